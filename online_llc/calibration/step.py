"""The step sized from the measured heat: the starting step, its calibration, its bounds.

Flow: the estimators ask here for a chain's starting step (:func:`resolve_hyperparameters`), and
hand it the heat measured on their draws (:mod:`online_llc.calibration.heat`) to get the next step
(:func:`calibrated_step`). Every heat constant below is an *excess* ``T - 1`` over the temperature 1.

* ``step_size``: ``min(0.08 / nbeta, 0.08 B / nbeta^2)`` to start with (discretization heat
  ``1 / (1 - epsilon nbeta h / 4)``, about 2% at unit curvature; minibatch heat about 2% at
  unit gradient noise), then calibrated on the measured heat: every shadow or offline step
  computes its gradient as the mean of two half-batch gradients, whose difference measures the
  gradient noise at no extra cost (:mod:`online_llc.calibration.heat`), and the step is rescaled towards
  the heat :data:`TARGET_EXCESS` (2%) whenever the measured heat is past :data:`CUT_EXCESS` (3%) and
  its interval clearly above the target. The step never exceeds ``0.08 / nbeta``.
  The offline estimator calibrates during burn-in (:func:`online_llc.estimate_llc`), the monitor
  between windows.

The online monitor keeps ``nbeta`` but trades pull for speed: a co-moving chain must relax within
a few windows to follow training, and the slowest direction relaxes over ``2 / (epsilon gamma)``
shadow steps, at least ``25 / rho`` at the offline step (``rho = gamma / nbeta``, the pull on a
unit-curvature direction). Online the defaults are ``localization = 0.09 * nbeta`` (23 at the
cap) and a largest step of ``0.15 / nbeta``: about 150 shadow steps, as the monitor had before,
with a pull of about 9% per unit-curvature direction that the 4% discretization heat of the larger
step partly offsets. Online the step starts at ``min(0.15 / nbeta, 0.15 B / nbeta^2)`` (minibatch
heat 3.75% at unit gradient noise) and is lowered only when the heat pooled over recent windows
is gross, past ``1 + 2 * MAX_EXCESS / sqrt(C)`` for a band of ``C`` chains (1.1 for one chain), and
then towards ``1 + MAX_EXCESS / sqrt(C)`` (:func:`online_llc.calibration.step.cooling_excess`; at least
``1 + CUT_EXCESS``): each change of the step moves the level a little and slows the relaxation, and
the heat left in the level is kept to a fixed share of the band. Compare the
live estimate with ``estimate_llc`` at the monitor's own settings (``monitor.config``).

Other samplers: SGHMC takes ``friction`` times SGLD's step (in the overdamped limit its position
moves by ``epsilon / (2 alpha)`` per unit force, and its minibatch heat is
``epsilon nbeta^2 q / (4 alpha B)``, so the heat is SGLD's). RMSProp-preconditioned SGLD starts at
``epsilon = 0.005`` (its steps are already scaled by the gradient's magnitude) and is calibrated
on its measured heat in the same way.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

from online_llc.config import SGLDConfig, default_estimand, default_nbeta
from online_llc.errors import check_positive_int

__all__ = [
    "DEFAULT_STEP_SCALE",
    "DEFAULT_RMSPROP_STEP",
    "ONLINE_STEP_SCALE",
    "TARGET_EXCESS",
    "CUT_EXCESS",
    "MAX_EXCESS",
    "DEFAULT_MAX_HEAT",
    "default_step_size",
    "relaxation_steps",
    "control_variate_pays",
    "resolve_hyperparameters",
    "calibrated_step",
    "max_step_size",
    "cooling_excess",
]

#: The largest default SGLD step is ``DEFAULT_STEP_SCALE / nbeta`` (``epsilon nbeta``, the step in
#: units of a unit-curvature direction's stiffness). On stiff deep networks its discretization
#: heat is not small: on dln[4, 12, 12, 12, 4] r=2 with full batches (n = 10240, nbeta 256, gamma
#: 6.4) the estimate reads 12.13 at this step, 10.04 at half of it and 8.06 / 8.02 / 8.00 at 1/4,
#: 1/8, 1/16 (lambda = 8): the excess grows faster than linearly, as the chain's excursions along
#: the network's scaling valleys reach stiffer regions. Offline, the measured discretization bias
#: counts towards the heat the step is calibrated on; online, it counts towards the heat the step
#: is cooled on when gross (``measure_discretization``, the default).
DEFAULT_STEP_SCALE: float = 0.08
DEFAULT_RMSPROP_STEP: float = 5e-3
#: The online monitor's largest default step is ``ONLINE_STEP_SCALE / nbeta``.
ONLINE_STEP_SCALE: float = 0.15
#: The heat ``T - 1`` the step is calibrated to (offline: minibatch and discretization together).
TARGET_EXCESS: float = 0.02
#: Calibration lowers the step when the measured heat's excess is above this and the lower end of
#: its interval is above :data:`TARGET_EXCESS` (:func:`online_llc.calibration.step.calibrated_step`).
CUT_EXCESS: float = 0.03
#: Above this measured heat a run warns that it ran hot (offline, and ``recommend_step_size``'s bound).
MAX_EXCESS: float = 0.05
#: Measured minibatch heat above which a step is called hot (the gradient noise then raises the
#: estimate by more than 10%).
DEFAULT_MAX_HEAT = 1.1


def default_step_size(
    nbeta: float, batch_size: Optional[int] = None, sampler: str = "sgld", friction: float = 0.1, online: bool = False
) -> float:
    """The starting step before calibration: ``min(0.08 / nbeta, 0.08 B / nbeta^2)`` for SGLD (the
    minibatch heat ``epsilon nbeta^2 q / (4 B)`` is then 2% at unit gradient noise ``q``),
    ``friction`` times that for SGHMC, :data:`DEFAULT_RMSPROP_STEP` for RMSProp-SGLD.
    ``batch_size=None``: the batch is not known, ``0.08 / nbeta``. Online the step is
    ``min(0.15 / nbeta, 0.15 B / nbeta^2)`` (:data:`ONLINE_STEP_SCALE`; minibatch heat 3.75%)."""
    if sampler == "rmsprop_sgld":
        return DEFAULT_RMSPROP_STEP
    scale = ONLINE_STEP_SCALE if online else DEFAULT_STEP_SCALE
    step = scale / nbeta
    if batch_size is not None:
        # Offline: minibatch heat TARGET_EXCESS at unit gradient noise. Online: the same ratio of
        # minibatch to discretization heat as offline, at the larger step (heat 3.75%).
        heat = TARGET_EXCESS * (scale / DEFAULT_STEP_SCALE)
        step = min(step, 4.0 * heat * batch_size / nbeta**2)
    return friction * step if sampler == "sghmc" else step


def control_variate_pays(nbeta: float, batch_size: int) -> bool:
    """Whether ``gradient="auto"`` takes the control-variate gradient at batch ``B``: ``B < nbeta / 2``,
    where the plain gradient's heat would hold its starting step more than 2x below the
    discretization bound (``0.08 B / nbeta^2 < 0.04 / nbeta``, :func:`default_step_size`).

    Larger batches pay on some models and not on others, so they keep the plain gradient.
    Measured with 4 chains: on linear regressions at n = 1e5 (``benchmarks/heat_grid.py``) the
    plain step still ended 2.3-2.6x below ``0.08 / nbeta`` at ``B = nbeta`` and 1.7x at
    ``2 nbeta``, and the control variate was faster (d = 12: 15.5 s against 37.0 s at ``nbeta``),
    but on the singular 6-6-6 deep linear network at ``B = nbeta`` it took 355 s on an idle
    machine where the plain gradient took 231 s on a busy one: its noise grows with the chain's
    spread, which a singular model's flat directions make wide, and calibration cut its step.
    """
    return 2.0 * batch_size < nbeta


def relaxation_steps(config: SGLDConfig) -> float:
    """Steps over which the slowest, localization-bound direction relaxes: ``2 / (epsilon gamma)``
    (``inf`` without localization). For SGHMC the position's drift per step is
    ``epsilon / (2 alpha)`` per unit force; for RMSProp-SGLD the preconditioner is unknown here
    and ``epsilon`` is used as it is."""
    if config.localization <= 0:
        return math.inf
    rate = config.step_size * config.localization / 2
    if config.sampler == "sghmc":
        rate /= config.friction
    return 1.0 / rate


def resolve_hyperparameters(
    *,
    num_samples: Any,
    nbeta: Optional[float],
    localization: Optional[float],
    step_size: Optional[float],
    sampler: str = "sgld",
    friction: float = 0.1,
    batch_size: Optional[int] = None,
    online: bool = False,
) -> SGLDConfig:
    """Validate the three SGLD knobs and fill in the defaults that depend on ``num_samples`` (and
    the batch size, for the starting step).


    Args:
        num_samples: ``n`` (an int >= 2 when ``nbeta`` is None, else >= 1).
        nbeta: ``n * beta`` or ``None`` for ``min(n / log n, 256)``.
        localization: ``gamma >= 0`` or ``None`` for ``0.2 * sqrt(nbeta)``.
        step_size: ``epsilon > 0`` or ``None`` for :func:`default_step_size` (which the estimators
            then calibrate on the measured heat).
        sampler: one of :data:`online_llc.config.SAMPLERS`.
        friction: SGHMC's ``alpha`` in (0, 1].
        batch_size: samples per batch, when known (sets the starting step).
        online: the online monitor's defaults (a stronger localization and a larger step, so that
            the co-moving chain relaxes within a few windows).


    Returns:
        A validated :class:`~online_llc.kernel.step.SGLDConfig`.
    """
    num_samples = check_positive_int("num_samples", num_samples)
    if batch_size is not None:
        batch_size = check_positive_int("batch_size", batch_size)
    if nbeta is None:
        default_nbeta(num_samples)  # validates n >= 2
    nbeta, localization = default_estimand(num_samples, nbeta, localization, online)
    # Validates nbeta, gamma, the sampler's name and friction before step_size is derived.
    cfg = SGLDConfig(nbeta=nbeta, localization=localization, step_size=1.0, sampler=sampler, friction=friction)
    if step_size is None:
        step_size = default_step_size(cfg.nbeta, batch_size, sampler, cfg.friction, online)
    return replace(cfg, step_size=step_size)


def calibrated_step(
    step: float,
    heat: float,
    max_step: float,
    heat_low: Optional[float] = None,
    heat_high: Optional[float] = None,
    target: float = TARGET_EXCESS,
) -> float:
    """The step to use next, given the minibatch ``heat`` measured at ``step``.


    The heat's excess ``heat - 1`` is proportional to the step at a fixed ``nbeta``, so the step
    is rescaled towards :data:`~online_llc.calibration.step.TARGET_EXCESS` when the excess is above
    :data:`~online_llc.calibration.step.CUT_EXCESS` (1.5 times the target) or below half the target (by at
    most 8x down and 2x up per call, so one noisy measurement cannot throw it far), and never above
    ``max_step``. A heat that is NaN leaves the step alone; an infinite one (the bias takes the
    whole of a positive mean: hotter than the heat can measure) gets the strongest cut, 8x.


    ``target`` replaces :data:`~online_llc.calibration.step.TARGET_EXCESS` as the excess a cut aims for (the
    monitor cools a gross heat to :data:`~online_llc.calibration.step.MAX_EXCESS` only: a co-moving chain
    pays for every cut in relaxation time).


    ``heat_low`` and ``heat_high`` bound the measurement (e.g. two standard errors either side):
    the step goes down only when ``heat_low`` is above the target too, and up only when
    ``heat_high`` is below half the target, so a measurement too noisy to decide leaves the step
    alone (a chain that has not yet spread from ``w*`` has a tiny mean, and its heat is then mostly
    noise). ``None`` means the point value.
    """
    if math.isnan(heat) or heat == -math.inf:
        return step
    low = heat if heat_low is None else heat_low
    high = heat if heat_high is None else heat_high
    excess = max(heat - 1.0, 1e-12)
    # Down only when the point is past CUT_EXCESS and the lower end past the target: an excess the
    # measurement resolves, and one that would bias the estimate by more than the 2-3% the
    # calibration aims for. Requiring the lower end past MAX_EXCESS instead (as before) let a well
    # measured 5.5% heat stand at batch 32 (deep linear networks read 6-10% high there).
    if (excess > CUT_EXCESS and low - 1.0 > TARGET_EXCESS) or (
        math.isfinite(high) and high - 1.0 < TARGET_EXCESS / 2 and step < max_step
    ):
        factor = min(max((target if excess > target else TARGET_EXCESS) / excess, 0.125), 2.0)
        return min(step * factor, max_step)
    return step


def max_step_size(nbeta: float, sampler: str, friction: float, step_size: float, online: bool = False) -> float:
    """The largest step calibration may reach: the default's discretization bound
    (``0.08 / nbeta``, online ``0.15 / nbeta``)."""
    if sampler == "rmsprop_sgld":
        return step_size
    bound = (ONLINE_STEP_SCALE if online else DEFAULT_STEP_SCALE) / nbeta
    return friction * bound if sampler == "sghmc" else bound


def cooling_excess(chains: int) -> float:
    """The heat excess the monitor cools its step towards when the band pools ``chains`` chains:
    ``max(CUT_EXCESS, MAX_EXCESS / sqrt(chains))`` (5% for one chain, 3.5% for two, 3% from three);
    the monitor (:class:`online_llc.monitor.track.Track`) cools a step once the pooled heat's excess is
    past twice that.


    The heat's bias stays a share of the band, whose width goes as ``1 / sqrt(chains)``, down to
    the heat offline calibration accepts without a cut: each cut slows a co-moving chain. On the
    step-change benchmark (``benchmarks/step_change.py``) four chains cooled like one (past 10%,
    towards 5%) left a few percent of heat in the live level, which their narrower band resolved
    (coverage 0.829); past 6% towards 3%, 0.936 at the same lag (first within 10% at window 3.5,
    median); towards 2.5%, 0.948 but a window slower (4.0). One chain cooled towards 3% tracked
    more slowly (window 4.5 instead of 3)."""
    return max(CUT_EXCESS, MAX_EXCESS / math.sqrt(max(chains, 1)))
