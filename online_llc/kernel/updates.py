"""The update maths of the sampler kernel: the batch gradient from its halves, and one in-place
update per sampler.

:func:`_combine_halves` joins the two half-batch gradients into the batch's and measures their
difference (the minibatch heat, :mod:`online_llc.calibration.heat`). Each update then changes one chain's
state, its offsets ``xi`` and the sampler's extra state (SGHMC's momentum, RMSProp's second
moments), in place from the batch gradient and standard normal noise
(:class:`online_llc.kernel.step.SGLDConfig` writes the three samplers' equations); the kernel
(:mod:`online_llc.kernel.step`) finds them by sampler name in a table through :func:`_update`.

Memory. The chain state and the arithmetic are float32 (or float64 for a float64 model) whatever
the parameters' dtype: in bfloat16 the localization's contraction ``1 - epsilon gamma / 2``
(about ``1 - 1e-3``) rounds to 1 and the chain never feels its prior. Every operation is in place
(``torch._foreach_*`` where the operation is the same for every tensor), and the gradient buffers
may be consumed: the batch gradient is formed in the second half's gradient buffers. SGLD's noise
is drawn in chunks (:func:`~online_llc.kernel.noise.noise_chunk`: at most 16 of them up to 268M
entries) and added to every tensor a chunk covers in one ``_foreach`` call
(:class:`~online_llc.kernel.noise.Noise`), so its operations do not
grow with the number of tensors and its scratch is one chunk (P / 16, or all of a model below 65k
entries); RMSProp and SGHMC draw each tensor's part of the same
stream into its gradient's buffer once the gradient has been used. The combination and the update
allocate nothing beyond that and one tensor's worth of scratch (RMSProp's preconditioner). When
the discretization bias is measured, the gradients must survive the update: SGLD then copies its
noise into the measurement's own buffer and forms the whole update there
(:func:`_sgld_update_into`), which allocates nothing else either.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from online_llc.config import SGLDConfig
from online_llc.kernel.noise import Noise as _Noise
from online_llc.kernel.noise import noise_std as _noise_std

__all__ = ["dot_sum", "init_aux", "state_dtype"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a chain's state for parameters of ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _norm(tensors: Sequence[Tensor]) -> Tensor:
    """``sqrt(sum ||t||^2)`` over ``tensors``, float64 (each tensor's norm in its own dtype)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))).double())


def dot_sum(tensors: Sequence[Tensor], grads: Sequence[Optional[Tensor]], device: torch.device) -> Tensor:
    """``sum_j tensors[j] . grads[j]`` (float64, on ``device``; parameters without a gradient left
    out, 0 when none has one): the discretization measurement's update dots. One BLAS dot per
    tensor (a product tensor and its float64 sum cost 3-5x as much; float32 accumulation is good
    to about 1e-6 relative, far inside the measurement's sampling noise), a tensor kept in a
    narrower dtype (a bfloat16 last update) widened to its gradient's, one tensor at a time."""
    parts = [torch.dot(t.reshape(-1).to(g.dtype), g.reshape(-1)) for t, g in zip(tensors, grads) if g is not None]
    return torch.stack(parts).double().sum() if parts else torch.zeros((), dtype=torch.float64, device=device)


def _combine_halves(
    g1: List[Optional[Tensor]],
    g2: List[Optional[Tensor]],
    halves: Tuple[int, int],
    names: Sequence[str],
    aux: Mapping[str, Tensor],
    config: SGLDConfig,
    masks: Optional[Mapping[str, Tensor]],
    device: torch.device,
) -> Tuple[List[Optional[Tensor]], Tensor]:
    """The whole batch's mean gradient ``g = (B1 g1 + B2 g2) / B`` and the halves' squared
    difference ``sum_j w_j (g1_j - g2_j)^2`` over the entries the chain moves, with ``w_j = 1``, or
    RMSProp's preconditioner ``G_j`` (from its second moments before this step; a fresh chain's
    first gradient stands in for them). In place: the result reuses ``g2``'s buffers, ``g1``'s are
    scratch (``g1 - g2`` is formed in them)."""
    b1, b2 = halves
    zero = torch.zeros((), dtype=torch.float64, device=device)
    if b2 == 0:
        return g1, zero
    w1, w2 = b1 / (b1 + b2), b2 / (b1 + b2)
    grads: List[Optional[Tensor]] = []
    diffs: List[Tensor] = []
    terms: List[Tensor] = []
    both = [(a, b) for a, b in zip(g1, g2) if a is not None and b is not None]
    if both:
        # d = g1 - g2 in g1's buffers, then g = g2 + w1 d in g2's (one call each for all tensors).
        torch._foreach_sub_([a for a, _ in both], [b for _, b in both])
        torch._foreach_add_([b for _, b in both], [a for a, _ in both], alpha=w1)
    for name, a, b in zip(names, g1, g2):
        if a is None or b is None:  # the loss of one half does not depend on the parameter
            grads.append(None if a is None and b is None else (a * w1 if b is None else b * w2))
            continue
        d = a
        grads.append(b)
        mask = masks.get(name) if masks else None
        if mask is not None:
            d.mul_(mask)
        if config.sampler == "rmsprop_sgld":
            prev = aux[name]
            # G from where(prev > 0, prev, (nbeta g)^2), in one scratch tensor (prev >= 0).
            precond = grads[-1].square().mul_(config.nbeta**2).masked_fill_(prev > 0, 0.0).add_(prev)
            precond.sqrt_().add_(config.rmsprop_eps).reciprocal_()
            terms.append(d.square_().mul_(precond).sum().double())
        else:
            diffs.append(d)
    total = torch.stack(terms).sum() if terms else zero
    if diffs:
        total = total + _norm(diffs).square()
    return grads, total


# The update maths, one function per sampler: (offsets, aux, grads, config, noise) -> None, in
# place. ``grads[j]`` is ``grad_xi L_B(w* + xi)`` of the j-th offset (None when the loss does not
# depend on it) and may be overwritten.


def _sgld_update(
    xs: List[Tensor], aux: List[Tensor], grads: List[Optional[Tensor]], config: SGLDConfig, noise: _Noise
) -> None:
    """``xi <- (1 - eps gamma / 2) xi - (eps nbeta / 2) grad + sqrt(eps) z``."""
    eps = config.step_size
    torch._foreach_mul_(xs, 1.0 - eps * config.localization / 2)
    pairs = [(x, g) for x, g in zip(xs, grads) if g is not None]
    if pairs:
        torch._foreach_add_([x for x, _ in pairs], [g for _, g in pairs], alpha=-eps * config.nbeta / 2)
    if noise.fused(xs):
        # The gradients are used: drop this function's references (with the caller's released,
        # :func:`_update`, their memory is free for the noise's chunk).
        del pairs
        grads.clear()
        noise.add_to(xs, _noise_std(config))
        return
    drawn = [(x, noise(x, g)) for x, g in zip(xs, grads)]
    drawn = [(x, z) for x, z in drawn if z is not None]
    if drawn:
        torch._foreach_add_([x for x, _ in drawn], [z for _, z in drawn], alpha=_noise_std(config))


def _sgld_update_into(
    xs: List[Tensor], grads: List[Optional[Tensor]], into: List[Tensor], config: SGLDConfig, noise: _Noise
) -> None:
    """SGLD's update formed in ``into`` and then added to the offsets:
    ``u = sqrt(eps) z - (eps nbeta / 2) grad - (eps gamma / 2) xi``, ``xi <- xi + u``. The noise is
    drawn into ``into`` (no scratch), the gradients are left intact, and ``into`` holds the
    update afterwards (the discretization measurement reads it), with no copy of the offsets and
    no subtraction to recover it. The same maths as :func:`_sgld_update`, with another order of
    the float operations."""
    eps = config.step_size
    if noise.fused(into):
        noise.copy_to(into)
    else:
        for x, u in zip(xs, into):
            if noise(x, u) is None:
                u.zero_()
    torch._foreach_mul_(into, _noise_std(config))
    pairs = [(u, g) for u, g in zip(into, grads) if g is not None]
    if pairs:
        torch._foreach_add_([u for u, _ in pairs], [g for _, g in pairs], alpha=-eps * config.nbeta / 2)
    if config.localization > 0:
        torch._foreach_add_(into, xs, alpha=-eps * config.localization / 2)
    torch._foreach_add_(xs, into)


def _rmsprop_precond(second_moments: Tensor, config: SGLDConfig) -> Tensor:
    """RMSProp's preconditioner ``G = 1 / (sqrt(V) + delta)`` (a new tensor)."""
    return second_moments.sqrt().add_(config.rmsprop_eps).reciprocal_()


def _rmsprop_sgld_update(
    xs: List[Tensor], aux: List[Tensor], grads: List[Optional[Tensor]], config: SGLDConfig, noise: _Noise
) -> None:
    """``V <- rho V + (1 - rho) g^2``, ``G = 1 / (sqrt(V) + delta)``,
    ``xi <- xi - (eps / 2) G grad U + sqrt(eps G) z``, with ``g = nbeta grad``."""
    rho = config.rmsprop_decay
    gs = [g if g is not None else torch.zeros_like(x) for x, g in zip(xs, grads)]
    torch._foreach_mul_(gs, config.nbeta)
    # A fresh chain starts its second moments at the first gradient's square: a tensor whose
    # moments are all zero takes g^2 (c = 1), the others the moving average (c = 1 - rho). The
    # test stays on the device (no host sync): V <- c (rho / (1 - rho) V + g^2).
    scale = [torch.where(v.any(), 1.0 - rho, 1.0).to(v.dtype) for v in aux]
    torch._foreach_mul_(aux, rho / (1.0 - rho))
    torch._foreach_addcmul_(aux, gs, gs)
    for v, c in zip(aux, scale):
        v.mul_(c)
    # The drift nbeta grad + gamma xi, in the gradient's buffer.
    torch._foreach_add_(gs, xs, alpha=config.localization)
    for x, v, drift in zip(xs, aux, gs):
        precond = _rmsprop_precond(v, config)
        x.addcmul_(precond, drift, value=-config.step_size / 2)
        z = noise(x, drift)
        if z is not None:
            x.addcmul_(z, precond.sqrt_(), value=_noise_std(config))


def _sghmc_update(
    xs: List[Tensor], aux: List[Tensor], grads: List[Optional[Tensor]], config: SGLDConfig, noise: _Noise
) -> None:
    """``v <- (1 - alpha) v - (eps / 2) grad U + sqrt(alpha eps) z``, ``xi <- xi + v``."""
    gs = [g if g is not None else torch.zeros_like(x) for x, g in zip(xs, grads)]
    # The drift nbeta grad + gamma xi, in the gradient's buffer.
    torch._foreach_mul_(gs, config.nbeta)
    torch._foreach_add_(gs, xs, alpha=config.localization)
    torch._foreach_mul_(aux, 1.0 - config.friction)
    torch._foreach_add_(aux, gs, alpha=-config.step_size / 2)
    for x, v, drift in zip(xs, aux, gs):
        z = noise(x, drift)
        if z is not None:
            # Noise variance 2 * alpha * (eps / 2): alpha = 1 gives SGLD's eps.
            v.add_(z, alpha=_noise_std(config) * math.sqrt(config.friction))
    torch._foreach_add_(xs, aux)


#: One update per sampler the configuration accepts (:data:`online_llc.config.SAMPLERS` names them).
_UPDATES: Dict[str, Callable[[List[Tensor], List[Tensor], List[Optional[Tensor]], SGLDConfig, _Noise], None]] = {
    "sgld": _sgld_update,
    "rmsprop_sgld": _rmsprop_sgld_update,
    "sghmc": _sghmc_update,
}



def init_aux(config: SGLDConfig, offset: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The sampler's extra chain state for a fresh chain: SGHMC's momentum ``v`` (zeros) or
    RMSProp's second moments ``V`` (zeros: filled with the first gradient's square), none for
    SGLD; in the offsets' dtype, at least float32 (:func:`state_dtype`)."""
    if config.sampler == "sgld":
        return {}
    return {n: torch.zeros_like(t, dtype=state_dtype(t.dtype)) for n, t in offset.items()}


def _update(
    offset: Mapping[str, Tensor],
    aux: Mapping[str, Tensor],
    grads: Sequence[Optional[Tensor]],
    *,
    config: SGLDConfig,
    generator: torch.Generator,
    masks: Optional[Mapping[str, Tensor]],
    consume_grads: bool = True,
    layouts: Optional[Sequence[Any]] = None,
    into: Optional[Mapping[str, Tensor]] = None,
) -> None:
    """Every parameter's update, in place on ``offset`` and ``aux``, in the offset's order: the
    noise of each is drawn from ``generator`` in that order; the offset and extra state are then
    zeroed outside their masks. With ``consume_grads`` the gradients' buffers receive the drift and
    the noise (they are garbage afterwards); otherwise the noise is drawn into new tensors and the
    gradients are left as they were (the update dots of :func:`online_llc.kernel.step.sampler_step`).
    ``layouts``: the offsets' places in their sharded parameters (see :class:`_Noise`).
    ``into``: buffers, one per offset (same shape and dtype), that receive the update
    ``xi_new - xi``; SGLD forms it there directly (:func:`_sgld_update_into`), leaving the
    gradients intact whatever ``consume_grads`` says; the other samplers copy the offsets in
    before and subtract after."""
    names = list(offset)
    xs = [offset[n] for n in names]
    state = [aux[n] for n in names] if aux else []
    # Consumed gradients of SGLD are released once the drift has used them, before the noise is
    # drawn (a chunk of scratch that then reuses their memory): the caller's list is emptied.
    release = grads if consume_grads and config.sampler == "sgld" and isinstance(grads, list) else None
    grads = list(grads)
    formed_into = into is not None and config.sampler == "sgld"
    if formed_into:
        assert into is not None
        _sgld_update_into(xs, grads, [into[n] for n in names], config, _Noise(config, generator, True, xs, layouts))
    else:
        if into is not None:
            torch._foreach_copy_([into[n] for n in names], xs)
        if not consume_grads and config.sampler != "sgld":
            grads = [None if g is None else g.clone() for g in grads]
        if release is not None:
            release.clear()  # the update receives the only references
        _UPDATES[config.sampler](xs, state, grads, config, _Noise(config, generator, consume_grads, xs, layouts))
    masked = [n for n in names if masks and masks.get(n) is not None]
    if masked:
        assert masks is not None
        ms = [masks[n] for n in masked]
        torch._foreach_mul_([offset[n] for n in masked], ms)
        if aux:
            torch._foreach_mul_([aux[n] for n in masked], ms)
        if formed_into:
            # xi was zero outside its mask, and u = xi_new - xi must be too.
            assert into is not None
            torch._foreach_mul_([into[n] for n in masked], ms)
    if into is not None and not formed_into:
        for n, x in zip(names, xs):
            torch.sub(x, into[n], out=into[n])
