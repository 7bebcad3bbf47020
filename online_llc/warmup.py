"""Data-driven warm-up: when has a chain's draw sequence reached equilibrium?

A chain starts at zero offset, where its draw ``d`` is about 0, and relaxes towards the local
posterior over a model-dependent number of steps (tens on a small reduced-rank regression, a few
hundred along the sloppy directions of a deep linear network); after the training weights jump
(a checkpoint reload, weight surgery, a switched teacher) its old offset overshoots or undershoots
the new level for a while. A fixed warm-up count is either wasteful or too short, so the monitor
decides from the draws themselves with MSER-5 (White 1997; Hoad, Robinson and Davies 2010, who
found it the most reliable of the published truncation rules). Over batch means ``b_1..b_B`` of 5
consecutive draws, the truncation point is::

    d* = argmin_{0 <= d <= B - tail}  sum_{j > d} (b_j - mean(b_{d+1..B}))^2 / (B - d)^2,

(``d`` up to ``B / 2``), the number of leading batches whose removal makes the standard error of
the remaining mean smallest: a trend inflates the spread, noise alone favours keeping more
batches. While the chain is still relaxing, ``d*`` sits at the latest allowed truncation (the
series is too short to show its end); once ``d*`` falls inside the first half, the second half
is one stationary stretch and the chain is declared equilibrated. Draws before that point are reported as warming up (they never reach the filter).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import numpy as np

from .errors import check_positive_int

__all__ = ["EquilibrationDetector", "mser_truncation"]

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


class EquilibrationDetector:
    """Decides, draw by draw, when one chain has equilibrated (see the module docstring).

    Args:
        min_draws: draws before the chain can be declared equilibrated (>= 1).
        max_draws: draws after which it is declared equilibrated regardless (>= ``min_draws``):
            bounds the memory (the draws since the restart are kept) and the time a chain
            that never settles, such as one that keeps following fast training, is blanked.
        tail: draws of stationary tail (after the transient) needed to declare equilibrium
            (a multiple of 5 is natural; >= 5).
    """

    def __init__(self, *, min_draws: int = 30, max_draws: int = 1000, tail: int = 30) -> None:
        self.min_draws = check_positive_int("min_draws", min_draws)
        self.max_draws = check_positive_int("max_draws", max_draws)
        if self.max_draws < self.min_draws:
            raise ValueError(f"Expected `max_draws` to be an int >= min_draws={min_draws}, got {max_draws!r}.")
        self.tail = check_positive_int("tail", tail)
        if self.tail < MSER_BATCH:
            raise ValueError(f"Expected `tail` to be an int >= {MSER_BATCH}, got {tail!r}.")
        self.restart()

    def restart(self, min_draws: int | None = None) -> None:
        """The chain starts over (at start, after a reset or after a jump of the weights);
        ``min_draws`` replaces the constructor's floor for this warm-up only."""
        self._min = self.min_draws if min_draws is None else check_positive_int("min_draws", min_draws)
        self.draws: List[List[float]] = []
        self.equilibrated = False
        #: Draws the last warm-up took (``None`` while warming up).
        self.warmup_length: int | None = None

    def add(self, *stats: float) -> bool:
        """Record one step's statistics (the draw, and any slow variable of the chain such as its
        squared offset norm); return whether it is still a warm-up step. Equilibrium needs every
        statistic to have settled."""
        if self.equilibrated:
            return False
        self.draws.append([float(v) for v in stats])
        k = len(self.draws)
        if k >= self.max_draws or (k >= self._min and self._settled()):
            self.equilibrated, self.warmup_length, self.draws = True, k, []
        return True

    def _settled(self) -> bool:
        n_batches = len(self.draws) // MSER_BATCH
        if n_batches < 2 * max(self.tail // MSER_BATCH, 1):
            return False
        # Settled when MSER's cut is interior for every statistic: it would keep more than the
        # second half.
        x = np.asarray(self.draws)
        return all(mser_truncation(x[:, j]) // MSER_BATCH < n_batches // 2 for j in range(x.shape[1]))

    def state_dict(self) -> Dict[str, Any]:
        """Plain Python values."""
        return {
            "draws": list(self.draws),
            "equilibrated": self.equilibrated,
            "warmup_length": self.warmup_length,
            "min_draws": self._min,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.draws = [[float(v) for v in row] for row in state["draws"]]
        self._min = int(state.get("min_draws", self.min_draws))
        self.equilibrated = bool(state["equilibrated"])
        w = state.get("warmup_length")
        self.warmup_length = None if w is None else int(w)
