"""What a framework adapter does when its monitor fails at a training step, shared so that every
adapter fails the same way. No framework import."""

from __future__ import annotations

import warnings

from online_llc.errors import MonitorError
from online_llc.monitor.estimator import OnlineLLC

__all__ = ["monitor_failed", "placeholders_after_failure", "placeholders_stopped"]

# Appended to an adapter's failure description once its placeholder draws raised too.
_STOPPED = "placeholders stopped"


def monitor_failed(
    adapter: str, monitor: OnlineLLC, step: int, exc: Exception, *, strict: bool, world_size: int
) -> str:
    """Handle ``exc``, raised by ``monitor.update`` at training step ``step``; call it from the
    ``except`` block.

    With ``strict`` it re-raises as :class:`MonitorError`. Otherwise the adapter disables itself:
    under DDP every track whose draw of the due step never reached its window gets its placeholder
    now (the other ranks' gathers wait for it), one warning says so, and the failure's description
    is returned for the adapter to keep.
    """
    if strict:
        raise MonitorError(f"{adapter} failed at step {step}: {exc!r}") from exc
    failure = f"step {step}: {type(exc).__name__}: {exc}"
    if world_size > 1 and monitor.owes_draw:
        try:
            monitor.skip_step(step)
        except Exception as again:  # noqa: BLE001 - the handler must not raise what it handles
            failure += f"; its placeholder draws failed too: {type(again).__name__}: {again}"
    warnings.warn(
        f"{adapter} disabled itself after a failure ({failure}); training continues. Pass strict=True to raise instead.",
        RuntimeWarning,
        stacklevel=3,
    )
    return failure


def placeholders_after_failure(adapter: str, monitor: OnlineLLC, step: int, failure: str) -> str:
    """After a failure under DDP, keep this rank in each window's collective with flagged
    placeholders (``monitor.skip_step``); call it at every training step. If that raises too (a
    broken process group, another rank gone), it must not reach training either: one warning,
    and the returned description (``failure`` with a ``"; placeholders stopped"`` note) tells the
    adapter to stop calling it (:func:`placeholders_stopped`)."""
    try:
        monitor.skip_step(step)
    except Exception as exc:  # noqa: BLE001 - the monitor must not kill training
        warnings.warn(
            f"{adapter}: the placeholder draws after its failure raised at step {step} "
            f"({type(exc).__name__}: {exc}); it stops joining the other ranks' collectives.",
            RuntimeWarning,
            stacklevel=3,
        )
        return f"{failure}; {_STOPPED} at step {step}: {type(exc).__name__}: {exc}"
    return failure


def placeholders_stopped(failure: str) -> bool:
    """Whether :func:`placeholders_after_failure` gave up on this failure."""
    return _STOPPED in failure
