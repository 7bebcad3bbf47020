"""Reading a callback's saved monitor state on resume, and the ranks' agreement on what to do
with it: nothing here raises before every rank has had its say (a rank that raised alone would
leave the others waiting in a collective)."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["everyone", "read_state"]


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


def everyone(device: Optional[torch.device], flag: bool) -> bool:
    """``flag`` on every rank (a MIN all-reduce on ``device``, the CPU by default); ``flag``
    itself outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device or torch.device("cpu"))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())
