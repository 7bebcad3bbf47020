"""online-llc: the local learning coefficient (LLC) as a live training metric.

The package's public API, gathered from the modules of the flow: training loop -> ShadowSampler
(sgld kernel) -> WindowStats -> LLCFilter -> OnlineLLC records -> callbacks
(:mod:`online_llc.callbacks`).

Public API:

* :class:`OnlineLLC` - the running estimate; :class:`LLCEstimate` - its records
  (:data:`FILTERED_STATUSES`: the windows whose ``mean`` is the filtered LLC).
* :func:`auto_cadence` - the schedule (``every_n_steps``, ``window``, warm-up) for a run's length.
* :func:`estimate_llc` - offline reference estimator (C SGLD chains at fixed weights).
* :class:`LLCResult` - its result record.
* :func:`recommend_step_size` - a short pilot that recommends the sampler's step size.
* :class:`ChainHealth` - :meth:`OnlineLLC.health`'s record: divergences, weight jumps, warm-ups,
  the step-size alarm.
* :mod:`online_llc.theory` - theoretical learning coefficients of known models.
* :mod:`online_llc.toy` - models with a known learning coefficient, for validation.
"""

from __future__ import annotations

from .cadence import Cadence, auto_cadence
from .config import DEFAULT_LOCALIZATION_SCALE, DEFAULT_NBETA_CAP, DEFAULT_STEP_SCALE, resolve_hyperparameters
from .errors import MonitorError, NonFiniteDrawError, OnlineLLCError
from .estimator import STATUSES, ChainHealth, LLCEstimate, OnlineLLC, SmoothedPoint, Transition
from .evaluator import LossFn
from .filter import FilterInfo, LLCFilter
from .groups import ParamSlice, attention_heads, groups_by_child, groups_by_head, groups_by_linear, resolve_groups
from .offline import LLCResult, estimate_llc
from .records import FILTERED_STATUSES
from .sgld import SAMPLERS, SGLDConfig, SGLDInfo, default_nbeta, sampler_step, sgld_step
from .tuning import PilotRun, StepSizeRecommendation, mala_acceptance, recommend_step_size

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "OnlineLLC",
    "LLCEstimate",
    "STATUSES",
    "FILTERED_STATUSES",
    "auto_cadence",
    "Cadence",
    "SmoothedPoint",
    "Transition",
    "ChainHealth",
    "recommend_step_size",
    "StepSizeRecommendation",
    "PilotRun",
    "mala_acceptance",
    "LLCFilter",
    "resolve_groups",
    "ParamSlice",
    "attention_heads",
    "groups_by_child",
    "groups_by_linear",
    "groups_by_head",
    "FilterInfo",
    "estimate_llc",
    "LLCResult",
    "LossFn",
    "SGLDConfig",
    "SGLDInfo",
    "sgld_step",
    "sampler_step",
    "SAMPLERS",
    "default_nbeta",
    "resolve_hyperparameters",
    "DEFAULT_LOCALIZATION_SCALE",
    "DEFAULT_NBETA_CAP",
    "DEFAULT_STEP_SCALE",
    "OnlineLLCError",
    "NonFiniteDrawError",
    "MonitorError",
]
