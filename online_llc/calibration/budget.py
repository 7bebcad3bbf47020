"""The offline estimator's automatic sampling budget: burn-in and draws per chain.

Flow: :func:`online_llc.estimate_llc` asks here, once its step is calibrated, how long to burn in
and how many draws to keep. Both are counted in steps, capped in samples (see
:data:`online_llc.offline.estimate.CAP_BATCH`): at a fixed heat the step, and so every direction's
relaxation in steps, scales with the batch size, so small batches take more, cheaper steps.

* ``burn_in`` and ``num_draws`` (offline): the burn-in is two relaxation times ``2 / (epsilon gamma)``
  of the slowest (localization-bound) direction (:data:`online_llc.calibration.budget.BURN_IN_RELAXATIONS`),
  at least 500 steps; the draws are 1000 times ``0.08 / (nbeta epsilon)``, the factor by which
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
from typing import Any, Optional

from online_llc.calibration.step import DEFAULT_STEP_SCALE, relaxation_steps

__all__ = ["DEFAULT_BURN_IN", "DEFAULT_NUM_DRAWS", "DEFAULT_PRECISION", "BURN_IN_RELAXATIONS", "resolve_burn_in", "resolve_num_draws", "scaled_cap"]

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


def resolve_burn_in(burn_in: Optional[int], config: Any, cap: int) -> int:
    """``burn_in``, or :data:`BURN_IN_RELAXATIONS` relaxation times of the slowest direction,
    ``2 / (epsilon gamma)`` each, at least ``DEFAULT_BURN_IN`` steps and at most ``cap`` (with a
    warning when that is longer)."""
    if burn_in is not None:
        return burn_in
    relax = relaxation_steps(config)
    needed = BURN_IN_RELAXATIONS * relax
    if needed > cap:
        warnings.warn(
            f"estimate_llc: the localization-bound directions relax over {relax:.0f} steps at step_size "
            f"{config.step_size:.3g} and the burn-in needs {needed:.0f} ({BURN_IN_RELAXATIONS} relaxation "
            f"times); it stops at {cap}, so the estimate may read low. Pass burn_in= for more, or use "
            "larger batches (the step, and so the relaxation, scales with the batch size).",
            RuntimeWarning,
            stacklevel=3,
        )
    return int(max(DEFAULT_BURN_IN, min(math.ceil(needed), cap)))


def resolve_num_draws(num_draws: Optional[int], config: Any, cap: int) -> int:
    """``num_draws``, or 1000 times how much smaller than ``0.08 / nbeta`` the step is (a smaller
    step mixes that much more slowly), and at least one relaxation time of the slowest direction
    (the flat directions of a singular model mix over it), at most ``cap``."""
    if num_draws is not None:
        return num_draws
    if config.sampler == "rmsprop_sgld":
        return DEFAULT_NUM_DRAWS
    unit = DEFAULT_STEP_SCALE / config.nbeta * (config.friction if config.sampler == "sghmc" else 1.0)
    factor = max(1.0, unit / config.step_size)
    # On dln[5, 3, 4, 6, 2] r=1 (n = 1e5, batch 256, localization 3.2) successive stretches of half
    # a relaxation time read 0.81 to 1.05 lambda: half a relaxation time of draws (what the first
    # rule gives at localization 3.2) is one such stretch, and two chains of it read 0.81.
    relax = relaxation_steps(config)
    wanted = max(DEFAULT_NUM_DRAWS * factor, relax if math.isfinite(relax) else 0.0)
    return int(min(math.ceil(wanted), cap))
