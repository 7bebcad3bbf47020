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

__all__ = ["to_state", "saved_update", "load_generators", "check_own_shards", "chain_tensors", "update_dtype", "keep_update"]


def update_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a chain of state ``dtype`` keeps its last update between measuring steps:
    bfloat16 for float32 chains, float32 for float64 ones, half the bytes (half a copy of the
    parameters per chain in measuring windows). The update only enters the discretization
    measurement, through the difference ``u_t . (g_{t+1} - g_t)`` of its dots with two consecutive
    gradients (:func:`online_llc.calibration.heat.discretization_term`); both dots take the kept,
    rounded ``u_t``, so the rounding moves that difference by about its own 2^-9 (relative), far
    inside the measurement's sampling noise; the chain itself moves with the exact update."""
    return torch.float32 if dtype == torch.float64 else torch.bfloat16


def keep_update(update: Mapping[str, Tensor], kept: Optional[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """``update`` (a step's update, in the chain's dtype) rounded into the kept buffers ``kept``,
    allocated in :func:`update_dtype` on the first call; returns them."""
    if kept is None:
        kept = {n: torch.empty_like(t, dtype=update_dtype(t.dtype)) for n, t in update.items()}
    torch._foreach_copy_(list(kept.values()), list(update.values()))
    return kept


def chain_tensors(part: List[Optional[Dict[str, Tensor]]], evaluator: Any, shards: bool) -> List[Optional[Dict[str, Tensor]]]:
    """Copies of one kind of per-chain tensors (offsets, sampler state or last updates) for a
    state: as they are, unsharded; for a model sharded by FSDP2, gathered to full tensors on the
    CPU (a collective: a chain spans all ranks, and any rank's full state restores every rank at
    any world size), or with ``shards`` this rank's own shards on the CPU."""
    if evaluator.sharded and not shards:
        return [None if d is None else evaluator.gather_full(d) for d in part]
    return [None if d is None else {n: t.detach().to("cpu", copy=True) if shards else t.detach().clone() for n, t in d.items()}
            for d in part]


def to_state(t: Tensor, like: Tensor) -> Tensor:
    """A loaded chain tensor on ``like``'s device, in the chain state's dtype (at least float32)."""
    return t.detach().to(device=like.device, dtype=state_dtype(like.dtype), copy=True)


def saved_update(
    state: Mapping[str, Any], c: int, num_chains: int, like: Mapping[str, Tensor], evaluator: Any
) -> Tuple[Optional[Dict[str, Tensor]], float, float]:
    """Chain ``c``'s last update, its dot and heat bias from ``state`` (the discretization
    measurement's pairing), or ``(None, nan, nan)`` where the state has none for these chains
    and parameters (states of other chains or shapes restart the pairing at the next step).
    A sharded ``evaluator`` takes its shards of the saved full tensors (``None``: the state holds
    this rank's shards already)."""
    updates = state.get("updates")
    prev = updates[c] if isinstance(updates, list) and len(updates) == num_chains else None
    if not isinstance(prev, Mapping) or set(prev) != set(like):
        return None, math.nan, math.nan
    if evaluator is not None and evaluator.sharded:
        prev = evaluator.take_shards(prev)
    if any(tuple(t.shape) != tuple(like[n].shape) for n, t in prev.items()):
        return None, math.nan, math.nan
    dot = state.get("last_dot", [None] * num_chains)[c]
    hb = state.get("last_heat_bias", [None] * num_chains)[c]
    return (
        {n: t.detach().to(device=like[n].device, dtype=update_dtype(state_dtype(like[n].dtype)), copy=True) for n, t in prev.items()},
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


def check_own_shards(state: Mapping[str, Any], evaluator: Any) -> bool:
    """Whether ``state`` holds one rank's shards (``state_dict(shards=True)``), checked to be this
    rank's own: the same rank of the same layout.

    Raises:
        ValueError: a state of another rank's shards, of another layout, or loaded into an
            unsharded monitor: the ranks' states must be merged into a full one first.
    """
    saved = state.get("shards")
    if saved is None:
        return False
    mine = evaluator.shard_info() if evaluator.sharded else None
    if saved != mine:
        where = "an unsharded monitor" if mine is None else f"rank {mine['rank']} of {mine['world']}"
        raise ValueError(
            f"Expected a full monitor state or this rank's own shards, got the shards of rank {saved['rank']} of "
            f"{saved['world']} for {where}: merge every rank's state first "
            "(online_llc.monitor.shards.merge_shards(states)), which restores at any world size."
        )
    return True
