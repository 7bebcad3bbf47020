"""Default hyperparameters, and the one place where ``nbeta``, ``localization`` and ``step_size``
are resolved and validated for both the offline and the online estimator.

How the defaults were chosen (``python benchmarks/defaults.py`` prints the measurements):

* ``nbeta = n / log n`` (``beta = 1 / log n``, the WBIC temperature; Lau et al. 2024).
* ``step_size = DEFAULT_STEP_SCALE / nbeta``. The drift of one SGLD step is
  ``(epsilon / 2) * nbeta * Hessian``, so ``epsilon * nbeta`` is the dimensionless step size; a
  fixed ``epsilon`` would be too hot for large ``n`` and needlessly slow for small ``n``. Two
  sources of upward bias grow with it: discretization (the chain's variance along a direction of
  curvature ``a`` is ``1 / (a (1 - epsilon a / 4))`` instead of ``1 / a``) and minibatch gradient
  noise, which heats the chain by about ``epsilon * nbeta^2 * sigma_g^2 / (4 |B|)``.
* ``localization = 100``. The pull ``gamma / 2 ||w - w*||^2`` confines the flat directions of a
  singular model (a deep linear network has exact ones: ``W2 A, A^-1 W1``). It biases the
  estimate downwards (a direction of curvature ``a`` counts ``1 / (1 + gamma / (nbeta a))`` of its
  share) but sets the slowest relaxation time, ``2 / (epsilon * gamma)`` steps (about 150 at the
  defaults and ``n = 10240``). With ``gamma = 50`` a 4-layer linear network's estimate was still
  rising after 8000 steps, so a longer run gave a different answer; with ``gamma = 100`` it was
  stationary after the 500-step burn-in.

Measured on :mod:`online_llc.toy` models (unit-variance inputs, Gaussian NLL, ``n = 10240``,
batch 256), the pair ``(gamma = 100, epsilon * nbeta = 0.15)`` lands within about 10% of theory on
linear regression, reduced-rank regressions and a 4-layer linear network ``[16, 8, 16, 8]``:
there the step size's heat and the localization's pull roughly cancel. That cancellation is
model-dependent, which is why every result reports an ``effective_temperature``: a
``[6, 6, 6, 6, 6]`` network came out 77% high with an effective temperature above 3, and the
rank-0 point of ``[10, 20, 20, 10]`` (all weights zero) came out 80% low, where the localization
dominates. For a larger model or a loss with larger curvature: lower ``step_size`` until the
effective temperature is near 1, keep ``gamma / nbeta`` small (under about 0.1), and check that
the estimate does not drift between the first and second half of the draws.

Other samplers (``python benchmarks/sampler_bias.py`` prints the table): SGHMC with friction
``alpha = 0.1`` at SGLD's step size ran 1.6-8x too hot (effective temperature 1.4-20: momentum
accumulates minibatch gradient noise over ~1/alpha steps); at ``alpha * 0.15 / nbeta`` it landed
6-13% low on the toy models. RMSProp-preconditioned SGLD at ``epsilon = 0.001`` was cold (13-32%
low, effective temperature 0.5), at 0.01 within -1..+14% on three models but 93% high (temperature
4.6) on a 4-layer network; the default 0.005 sits between.

Online cadence (``python benchmarks/overhead.py`` prints the overhead):

* ``every_n_steps = 25``. A shadow step costs one forward+backward and one forward on one batch
  plus the Gaussian noise for every parameter: about 2x a training step of a small MLP
  (784-256-256-10, Adam, batch 128, one thread), less for compute-bound models (1.33x). Measured
  training-time ratios with/without the monitor, interleaved in one run: 1.21 at 10, 1.11 at 20,
  1.08 at 25, 1.04-1.06 at 50. The overhead is about ``shadow cost / every_n_steps``.
* ``window = 40`` draws: a window then spans 1000 training steps. The estimate follows a step
  change within 3-4 windows (``benchmarks/step_change.py``), so lag is about
  ``4 * every_n_steps * window`` training steps: halve ``every_n_steps`` to halve the lag at twice
  the overhead, or shorten ``window`` (noisier windows, wider band). Windows should hold well
  over the chain's autocorrelation time (``LLCEstimate.ess`` shows it).
* ``warmup = "auto"``: equilibrium is detected from each chain's draws and squared offset norm
  (MSER-5, :mod:`online_llc.warmup`). A fixed count fits no model: the slowest relaxation at the
  default step and localization is ``2 / (epsilon * gamma) ≈ 150`` steps, the draw of a
  reduced-rank regression settles within about 20, and the detector took 60-120 shadow steps
  there and 70-370 on ``[16, 8, 16, 8]``, whose offset norm relaxes slowly. Its floor is 100 for a
  chain starting at zero offset: at a saddle the chain leaves slowly at first, which looks
  stationary.
* ``horizon = 4`` windows: the band's standard error also counts correlation slower than one
  window (see :class:`online_llc.window.WindowStats`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from .errors import check_positive_int
from .sgld import SGLDConfig, default_nbeta

__all__ = [
    "DEFAULT_LOCALIZATION",
    "DEFAULT_STEP_SCALE",
    "DEFAULT_RMSPROP_STEP",
    "DEFAULT_NUM_DRAWS",
    "DEFAULT_BURN_IN",
    "DEFAULT_EVERY_N_STEPS",
    "DEFAULT_WINDOW",
    "DEFAULT_WARMUP",
    "DEFAULT_HORIZON",
    "resolve_hyperparameters",
]

DEFAULT_LOCALIZATION: float = 100.0
DEFAULT_STEP_SCALE: float = 0.15
DEFAULT_RMSPROP_STEP: float = 5e-3
DEFAULT_NUM_DRAWS: int = 1000
DEFAULT_BURN_IN: int = 500
DEFAULT_EVERY_N_STEPS: int = 25
DEFAULT_WINDOW: int = 40
DEFAULT_WARMUP: str = "auto"
DEFAULT_HORIZON: int = 4


def resolve_hyperparameters(
    *,
    num_samples: Any,
    nbeta: Optional[float],
    localization: float,
    step_size: Optional[float],
    sampler: str = "sgld",
    friction: float = 0.1,
) -> SGLDConfig:
    """Validate the three SGLD knobs and fill in the defaults that depend on ``num_samples``.

    Args:
        num_samples: ``n`` (an int >= 2 when ``nbeta`` is None, else >= 1).
        nbeta: ``n * beta`` or ``None`` for ``n / log n``.
        localization: ``gamma >= 0``.
        step_size: ``epsilon > 0`` or ``None`` for ``DEFAULT_STEP_SCALE / nbeta`` (SGLD),
            ``friction * DEFAULT_STEP_SCALE / nbeta`` (SGHMC: in the overdamped limit its position
            moves by ``epsilon / (2 alpha)`` per unit force, so this matches SGLD's drift) or
            ``DEFAULT_RMSPROP_STEP`` (RMSProp-preconditioned SGLD, whose steps are already scaled
            by the gradient's magnitude).
        sampler: one of :data:`online_llc.sgld.SAMPLERS`.
        friction: SGHMC's ``alpha`` in (0, 1].

    Returns:
        A validated :class:`~online_llc.sgld.SGLDConfig`.
    """
    check_positive_int("num_samples", num_samples)
    if nbeta is None:
        nbeta = default_nbeta(num_samples)
    # Validates nbeta, gamma, the sampler's name and friction before step_size is derived.
    cfg = SGLDConfig(nbeta=nbeta, localization=localization, step_size=1.0, sampler=sampler, friction=friction)
    if step_size is None:
        if sampler == "rmsprop_sgld":
            step_size = DEFAULT_RMSPROP_STEP
        elif sampler == "sghmc":
            step_size = cfg.friction * DEFAULT_STEP_SCALE / cfg.nbeta
        else:
            step_size = DEFAULT_STEP_SCALE / cfg.nbeta
    return replace(cfg, step_size=step_size)
