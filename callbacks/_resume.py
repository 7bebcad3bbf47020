"""Reading a callback's saved monitor state on resume, and the ranks' agreement on what to do
with it: nothing here raises before every rank has had its say (a rank that raised alone would
leave the others waiting in a collective)."""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from online_llc.errors import MonitorError
from online_llc.monitor.shards import merge_shards

__all__ = ["everyone", "load_problem", "read_merged", "read_state", "start_afresh"]


def read_state(path: str, version: int) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The state saved at ``path`` and ``None``, or ``None`` and why there is none usable
    (``None`` for a missing file). Never raises: a corrupt file or one of another format is
    reported, so that every rank reaches the agreement."""
    if not os.path.isfile(path):
        return None, None
    try:
        saved = dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - a corrupt file is reported, not raised
        return None, f"an unreadable monitor state {path!r} ({type(exc).__name__})"
    if saved.get("format") != version:
        return None, f"{path!r}, which is not a monitor state of format {version}"
    return saved, None


def read_merged(first: Dict[str, Any], path_of: Any, version: int) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """``first`` (rank 0's saved state) as it is, or, when it holds only rank 0's shards of a
    sharded monitor (``state_dict(shards=True)``), every saving rank's state read
    (``path_of(rank)``) and merged into a full one (:func:`online_llc.monitor.shards.merge_shards`),
    which restores any world size. Never raises: a missing or unreadable rank's file is reported."""
    if "shards" not in first.get("sampler", {}):
        return first, None
    states = [first]
    for rank in range(1, int(first.get("world_size", 1))):
        saved, why = read_state(path_of(rank), version)
        if saved is None:
            return None, why or f"no monitor state {path_of(rank)!r} (a sharded monitor saves one shard per rank)"
        states.append(saved)
    try:
        return merge_shards(states), None
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return None, f"the ranks' shards in {path_of(0)!r} and beside it do not merge ({exc})"


def everyone(device: Optional[torch.device], flag: bool) -> bool:
    """``flag`` on every rank (a MIN all-reduce on ``device``, the CPU by default); ``flag``
    itself outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device or torch.device("cpu"))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def load_problem(monitor: Any, state: Dict[str, Any]) -> Optional[str]:
    """Load ``state`` into ``monitor``; ``None``, or in one line why it does not load (taken with
    other settings, another version): settings that differ must not kill training."""
    try:
        monitor.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - reported through the failure policy instead
        return f"does not load into this monitor ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
    return None


def start_afresh(who: str, problem: str, step: int, *, strict: bool, stacklevel: int) -> None:
    """Say that ``who`` starts a fresh monitor at ``step`` because of ``problem``: a warning, or
    with ``strict`` a :class:`~online_llc.errors.MonitorError`."""
    message = f"{who} found {problem}: the LLC estimate starts afresh at step {step}."
    if strict:
        raise MonitorError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
