"""Sharded models are refused at construction, in the core (not only by the Lightning adapter)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from test_fsdp import run_two_processes
from torch import nn

from online_llc import OnlineLLC, estimate_llc
from online_llc.kernel.sharding import sharding_of


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean(dim=1)


def test_partitioned_parameters_are_refused_naming_the_model():
    """A parameter carrying DeepSpeed's partition attributes (ZeRO-3) is refused by both
    estimators; the same model without them is accepted."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert sharding_of(model) is None
    OnlineLLC(model, mse, num_samples=100, every_n_steps=1, window=5)
    model[0].weight.ds_id = 0
    with pytest.raises(ValueError, match=r"`model`.*DeepSpeed ZeRO-3"):
        OnlineLLC(model, mse, num_samples=100, every_n_steps=1, window=5)
    batches = [(torch.randn(8, 3), torch.randn(8, 2))]
    with pytest.raises(ValueError, match=r"`model`.*DeepSpeed ZeRO-3"):
        estimate_llc(model, mse, batches, num_samples=100, num_draws=10)


SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from online_llc import OnlineLLC

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)

    def mlp():
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def mse(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(dim=1)

    out = {}
    # Why the refusal: FSDP2's forward ignores substituted weights (the output is unchanged).
    m2 = mlp()
    fully_shard(m2[0]); fully_shard(m2[2]); fully_shard(m2)
    x = torch.randn(5, 8)
    moved = {n: p.detach() + 0.5 for n, p in m2.named_parameters()}
    out["fsdp2_ignores_substitution"] = bool(torch.equal(torch.func.functional_call(m2, moved, (x,)), m2(x)))
    # A fresh one for the monitor: functional_call on m2 left its registered parameters swapped.
    m3 = mlp()
    fully_shard(m3[0]); fully_shard(m3[2]); fully_shard(m3)
    for name, model in (("fsdp2", m3), ("fsdp1", FullyShardedDataParallel(mlp(), device_id=torch.device("cpu")))):
        try:
            OnlineLLC(model, mse, num_samples=100, every_n_steps=1, window=5)
            out[name] = "accepted"
        except ValueError as exc:
            out[name] = str(exc)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_fsdp1_models_are_refused_and_fsdp2_ones_accepted_on_two_processes(tmp_path):
    """Two CPU processes (gloo): a model wrapped in FSDP1 is refused with a message naming
    ``model`` and the wrapper, on every rank; one sharded with FSDP2 (``fully_shard``) is accepted
    by the online monitor, which moves its shards (``tests/test_fsdp.py``). The script first checks
    why substitution cannot serve FSDP2: its forward returns the unperturbed output for
    substituted weights."""
    ranks = run_two_processes(tmp_path, SCRIPT)
    for out in ranks:
        assert out["fsdp2_ignores_substitution"] is True
        assert out["fsdp2"] == "accepted"
        assert out["fsdp1"].startswith("Expected `model`") and "FullyShardedDataParallel" in out["fsdp1"]
