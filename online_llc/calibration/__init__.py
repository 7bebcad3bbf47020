"""Calibration: the heat measured on the chains' draws, and the step and budget sized from it.

* :mod:`~online_llc.calibration.heat` - the minibatch and discretization heat of the sampler,
  measured from two half-batch gradients and consecutive updates at no extra cost.
* :mod:`~online_llc.calibration.step` - the starting step, its calibration on the measured heat,
  the monitor's cooling of a gross heat; every heat constant there is an excess ``T - 1``.
* :mod:`~online_llc.calibration.budget` - the offline burn-in and draws per chain.
"""

from online_llc.calibration.budget import resolve_burn_in, resolve_num_draws
from online_llc.calibration.heat import heat_interval, pooled_heat
from online_llc.calibration.step import calibrated_step, relaxation_steps, resolve_hyperparameters

__all__ = [
    "calibrated_step",
    "heat_interval",
    "pooled_heat",
    "relaxation_steps",
    "resolve_burn_in",
    "resolve_hyperparameters",
    "resolve_num_draws",
]
