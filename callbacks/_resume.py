"""Reading a callback's saved monitor state on resume, and the ranks' agreement on what to do
with it: nothing here raises before every rank has had its say (a rank that raised alone would
leave the others waiting in a collective)."""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from online_llc.errors import MonitorError

__all__ = ["everyone", "load_problem", "read_state", "start_afresh"]


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
