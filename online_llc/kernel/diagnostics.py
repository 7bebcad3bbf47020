"""Diagnostics of the kernel's steps: the Metropolis (MALA) acceptance of one SGLD proposal."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from online_llc.config import SGLDConfig
from online_llc.kernel.evaluator import LossEvaluator, moved_weights
from online_llc.kernel.randomness import private_rng

__all__ = ["mala_acceptance"]


def mala_acceptance(
    evaluator: LossEvaluator,
    center: Mapping[str, Tensor],
    offset: Mapping[str, Tensor],
    batch: Any,
    *,
    config: SGLDConfig,
    generator: torch.Generator,
    masks: Optional[Mapping[str, Tensor]] = None,
) -> float:
    """Metropolis-adjusted acceptance probability of one SGLD proposal from ``offset`` (a step-size
    diagnostic; the chain itself is not moved and never rejects).

    With the potential ``U(xi) = nbeta L_B(w* + xi) + (gamma / 2) ||xi||^2`` on one batch, SGLD
    proposes ``xi' ~ q(. | xi) = N(xi - (eps / 2) grad U(xi), eps I)``; MALA (Roberts and Tweedie
    1996) would accept it with probability::

        alpha = min(1, exp( U(xi) - U(xi') + log q(xi | xi') - log q(xi' | xi) )).

    ``alpha`` is 1 for an exact sampler and falls as the discretization error grows: devinterp's
    authors report mean acceptances about 0.9 for well-tuned LLC chains. Both potentials use the
    same batch (and the same dropout masks), so batch noise does not enter. Costs two forward and
    backward passes; ``generator`` draws the proposal (pass one that is not the chain's, so the
    audit does not change its trajectory).

    Returns:
        ``alpha`` in [0, 1], or NaN if a loss is not finite.
    """
    eps, nbeta, gamma = config.step_size, config.nbeta, config.localization
    noise_std = math.sqrt(eps) * config.noise_scale
    if noise_std == 0:
        return math.nan  # deterministic dynamics: no proposal density

    def potential(xi: Mapping[str, Tensor]) -> Tuple[float, List[Tensor]]:
        rewind()
        leaf = {n: t.detach().requires_grad_(True) for n, t in xi.items()}
        # w* + xi cast to the parameters' dtype (offsets are float32 for a bfloat16 model).
        loss = evaluator.losses(moved_weights(center, leaf), batch).mean()
        grads = torch.autograd.grad(loss, list(leaf.values()), allow_unused=True)
        with torch.no_grad():
            u = nbeta * float(loss.detach().double()) + 0.5 * gamma * sum(
                float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2 for t in xi.values()
            )
            full = []
            for (name, x), g in zip(xi.items(), grads):
                d = x.detach() * gamma
                if g is not None:
                    d = d + nbeta * g
                mask = masks.get(name) if masks else None
                full.append(d * mask if mask is not None else d)
        return u, full

    with evaluator.mode_context(), private_rng(center, generator) as rewind, torch.enable_grad():
        u0, g0 = potential(offset)
        with torch.no_grad():
            prop: Dict[str, Tensor] = {}
            for (name, x), g in zip(offset.items(), g0):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                mask = masks.get(name) if masks else None
                if mask is not None:
                    z = z * mask
                prop[name] = x - (eps / 2) * g + noise_std * z
        u1, g1 = potential(prop)
    if not (math.isfinite(u0) and math.isfinite(u1)):
        return math.nan
    with torch.no_grad():
        fwd = bwd = 0.0  # ||xi' - xi + (eps/2) grad U(xi)||^2 and the reverse
        for (name, x), ga, gb in zip(offset.items(), g0, g1):
            xp = prop[name]
            fwd += float(torch.linalg.vector_norm((xp - x + (eps / 2) * ga).double())) ** 2
            bwd += float(torch.linalg.vector_norm((x - xp + (eps / 2) * gb).double())) ** 2
    var = noise_std**2
    log_alpha = u0 - u1 + (fwd - bwd) / (2 * var)
    return 1.0 if log_alpha >= 0 else math.exp(log_alpha)
