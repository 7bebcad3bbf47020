"""The shadow chains' checkpoint helpers: restoring chain tensors, the discretization
measurement's pairing and the chains' generators (:meth:`online_llc.monitor.shadow.ShadowSampler.load_state_dict`).

Flow: checkpoint -> **shadow_state** -> ShadowSampler -> Track.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from online_llc.kernel.updates import state_dtype

__all__ = ["to_state", "saved_update", "load_generators"]


def to_state(t: Tensor, like: Tensor) -> Tensor:
    """A loaded chain tensor on ``like``'s device, in the chain state's dtype (at least float32)."""
    return t.detach().to(device=like.device, dtype=state_dtype(like.dtype), copy=True)


def saved_update(
    state: Mapping[str, Any], c: int, num_chains: int, like: Mapping[str, Tensor], evaluator: Any
) -> Tuple[Optional[Dict[str, Tensor]], float, float]:
    """Chain ``c``'s last update, its dot and heat bias from ``state`` (the discretization
    measurement's pairing), or ``(None, nan, nan)`` where the state has none for these chains
    and parameters (states of other chains or shapes restart the pairing at the next step).
    A sharded ``evaluator`` takes its shards of the saved full tensors."""
    updates = state.get("updates")
    prev = updates[c] if isinstance(updates, list) and len(updates) == num_chains else None
    if not isinstance(prev, Mapping) or set(prev) != set(like):
        return None, math.nan, math.nan
    if evaluator.sharded:
        prev = evaluator.take_shards(prev)
    if any(tuple(t.shape) != tuple(like[n].shape) for n, t in prev.items()):
        return None, math.nan, math.nan
    dot = state.get("last_dot", [None] * num_chains)[c]
    hb = state.get("last_heat_bias", [None] * num_chains)[c]
    return (
        {n: to_state(t, like[n]) for n, t in prev.items()},
        math.nan if dot is None else float(dot),
        math.nan if hb is None else float(hb),
    )


def load_generators(generators: List[torch.Generator], states: List[Any], device_type: str, device: torch.device) -> bool:
    """Set each generator's saved state; False (nothing set) when they were saved on another
    device type, whose generator states do not carry over."""
    if device_type != device.type:
        return False
    for g, st in zip(generators, states):
        g.set_state(st.cpu() if isinstance(st, Tensor) else torch.tensor(st, dtype=torch.uint8))
    return True
