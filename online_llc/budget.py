"""The offline estimator's automatic sampling budget: burn-in and draws per chain.

Flow: :func:`online_llc.estimate_llc` asks here, once its step is calibrated, how long to burn in
and how many draws to keep. Both are counted in steps, capped in samples (see
:data:`online_llc.offline.CAP_BATCH`): at a fixed heat the step, and so every direction's
relaxation in steps, scales with the batch size, so small batches take more, cheaper steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

from .config import DEFAULT_BURN_IN, DEFAULT_NUM_DRAWS, DEFAULT_STEP_SCALE, relaxation_steps

__all__ = ["resolve_burn_in", "resolve_num_draws", "scaled_cap"]


def scaled_cap(steps: int, batch_size: int, cap_batch: int) -> int:
    """A cap of ``steps`` steps of ``cap_batch`` samples, in steps of ``batch_size`` samples (never
    fewer than ``steps``)."""
    return int(steps * max(1.0, cap_batch / batch_size))


def resolve_burn_in(burn_in: Optional[int], config: Any, cap: int) -> int:
    """``burn_in``, or one relaxation time of the slowest direction, ``2 / (epsilon gamma)``, at
    least ``DEFAULT_BURN_IN`` steps and at most ``cap`` (with a warning when the relaxation is
    longer)."""
    if burn_in is not None:
        return burn_in
    relax = relaxation_steps(config)
    if relax > cap:
        warnings.warn(
            f"estimate_llc: the localization-bound directions relax over {relax:.0f} steps at step_size "
            f"{config.step_size:.3g}; the burn-in stops at {cap}. Pass burn_in= for more, or use "
            "larger batches (the step, and so the relaxation, scales with the batch size).",
            RuntimeWarning,
            stacklevel=3,
        )
    return int(max(DEFAULT_BURN_IN, min(math.ceil(relax), cap)))


def resolve_num_draws(num_draws: Optional[int], config: Any, cap: int) -> int:
    """``num_draws``, or 1000 times how much smaller than ``0.08 / nbeta`` the step is (a smaller
    step mixes that much more slowly), at most ``cap``."""
    if num_draws is not None:
        return num_draws
    if config.sampler == "rmsprop_sgld":
        return DEFAULT_NUM_DRAWS
    unit = DEFAULT_STEP_SCALE / config.nbeta * (config.friction if config.sampler == "sghmc" else 1.0)
    factor = max(1.0, unit / config.step_size)
    return int(min(math.ceil(DEFAULT_NUM_DRAWS * factor), cap))
