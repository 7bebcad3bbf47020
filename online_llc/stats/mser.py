"""MSER truncation: where a series' initial transient ends, and whether it has ended.

MSER-5 (White 1997; Hoad, Robinson and Davies 2010, who found it the most reliable of the
published truncation rules): over batch means ``b_1..b_B`` of 5 consecutive draws, the truncation
point is::

    d* = argmin_{0 <= d <= B / 2}  sum_{j > d} (b_j - mean(b_{d+1..B}))^2 / (B - d)^2,

the number of leading batches whose removal makes the standard error of the remaining mean
smallest: a trend inflates the spread, noise alone favours keeping more batches. While a chain
is still relaxing, ``d*`` sits at the latest allowed truncation (the series is too short to show
its end); once ``d*`` falls inside the first half, the second half is one stationary stretch.
The online warm-up (:mod:`online_llc.monitor.warmup`) and the offline burn-in
(:func:`online_llc.estimate_llc`) both decide with :func:`settled`.
"""

from __future__ import annotations

from typing import List

import numpy as np

__all__ = ["MSER_BATCH", "mser_truncation", "settled"]

#: Draws per batch mean (the "5" of MSER-5: damps the draw-to-draw noise of the statistic).
MSER_BATCH = 5


def mser_truncation(x: np.ndarray | List[float], *, batch: int = MSER_BATCH, max_cut: int | None = None) -> int:
    """MSER truncation point of ``x``, in draws (a multiple of ``batch``).

    Args:
        x: the draws, oldest first (a partial last batch is ignored).
        batch: draws per batch mean.
        max_cut: the most batches that may be cut (default: half of them, the usual MSER rule).

    Returns:
        ``batch * d*``, with ``d*`` the argmin over ``0 <= d <= max_cut`` of the module
        docstring's criterion (0 when ``x`` has fewer than two whole batches).
    """
    n_batches = len(x) // batch
    if n_batches < 2:
        return 0
    max_cut = n_batches // 2 if max_cut is None else min(max_cut, n_batches - 1)
    b = np.asarray(x[: n_batches * batch], dtype=float).reshape(n_batches, batch).mean(axis=1)
    # Suffix sums give every candidate's tail mean and sum of squares in one pass.
    s1 = np.cumsum(b[::-1])[::-1]
    s2 = np.cumsum((b * b)[::-1])[::-1]
    d = np.arange(max_cut + 1)
    m = n_batches - d
    sse = s2[d] - s1[d] ** 2 / m
    return int(batch * np.argmin(sse / m**2))


def settled(series: np.ndarray) -> bool:
    """Whether every column of ``series`` (``[draws, statistics]``, oldest first: the draw and
    slow variables of a chain such as its squared offset norm) has a stationary second half: its
    MSER truncation point lies inside the first half (interior, so it would keep more than the
    second half). False for fewer than two whole batches."""
    x = np.asarray(series, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    n_batches = x.shape[0] // MSER_BATCH
    if n_batches < 2:
        return False
    return all(mser_truncation(x[:, j]) // MSER_BATCH < n_batches // 2 for j in range(x.shape[1]))
