"""Monte Carlo standard errors of autocorrelated chains (numpy only, no state).

The uncertainty half of :mod:`online_llc.stats.draws`: the effective sample size of one chain
(Geyer's initial monotone sequence, with a finite-sample correction), the standard error of the
grand mean of independent chains from their own autocorrelations, and the multi-chain version
that also counts the chains' disagreement. Windows (:class:`online_llc.monitor.window.WindowStats`) and
the offline estimator (:func:`online_llc.estimate_llc`) both use them.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["effective_sample_size", "mean_standard_error", "multichain_standard_error"]

# Below this many draws a chain's autocorrelation cannot be estimated at all (Geyer's sequence
# would hold one or two noisy pairs); such chains are treated as independent draws. This is
# anti-conservative for correlated chains, which is why windows should be >> the correlation time.
_MIN_DRAWS_FOR_ACF = 8


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Biased (1/n) autocovariances ``gamma_k``, k = 0..n-1, of a 1-D series, via FFT."""
    n = x.shape[0]
    centered = x - x.mean()
    # Zero-pad to >= 2n so the circular correlation equals the linear one.
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(centered, size)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), size)[:n] / n
    return acov


def _chain_moments(x: np.ndarray) -> tuple[float, float]:
    """Variance of one chain's draws and the variance of its mean.

    Returns ``(s2, vm)``: ``s2`` estimates the stationary variance of a draw and ``vm`` the
    variance of the chain's sample mean, with ``1 <= s2 / vm <= n`` (``s2 / vm`` is the ESS).
    For ``n == 1`` returns ``(nan, nan)``; for a constant chain ``(0.0, 0.0)``.

    Method (Geyer 1992, initial monotone sequence). With ``gamma_k`` the 1/n autocovariances and
    pair sums ``G_m = gamma_{2m} + gamma_{2m+1}``, keep ``G_0..G_{M-1}`` up to the first
    non-positive one, make them non-increasing, and set::

        sigma2 = -gamma_0 + 2 * sum_{m<M} G_m      (asymptotic variance, n * Var(mean))
        vm     = sigma2 / max(n - 2M, n/2)
        s2     = gamma_0 + vm
    """
    n = x.shape[0]
    if n == 1:
        return math.nan, math.nan
    acov = _autocovariance(x)
    gamma0 = float(acov[0])
    if not gamma0 > 0.0:
        # Constant chain: no spread, no uncertainty about its mean.
        return 0.0, 0.0
    if n < _MIN_DRAWS_FOR_ACF:
        # Independent-draws fallback: s2 is the ddof=1 variance, vm = s2 / n, ESS = n.
        vm = gamma0 / (n - 1)
        return gamma0 + vm, vm

    num_pairs = n // 2
    pairs = acov[0 : 2 * num_pairs : 2] + acov[1 : 2 * num_pairs : 2]
    non_positive = np.flatnonzero(pairs <= 0.0)
    num_kept = int(non_positive[0]) if non_positive.size else num_pairs
    kept = np.minimum.accumulate(pairs[:num_kept])
    sigma2 = max(-gamma0 + 2.0 * float(kept.sum()), 0.0)

    # Why not sigma2 / n: the centred autocovariances sum to exactly zero over all lags, so each
    # gamma_k is biased down by about Var(mean) and a sum over the 2M lags 0..2M-1 (each counted
    # twice but gamma_0) loses about (4M - 1) Var(mean). Undoing the full amount over-corrects,
    # because the adaptive cut-off M is placed where the noise happened to be positive, and
    # those lags are biased up. Dividing by n - 2M undoes about half of it (a calibration, not
    # a theorem). Simulated AR(1) windows of n = 200 (20 seeds x 1000 windows, 1 and 2 chains)
    # put mean(vm) at +13..+16% of the exact Var(mean) for independent draws (Geyer keeps
    # positive noise pairs; the ESS <= n clip below adds ~4 points), +5..+9% at phi = 0.5 and
    # -10..-2% at phi = 0.9 (n ~ 10 tau), where plain sigma2 / n is ~20% low. Shorter windows
    # are worse: -22% at n = 5 tau. See tests/test_window.py.
    # The n/2 floor caps the correction at 2x for chains that barely decorrelate.
    vm = sigma2 / max(n - 2 * num_kept, n / 2)
    # Clip so that ESS = s2 / vm <= n: never report less uncertainty than for independent draws
    # (antithetic chains could otherwise claim ESS > n on noise).
    vm = max(vm, gamma0 / (n - 1))
    # E[gamma_0] = Var(draw) - Var(mean) exactly for a stationary series, so adding vm back gives
    # an (approximately) unbiased variance of a draw; for independent draws it is the ddof=1
    # variance up to O(1/n^2).
    s2 = gamma0 + vm
    return s2, vm


def _ess(s2: float, vm: float, n: int) -> float:
    """ESS ``s2 / vm`` clipped to ``[1, n]``; ``n`` when the mean is known exactly (``vm == 0``)."""
    if not vm > 0.0:
        return float(n)
    return float(min(max(s2 / vm, 1.0), n))


def _as_draws(name: str, values: ArrayLike) -> np.ndarray:
    """``values`` as a finite float64 array of shape [C, W] (a 1-D input is one chain)."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"Expected `{name}` to be a numeric array of shape [chains, draws], got {values!r}."
        ) from None
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(
            f"Expected `{name}` to be a non-empty array of shape [chains, draws], "
            f"got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"Expected `{name}` to be finite, got {int(np.sum(~np.isfinite(arr)))} non-finite "
            "value(s). Filter out non-finite draws (diverged chains) before computing statistics."
        )
    return arr


def effective_sample_size(x: ArrayLike) -> float:
    """Effective sample size of one chain's draws.

    ``ESS = n / tau`` with ``tau`` the integrated autocorrelation time, estimated by Geyer's
    initial monotone sequence (see ``_chain_moments`` for the finite-sample correction), and
    clipped to ``[1, n]``. A constant chain has ``ESS = n``; a chain shorter than 8 draws is
    treated as independent (``ESS = n``): its autocorrelation cannot be estimated.

    Args:
        x: the chain's draws, 1-D, finite, in sampling order.

    Returns:
        The ESS as a float in ``[1, len(x)]``.

    Raises:
        ValueError: if ``x`` is not a non-empty, finite 1-D array.
    """
    arr = _as_draws("x", x)
    if np.ndim(x) != 1:
        raise ValueError(f"Expected `x` to be a 1-D array (one chain), got shape {np.shape(x)}.")
    arr = arr[0]
    s2, vm = _chain_moments(arr)
    return _ess(s2, vm, arr.shape[0])


def _standard_error_from(chain_vm: np.ndarray, draws: np.ndarray) -> float:
    """se of the grand mean from per-chain ``Var(mean)``s, with the one-draw-per-chain fallback."""
    num_chains, width = draws.shape
    if width >= 2:
        return float(math.sqrt(float(chain_vm.sum())) / num_chains)
    # One draw per chain: nothing within a chain to go on, but chains are independent, so the
    # spread between them is an honest (if noisy) estimate of a draw's variance.
    if num_chains >= 2:
        return float(math.sqrt(float(np.var(draws[:, 0], ddof=1)) / num_chains))
    # A single draw says nothing about its own uncertainty: an infinite se tells a filter to
    # ignore the observation, which is the truthful answer (NaN is never returned for se).
    return math.inf


def mean_standard_error(draws: ArrayLike) -> float:
    """Standard error of the grand mean of ``C`` independent, autocorrelated chains.

    ``se = sqrt( sum_c s2_c / ess_c ) / C``, where ``s2_c / ess_c`` is chain c's estimated
    variance of its own mean (Geyer's initial monotone sequence, see :func:`effective_sample_size`).
    This is not the naive ``std / sqrt(C * W)``, which for lag-1 autocorrelation 0.9 is about
    ``sqrt(19)`` ~ 4.4x too small.

    With one draw per chain (``W == 1``) the between-chain spread is used
    (``std(ddof=1) / sqrt(C)``); with a single draw in all, ``se`` is ``inf``.

    Args:
        draws: array of shape ``[C, W]`` (C chains, W consecutive draws each); a 1-D array is
            one chain.

    Returns:
        The standard error as a float (never NaN; ``0.0`` for constant chains).

    Raises:
        ValueError: if ``draws`` is empty, not 1-D/2-D, or not finite.
    """
    arr = _as_draws("draws", draws)
    chain_vm = np.array([_chain_moments(row)[1] for row in arr])
    return _standard_error_from(chain_vm, arr)


def multichain_standard_error(draws: ArrayLike) -> float:
    """Standard error of the grand mean that also counts the chains' disagreement.

    :func:`mean_standard_error` reads each chain's autocorrelation from that chain alone; when a
    run covers only a few correlation times of its slowest component (the flat directions of a
    singular model relax over ``2 / (epsilon gamma)`` steps) every chain under-reads it, and so
    does the sum. Here the autocorrelations are measured against the pooled variance, which
    includes the spread of the chain means (Gelman et al., BDA3 section 11.5; Vehtari et al.
    2021, without rank normalisation, since the mean is the target)::

        W = mean_c s2_c,   var+ = (n - 1) / n W + var_c(mean_c)
        rho_t = 1 - (W - mean_c gamma_{c,t}) / var+
        tau = -1 + 2 sum_t rho_t     (Geyer's initial monotone sequence on pairs)
        se = sqrt(var+ tau / (C n))

    and the larger of this and :func:`mean_standard_error` is returned: with chains that agree the
    two match, and chains that disagree by more than their own autocorrelation allows raise it.

    Args:
        draws: array of shape ``[C, W]``; with one chain this is :func:`mean_standard_error`.

    Returns:
        The standard error as a float (``0.0`` for constant draws).
    """
    arr = _as_draws("draws", draws)
    within = mean_standard_error(arr)
    num_chains, n = arr.shape
    if num_chains < 2 or n < _MIN_DRAWS_FOR_ACF:
        return within
    acov = np.stack([_autocovariance(row) for row in arr])
    chain_var = acov[:, 0] * n / (n - 1)
    mean_var = float(chain_var.mean())
    var_plus = mean_var * (n - 1) / n + float(np.var(arr.mean(axis=1), ddof=1))
    if not var_plus > 0.0:
        return within
    rho = 1.0 - (mean_var - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    num_pairs = n // 2
    pairs = rho[0 : 2 * num_pairs : 2] + rho[1 : 2 * num_pairs : 2]
    non_positive = np.flatnonzero(pairs <= 0.0)
    num_kept = int(non_positive[0]) if non_positive.size else num_pairs
    tau = max(-1.0 + 2.0 * float(np.minimum.accumulate(pairs[:num_kept]).sum()), 1.0)
    return max(within, math.sqrt(var_plus * tau / (num_chains * n)))


