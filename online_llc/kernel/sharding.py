"""Refuse models whose parameters the sampler cannot substitute: sharded or partitioned ones.

The kernel evaluates the loss at ``w* + xi`` by substituting parameters through
``torch.func.functional_call`` (:class:`~online_llc.kernel.evaluator.LossEvaluator`). Wrappers that
manage their own parameter storage defeat that silently:

* FSDP2 (``torch.distributed.fsdp.fully_shard``): the forward's pre-hook all-gathers the module's
  own shards and swaps them in, so a substituted parameter is ignored. Checked on 2 CPU processes
  (gloo): the substituted forward returned exactly the unperturbed output and the offsets got no
  gradient, so every draw would read ``L(w*)`` and the estimate would be about zero. The online
  monitor moves the shards themselves instead (:mod:`online_llc.kernel.fsdp`); the offline estimator,
  which substitutes, refuses FSDP2 through this check.
* FSDP1 (``FullyShardedDataParallel``): the trainable parameters are flat shards
  (``_flat_param``), one per wrapped unit, not the model's weights.
* DeepSpeed ZeRO stage 3: parameters are placeholders of size zero between forwards.
* Tensor parallelism (``DTensor`` parameters): the norms and noise would be per shard.

None of them raises an error of its own, so the check is made at construction, by the wrappers'
class names and the parameters' attributes (no import of the distributed packages, which a
build of torch may lack, or of DeepSpeed). DDP is fine: its parameters are whole on every rank.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["check_unsharded", "sharding_of"]

_WRAPPERS = {
    "FSDPModule": "FSDP2 (fully_shard)",
    "FullyShardedDataParallel": "FSDP (FullyShardedDataParallel)",
    "DeepSpeedEngine": "DeepSpeed",
}


def sharding_of(model: nn.Module) -> Optional[str]:
    """What shards or partitions ``model``'s parameters, or ``None`` for an ordinary model."""
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls.__name__ in _WRAPPERS:
                return _WRAPPERS[cls.__name__]
    for _, p in model.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            return "DeepSpeed ZeRO-3 (partitioned parameters)"
        if any(cls.__name__ == "DTensor" for cls in type(p).__mro__):
            return "DTensor parameters (tensor parallelism or FSDP2)"
        if any(cls.__name__ == "FlatParameter" for cls in type(p).__mro__):
            return "FSDP (FullyShardedDataParallel)"
    return None


def check_unsharded(model: nn.Module) -> None:
    """Raise ``ValueError`` naming ``model`` when its parameters are sharded or partitioned.

    Raises:
        ValueError: ``model`` is, or contains, an FSDP, FSDP2 or DeepSpeed module, or holds
            DTensor or DeepSpeed-partitioned parameters.
    """
    kind = sharding_of(model)
    if kind is not None:
        raise ValueError(
            f"Expected `model` to hold whole parameters on every rank (a single device or DDP), got a model "
            f"sharded by {kind}: its forward uses its own parameter shards and ignores the weights the sampler "
            "substitutes, so every draw would read the unperturbed loss. The online monitor (OnlineLLC) supports "
            "FSDP2 (fully_shard); otherwise pass the unwrapped module with DDP, or estimate offline on a gathered "
            "copy of the weights."
        )
