"""The offline estimators, at fixed weights ``w*``: the reference estimate and the step-size pilot.

* :mod:`~online_llc.offline.estimate` - :func:`estimate_llc`: C independent chains, burn-in and
  draws sized to the measured heat and the precision (:mod:`~online_llc.offline.rows`: what a
  chain records per step, and what is read from it).
* :mod:`~online_llc.offline.recommend` - :func:`recommend_step_size`: short chains on a ladder of
  steps, built on :func:`estimate_llc`.
"""

from online_llc.offline.estimate import estimate_llc
from online_llc.offline.recommend import PilotRun, StepSizeRecommendation, recommend_step_size

__all__ = ["PilotRun", "StepSizeRecommendation", "estimate_llc", "recommend_step_size"]
