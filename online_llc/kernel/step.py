"""The localized, tempered sampler kernel: one step of SGLD (or a variant) with paired losses.

Flow: training loop -> **ShadowSampler (sgld kernel)** -> WindowStats -> LLCFilter -> OnlineLLC
records -> callbacks. :class:`~online_llc.monitor.shadow.ShadowSampler` runs :func:`sampler_step` at the
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

* the update maths, in :mod:`online_llc.kernel.updates`: one in-place update per sampler (see
  :class:`SGLDConfig`) of a chain's offsets and extra state from its gradients and standard
  normal noise, found by sampler name in a table (:data:`online_llc.config.SAMPLERS` lists its keys);
* the step: the paired losses and the gradient at ``w* + xi``, the step's numbers, then the noise
  draws and the update of every parameter. ``_kernel_step`` updates the chain in place and leaves
  its numbers on the device, so :class:`~online_llc.monitor.shadow.ShadowSampler` reads every chain's
  numbers with one host copy per shadow step; :func:`sampler_step` is the same step on new
  tensors, returning its :class:`SGLDInfo`;
* the model plumbing, in :mod:`online_llc.kernel.evaluator`: losses through ``torch.func.functional_call``
  (the model, its ``.grad`` fields and buffers are never modified) and a private generator for
  every random number, the model's dropout included, so the training run's random streams are
  left exactly as they were and both passes of one step see the same dropout masks.

Precision: the chain's state and update are float32 whatever the parameters' dtype (bfloat16,
float16); ``w* + xi`` is cast to the parameters' dtype only for the forward pass, and the step's
numbers (draw, heat) are accumulated in float64 from float32 gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from online_llc.config import SGLDConfig
from online_llc.kernel.anchor import StepAnchor
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.passes import Centre
from online_llc.kernel.randomness import private_rng
from online_llc.kernel.updates import _combine_halves, _update, state_dtype

__all__ = ["SGLDInfo", "sampler_step", "sgld_step"]

#: An anchor computed during the step from the centre's gradients (``(c_1, c_2)``, the halves'
#: sizes and the offsets), returned in the offsets' order (:class:`online_llc.kernel.anchor.RunningAnchor`).
Anchor = Callable[[Tuple[List[Optional[Tensor]], List[Optional[Tensor]]], Tuple[int, int], List[Tensor]], List[Tensor]]


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
            (:mod:`online_llc.calibration.heat`); 0 for a batch of one or without injected noise,
            NaN for a plain step, which does not measure it.
        prev_update_dot_grad: ``nbeta (xi - xi_prev) . g``, the previous update against this
            step's batch gradient ``g`` (NaN unless ``previous_offset`` was given).
        update_dot_grad: ``nbeta (xi_new - xi) . g``, this step's update against the same
            gradient (NaN likewise). Consecutive steps give the discretization bias
            (:func:`online_llc.calibration.heat.discretization_bias`).
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


class _Pending(NamedTuple):
    """One kernel step whose numbers are still on the device: ``stats`` (float64) holds, in order,
    the draw's mean difference, its variance, the two mean losses, the offset norm, the halves'
    weighted squared gradient difference, and (with the update dots) the two dots; read them with
    one host copy (for every chain of a shadow step at once) and turn them into an
    :class:`SGLDInfo` with :func:`_info`. ``heat``: whether the step measured the minibatch heat
    (a plain step does not: its ``heat_bias`` is NaN)."""

    stats: Tensor
    batch_size: int
    halves: Tuple[int, int]
    center_losses: Centre
    grads: Optional[List[Optional[Tensor]]]
    heat: bool = True


def _info(values: Sequence[float], pending: _Pending, config: SGLDConfig) -> SGLDInfo:
    """The step's :class:`SGLDInfo` from the host copy ``values`` of ``pending.stats``."""
    nbeta = config.nbeta
    b = pending.batch_size
    b1, b2 = pending.halves
    heat_bias = 0.0 if pending.heat else math.nan
    if pending.heat and b1 > 0 and b2 > 0 and config.noise_scale > 0:
        # tr(C) / B from the halves, then the draw's excess epsilon nbeta^2 tr(C) / (8 B), relative
        # to the injected noise (noise_scale^2 epsilon); SGHMC's momentum heats by 1 / alpha.
        tr_c_over_b = values[5] * b1 * b2 / (b1 + b2) ** 2
        heat_bias = config.step_size * nbeta**2 * tr_c_over_b / (8.0 * config.noise_scale**2)
        if config.sampler == "sghmc":
            heat_bias /= config.friction
    info = SGLDInfo(
        draw=nbeta * values[0],
        noise_var=nbeta**2 * values[1] / b,
        loss_center=values[2],
        loss_sample=values[3],
        offset_norm=values[4],
        batch_size=b,
        heat_bias=heat_bias,
    )
    if len(values) > 6:
        info = replace(info, prev_update_dot_grad=nbeta * values[6], update_dot_grad=nbeta * values[7])
    return info


def _kernel_step(
    evaluator: LossEvaluator,
    center: Mapping[str, Tensor],
    offset: Dict[str, Tensor],
    aux: Dict[str, Tensor],
    batch: Any,
    *,
    config: SGLDConfig,
    generator: torch.Generator,
    masks: Optional[Mapping[str, Tensor]] = None,
    rng_seed: Optional[int] = None,
    center_losses: Optional[Centre] = None,
    keep_grads: bool = False,
    pre_update: Optional[Callable[[List[Optional[Tensor]]], Optional[Mapping[str, Tensor]]]] = None,
    anchor: Optional[Union[Mapping[str, Tensor], Anchor]] = None,
    heat: bool = True,
) -> _Pending:
    """One step of ``config.sampler`` that updates ``offset`` and ``aux`` in place (whatever the
    losses: the caller discards a non-finite step) and leaves its numbers on the device.

    ``rng_seed`` seeds the model's randomness (:func:`~online_llc.kernel.evaluator.private_rng`; drawn from
    ``generator``, one host read, when None); ``center_losses`` reuses the centre's losses of an
    earlier step on the same batch and centre (deterministic models); ``keep_grads`` keeps the
    batch gradient intact and returns it (the update dots); ``pre_update`` is called with the
    batch gradient just before the offset is updated (with ``keep_grads``: it must not change them)
    and may return buffers, one per offset, that then receive the update ``xi_new - xi``
    (:func:`online_llc.kernel.updates._update`'s ``into``); ``anchor`` is the full-data gradient
    at the centre, by parameter name, which the control-variate gradient needs
    (``config.gradient``), or a callable that takes the centre's gradients, the halves' sizes and
    the offsets and returns it in the offsets' order (the online running anchor,
    :class:`~online_llc.kernel.anchor.RunningAnchor`). ``heat=False`` runs the plain step: the
    passes over the whole batch with one gradient
    (:func:`~online_llc.kernel.passes.paired_losses_and_grads`'s ``split``), no heat measured (the
    control-variate draw always splits)."""
    cv = config.gradient == "control_variate"
    heat = heat or config.draw == "control_variate"
    if cv and (anchor is None or (not callable(anchor) and set(anchor) != set(offset))):
        raise ValueError(
            "Expected `anchor` (the full-data gradient at the centre, one tensor per sampled parameter) for "
            f"gradient='control_variate', got {None if anchor is None else sorted(anchor)}."
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "The SGLD step needs gradients and cannot run inside torch.inference_mode(); "
            "call it outside (torch.no_grad() is fine: gradients are re-enabled locally)."
        )
    # enable_grad: the caller may be inside torch.no_grad() (e.g. a validation hook); the
    # gradient w.r.t. the offset is local and never reaches the model's .grad.
    # The evaluator's mode (eval by default) for the passes only; every flag is restored after.
    # The control variate is formed as the centre's gradients arrive, which are then never held
    # whole, where the anchor can stream them (kernel.anchor.AnchorStream), with the
    # control-variate draw's corrections where the draw needs them.
    draw_cv = config.draw == "control_variate"
    stream = anchor.stream(list(offset.values()), corrections=draw_cv) if cv and isinstance(anchor, StepAnchor) else None
    with evaluator.mode_context(), private_rng(center, generator, rng_seed) as rewind, torch.enable_grad():
        l_center, l_sample, g1, g2, halves, center_losses = evaluator.paired(
            center, offset, batch, rewind, center_losses, center_grads=cv, split=heat, centre_stream=stream
        )
    with torch.no_grad():
        streamed = stream is not None and stream.started
        kappa = stream.kappa() if streamed and draw_cv else None  # type: ignore[union-attr]
        if cv and not streamed:
            assert anchor is not None and center_losses.grads is not None
            gbar = anchor(center_losses.grads, halves, list(offset.values())) if callable(anchor) else [anchor[n] for n in offset]
            if draw_cv:
                kappa = _draw_corrections(center_losses.grads, gbar, list(offset.values()))
            _control_variate(g1, center_losses.grads[0], g2, center_losses.grads[1], gbar)
        device = l_center.device
        grads, noise_sq = _combine_halves(g1, g2, halves, list(offset), aux, config, masks, device)
        del g1, g2
        stats, b = evaluator.step_stats(l_center, l_sample, list(offset.values()), noise_sq)
        if kappa is not None:
            stats = _corrected_draw(stats, l_sample.double() - l_center.double(), kappa, halves)
        into = pre_update(grads) if pre_update is not None else None
        _update(
            offset, aux, grads, config=config, generator=generator, masks=masks, consume_grads=not keep_grads,
            layouts=evaluator.noise_layouts(list(offset)), into=into,
        )
    return _Pending(stats, b, halves, center_losses, grads if keep_grads else None, heat)


def _control_variate(
    g1: List[Optional[Tensor]],
    c1: List[Optional[Tensor]],
    g2: List[Optional[Tensor]],
    c2: List[Optional[Tensor]],
    anchor: List[Tensor],
) -> None:
    """The halves' control-variate gradients in place: ``g_k <- g_k - c_k + gbar`` (``c_k`` the
    centre's gradient on the same half, ``gbar`` the full-data gradient at the centre). Their mean
    is the batch's control-variate gradient and their difference measures its noise, so the heat
    is read as for the plain gradient. A gradient the loss does not reach stays None."""
    for g, c in ((g1, c1), (g2, c2)):
        idx = [j for j, (a, b) in enumerate(zip(g, c)) if a is not None and b is not None]
        if idx:
            torch._foreach_sub_([g[j] for j in idx], [c[j] for j in idx])  # type: ignore[misc]
            torch._foreach_add_([g[j] for j in idx], [anchor[j] for j in idx])  # type: ignore[misc]


def _draw_corrections(
    centre_grads: Tuple[List[Optional[Tensor]], List[Optional[Tensor]]],
    anchor: List[Tensor],
    offsets: List[Tensor],
) -> Tensor:
    """``[(c_1 - gbar) . xi, (c_2 - gbar) . xi]`` (float64): each half's centre gradient ``c_k`` less
    the full-data gradient, against the offset before the update."""
    out = []
    for c in centre_grads:
        terms = [
            torch.dot((g - a).reshape(-1).to(torch.float64), x.reshape(-1).to(torch.float64))
            for g, a, x in zip(c, anchor, offsets)
            if g is not None
        ]
        out.append(torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64, device=offsets[0].device))
    return torch.stack(out)


def _corrected_draw(stats: Tensor, diff: Tensor, kappa: Tensor, halves: Tuple[int, int]) -> Tensor:
    """The step's numbers with the control-variate draw ``d' = d - nbeta (grad L_B(w*) - gbar) . xi``.

    ``grad L_B(w*)`` is the halves' centre gradients weighted by their sizes, so each half's mean
    difference ``m_k`` becomes ``m_k - kappa_k``; the draw's mean is their weighted mean. Its
    per-sample variance (the noise channel ``v = nbeta^2 var / |B|``) is read from the two halves,
    the only split whose correction is known: ``E[(m'_1 - m'_2)^2] = var (1 / B1 + 1 / B2)``, so
    ``var = (m'_1 - m'_2)^2 B1 B2 / B`` (unbiased, one degree of freedom per step; 0 for a batch of
    one). The control variate runs offline on whole parameters only, so every sample is here."""
    b1, b2 = halves
    b = b1 + b2
    out = stats.clone()
    if b2 == 0:
        out[0] = stats[0] - kappa[0]
        out[1] = 0.0
        return out
    m1 = diff[:b1].mean() - kappa[0]
    m2 = diff[b1:].mean() - kappa[1]
    out[0] = (b1 * m1 + b2 * m2) / b
    out[1] = (m1 - m2).square() * (b1 * b2 / b)
    return out


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
    rng_seed: Optional[int] = None,
    anchor: Optional[Mapping[str, Tensor]] = None,
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], SGLDInfo]:
    """One step of ``config.sampler`` (see :class:`SGLDConfig`) on ``offset`` around ``center``.

    Args:
        evaluator, center, offset, batch, config, generator: as in :func:`sgld_step`.
        aux: the sampler's extra state (:func:`init_aux`): SGHMC momentum or RMSProp moments.
        masks: per parameter, a boolean mask: the chain moves only those entries (the offset and
            the sampler's state stay zero elsewhere), e.g. one attention head's slice.
        previous_offset: the offset one step before ``offset`` (the same chain, step and
            estimand). Given, the step also measures ``info.prev_update_dot_grad`` and
            ``info.update_dot_grad`` (SGLD and RMSProp-SGLD with injected noise).
        rng_seed: seeds the model's own randomness (dropout) for this step; by default an integer
            drawn from ``generator``, which costs a second host read per step
            (:func:`~online_llc.kernel.randomness.derived_seed` gives one from a step counter).
        anchor: the full-data gradient ``grad L_n(w*)`` at the centre, by parameter name: needed
            by ``config.gradient == "control_variate"`` (:func:`full_gradient` computes it).

    Returns:
        ``(new_offset, new_aux, info)``, new tensors in float32 (float64 for float64 offsets);
        unchanged state when the losses are not finite. The step reads its numbers on the host
        once (one device sync).
    """
    new = {n: t.detach().to(state_dtype(t.dtype), copy=True) for n, t in offset.items()}
    new_aux = {n: t.detach().to(state_dtype(t.dtype), copy=True) for n, t in aux.items()}
    dots = previous_offset is not None and config.sampler != "sghmc" and config.noise_scale > 0
    pending = _kernel_step(
        evaluator, center, new, new_aux, batch, config=config, generator=generator, masks=masks,
        rng_seed=rng_seed, keep_grads=dots, anchor=anchor,
    )
    stats = pending.stats
    if dots:
        assert previous_offset is not None and pending.grads is not None
        stats = torch.cat([stats, _update_dots(previous_offset, offset, new, pending.grads).to(stats.device)])
    info = _info(stats.tolist(), pending, config)
    if not info.finite:
        return dict(offset), dict(aux), info
    return new, new_aux, info


def _update_dots(
    previous: Mapping[str, Tensor],
    offset: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
    grads: Sequence[Optional[Tensor]],
) -> Tensor:
    """``[(xi - xi_prev) . g, (xi_new - xi) . g]`` (float64, on the device)."""
    before, after = [], []
    with torch.no_grad():
        for (name, x), g in zip(offset.items(), grads):
            if g is None:
                continue
            before.append((x - previous[name]).mul_(g).sum(dtype=torch.float64))
            after.append((new[name] - x).mul_(g).sum(dtype=torch.float64))
    if not before:
        return torch.zeros(2, dtype=torch.float64)
    return torch.stack([torch.stack(before).sum(), torch.stack(after).sum()])


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
