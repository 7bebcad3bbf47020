"""The offline estimator's automatic sampling budget: burn-in and draws per chain.

Flow: :func:`online_llc.estimate_llc` asks here, once its step is calibrated, how long to burn in
and how many draws to keep. Both are counted in steps, capped in samples (see
:data:`online_llc.offline.estimate.CAP_BATCH`): at a fixed heat the step, and so every direction's
relaxation in steps, scales with the batch size, so small batches take more, cheaper steps.

* ``burn_in`` and ``num_draws`` (offline): the burn-in is two relaxation times of the slowest
  direction (:data:`online_llc.calibration.budget.BURN_IN_RELAXATIONS`), at least 500 steps: the
  smaller of the localization's bound ``2 / (epsilon gamma)`` (a flat direction) and the bound
  measured from the chain's spread, ``2 mean(||xi||^2) / epsilon`` (:func:`spread_relaxation`;
  a regular model relaxes in tens of steps where the localization's bound says thousands); the draws are 1000 times ``0.08 / (nbeta epsilon)``, the factor by which
  calibration shortened the step (every direction relaxes that much more slowly), and at least
  one relaxation time (the flat directions mix over it). At a fixed heat ``epsilon`` is
  proportional to ``B``, so small batches take more, cheaper steps: the samples seen are about
  the same at every batch size.
  The draws are then doubled while the multi-chain standard error is above
  :data:`DEFAULT_PRECISION` (5%) of the estimate, up to 50000 per chain: a model whose LLC lives in
  flat directions (a normal crossing ``w1^2 w2^2`` with lambda 1/2, read 0.24 at nbeta 256)
  showed a standard error of 35% after 1000 draws x 4 chains and 6% after 20000
  (``benchmarks/known_lambda.py --part crossings``); the deep linear networks meet 5% at once.
  A calibration round acts only when two standard errors of its heat agree on the direction:
  a chain that has not yet spread from ``w*`` has a tiny mean, and its heat is then mostly
  noise (``w1^2 w2^4`` read 2.3 there, and the step was cut 8x for nothing).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from online_llc.calibration.step import DEFAULT_STEP_SCALE, relaxation_steps

__all__ = [
    "DEFAULT_BURN_IN",
    "DEFAULT_NUM_DRAWS",
    "DEFAULT_PRECISION",
    "BURN_IN_RELAXATIONS",
    "resolve_burn_in",
    "resolve_num_draws",
    "scaled_cap",
    "spread_relaxation",
    "next_burn_in",
]

DEFAULT_NUM_DRAWS: int = 1000
#: Offline: the relative standard error the automatic draw count aims for (draws are doubled
#: until it is reached or the cap is). 5% keeps two standard errors within the 10% the
#: known-lambda suite aims for.
DEFAULT_PRECISION: float = 0.05
DEFAULT_BURN_IN: int = 500
#: The automatic burn-in, in relaxation times ``2 / (epsilon gamma)`` of the slowest direction.
#: A chain starts at ``w*`` with no spread; the spread of a localization-bound direction closes its
#: gap as ``exp(-epsilon gamma t)``, so after one relaxation time 13.5% of it is left and after two
#: 1.8%. Measured on dln[6, 6, 6] r=2 (n = 1e5, batch 256, localization 3.2, 4 chains): the draws
#: read 0.922, 0.965, 0.980 and 0.974 lambda over the four successive half relaxation times after
#: one relaxation time of burn-in, so one left the estimate several percent low.
BURN_IN_RELAXATIONS = 2


def scaled_cap(steps: int, batch_size: int, cap_batch: int) -> int:
    """A cap of ``steps`` steps of ``cap_batch`` samples, in steps of ``batch_size`` samples (never
    fewer than ``steps``)."""
    return int(steps * max(1.0, cap_batch / batch_size))


def spread_relaxation(offset_sq: Sequence[float], config: Any) -> float:
    """A measured bound on the slowest direction's relaxation time: ``2 mean(||xi||^2) / epsilon``
    over a stretch of one SGLD chain (``inf`` for the other samplers, where it is not a bound).

    Near ``w*`` the localized posterior is Gaussian with curvatures ``k_j = nbeta h_j + gamma``;
    direction ``j`` relaxes over ``2 / (epsilon k_j)`` steps (its mean; its variance closes its gap as
    ``exp(-epsilon k_j t)``) and holds variance ``1 / k_j``, so the slowest one relaxes over at most
    ``sum_j 2 / (epsilon k_j) = 2 E||xi||^2 / epsilon`` steps. The localization's bound
    ``2 / (epsilon gamma)`` (:func:`~online_llc.calibration.step.relaxation_steps`) assumes a flat
    direction; a model without one (a regular model, tight around ``w*``) relaxes far sooner, and
    a model with one spreads wide, so this bound then exceeds that one.

    Measured on a chain still relaxing, it ends the burn-in only where it should: direction ``j``
    holds variance ``(1 - exp(-epsilon k_j t)) / k_j`` at step ``t``, so ``t`` at least
    :data:`BURN_IN_RELAXATIONS` such bounds, ``4 mean(||xi||^2) / epsilon``, implies
    ``epsilon k_j t >= 4 (1 - exp(-epsilon k_j t))``, that is ``epsilon k_j t >= 3.92``: every
    direction's variance is within 2% of its end, as after two of the localization's relaxation
    times. (The mean is taken over the stretch's last quarter, a little below its value at ``t``;
    the minibatch heat raises it, a longer and safer bound.)
    """
    if config.sampler != "sgld" or len(offset_sq) == 0:
        return math.inf
    return 2.0 * float(np.mean(offset_sq)) / config.step_size


def resolve_burn_in(
    burn_in: Optional[int], config: Any, cap: int, relax: float = math.inf, warn: bool = True,
) -> int:
    """``burn_in``, or :data:`BURN_IN_RELAXATIONS` relaxation times of the slowest direction, the
    smaller of ``2 / (epsilon gamma)`` and the measured ``relax`` (:func:`spread_relaxation`), at
    least ``DEFAULT_BURN_IN`` steps and at most ``cap`` (with a warning, when ``warn``, where that
    is shorter)."""
    if burn_in is not None:
        return burn_in
    relax = min(relaxation_steps(config), relax)
    needed = BURN_IN_RELAXATIONS * relax
    if needed > cap and warn:
        why = (
            f"the localization-bound directions relax over {relax:.0f} steps at step_size {config.step_size:.3g} and "
            f"the burn-in needs {needed:.0f} ({BURN_IN_RELAXATIONS} relaxation times)"
            if math.isfinite(needed)
            else "without localization (localization=0) no bound limits how slowly a flat direction relaxes"
        )
        warnings.warn(
            f"estimate_llc: {why}; it stops at {cap}, so the estimate may read low. Pass burn_in= for more, or use "
            "larger batches (the step, and so the relaxation, scales with the batch size).",
            RuntimeWarning,
            stacklevel=3,
        )
    # min before ceil: without localization (gamma = 0) the bound is infinite and the cap binds.
    return int(max(DEFAULT_BURN_IN, math.ceil(min(needed, cap))))


def next_burn_in(offset_sq: Sequence[float], config: Any, cap: int) -> Tuple[Optional[int], float]:
    """Whether the automatic burn-in may end after the ``len(offset_sq)`` steps run so far, from
    the chain's squared offsets ``||xi||^2`` over them: ``(None, relax)`` when it may, else
    ``(steps, relax)`` with the length to run to next. ``relax`` is the measured relaxation
    (:func:`spread_relaxation` over the last quarter). The burn-in ends once it is
    :data:`BURN_IN_RELAXATIONS` times ``relax``, or at the localization's bound (capped at ``cap``,
    :func:`resolve_burn_in`), whichever comes first, and never before :data:`DEFAULT_BURN_IN`
    steps; it grows by at least a quarter per check, so it ends after a few checks."""
    done = len(offset_sq)
    relax = spread_relaxation(np.asarray(offset_sq)[3 * done // 4 :], config)
    if done < DEFAULT_BURN_IN:
        return DEFAULT_BURN_IN, relax
    # The measured need never exceeds the localization's bound (resolve_burn_in takes the smaller
    # relaxation), so reaching that bound ends the burn-in too.
    longest = resolve_burn_in(None, config, cap, warn=False)
    needed = resolve_burn_in(None, config, cap, relax=relax, warn=False)
    if needed <= done:
        return None, relax
    return min(longest, max(needed, done + done // 4)), relax


def resolve_num_draws(num_draws: Optional[int], config: Any, cap: int, relax: float = math.inf) -> int:
    """``num_draws``, or 1000 times how much smaller than ``0.08 / nbeta`` the step is (a smaller
    step mixes that much more slowly), and at least one relaxation time of the slowest direction
    (the flat directions of a singular model mix over it; the smaller of ``2 / (epsilon gamma)``
    and the measured ``relax``), at most ``cap``."""
    if num_draws is not None:
        return num_draws
    if config.sampler == "rmsprop_sgld":
        return DEFAULT_NUM_DRAWS
    unit = DEFAULT_STEP_SCALE / config.nbeta * (config.friction if config.sampler == "sghmc" else 1.0)
    factor = max(1.0, unit / config.step_size)
    # On dln[5, 3, 4, 6, 2] r=1 (n = 1e5, batch 256, localization 3.2) successive stretches of half
    # a relaxation time read 0.81 to 1.05 lambda: half a relaxation time of draws (what the first
    # rule gives at localization 3.2) is one such stretch, and two chains of it read 0.81.
    relax = min(relaxation_steps(config), relax)
    wanted = max(DEFAULT_NUM_DRAWS * factor, relax if math.isfinite(relax) else 0.0)
    return int(min(math.ceil(wanted), cap))
