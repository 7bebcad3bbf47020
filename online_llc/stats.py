"""Pure statistics of one window of the shadow chain's draws (numpy only, no state).

Flow: training loop -> ShadowSampler (sgld kernel) -> WindowStats -> LLCFilter -> OnlineLLC
records -> callbacks. These are the numbers :class:`online_llc.window.WindowStats` computes when a
window closes, and the offline estimator (:func:`online_llc.estimate_llc`) over its chains' draws.

A sampler emits, once per shadow step and per chain ``c``, a pair ``(d, v)``::

    d = nbeta * mean_i( l_i(w + xi) - l_i(w) )        (the LLC observation)
    v = nbeta^2 * var_i( l_i(w + xi) - l_i(w) ) / |B|  (its within-batch noise variance)

Every ``W`` draws per chain form a window, summarised by :class:`WindowSummary`:

* ``mean``: the grand mean of ``d`` over the ``C x W`` draws;
* ``se``: its standard error, with the within-chain autocorrelation accounted for
  (chains are independent, draws within a chain are not)::

      se = sqrt( sum_c s2_c / ess_c ) / C

  where ``s2_c`` is chain c's variance and ``ess_c`` its effective sample size
  (:func:`effective_sample_size`);
* the Gamma channel. At equilibrium ``d`` is approximately Gamma with mean ``lambda*T`` and
  variance ``lambda*T^2`` plus batch noise of variance ``v``, so::

      var_channel = var(d) - mean(v)
      ratio       = mean(d)^2 / var_channel   (~ lambda, temperature-free)
      dispersion = var_channel / mean(d)     (~ T; ~1 for a well-tuned chain)

* the heat. Each draw comes with ``b``, how much the step's minibatch gradient noise raised the
  draw's expectation (measured from half-batch gradients, :mod:`online_llc.heat`), so::

      heat_bias = mean(b)
      heat      = mean(d) / (mean(d) - heat_bias)   (the minibatch temperature; 1 without heat)

``mean`` and ``se`` are never NaN; the diagnostics (``lag1``, ``var_draw``, ``var_channel``,
``ratio``, ``dispersion``) may be NaN where they are undefined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .errors import check_nonneg_int

__all__ = [
    "WindowSummary",
    "effective_sample_size",
    "mean_standard_error",
    "multichain_standard_error",
    "summarize",
]

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


@dataclass(frozen=True)
class WindowSummary:
    """Statistics of one window of draws (``C`` chains x ``W`` draws).

    Attributes:
        start_step: training step of the window's first draw.
        end_step: training step of the window's last draw.
        n_draws: ``C * W``.
        mean: grand mean of ``d``, the window's LLC observation. Never NaN.
        se: standard error of ``mean`` (autocorrelation-aware, see :func:`mean_standard_error`),
            including the ``var_of_mean_floor`` when one was given.
        se_window: the same from the window's own draws only (equal to ``se`` without a floor).
            Never NaN; ``inf`` only for a single draw.
        ess: total effective sample size, ``sum_c ess_c``.
        lag1: lag-1 autocorrelation pooled over chains (NaN if ``W < 2`` or the draws are
            constant).
        var_draw: variance of one draw ``d``, pooled over chains: the mean over chains of
            ``gamma_0 + Var(mean)`` (unbiased under autocorrelation, see ``_chain_moments``;
            the ddof=1 variance for independent draws). For ``W == 1`` the between-chain
            variance; NaN for a single draw.
        mean_noise_var: mean of ``v``, the within-batch noise variance of ``d``.
        var_channel: ``var_draw - mean_noise_var``; may be negative when batch noise dominates.
        ratio: ``mean**2 / var_channel`` (~ lambda); NaN when ``var_channel <= 0``.
        dispersion: ``var_channel / mean``; NaN when ``mean <= 0``. About ``T`` for independent
            Gamma draws, but a window of autocorrelated draws reads it low (0.4-1 on chains
            that were 1.1-2.3x hot), so the health signal is ``heat``.
        heat_bias: mean of the draws' measured heat bias ``b`` (0 when none was given).
        heat: ``mean / (mean - heat_bias)``, the minibatch temperature; NaN when
            ``mean <= heat_bias`` or no heat bias was given.
        diverged_draws: draws flagged as placeholders for a reset chain (see
            :meth:`online_llc.window.WindowStats.update`), over all chains (all ranks with
            ``gather``).
        warmup_draws: draws flagged as coming from a chain still warming up.
        dropped_draws: warm-up draws left out because the chains' trailing healthy draws
            covered at least half the window (the summary then describes those draws only).
    """

    start_step: int
    end_step: int
    n_draws: int
    mean: float
    se: float
    se_window: float
    ess: float
    lag1: float
    var_draw: float
    mean_noise_var: float
    var_channel: float
    ratio: float
    dispersion: float
    heat_bias: float = 0.0
    heat: float = math.nan
    diverged_draws: int = 0
    warmup_draws: int = 0
    dropped_draws: int = 0

    def to_dict(self) -> dict[str, int | float]:
        """The fields as a dict of plain Python ``int`` (steps, n_draws) and ``float`` values."""
        out: dict[str, int | float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            ints = ("start_step", "end_step", "n_draws", "diverged_draws", "warmup_draws")
            out[f.name] = int(value) if f.name in ints else float(value)
        return out


def summarize(
    draws: ArrayLike,
    noise_vars: ArrayLike,
    *,
    start_step: int = 0,
    end_step: int | None = None,
    var_of_mean_floor: ArrayLike | None = None,
    heat_biases: ArrayLike | None = None,
) -> WindowSummary:
    """Summarise one window of draws.

    Args:
        draws: LLC observations ``d``, shape ``[C, W]`` (a 1-D array is one chain), finite.
        noise_vars: their within-batch noise variances ``v``, same shape, finite and ``>= 0``.
        start_step: training step of the first draw.
        end_step: training step of the last draw; defaults to ``start_step + W - 1``.
        var_of_mean_floor: optional per-chain lower bound on the variance of each chain's
            window mean, shape ``[C]`` (see :class:`online_llc.window.WindowStats`'s ``horizon``:
            correlation slower than a window is invisible inside it).

    Returns:
        The :class:`WindowSummary` (see its attributes for every formula).

    Raises:
        ValueError: for non-finite or mismatched inputs, negative ``noise_vars``, or steps that
            are not non-negative ints with ``end_step >= start_step``.
    """
    d = _as_draws("draws", draws)
    v = _as_draws("noise_vars", noise_vars)
    if v.shape != d.shape:
        raise ValueError(
            f"Expected `noise_vars` to have the shape of `draws` {d.shape}, got {v.shape}."
        )
    if np.any(v < 0.0):
        raise ValueError(
            f"Expected `noise_vars` to be >= 0, got minimum {float(v.min())!r}."
        )
    start_step = check_nonneg_int("start_step", _plain_int(start_step))
    num_chains, width = d.shape
    if end_step is None:
        end_step = start_step + width - 1
    end_step = check_nonneg_int("end_step", _plain_int(end_step))
    if end_step < start_step:
        raise ValueError(
            f"Expected `end_step` to be >= start_step ({start_step}), got {end_step!r}."
        )

    moments = np.array([_chain_moments(row) for row in d])  # [C, 2]: s2_c, vm_c
    se_window = _standard_error_from(moments[:, 1], d)
    if var_of_mean_floor is not None:
        floor = np.asarray(var_of_mean_floor, dtype=np.float64).reshape(-1)
        if floor.shape != (num_chains,) or not np.all(np.isfinite(floor)) or np.any(floor < 0):
            raise ValueError(
                f"Expected `var_of_mean_floor` to be {num_chains} finite floats >= 0, got {var_of_mean_floor!r}."
            )
        moments[:, 1] = np.maximum(moments[:, 1], floor)
    mean = float(d.mean())
    se = _standard_error_from(moments[:, 1], d)

    if width >= 2:
        var_draw = float(moments[:, 0].mean())
        ess = float(sum(_ess(float(s2), float(vm), width) for s2, vm in moments))
        centered = d - d.mean(axis=1, keepdims=True)
        denom = float(np.sum(centered * centered))
        lag1 = float(np.sum(centered[:, :-1] * centered[:, 1:]) / denom) if denom > 0.0 else math.nan
    else:
        # One draw per chain: draws are independent across chains.
        var_draw = float(np.var(d[:, 0], ddof=1)) if num_chains >= 2 else math.nan
        ess = float(num_chains)
        lag1 = math.nan

    mean_noise_var = float(v.mean())
    var_channel = var_draw - mean_noise_var
    # The Gamma channel is undefined when batch noise swamps the chain's own spread
    # (var_channel <= 0) or when the LLC observation is not positive; NaN says so rather than
    # a huge or negative number that could be mistaken for a measurement.
    ratio = mean * mean / var_channel if var_channel > 0.0 else math.nan
    dispersion = var_channel / mean if mean > 0.0 else math.nan
    heat_bias, heat = 0.0, math.nan
    if heat_biases is not None:
        b = _as_draws("heat_biases", heat_biases)
        if b.shape != d.shape:
            raise ValueError(f"Expected `heat_biases` to have the shape of `draws` {d.shape}, got {b.shape}.")
        heat_bias = float(b.mean())
        # The same formula as online_llc.heat.heat_from (this module stays numpy-only).
        heat = mean / (mean - heat_bias) if mean - heat_bias > 0.0 else math.nan

    return WindowSummary(
        start_step=start_step,
        end_step=end_step,
        n_draws=int(d.size),
        mean=mean,
        se=float(se),
        se_window=float(se_window),
        ess=ess,
        lag1=lag1,
        var_draw=float(var_draw),
        mean_noise_var=mean_noise_var,
        var_channel=float(var_channel),
        ratio=float(ratio),
        dispersion=float(dispersion),
        heat_bias=heat_bias,
        heat=float(heat),
    )


def _plain_int(value: Any) -> Any:
    """numpy integers as Python ints (so the validators accept them); anything else unchanged."""
    if isinstance(value, np.integer):
        return int(value)
    return value

