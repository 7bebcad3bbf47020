"""The update maths of the sampler kernel: one small pure function per sampler.

Each maps one parameter's state record ``(offset, aux)``, its gradient and its standard normal
noise to the new record (:class:`online_llc.sgld.SGLDConfig` writes the three samplers' equations);
:func:`online_llc.sgld.sampler_step` finds them by sampler name in a table and applies them to
every parameter through :func:`_update`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .sgld import SGLDConfig

__all__ = ["SAMPLERS", "init_aux"]


class _ParamState(NamedTuple):
    """One parameter's chain state: its offset ``xi`` and the sampler's extra state (SGHMC's
    momentum ``v`` or RMSProp's second moments ``V``; ``None`` for SGLD)."""

    offset: Tensor
    aux: Optional[Tensor]


def _noise_std(config: SGLDConfig) -> float:
    """The injected noise's standard deviation, ``sqrt(epsilon) * noise_scale``."""
    return math.sqrt(config.step_size) * config.noise_scale


# The update maths, one function per sampler: (state, grad, noise, config) -> new state, where
# ``grad`` is ``grad_xi L_B(w* + xi)`` (None when the loss does not depend on the parameter) and
# ``noise`` a standard normal draw of the offset's shape (None for the deterministic dynamics).
# Each builds its result in new tensors and never modifies its inputs.


def _sgld_update(
    state: _ParamState, grad: Optional[Tensor], noise: Optional[Tensor], config: SGLDConfig
) -> _ParamState:
    """``xi <- (1 - eps gamma / 2) xi - (eps nbeta / 2) grad + sqrt(eps) z``."""
    eps = config.step_size
    # In place on one new tensor.
    new = state.offset * (1.0 - eps * config.localization / 2)
    if grad is not None:
        new.add_(grad, alpha=-eps * config.nbeta / 2)
    if noise is not None:
        new.add_(noise, alpha=_noise_std(config))
    return _ParamState(new, None)


def _rmsprop_precond(second_moments: Tensor, config: SGLDConfig) -> Tensor:
    """RMSProp's preconditioner ``G = 1 / (sqrt(V) + delta)``."""
    return 1.0 / (second_moments.sqrt() + config.rmsprop_eps)


def _rmsprop_sgld_update(
    state: _ParamState, grad: Optional[Tensor], noise: Optional[Tensor], config: SGLDConfig
) -> _ParamState:
    """``V <- rho V + (1 - rho) g^2``, ``G = 1 / (sqrt(V) + delta)``,
    ``xi <- xi - (eps / 2) G grad U + sqrt(eps G) z``, with ``g = nbeta grad``."""
    x = state.offset
    g_loss = grad * config.nbeta if grad is not None else torch.zeros_like(x)
    prev = state.aux
    # A fresh chain starts its second moments at the first gradient's square.
    first = not bool(prev.any())
    sq = g_loss * g_loss
    v2 = sq if first else prev * config.rmsprop_decay + sq * (1.0 - config.rmsprop_decay)
    precond = _rmsprop_precond(v2, config)
    drift = x * config.localization + g_loss
    new = x - (config.step_size / 2) * precond * drift
    if noise is not None:
        new.add_(noise * precond.sqrt(), alpha=_noise_std(config))
    return _ParamState(new, v2)


def _sghmc_update(
    state: _ParamState, grad: Optional[Tensor], noise: Optional[Tensor], config: SGLDConfig
) -> _ParamState:
    """``v <- (1 - alpha) v - (eps / 2) grad U + sqrt(alpha eps) z``, ``xi <- xi + v``."""
    drift = state.offset * config.localization
    if grad is not None:
        drift.add_(grad, alpha=config.nbeta)
    v = state.aux * (1.0 - config.friction)
    v.add_(drift, alpha=-config.step_size / 2)
    if noise is not None:
        # Noise variance 2 * alpha * (eps / 2): alpha = 1 gives SGLD's eps.
        v.add_(noise, alpha=_noise_std(config) * math.sqrt(config.friction))
    return _ParamState(state.offset + v, v)


_UPDATES: Dict[str, Callable[[_ParamState, Optional[Tensor], Optional[Tensor], SGLDConfig], _ParamState]] = {
    "sgld": _sgld_update,
    "rmsprop_sgld": _rmsprop_sgld_update,
    "sghmc": _sghmc_update,
}

#: The samplers :func:`sampler_step` implements.
SAMPLERS = tuple(_UPDATES)


def init_aux(config: SGLDConfig, offset: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The sampler's extra chain state for a fresh chain: SGHMC's momentum ``v`` (zeros) or
    RMSProp's second moments ``V`` (zeros: filled with the first gradient's square), none for SGLD."""
    if config.sampler == "sgld":
        return {}
    return {n: torch.zeros_like(t) for n, t in offset.items()}


def _update(
    offset: Mapping[str, Tensor],
    aux: Mapping[str, Tensor],
    grads: Sequence[Optional[Tensor]],
    *,
    config: SGLDConfig,
    generator: torch.Generator,
    masks: Optional[Mapping[str, Tensor]],
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Every parameter's update, in the offset's order: its noise is drawn from ``generator`` just
    before its update (the order of the draws is part of a seed's trajectory), then the new offset
    and extra state are zeroed outside its mask."""
    update = _UPDATES[config.sampler]
    sample_noise = _noise_std(config) > 0
    new_offset: Dict[str, Tensor] = {}
    new_aux: Dict[str, Tensor] = {}
    for (name, x), g in zip(offset.items(), grads):
        noise = None
        if sample_noise:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        new, v = update(_ParamState(x, aux[name] if aux else None), g, noise, config)
        mask = masks.get(name) if masks else None
        if mask is not None:
            new.mul_(mask)
            if v is not None:
                v = v * mask
        new_offset[name] = new
        if v is not None:
            new_aux[name] = v
    return new_offset, new_aux
