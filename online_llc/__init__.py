"""online-llc: the local learning coefficient (LLC) as a live training metric.

The package is laid out along the flow of the estimate, one wing per stage; each wing imports
only the wings below it (``lint-imports`` checks it)::

    faces        online_llc.callbacks, online_llc.cli, online_llc.plot, online_llc.demos
    estimators   online_llc.monitor (OnlineLLC), online_llc.offline (estimate_llc)
    calibration  online_llc.calibration (the heat measured; the step and budget sized from it)
    kernel       online_llc.kernel (one SGLD step at w* + xi: passes, updates, noise, sharding)
    ground       online_llc.stats (draws, MCSE, the filter), online_llc.models (theory, toy
                 models, groups, heads, losses), online_llc.config (the estimand),
                 online_llc.records, online_llc.errors

The names below are what a user needs; everything else is importable from its wing.

* :class:`OnlineLLC` - the running estimate, configured by :class:`MonitorSettings`'s options;
  :class:`LLCEstimate` - its records (:data:`STATUSES`); :class:`ChainHealth` - its chains' health.
* :func:`auto_cadence` - the schedule (``every_n_steps``, ``window``, warm-up) for a run's length.
* :func:`estimate_llc` - the offline reference estimator; :class:`LLCResult` - its result.
* :func:`recommend_step_size` - a short pilot that recommends the sampler's step size.
* :func:`groups_by_head`, :func:`groups_by_child`, :func:`groups_by_linear` - parameter groups for
  per-module LLCs (``groups=``).
* :class:`LossFn` - the per-sample loss protocol; the errors the package raises.
"""

from __future__ import annotations

from online_llc.config import SGLDConfig
from online_llc.errors import MonitorError, NonFiniteDrawError, OnlineLLCError
from online_llc.kernel.evaluator import LossFn
from online_llc.models.groups import groups_by_child, groups_by_linear
from online_llc.models.heads import groups_by_head
from online_llc.monitor.cadence import auto_cadence
from online_llc.monitor.estimator import OnlineLLC
from online_llc.monitor.settings import MonitorSettings
from online_llc.offline.estimate import estimate_llc
from online_llc.offline.recommend import StepSizeRecommendation, recommend_step_size
from online_llc.records import STATUSES, ChainHealth, LLCEstimate, LLCResult, ProbeResult

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "OnlineLLC",
    "MonitorSettings",
    "LLCEstimate",
    "STATUSES",
    "ChainHealth",
    "auto_cadence",
    "estimate_llc",
    "LLCResult",
    "ProbeResult",
    "recommend_step_size",
    "StepSizeRecommendation",
    "SGLDConfig",
    "groups_by_head",
    "groups_by_child",
    "groups_by_linear",
    "LossFn",
    "OnlineLLCError",
    "NonFiniteDrawError",
    "MonitorError",
]
