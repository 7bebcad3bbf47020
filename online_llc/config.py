"""Default hyperparameters, and the one place where ``nbeta``, ``localization`` and ``step_size``
are resolved and validated for both the offline and the online estimator.

The estimand and the sampler are chosen separately. ``nbeta`` and ``localization`` define *what*
is estimated (the localized, tempered posterior); the step size only decides how well the sampler
reaches it, so it is tuned to the user's batch size while the estimand is not.

* ``nbeta = min(n / log n, 256)``. ``n / log n`` (``beta = 1 / log n``, the WBIC temperature;
  Lau et al. 2024) grows with the data, and a minibatch chain's heat grows with it:
  SGLD on a batch of ``B`` samples runs at the temperature ``T ~ 1 + epsilon nbeta^2 q / (4 B)``
  along a direction whose per-sample gradient variance is ``q`` (about its curvature for an NLL
  loss). Keeping ``T`` within a few percent of 1 needs ``epsilon ~ B / nbeta^2``, and the
  localization-bound directions then relax over ``~ nbeta^2 / (B gamma)`` steps: millions at
  ``n = 5e5, B = 32``. Capped at 256, the estimate is the same at every data size past
  ``n ~ 1600`` and, since the step absorbs the batch size, at every batch size
  (``benchmarks/known_lambda.py``). On the known-lambda models (reduced-rank regressions and
  deep linear networks, n = 1e6, batch 1024) ``nbeta`` from 64 to 1024 gave estimates within
  about 10% of each other at a suitable localization; 256 costs 8x fewer steps than 1024.
* ``localization = 0.2 * sqrt(nbeta)`` (3.2 at the cap). The pull ``gamma / 2 ||w - w*||^2``
  confines the flat directions of a singular model but lowers the estimate: a regular direction
  of curvature ``h`` counts ``1 / (1 + gamma / (nbeta h))`` of its share, and a quartic one
  (``K ~ c w^4``, common at singularities) loses about ``gamma / sqrt(nbeta c)``, hence the
  square root. The exact estimand (``benchmarks/exact_estimand.py``: MALA on the full batch,
  float64, n = 1e5, nbeta 256) measures the pull on the deep linear networks: 8-8-8-8 reads 0.827
  lambda at scale 0.4, 0.919 at 0.2 and 0.947 at 0.1; 5-3-4-6-2 0.867 at 0.4, 1.006 +- 0.05 at 0.2
  and 0.923 +- 0.05 at 0.1. A larger nbeta at the same scale does not help (1024, scale 0.4:
  0.803). Scale 0.2 halves the worst pull (17% to 8%) at twice the relaxation time
  ``2 / (epsilon gamma)``; a weaker pull lets near-flat directions wander (up to 2.6x too high at
  scale 0.1 with a short burn-in) and mixes more slowly still. SGLD at batch 32 reads the exact
  estimand at 0.2 (8-8-8-8: 1.001 times it; 5-3-4-6-2: 0.999).
* ``step_size``: ``min(0.08 / nbeta, 0.08 B / nbeta^2)`` to start with (discretization heat
  ``1 / (1 - epsilon nbeta h / 4)``, about 2% at unit curvature; minibatch heat about 2% at
  unit gradient noise), then calibrated on the measured heat: every shadow or offline step
  computes its gradient as the mean of two half-batch gradients, whose difference measures the
  gradient noise at no extra cost (:mod:`online_llc.heat`), and the step is rescaled towards
  the heat :data:`TARGET_HEAT` (2%) whenever the measured heat is past :data:`CUT_HEAT` (3%) and
  its interval clearly above the target. The step never exceeds ``0.08 / nbeta``.
  The offline estimator calibrates during burn-in (:func:`online_llc.estimate_llc`), the monitor
  between windows.
* ``burn_in`` and ``num_draws`` (offline): the burn-in is two relaxation times ``2 / (epsilon gamma)``
  of the slowest (localization-bound) direction (:data:`online_llc.budget.BURN_IN_RELAXATIONS`),
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

The online monitor keeps ``nbeta`` but trades pull for speed: a co-moving chain must relax within
a few windows to follow training, and the slowest direction relaxes over ``2 / (epsilon gamma)``
shadow steps, at least ``25 / rho`` at the offline step (``rho = gamma / nbeta``, the pull on a
unit-curvature direction). Online the defaults are ``localization = 0.09 * nbeta`` (23 at the
cap) and a largest step of ``0.15 / nbeta``: about 150 shadow steps, as the monitor had before,
with a pull of about 9% per unit-curvature direction that the 4% discretization heat of the larger
step partly offsets. Online the step starts at ``min(0.15 / nbeta, 0.15 B / nbeta^2)`` (minibatch
heat 3.75% at unit gradient noise) and is lowered only when the heat pooled over recent windows
is gross, past ``1 + 2 * MAX_HEAT / sqrt(C)`` for a band of ``C`` chains (1.1 for one chain), and
then towards ``1 + MAX_HEAT / sqrt(C)`` (:func:`online_llc.heat.cooling_heat`; at least
``1 + CUT_HEAT``): each change of the step moves the level a little and slows the relaxation, and
the heat left in the level is kept to a fixed share of the band. Compare the
live estimate with ``estimate_llc`` at the monitor's own settings (``monitor.config``).

Other samplers: SGHMC takes ``friction`` times SGLD's step (in the overdamped limit its position
moves by ``epsilon / (2 alpha)`` per unit force, and its minibatch heat is
``epsilon nbeta^2 q / (4 alpha B)``, so the heat is SGLD's). RMSProp-preconditioned SGLD starts at
``epsilon = 0.005`` (its steps are already scaled by the gradient's magnitude) and is calibrated
on its measured heat in the same way.

Online cadence (``python benchmarks/overhead.py`` prints the overhead):

* ``every_n_steps = 35`` (what ``"auto"`` means for runs of unknown length or of 35000 steps
  and more; :mod:`online_llc.cadence` sizes shorter runs). A shadow step costs one
  forward+backward and one forward on one batch (in half batches) plus the Gaussian noise for
  every parameter and the monitor's own per-step work: 2.5-3.0x a training step of a small MLP
  (784-256-256-10, Adam, batch 128, one thread), less for compute-bound models (1.33x). The
  overhead is about ``shadow cost / every_n_steps``: on that MLP 1.09 at 35, 1.10-1.11 at 30
  and 1.10-1.12 at 25 (the default before the heat measurements made the step dearer), so 35 is
  the cadence that keeps the bound of 1.10 on it.
* ``window = 40`` draws: a window then spans 1400 training steps. The estimate follows a step
  change within 3-4 windows (``benchmarks/step_change.py``), so lag is about
  ``4 * every_n_steps * window`` training steps: halve ``every_n_steps`` to halve the lag at twice
  the overhead, or shorten ``window`` (noisier windows, wider band). Windows should hold well
  over the chain's autocorrelation time (``LLCEstimate.ess`` shows it).
* ``warmup = "auto"``: equilibrium is detected from each chain's draws and squared offset norm
  (MSER-5, :mod:`online_llc.warmup`), at least 100 shadow steps for a chain starting at zero
  offset (at a saddle the chain leaves slowly at first, which looks stationary); runs too short
  for that within their first 10% get a proportionally shorter floor (at least 20).
* ``horizon = 4`` windows: the band's standard error also counts correlation slower than one
  window (see :class:`online_llc.window.WindowStats`).
"""

from __future__ import annotations

from dataclasses import replace
import math
from typing import Any, Optional, Tuple

from .errors import check_positive_float, check_positive_int
from .sgld import SGLDConfig, default_nbeta

__all__ = [
    "DEFAULT_NBETA_CAP",
    "DEFAULT_LOCALIZATION_SCALE",
    "DEFAULT_STEP_SCALE",
    "DEFAULT_RMSPROP_STEP",
    "ONLINE_LOCALIZATION_PER_NBETA",
    "ONLINE_STEP_SCALE",
    "TARGET_HEAT",
    "CUT_HEAT",
    "MAX_HEAT",
    "DEFAULT_NUM_DRAWS",
    "DEFAULT_PRECISION",
    "DEFAULT_BURN_IN",
    "DEFAULT_EVERY_N_STEPS",
    "DEFAULT_WINDOW",
    "DEFAULT_WARMUP",
    "DEFAULT_HORIZON",
    "default_estimand",
    "default_step_size",
    "LAG_FRACTION",
    "lag_std",
    "relaxation_steps",
    "resolve_hyperparameters",
]

#: The largest default ``nbeta``: ``min(n / log n, DEFAULT_NBETA_CAP)``.
DEFAULT_NBETA_CAP: float = 256.0
#: The default localization is ``DEFAULT_LOCALIZATION_SCALE * sqrt(nbeta)``.
DEFAULT_LOCALIZATION_SCALE: float = 0.2
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
#: The online monitor's default localization is ``ONLINE_LOCALIZATION_PER_NBETA * nbeta``.
ONLINE_LOCALIZATION_PER_NBETA: float = 0.09
#: The online monitor's largest default step is ``ONLINE_STEP_SCALE / nbeta``.
ONLINE_STEP_SCALE: float = 0.15
#: The heat ``T - 1`` the step is calibrated to (offline: minibatch and discretization together).
TARGET_HEAT: float = 0.02
#: Calibration lowers the step when the measured heat's excess is above this and the lower end of
#: its interval is above :data:`TARGET_HEAT` (:func:`online_llc.heat.calibrated_step`).
CUT_HEAT: float = 0.03
#: Above this measured heat a run warns that it ran hot (offline, and ``recommend_step_size``'s bound).
MAX_HEAT: float = 0.05
DEFAULT_NUM_DRAWS: int = 1000
#: Offline: the relative standard error the automatic draw count aims for (draws are doubled
#: until it is reached or the cap is). 5% keeps two standard errors within the 10% the
#: known-lambda suite aims for.
DEFAULT_PRECISION: float = 0.05
DEFAULT_BURN_IN: int = 500
DEFAULT_EVERY_N_STEPS: int = 35
DEFAULT_WINDOW: int = 40
DEFAULT_WARMUP: str = "auto"
DEFAULT_HORIZON: int = 4


def default_estimand(
    num_samples: int, nbeta: Optional[float] = None, localization: Optional[float] = None, online: bool = False
) -> Tuple[float, float]:
    """``(nbeta, localization)`` with the defaults filled in: ``min(n / log n, 256)`` and
    ``0.2 * sqrt(nbeta)``, or ``0.09 * nbeta`` for the online monitor (see the module docstring
    for why)."""
    if nbeta is None:
        nbeta = min(default_nbeta(num_samples), DEFAULT_NBETA_CAP)
    nbeta = check_positive_float("nbeta", nbeta)
    if localization is None:
        if online:
            localization = ONLINE_LOCALIZATION_PER_NBETA * nbeta
        else:
            localization = DEFAULT_LOCALIZATION_SCALE * math.sqrt(nbeta)
    return nbeta, localization


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
        # Offline: minibatch heat TARGET_HEAT at unit gradient noise. Online: the same ratio of
        # minibatch to discretization heat as offline, at the larger step (heat 3.75%).
        heat = TARGET_HEAT * (scale / DEFAULT_STEP_SCALE)
        step = min(step, 4.0 * heat * batch_size / nbeta**2)
    return friction * step if sampler == "sghmc" else step


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


#: The lag of a co-moving chain's reading, as a fraction of the slowest direction's relaxation
#: time (its stiffer directions, which carry most of the LLC, relax faster). See :func:`lag_std`.
LAG_FRACTION: float = 0.5


def lag_std(slope: float, relaxation: float, stride: float) -> float:
    """How far a co-moving chain's reading can trail a moving LLC: ``|slope| * lag`` with the lag
    ``LAG_FRACTION * relaxation * stride`` training steps (``relaxation`` in shadow steps,
    :func:`relaxation_steps`; ``stride`` training steps per shadow step; ``slope`` the filter's
    LLC per training step). The monitor adds it to the band's variance. On a stagewise deep
    linear network trained with SGD (``benchmarks/online_vs_offline.py --part moving``), the
    live 90% band covered the offline estimate at 7 of 10 checkpoints without it (normalized
    errors of rms 1.5) and 10 of 10 with it (rms 0.9); at frozen weights the slope is about zero
    and the band is unchanged."""
    if not (math.isfinite(slope) and math.isfinite(relaxation) and math.isfinite(stride)):
        return 0.0
    return abs(slope) * LAG_FRACTION * relaxation * stride


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
        sampler: one of :data:`online_llc.sgld.SAMPLERS`.
        friction: SGHMC's ``alpha`` in (0, 1].
        batch_size: samples per batch, when known (sets the starting step).
        online: the online monitor's defaults (a stronger localization and a larger step, so that
            the co-moving chain relaxes within a few windows).

    Returns:
        A validated :class:`~online_llc.sgld.SGLDConfig`.
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
