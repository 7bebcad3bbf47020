"""Default hyperparameters, and the one place where ``nbeta``, ``localization`` and ``step_size``
are resolved and validated for both the offline and the online estimator.

How the defaults were chosen (``benchmarks/defaults.py`` prints the measurements):

* ``nbeta = n / log n`` (``beta = 1 / log n``, the WBIC temperature; Lau et al. 2024).
* ``step_size = DEFAULT_STEP_SCALE / nbeta``. The drift of one SGLD step is
  ``(epsilon / 2) * nbeta * Hessian``, so ``epsilon * nbeta`` is the dimensionless step size; a
  fixed ``epsilon`` would be too hot for large ``n`` and needlessly slow for small ``n``. Two
  sources of bias grow with it: the discretization (the chain's variance along a direction of
  curvature ``a`` is ``1 / (a (1 - epsilon a / 4))`` instead of ``1 / a``) and minibatch gradient
  noise, which heats the chain by about ``epsilon * nbeta^2 * sigma_g^2 / (4 |B|)``. On the toy
  models of :mod:`online_llc.toy` (unit-variance inputs, Gaussian NLL, ``n = 10240``, batch 256)
  ``epsilon * nbeta = 0.1`` kept the estimate within about 15% of theory while ``0.3`` overshot by
  35-150%; the effective-temperature diagnostic rises with it (report it, and halve the step size
  while it is well above 1).
* ``localization = 100``. The pull ``gamma / 2 ||w - w*||^2`` confines the flat directions of a
  singular model; without it the chain wanders away along them (with ``gamma = 10`` a 4-layer
  linear network's estimate was still rising after 3000 steps). It also biases the estimate
  downwards (a direction of curvature ``a`` counts ``1 / (1 + gamma / (nbeta a))`` of its share).
  ``gamma = 100`` at ``nbeta ≈ 1100`` mixes within a few hundred steps and stayed within 15% on
  the models above. For larger models or losses with larger curvature, keep
  ``gamma / nbeta`` small (under about 0.1) and check that the estimate does not drift between
  the first and second half of the draws.
"""

from __future__ import annotations

from typing import Any, Optional

from .errors import check_positive_int
from .sgld import SGLDConfig, default_nbeta

__all__ = [
    "DEFAULT_LOCALIZATION",
    "DEFAULT_STEP_SCALE",
    "DEFAULT_NUM_DRAWS",
    "DEFAULT_BURN_IN",
    "resolve_hyperparameters",
]

DEFAULT_LOCALIZATION: float = 50.0
DEFAULT_STEP_SCALE: float = 0.1
DEFAULT_NUM_DRAWS: int = 1000
DEFAULT_BURN_IN: int = 500


def resolve_hyperparameters(
    *, num_samples: Any, nbeta: Optional[float], localization: float, step_size: Optional[float]
) -> SGLDConfig:
    """Validate the three SGLD knobs and fill in the defaults that depend on ``num_samples``.

    Args:
        num_samples: ``n`` (an int >= 2 when ``nbeta`` is None, else >= 1).
        nbeta: ``n * beta`` or ``None`` for ``n / log n``.
        localization: ``gamma >= 0``.
        step_size: ``epsilon > 0`` or ``None`` for ``DEFAULT_STEP_SCALE / nbeta``.

    Returns:
        A validated :class:`~online_llc.sgld.SGLDConfig`.
    """
    check_positive_int("num_samples", num_samples)
    if nbeta is None:
        nbeta = default_nbeta(num_samples)
    cfg = SGLDConfig(nbeta=nbeta, localization=localization, step_size=1.0)  # validates nbeta, gamma
    if step_size is None:
        step_size = DEFAULT_STEP_SCALE / cfg.nbeta
    return SGLDConfig(nbeta=cfg.nbeta, localization=cfg.localization, step_size=step_size)
