"""What the sharded evaluator (:mod:`online_llc.kernel.fsdp`) needs of FSDP2's and the process
group's state around its passes: a user's no-sync block set aside and put back, and the ranks'
agreement on a failed pass.

Flow: training loop -> ShadowSampler (sgld kernel, sharded evaluator, **its guards**) ->
WindowStats -> LLCFilter -> OnlineLLC records -> callbacks.

Why an agreement. A sharded shadow step is a chain of collectives (each forward's all-gathers,
each backward's reduce-scatters, the statistics' all-gather). A rank whose ``loss_fn`` raises on
its own batch after the model's forward (a malformed batch, an output of the wrong shape) would
leave the other ranks waiting in the next collective for ever, and "a monitor failure never
stops training" would not hold. After each forward every rank therefore joins one all-reduce of
a flag (one number, next to the forward's all-gathers of the whole model): if any rank failed,
every rank raises, and the callbacks disable the monitor on every rank together. What it cannot
cover: a failure inside the model's own forward or backward (out of memory mid-layer) leaves the
others in FSDP's collective, as it would in training, until the process group's timeout.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from online_llc.errors import MonitorError

__all__ = ["agree_on_failure"]


def agree_on_failure(failure: Optional[BaseException], group: Any, rank: int, device: torch.device) -> None:
    """Every rank of ``group`` learns whether any rank failed its pass: ``failure`` (this rank's
    exception, ``None`` when its pass succeeded) is re-raised where it happened; the other ranks
    raise a :class:`~online_llc.errors.MonitorError` naming the failed rank. One all-reduce of a
    number (the highest failed rank plus one), a collective: every rank must call it after each
    forward.

    Raises:
        BaseException: ``failure``, on its rank.
        MonitorError: on the other ranks, when a rank failed.
    """
    flag = torch.tensor([0.0 if failure is None else float(rank + 1)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if failure is not None:
        raise failure
    failed = int(flag.item())
    if failed:
        raise MonitorError(
            f"rank {failed - 1} failed in the shadow step's forward (its own error is raised there): every rank "
            "stops the step, so that none waits for it in the next collective"
        )


_PRIVATE_STATE_WARNED = False


def _sync_state(modules: Sequence[nn.Module]) -> Tuple[List[Tuple[Any, bool, bool]], List[Tuple[Any, Any, Any]]]:
    """Set aside what a no-sync block leaves in private FSDP2 state (there is no public API):
    each parameter group's sync flags, and each parameter's pending unsharded gradient
    (``_unsharded_param.grad``, or ``unsharded_accumulated_grad`` under a reduce dtype), which
    are emptied for the passes. Where this torch keeps them elsewhere, warn once and leave them.

    Returns:
        ``(group, reduce_grads, all_reduce_grads)`` per group and ``(fsdp_param, grad,
        accumulated)`` per parameter with a pending gradient, for :func:`_restore_sync_state`.
    """
    global _PRIVATE_STATE_WARNED
    flags: List[Tuple[Any, bool, bool]] = []
    pending: List[Tuple[Any, Any, Any]] = []
    try:
        groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]  # type: ignore[attr-defined]
        for group in groups:
            flags.append((group, bool(group.reduce_grads), bool(group.all_reduce_grads)))
            for fp in group.fsdp_params:
                unsharded = getattr(fp, "_unsharded_param", None)
                grad = None if unsharded is None else unsharded.grad
                accumulated = fp.unsharded_accumulated_grad
                if grad is not None or accumulated is not None:
                    pending.append((fp, grad, accumulated))
    except AttributeError as exc:
        # A future torch may move this state: the passes still run, but a user's no-sync flags
        # and accumulated gradient can no longer be protected, which the user must hear.
        if not _PRIVATE_STATE_WARNED:
            _PRIVATE_STATE_WARNED = True
            warnings.warn(
                f"OnlineLLC: this torch keeps FSDP2's gradient-sync state where the monitor does not look ({exc}): "
                "a shadow step inside set_requires_gradient_sync(False) would change the accumulated gradient. "
                "Call monitor.update() after the optimizer step, outside no-sync blocks.",
                RuntimeWarning,
                stacklevel=4,
            )
        return [], []
    for fp, grad, accumulated in pending:
        if grad is not None:
            fp._unsharded_param.grad = None
        fp.unsharded_accumulated_grad = None
    return flags, pending


def _restore_sync_state(flags: Sequence[Tuple[Any, bool, bool]], pending: Sequence[Tuple[Any, Any, Any]]) -> None:
    for group, reduce, all_reduce in flags:
        group.reduce_grads, group.all_reduce_grads = reduce, all_reduce
    for fp, grad, accumulated in pending:
        if grad is not None:
            fp._unsharded_param.grad = grad
        fp.unsharded_accumulated_grad = accumulated
