"""The rows a chain of :func:`online_llc.estimate_llc` records per step, and what the estimator
reads from a stretch of them: the heat and the next step (calibration), the discretization bias,
whether the draws are precise enough."""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from online_llc.calibration.heat import bias_interval, discretization_bias
from online_llc.calibration.step import calibrated_step
from online_llc.stats.draws import heat_ratio
from online_llc.stats.mcse import multichain_standard_error

# The rows each chain's run records per step: the draw, its noise variance, the heat bias, the
# two update-gradient products of the discretization bias (SGLDInfo's fields of the same names),
# and the squared offset ||xi||^2 (the measured relaxation, calibration.budget.spread_relaxation).
DRAW, NOISE_VAR, HEAT_BIAS, PREV_DOT, OWN_DOT, OFFSET_SQ = range(6)
ROWS = 6


def recalibrated(tail: np.ndarray, step: float, top: float, lower_only: bool = False) -> Tuple[float, float]:
    """``(heat, next step)`` from the rows of :func:`estimate_llc`'s ``run`` over a stretch of one
    chain. ``heat`` counts the minibatch and the discretization bias together,
    ``mean / (mean - heat_bias - discretization_bias)``: both grow in proportion to the step, so
    the step moves towards the target of their sum (only down when ``lower_only``), and only when
    two standard errors of the measurement agree on the direction (:func:`~online_llc.calibration.heat.bias_interval`)."""
    # Minibatch and discretization heat together (both grow with the step); an unmeasured (NaN)
    # discretization bias counts as 0.
    disc = stretch_discretization_bias(tail)
    heat = heat_ratio(float(tail[DRAW].mean()), float(tail[HEAT_BIAS].mean()) + (disc if math.isfinite(disc) else 0.0))
    _, low, high = bias_interval(tail[DRAW], tail[PREV_DOT], tail[OWN_DOT], tail[HEAT_BIAS])
    new = calibrated_step(step, heat, top, heat_low=low, heat_high=high)
    return heat, (min(new, step) if lower_only else new)


def imprecise(chain_rows: List[np.ndarray], burn_in: int, precision: float) -> bool:
    """Whether the kept draws' multi-chain standard error is above ``precision`` times their mean."""
    kept = np.stack([rows[DRAW, burn_in:] for rows in chain_rows])
    return bool(multichain_standard_error(kept) > precision * abs(float(kept.mean())))


def stretch_discretization_bias(rows: np.ndarray) -> float:
    """:func:`online_llc.calibration.heat.discretization_bias` of one chain's stretch of ``run`` rows."""
    return discretization_bias(rows[PREV_DOT], rows[OWN_DOT], rows[HEAT_BIAS])
