"""The localized, tempered sampler kernel: one step of SGLD (or a variant) with paired losses.

Flow: training loop -> **ShadowSampler (sgld kernel)** -> WindowStats -> LLCFilter -> OnlineLLC
records -> callbacks. :class:`~online_llc.shadow.ShadowSampler` runs :func:`sampler_step` at the
current training weights; the offline estimator (:func:`online_llc.estimate_llc`) runs it at fixed
weights.

One step of the kernel, for an offset ``xi`` around centre weights ``w*``::

    d   = nbeta * mean_i( l_i(w* + xi) - l_i(w*) )                 (the draw)
    v   = nbeta^2 * var_i( l_i(w* + xi) - l_i(w*) ) / |B|            (its within-batch noise variance)
    xi <- xi - (epsilon / 2) * ( nbeta * grad_xi L_B(w* + xi) + gamma * xi ) + sqrt(epsilon) * N(0, I)

with ``L_B`` the mean loss on the minibatch ``B``, ``nbeta = n * beta``, ``gamma`` the localization
and ``epsilon`` the step size. The chain samples ``p(w) ∝ exp(-nbeta L_n(w) - gamma/2 ||w - w*||^2)``
and ``lambda_hat = E[d]`` (Lau et al. 2024).

Both losses are evaluated on the same samples (pairing): the batch-to-batch fluctuation of ``L_B``,
which is tens of times larger than ``lambda`` after multiplying by ``nbeta``, cancels in ``d``.

The step has three layers:

* the update maths, in :mod:`online_llc.updates`: one small pure function per sampler (see :class:`SGLDConfig`) that maps one
  parameter's state record ``(offset, aux)``, its gradient and its standard normal noise to the new
  record, found by sampler name in a table (:data:`SAMPLERS` lists its keys);
* :func:`sampler_step`: the paired losses and the gradient at ``w* + xi``, the step's
  :class:`SGLDInfo`, then the noise draws and the update of every parameter;
* the model plumbing, in :mod:`online_llc.evaluator`: losses through ``torch.func.functional_call``
  (the model, its ``.grad`` fields and buffers are never modified) and a private generator for
  every random number, the model's dropout included, so the training run's random streams are
  left exactly as they were and both passes of one step see the same dropout masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .errors import check_choice, check_nonneg_float, check_positive_float
from .evaluator import LossEvaluator, LossFn, paired_losses_and_grads, private_rng
from .updates import SAMPLERS, _rmsprop_precond, _update, init_aux

__all__ = [
    "LossFn",
    "SAMPLERS",
    "SGLDConfig",
    "sampler_step",
    "init_aux",
    "SGLDInfo",
    "LossEvaluator",
    "sgld_step",
    "default_nbeta",
]


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbeta", check_positive_float("nbeta", self.nbeta))
        object.__setattr__(self, "localization", check_nonneg_float("localization", self.localization))
        object.__setattr__(self, "step_size", check_positive_float("step_size", self.step_size))
        object.__setattr__(self, "noise_scale", check_nonneg_float("noise_scale", self.noise_scale))
        check_choice("sampler", self.sampler, SAMPLERS)
        friction = check_positive_float("friction", self.friction)
        if friction > 1:
            raise ValueError(f"Expected `friction` to be a float in (0, 1], got {self.friction!r}.")
        object.__setattr__(self, "friction", friction)
        decay = check_nonneg_float("rmsprop_decay", self.rmsprop_decay)
        if decay >= 1:
            raise ValueError(f"Expected `rmsprop_decay` to be a float in [0, 1), got {self.rmsprop_decay!r}.")
        object.__setattr__(self, "rmsprop_decay", decay)
        object.__setattr__(self, "rmsprop_eps", check_positive_float("rmsprop_eps", self.rmsprop_eps))


@dataclass(frozen=True)
class SGLDInfo:
    """What one kernel step observed (all at the offset *before* the update).

    Attributes:
        draw: ``d = nbeta * mean_i(l_i(w*+xi) - l_i(w*))``.
        noise_var: ``v = nbeta^2 * var_i(l_i(w*+xi) - l_i(w*)) / |B|`` (0 for a batch of one).
        loss_center: ``mean_i l_i(w*)`` on the batch.
        loss_sample: ``mean_i l_i(w* + xi)`` on the batch.
        offset_norm: ``||xi||`` before the update.
        batch_size: ``|B|``.
        heat_bias: how much the minibatch gradient noise of this step raises the draw's
            expectation, in LLC units, measured from the two half-batch gradients ``g1, g2``:
            ``epsilon nbeta^2 tr(C) / (8 |B|)`` with ``tr(C) / |B| = ||g1 - g2||^2 B1 B2 / |B|^2``
            (:mod:`online_llc.heat`); 0 for a batch of one or without injected noise.
        prev_update_dot_grad: ``nbeta (xi - xi_prev) . g``, the previous update against this
            step's batch gradient ``g`` (NaN unless ``previous_offset`` was given).
        update_dot_grad: ``nbeta (xi_new - xi) . g``, this step's update against the same
            gradient (NaN likewise). Consecutive steps give the discretization bias
            (:func:`online_llc.heat.discretization_bias`).
    """

    draw: float
    noise_var: float
    loss_center: float
    loss_sample: float
    offset_norm: float
    batch_size: int
    heat_bias: float = 0.0
    prev_update_dot_grad: float = math.nan
    update_dot_grad: float = math.nan

    @property
    def finite(self) -> bool:
        """Whether every number of the step is finite (a diverging chain is not)."""
        return all(
            math.isfinite(x)
            for x in (self.draw, self.noise_var, self.loss_center, self.loss_sample, self.offset_norm)
        )


def _step_info(
    l_center: Tensor, l_sample: Tensor, offset: Mapping[str, Tensor], config: SGLDConfig, noise_sq: Tensor, halves: Tuple[int, int]
) -> SGLDInfo:
    """The step's :class:`SGLDInfo` from the paired per-sample losses and the half-batch gradients'
    (weighted) squared difference ``noise_sq``, with one host sync."""
    nbeta = config.nbeta
    diff = (l_sample - l_center).double()
    b = diff.numel()
    norms = torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in offset.values()])
    stats = torch.stack(
        [diff.mean(), diff.var(unbiased=True) if b > 1 else diff.new_zeros(()), l_center.double().mean(),
         l_sample.double().mean(), torch.linalg.vector_norm(norms), noise_sq.double()]
    ).tolist()
    b1, b2 = halves
    heat_bias = 0.0
    if b1 > 0 and b2 > 0 and config.noise_scale > 0:
        # tr(C) / B from the halves, then the draw's excess epsilon nbeta^2 tr(C) / (8 B), relative
        # to the injected noise (noise_scale^2 epsilon); SGHMC's momentum heats by 1 / alpha.
        tr_c_over_b = stats[5] * b1 * b2 / (b1 + b2) ** 2
        heat_bias = config.step_size * nbeta**2 * tr_c_over_b / (8.0 * config.noise_scale**2)
        if config.sampler == "sghmc":
            heat_bias /= config.friction
    return SGLDInfo(
        draw=nbeta * stats[0],
        noise_var=nbeta**2 * stats[1] / b,
        loss_center=stats[2],
        loss_sample=stats[3],
        offset_norm=stats[4],
        batch_size=b,
        heat_bias=heat_bias,
    )


def _noise_sq(
    g1: Sequence[Optional[Tensor]],
    g2: Sequence[Optional[Tensor]],
    offset: Mapping[str, Tensor],
    aux: Mapping[str, Tensor],
    config: SGLDConfig,
    masks: Optional[Mapping[str, Tensor]],
) -> Tensor:
    """``sum_j w_j (g1_j - g2_j)^2`` over the entries the chain moves, with ``w_j = 1``, or RMSProp's
    preconditioner ``G_j`` (from its second moments before this step; a fresh chain's first
    gradient stands in for them)."""
    total = torch.zeros((), dtype=torch.float64, device=_device(offset))
    for (name, x), a, b in zip(offset.items(), g1, g2):
        if a is None or b is None:
            continue
        d2 = (a - b).double().square()
        mask = masks.get(name) if masks else None
        if mask is not None:
            d2 = d2 * mask
        if config.sampler == "rmsprop_sgld":
            prev = aux[name].double()
            g = (0.5 * (a + b)).double() * config.nbeta
            v2 = torch.where(prev > 0, prev, g.square())
            d2 = d2 * _rmsprop_precond(v2, config)
        total = total + d2.sum()
    return total


def sampler_step(
    evaluator: LossEvaluator,
    center: Mapping[str, Tensor],
    offset: Mapping[str, Tensor],
    aux: Mapping[str, Tensor],
    batch: Any,
    *,
    config: SGLDConfig,
    generator: torch.Generator,
    masks: Optional[Mapping[str, Tensor]] = None,
    previous_offset: Optional[Mapping[str, Tensor]] = None,
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], SGLDInfo]:
    """One step of ``config.sampler`` (see :class:`SGLDConfig`) on ``offset`` around ``center``.

    Args:
        evaluator, center, offset, batch, config, generator: as in :func:`sgld_step`.
        aux: the sampler's extra state (:func:`init_aux`): SGHMC momentum or RMSProp moments.
        masks: per parameter, a boolean mask: the chain moves only those entries (the offset and
            the sampler's state stay zero elsewhere), e.g. one attention head's slice.
        previous_offset: the offset one step before ``offset`` (the same chain, step and
            estimand). Given, the step also measures ``info.prev_update_dot_grad`` and
            ``info.update_dot_grad`` (SGLD and RMSProp-SGLD with injected noise; an extra host
            sync per step, so the monitor does not ask for it).

    Returns:
        ``(new_offset, new_aux, info)``; unchanged state when the losses are not finite.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "The SGLD step needs gradients and cannot run inside torch.inference_mode(); "
            "call it outside (torch.no_grad() is fine: gradients are re-enabled locally)."
        )
    # enable_grad: the caller may be inside torch.no_grad() (e.g. a validation hook); the
    # gradient w.r.t. the offset is local and never reaches the model's .grad.
    # The evaluator's mode (eval by default) for the passes only; every flag is restored after.
    with evaluator.mode_context(), private_rng(center, generator) as rewind, torch.enable_grad():
        l_center, l_sample, g1, g2, halves = paired_losses_and_grads(evaluator, center, offset, batch, rewind)

    with torch.no_grad():
        b1, b2 = halves
        # The whole batch's mean gradient, from its halves.
        grads = [
            None if a is None else (a if b2 == 0 else (a * b1 + b * b2) / (b1 + b2)) for a, b in zip(g1, g2)
        ]
        noise_sq = _noise_sq(g1, g2, offset, aux, config, masks) if b2 > 0 else torch.zeros((), dtype=torch.float64, device=l_center.device)
        info = _step_info(l_center, l_sample, offset, config, noise_sq, halves)
        if not info.finite:
            return dict(offset), dict(aux), info
        new_offset, new_aux = _update(offset, aux, grads, config=config, generator=generator, masks=masks)
        if previous_offset is not None and config.sampler != "sghmc" and config.noise_scale > 0:
            info = _with_update_dots(info, previous_offset, offset, new_offset, grads, config.nbeta)
    return new_offset, new_aux, info


def _with_update_dots(
    info: SGLDInfo,
    previous: Mapping[str, Tensor],
    offset: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
    grads: Sequence[Optional[Tensor]],
    nbeta: float,
) -> SGLDInfo:
    """``info`` with ``nbeta (xi - xi_prev) . g`` and ``nbeta (xi_new - xi) . g`` filled in."""
    before = torch.zeros((), dtype=torch.float64, device=_device(offset))
    after = torch.zeros_like(before)
    for (name, x), g in zip(offset.items(), grads):
        if g is None:
            continue
        g64 = g.double()
        before = before + ((x - previous[name]).double() * g64).sum()
        after = after + ((new[name] - x).double() * g64).sum()
    b, a = torch.stack([before, after]).tolist()
    return replace(info, prev_update_dot_grad=nbeta * b, update_dot_grad=nbeta * a)


def _device(offset: Mapping[str, Tensor]) -> torch.device:
    """The device of the chain's first offset tensor."""
    return next(iter(offset.values())).device


def sgld_step(
    evaluator: LossEvaluator,
    center: Mapping[str, Tensor],
    offset: Mapping[str, Tensor],
    batch: Any,
    *,
    config: SGLDConfig,
    generator: torch.Generator,
) -> Tuple[Dict[str, Tensor], SGLDInfo]:
    """One localized, tempered SGLD step on ``offset`` around ``center`` (see module docstring).

    Args:
        evaluator: wraps the model and the per-sample loss.
        center: the centre weights ``w*`` by parameter name (not modified).
        offset: the chain's offset ``xi`` by parameter name (not modified).
        batch: passed to ``loss_fn`` unchanged.
        config: ``nbeta``, ``localization``, ``step_size`` (``sampler`` must be ``"sgld"``; use
            :func:`sampler_step` for the samplers that carry extra state).
        generator: private generator for the Gaussian noise (and the reseeded dropout masks).

    Returns:
        ``(new_offset, info)``; ``info`` describes the offset before the update. When the losses
        are not finite the offset is returned unchanged and ``info.finite`` is False, so the caller
        decides how to report and recover.
    """
    if config.sampler != "sgld":
        raise ValueError(f"sgld_step runs sampler='sgld'; use sampler_step for {config.sampler!r}.")
    new_offset, _, info = sampler_step(evaluator, center, offset, {}, batch, config=config, generator=generator)
    return new_offset, info


def __getattr__(name: str) -> Any:
    # mala_acceptance, a step-size diagnostic, lives in online_llc.tuning, which imports this
    # module: it is loaded on first access so that `from online_llc.sgld import mala_acceptance`
    # keeps working.
    if name == "mala_acceptance":
        from .tuning import mala_acceptance

        return mala_acceptance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
