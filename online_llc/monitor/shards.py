"""Checkpoints of a sharded monitor in shards: every rank saves its own 1/R of the chains, and the
ranks' states merge into a full one.

Flow: OnlineLLC.state_dict(shards=True) on each rank -> files -> **merge_shards** -> a full state
-> OnlineLLC.load_state_dict on any world size, or on an unsharded monitor.

Under FSDP2 (:mod:`online_llc.kernel.fsdp`) one chain spans all ranks: each keeps its shard of the
offsets, the sampler state and the last update. ``state_dict()`` gathers them to full CPU tensors
on every rank (for a 7B-parameter float32 chain, tens of GB of host memory per rank, and R
identical copies when every rank saves); ``state_dict(shards=True)`` keeps each rank's own, with
its layout (rank, world size, and per parameter the full shape, the sharded dimension, the start
and length of the shard). Such a state restores the same rank of the same layout as it is; for
another world size (or an unsharded monitor) :func:`merge_shards` puts the full tensors together
from every rank's state, one tensor at a time. Everything else in a state (windows, filters,
generators, histories) is the same on every rank, and is taken from rank 0's.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["merge_shards"]

# The per-chain tensors a sampler's state holds, each a list (one dict per chain, or None).
_CHAIN_KEYS = ("offsets", "aux", "updates")


def merge_shards(states: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """A full :class:`~online_llc.OnlineLLC` state from every rank's ``state_dict(shards=True)``.

    Args:
        states: one state per rank of the run that saved them, in any order.

    Returns:
        A state as ``state_dict()`` gives it (full tensors on the CPU), which loads into a monitor
        sharded over any number of ranks, or into an unsharded one.

    Raises:
        ValueError: a state that holds no shards, or states that are not exactly one per rank of
            one run.
    """
    states = list(states)
    if not states:
        raise ValueError("Expected `states` to hold one state per rank, got none.")
    samplers = [_samplers(s) for s in states]
    infos = [next(iter(s.values())).get("shards") if s else None for s in samplers]
    if any(info is None for info in infos):
        raise ValueError("Expected `states` from OnlineLLC.state_dict(shards=True), got a state without shards.")
    world = infos[0]["world"]
    ranks = sorted(info["rank"] for info in infos)
    if ranks != list(range(world)) or any(info["world"] != world for info in infos):
        raise ValueError(f"Expected one state per rank of a run on {world} ranks, got the states of ranks {ranks}.")
    order = sorted(range(len(states)), key=lambda i: infos[i]["rank"])
    merged = _copy(states[order[0]])
    for path, target in _samplers(merged).items():
        parts = [samplers[i][path] for i in order]
        for key in _CHAIN_KEYS:
            target[key] = [_merge_chain([p[key][c] for p in parts], [p["shards"] for p in parts])
                           for c in range(len(parts[0][key]))]
        target.pop("shards")
    return merged


def _samplers(state: Mapping[str, Any]) -> Dict[Optional[str], Dict[str, Any]]:
    """Every track's sampler state in a monitor state: the whole model's (``None``) and each
    group's, by name."""
    out: Dict[Optional[str], Dict[str, Any]] = {None: state["sampler"]} if "sampler" in state else {}
    for name, group in (state.get("groups") or {}).items():
        out[name] = group["sampler"]
    return out


def _copy(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``state`` whose sampler states (and the dicts above them) can be replaced."""
    out = dict(state)
    if "sampler" in out:
        out["sampler"] = dict(out["sampler"])
    if out.get("groups"):
        out["groups"] = {n: {**g, "sampler": dict(g["sampler"])} for n, g in out["groups"].items()}
    return out


def _merge_chain(pieces: List[Optional[Mapping[str, Tensor]]], infos: List[Mapping[str, Any]]) -> Optional[Dict[str, Tensor]]:
    """One chain's full tensors from the ranks' shards (``None`` where the ranks hold none: a
    last update not kept)."""
    if any(p is None for p in pieces):
        return None
    full: Dict[str, Tensor] = {}
    for name, first in pieces[0].items():
        shape, dim = infos[0]["layouts"][name][:2]
        t = torch.empty(shape, dtype=first.dtype)
        for piece, info in zip(pieces, infos):
            _, _, start, length = info["layouts"][name]
            t.narrow(dim, start, length).copy_(piece[name])
        full[name] = t
    return full
