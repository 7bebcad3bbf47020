"""The minibatch heat of the sampler, measured from two half-batch gradients at no extra cost.

Where it sits: the kernel (:mod:`online_llc.kernel.step`) computes its minibatch gradient as the mean of
the gradients of the batch's two halves; the batch is split by :func:`online_llc.kernel.halves.split_halves`; this module turns the halves'
difference into the heat the step adds to the draw (:mod:`online_llc.calibration.step` sizes the step on it).

With a batch of ``B`` samples, SGLD's gradient noise adds ``(epsilon / 2)^2 nbeta^2 C / B`` (``C``
the per-sample gradient covariance) to the injected ``epsilon I``. Along a direction ``j`` of
curvature ``a_j = nbeta h_j + gamma`` the chain's variance is ``T_j / a_j`` with
``T_j = 1 + epsilon nbeta^2 C_jj / (4 B)``, so the draw's expectation rises by::

    heat_bias = sum_j (nbeta h_j / a_j) * epsilon nbeta^2 C_jj / (8 B)  <=  epsilon nbeta^2 tr(C) / (8 B).

The halves' gradients ``g1, g2`` (``B1 + B2 = B`` samples) have ``E||g1 - g2||^2 = tr(C) (1/B1 + 1/B2)``,
an unbiased measurement of ``tr(C) / B = ||g1 - g2||^2 B1 B2 / B^2`` from every step. The reported
``heat_bias`` takes every direction at its full share (``nbeta h_j >> gamma``), so it is an upper
bound that is tight for the directions that carry the draw. The heat of a window or a run is::

    heat = mean(d) / (mean(d) - heat_bias)       (T of the minibatch noise alone; NaN when undefined)

Variants: SGHMC with friction ``alpha`` heats by ``1 / alpha`` as much (its momentum integrates the
noise), RMSProp-SGLD by the preconditioner ``G_j`` per coordinate.

The discretization heat ``1 / (1 - epsilon a_j / 4)`` of a finite step is not in ``heat``; it is
measured separately from consecutive steps (offline, and by the monitor's chains). With ``u_t = xi_{t+1} - xi_t`` and ``g_t``
the batch gradient at ``xi_t``, a Taylor step gives ``E[u_t . (g_{t+1} - g_t)] = epsilon tr(H)``
plus, because ``u_t`` carries ``-(epsilon / 2) nbeta`` times ``g_t``'s own noise,
``(epsilon / 2) nbeta tr(C) / B``. On a quadratic loss the draw's expectation rises by
``epsilon nbeta tr(H) / 8`` to first order (every direction, stiff or not), so::

    discretization_bias = nbeta E[u_t . (g_{t+1} - g_t)] / 8 - heat_bias / 2.

It is exact to first order on a quadratic loss; more than that, it carries the product of the two
heats. Along a direction of stiffness ``a_j`` the chain is an AR(1) with draw
``m_j = s_j (1 + x_j) / (2 (1 - delta_j))`` (``x_j`` the minibatch heat, ``delta_j = epsilon a_j / 4``,
``s_j = nbeta h_j / a_j``), and the measurement above reads ``delta_j m_j`` exactly, so
``m_j - heat_bias_j - discretization_bias_j = s_j / 2`` when ``s_j = 1``: the total heat
``mean / (mean - heat_bias - discretization_bias)`` (``LLCResult.total_heat``) is then exact at
any heat, for independent batches. At gross heat it is a ratio of two nearly equal noisy figures,
so its interval (:func:`heat_interval`) widens and its upper end reaches ``inf``. Shuffled epochs
add a bias no measurement here sees (:class:`online_llc.models.toy.RandomBatches`): 7% at heat 1.35,
within the standard errors at the calibrated defaults. On dln[4, 12, 12, 12, 4] r=2 (full batch, nbeta
256) it read 4.7 / 2.5 / 0.68 / 0.43 / 0.24 against excesses of 4.1 / 2.1 / 0.06 / 0.02 / 0.00
at steps 1, 1/2, 1/4, 1/8, 1/16 of the largest default: close where the excess is gross,
several times high where it is small (so a step calibrated on it errs small there). Offline, the
step is calibrated on the sum of the two biases (:func:`online_llc.estimate_llc`); online, a step
whose pooled total heat is gross is cooled on it (:class:`online_llc.monitor.track.Track`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Tuple

import numpy as np

from online_llc.stats.draws import heat_ratio

__all__ = [
    "pooled_heat",
    "heat_interval",
    "per_step_bias",
    "discretization_bias",
    "discretization_term",
]


def pooled_heat(means: Iterable[float], heat_biases: Iterable[float]) -> float:
    """The heat of several windows together, ``sum(mean) / sum(mean - heat_bias)``.

    Pooling the sums (rather than averaging the windows' heats) keeps one noisy window with a
    small mean from dominating. NaN for no windows; otherwise :func:`~online_llc.stats.draws.heat_ratio`
    of the sums.
    """
    means, heat_biases = list(means), list(heat_biases)
    if not means:
        return math.nan
    return heat_ratio(sum(means), sum(heat_biases))


def discretization_term(next_prev_dot: Any, own_dot: Any, heat_bias: Any) -> Any:
    """One step's term of :func:`discretization_bias`, ``(p_{t+1} - u_t) / 8 - b_t / 2``, from the
    next step's ``prev_update_dot_grad`` and this step's ``update_dot_grad`` and ``heat_bias``
    (floats or arrays of them, elementwise; the monitor's chains report it per step)."""
    return (next_prev_dot - own_dot) / 8.0 - heat_bias / 2.0


def discretization_bias(prev_update_dot_grad: np.ndarray, update_dot_grad: np.ndarray, heat_bias: np.ndarray) -> float:
    """The first-order discretization bias of consecutive draws of one chain, in LLC units.

    Args:
        prev_update_dot_grad, update_dot_grad, heat_bias: per step, the :class:`~online_llc.kernel.step.SGLDInfo`
            fields of the same names (steps in order, one chain, one step size).

    Returns:
        ``mean_t(prev_update_dot_grad[t + 1] - update_dot_grad[t]) / 8 - mean_t(heat_bias[t]) / 2``
        over the steps where both are measured (see the module docstring); NaN with fewer than
        two such steps.
    """
    prev = np.asarray(prev_update_dot_grad, dtype=np.float64)[1:]
    own = np.asarray(update_dot_grad, dtype=np.float64)[:-1]
    hb = np.asarray(heat_bias, dtype=np.float64)[:-1]
    ok = np.isfinite(prev) & np.isfinite(own) & np.isfinite(hb)
    if int(ok.sum()) < 2:
        return math.nan
    return float(discretization_term(prev[ok], own[ok], hb[ok]).mean())





def per_step_bias(prev_update_dot_grad: np.ndarray, update_dot_grad: np.ndarray, heat_bias: np.ndarray) -> np.ndarray:
    """The combined (minibatch and discretization) bias per step of one chain's stretch:
    ``hb_t / 2 + (p_{t+1} - u_t) / 8`` (its mean is ``heat_bias + discretization_bias``,
    :func:`discretization_bias`), or ``hb_t`` where the update products are not measured (the last
    step, SGHMC)."""
    hb = np.asarray(heat_bias, dtype=np.float64)
    prev = np.asarray(prev_update_dot_grad, dtype=np.float64)
    own = np.asarray(update_dot_grad, dtype=np.float64)
    out = hb.copy()
    nxt = np.append(prev[1:], np.nan)
    ok = np.isfinite(nxt) & np.isfinite(own)
    out[ok] = hb[ok] / 2.0 + (nxt[ok] - own[ok]) / 8.0
    return out


def bias_interval(
    draws: np.ndarray, prev_update_dot_grad: np.ndarray, update_dot_grad: np.ndarray, heat_bias: np.ndarray,
    z: float = 2.0, batches: int = 10,
) -> Tuple[float, float, float]:
    """``(heat, heat_low, heat_high)`` of one chain's stretch, counting the minibatch and the
    discretization bias together (:func:`per_step_bias`), with ``z`` batch-means standard errors of
    the bias and of the mean either side; for calibration.

    ``batches`` batch means of the bias and of the draws give the standard errors (consecutive
    steps are correlated; batch means of a few relaxation-free stretches are the cheap honest
    choice here). The interval is NaN-free only where the corrected mean stays positive:
    ``heat_low`` uses the low bias and the high mean, ``heat_high`` the high bias and the low mean
    (NaN when that is not positive: undecided, so calibration leaves the step alone).
    """
    d = np.asarray(draws, dtype=np.float64)
    per_step = per_step_bias(prev_update_dot_grad, update_dot_grad, heat_bias)
    keep = np.isfinite(per_step) & np.isfinite(d)
    d, per_step = d[keep], per_step[keep]
    if d.size < 2 * batches:
        return math.nan, math.nan, math.nan
    (m, m_se), (b, b_se) = _batch_mean_se(d[None], batches), _batch_mean_se(per_step[None], batches)
    return heat_ratio(m, b), heat_ratio(m + z * m_se, b - z * b_se), heat_ratio(m - z * m_se, b + z * b_se)


def heat_interval(draws: np.ndarray, biases: np.ndarray, z: float = 2.0, batches: int = 10) -> Tuple[float, float, float]:
    """``(heat, low, high)`` of chains' draws ``[C, D]`` and their per-step biases ``[C, D]``
    (:func:`per_step_bias`), as reported to the user.

    The standard errors come from ``batches`` batch means per chain, pooled over the chains.
    Near heat 1 the interval is narrow; at gross heat ``mean / (mean - bias)`` divides by a small
    difference of two noisy figures, so it widens fast and its upper end becomes ``inf`` (the
    bias may take the whole mean): the point then reads within a factor of the truth, the lower
    end still bounds it. All NaN when the draws' mean is not clearly positive (``mean - z se <= 0``,
    no LLC to compare the heat with) or too few steps are measured.
    """
    d = np.atleast_2d(np.asarray(draws, dtype=np.float64))
    b = np.atleast_2d(np.asarray(biases, dtype=np.float64))
    if d.shape != b.shape or d.shape[1] < 2 * batches or not (np.isfinite(d).all() and np.isfinite(b).all()):
        return math.nan, math.nan, math.nan
    (m, m_se), (bias, b_se) = _batch_mean_se(d, batches), _batch_mean_se(b, batches)
    if m - z * m_se <= 0:
        return math.nan, math.nan, math.nan
    return (
        heat_ratio(m, bias),
        heat_ratio(m + z * m_se, bias - z * b_se),
        heat_ratio(m - z * m_se, bias + z * b_se),
    )


def _batch_mean_se(x: np.ndarray, batches: int) -> Tuple[float, float]:
    """Mean of ``x`` ``[C, D]`` and its standard error from ``batches`` batch means per row."""
    size = x.shape[1] // batches
    means = x[:, : size * batches].reshape(x.shape[0] * batches, size).mean(axis=1)
    return float(x.mean()), float(means.std(ddof=1) / math.sqrt(means.size))
