"""Pure statistics of one window of the shadow chain's draws (numpy only, no state).

Flow: training loop -> ShadowSampler (sgld kernel) -> WindowStats -> LLCFilter -> OnlineLLC
records -> callbacks. These are the numbers :class:`online_llc.monitor.window.WindowStats` computes when a
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
  draw's expectation (measured from half-batch gradients, :mod:`online_llc.calibration.heat`), so::

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

from online_llc.errors import check_nonneg_int
from online_llc.stats.mcse import (
    _as_draws,
    _chain_moments,
    _ess,
    _standard_error_from,
)

__all__ = ["WindowSummary", "heat_ratio", "summarize"]


def heat_ratio(mean: float, bias: float) -> float:
    """The heat of draws whose mean is ``mean`` and whose measured bias is ``bias``::

        heat = mean / (mean - bias)

    the one heat ratio of the package (windows, pooled windows, offline runs, their intervals).
    ``inf`` where the bias takes the whole of a positive ``mean`` (the chain is hotter than the
    measurement can resolve); NaN where there is no positive, finite ``mean`` to compare the bias
    with, or the bias is not finite.
    """
    if not (math.isfinite(mean) and math.isfinite(bias)) or mean <= 0:
        return math.nan
    return mean / (mean - bias) if mean - bias > 0 else math.inf


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
        heat: ``mean / (mean - heat_bias)``, the minibatch temperature; ``inf`` when
            ``0 < mean <= heat_bias`` (hotter than the window can measure), NaN when
            ``mean <= 0`` or no heat bias was given.
        diverged_draws: draws flagged as placeholders for a reset chain (see
            :meth:`online_llc.monitor.window.WindowStats.update`), over all chains (all ranks with
            ``gather``).
        warmup_draws: draws flagged as coming from a chain still warming up.
        dropped_draws: warm-up draws left out because the chains' trailing healthy draws
            covered at least half the window (the summary then describes those draws only).
        offset_norm: mean of the draws' chain offset norms ``||xi||``, reset placeholders left
            out, over all chains (all ranks with ``gather``, so the same on every rank); NaN when
            no norm was given. The weight-jump detector's measure of the chains' spread.
        discretization_bias: mean of the draws' measured discretization bias (how much the
            step's finite size raised them, :mod:`online_llc.calibration.heat`), placeholders and unmeasured
            draws left out; NaN when none was measured.
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
    offset_norm: float = math.nan
    discretization_bias: float = math.nan

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
            window mean, shape ``[C]`` (see :class:`online_llc.monitor.window.WindowStats`'s ``horizon``:
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
        heat = heat_ratio(mean, heat_bias)

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

