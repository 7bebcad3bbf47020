"""The estimand: ``nbeta`` and ``localization`` with their defaults, and the sampler's configuration.

The estimand and the sampler are chosen separately. ``nbeta`` and ``localization`` define *what*
is estimated (the localized, tempered posterior); the step size only decides how well the sampler
reaches it (:mod:`online_llc.calibration.step` sizes it, tuned to the user's batch size while the
estimand is not).

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

The online monitor keeps ``nbeta`` but localizes harder (``localization = 0.09 * nbeta``, 23 at
the cap) so that its co-moving chain relaxes within a few windows (:mod:`online_llc.calibration.step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from online_llc.errors import check_choice, check_nonneg_float, check_positive_float

__all__ = [
    "SAMPLERS",
    "GRADIENTS",
    "DRAWS",
    "SGLDConfig",
    "default_nbeta",
    "DEFAULT_NBETA_CAP",
    "DEFAULT_LOCALIZATION_SCALE",
    "ONLINE_LOCALIZATION_PER_NBETA",
    "default_estimand",
]

#: The samplers the kernel implements (:mod:`online_llc.kernel.updates` has one update per name).
SAMPLERS = ("sgld", "rmsprop_sgld", "sghmc")
#: The gradients a step can take: the minibatch gradient at ``w* + xi`` (``"plain"``), or the
#: control-variate gradient ``grad L_B(w* + xi) - grad L_B(w*) + grad L_n(w*)`` (Baker, Fearnhead,
#: Fox and Nemeth 2019), whose batch noise is that of the difference, about ``||xi||`` times the
#: spread of the per-sample curvature instead of the per-sample gradients' spread.
GRADIENTS = ("plain", "control_variate")
#: The draws a step can record: the paired draw ``d = nbeta (L_B(w* + xi) - L_B(w*))``
#: (``"plain"``), or ``d' = d - nbeta (grad L_B(w*) - grad L_n(w*)) . xi`` (``"control_variate"``,
#: with the control-variate gradient, whose centre gradients it reuses): the same expectation (the
#: batch is drawn independently of the chain's ``xi``) without the batch's linear term, whose
#: batch-to-batch noise dominates ``d``'s variance near ``w*``.
DRAWS = ("plain", "control_variate")


def default_nbeta(num_samples: int) -> float:
    """``n * beta`` with ``beta = 1 / log n`` (the WBIC inverse temperature): ``n / log n``."""
    if num_samples < 2:
        raise ValueError(f"Expected `num_samples` to be an int >= 2, got {num_samples!r}.")
    return num_samples / math.log(num_samples)


@dataclass(frozen=True)
class SGLDConfig:
    """Hyperparameters of the localized, tempered sampler (SGLD or one of its variants).

    With ``U(xi) = nbeta * L_B(w* + xi) + (gamma / 2) ||xi||^2`` and ``z ~ N(0, I)``:

    * ``"sgld"`` (Welling & Teh 2011): ``xi <- xi - (epsilon / 2) grad U + sqrt(epsilon) z``.
    * ``"rmsprop_sgld"`` (Li et al. 2016, without the correction term): ``V <- rho V + (1 - rho) g^2``
      with ``g = nbeta grad L_B`` (the loss part only: the localization is not a curvature of the
      data), ``G = 1 / (sqrt(V) + delta)``, ``xi <- xi - (epsilon / 2) G grad U + sqrt(epsilon G) z``.
    * ``"sghmc"`` (Chen et al. 2014, eq. 15, with no gradient-noise estimate):
      ``v <- (1 - alpha) v - (epsilon / 2) grad U + sqrt(alpha epsilon) z``, ``xi <- xi + v``.
      ``alpha = 1`` is SGLD exactly; smaller friction lets the chain travel further per step.

    Attributes:
        nbeta: ``n * beta``, the inverse temperature times the sample size (> 0).
        localization: ``gamma``, strength of the pull towards the centre (>= 0).
        step_size: ``epsilon`` (> 0).
        noise_scale: multiplies the injected noise; 1 samples, 0 gives the deterministic dynamics
            (used by tests of the degenerate cases).
        sampler: one of :data:`SAMPLERS`.
        friction: SGHMC's ``alpha`` in (0, 1].
        rmsprop_decay: RMSProp's ``rho`` in [0, 1).
        gradient: one of :data:`GRADIENTS`; ``"control_variate"`` needs the full-data gradient
            at the centre (the kernel's ``anchor``).
        draw: one of :data:`DRAWS`; ``"control_variate"`` needs ``gradient="control_variate"``.
        rmsprop_eps: RMSProp's ``delta`` (> 0), in units of ``nbeta * gradient``. It floors the
            preconditioner at ``1 / delta``: with a tiny ``delta`` a chain that starts where the
            loss gradient vanishes (a noiseless minimum) gets ``G ~ 1e8`` and its first noise
            kick throws it far away. At equilibrium ``sqrt(V) >= sqrt(nbeta * curvature)``, which
            is well above 0.1 for the models measured.
    """

    nbeta: float
    localization: float
    step_size: float
    noise_scale: float = 1.0
    sampler: str = "sgld"
    friction: float = 0.1
    rmsprop_decay: float = 0.999
    rmsprop_eps: float = 0.1
    gradient: str = "plain"
    draw: str = "plain"

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbeta", check_positive_float("nbeta", self.nbeta))
        object.__setattr__(self, "localization", check_nonneg_float("localization", self.localization))
        object.__setattr__(self, "step_size", check_positive_float("step_size", self.step_size))
        object.__setattr__(self, "noise_scale", check_nonneg_float("noise_scale", self.noise_scale))
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("gradient", self.gradient, GRADIENTS)
        check_choice("draw", self.draw, DRAWS)
        if self.draw == "control_variate" and self.gradient != "control_variate":
            raise ValueError(
                "Expected gradient='control_variate' with draw='control_variate' (the draw reuses that gradient's "
                f"centre gradients and full-data gradient), got gradient={self.gradient!r}."
            )
        friction = check_positive_float("friction", self.friction)
        if friction > 1:
            raise ValueError(f"Expected `friction` to be a float in (0, 1], got {self.friction!r}.")
        object.__setattr__(self, "friction", friction)
        decay = check_nonneg_float("rmsprop_decay", self.rmsprop_decay)
        if decay >= 1:
            raise ValueError(f"Expected `rmsprop_decay` to be a float in [0, 1), got {self.rmsprop_decay!r}.")
        object.__setattr__(self, "rmsprop_decay", decay)
        object.__setattr__(self, "rmsprop_eps", check_positive_float("rmsprop_eps", self.rmsprop_eps))

    def estimate_kwargs(self) -> Dict[str, Any]:
        """These settings as :func:`online_llc.estimate_llc`'s keyword arguments: the estimand
        (``nbeta``, ``localization``) at this step, sampler and gradient. With a monitor's
        ``chain_config`` (its step as calibrated, not the starting step ``monitor.config``
        holds), ``estimate_llc(model, loss_fn, batches, num_samples=n,
        **monitor.chain_config.estimate_kwargs())`` estimates what the live chain samples."""
        return {
            "nbeta": self.nbeta, "localization": self.localization, "step_size": self.step_size,
            "sampler": self.sampler, "friction": self.friction, "gradient": self.gradient,
        }


#: The largest default ``nbeta``: ``min(n / log n, DEFAULT_NBETA_CAP)``.
DEFAULT_NBETA_CAP: float = 256.0
#: The default localization is ``DEFAULT_LOCALIZATION_SCALE * sqrt(nbeta)``.
DEFAULT_LOCALIZATION_SCALE: float = 0.2
#: The online monitor's default localization is ``ONLINE_LOCALIZATION_PER_NBETA * nbeta``.
ONLINE_LOCALIZATION_PER_NBETA: float = 0.09


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


