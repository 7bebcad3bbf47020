"""The shadow chain on an FSDP2-sharded model (``fully_shard``), on two CPU processes (gloo).

The oracle is the unsharded monitor: a chain sharded over two ranks must be, to float tolerance,
the unsharded chain with the same seed stepping on the union of the ranks' batches (ordered so its
halves are the ranks' halves). Training itself must be bit-identical with and without the monitor.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

from online_llc.kernel.fsdp import _layout

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from online_llc import OnlineLLC, estimate_llc

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    B, STEPS, N = 8, 60, 4096
    # float64 throughout, so that the comparison with the unsharded run is sharp: a draw is nbeta
    # (about 500) times a difference of two losses, and float32 losses summed in another order
    # (a rank's batch against the union) already differ by ~1e-4 of the draw.
    torch.set_default_dtype(torch.float64)

    def mlp():
        torch.manual_seed(0)  # 6 -> 10 -> 4 -> 3: the last layer's 3 rows shard unevenly (2 + 1)
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 3))

    def mse(model, batch):
        x, y = batch
        return 0.5 * ((model(x) - y) ** 2).sum(dim=1)

    def shard(m):
        for i in (0, 2, 4):
            fully_shard(m[i])
        # The root keeps its unsharded parameters after the forward: the evaluator must reshard.
        return fully_shard(m, reshard_after_forward=False)

    def batches(step):
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(world, B, 6, generator=g), torch.randn(world, B, 3, generator=g)

    def union(xs, ys):
        # The ranks' first halves, then their second halves: the union's halves are the ranks'.
        h = B // 2
        cat = lambda t: torch.cat([t[:, :h].reshape(-1, t.shape[-1]), t[:, h:].reshape(-1, t.shape[-1])])
        return cat(xs), cat(ys)

    def train(model, monitor, sharded, steps=range(1, STEPS + 1), opt=None):
        opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
        for t in steps:
            xs, ys = batches(t)
            opt.zero_grad()
            mine = (xs[rank], ys[rank]) if sharded else (xs.reshape(-1, 6), ys.reshape(-1, 3))
            mse(model, mine).mean().backward()
            opt.step()
            if monitor is not None:
                grads = [p.grad.detach().clone() for p in model.parameters()]
                monitor.update(mine if sharded else union(xs, ys), t)
                # The training run's gradients are set aside and put back.
                assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        return opt

    def record(mon, group=None, probes=None):
        hist = mon.history() if group is None else mon.group_history(group)
        if probes is not None:  # a probe set's windows, beside the whole model's or a group's chains
            hist = (mon.probes if group is None else mon.group_probes[group]).history(probes)
        return [[e.step, e.mean, e.std, e.raw_mean, e.raw_se, e.heat, e.status, e.step_size] for e in hist]

    # A probe set, the same on every rank (each rank evaluates it whole with the sharded model).
    g = torch.Generator().manual_seed(7)
    held = (torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g))

    out = {}
    plain = shard(mlp())
    train(plain, None, True)
    for sampler in ("sgld", "rmsprop_sgld", "sghmc"):
        # gradient="plain": a sharded chain keeps the plain gradient at any batch ("auto"), and
        # the unsharded reference must take the same.
        opts = dict(num_samples=N, every_n_steps=2, window=5, num_chains=2, seed=3, sampler=sampler, warmup=0,
                    gradient="plain")
        if sampler == "sgld":
            opts["groups"] = {"first": ["0.*"]}
            opts["probes"] = {"held": held}
        m = shard(mlp())
        mon = OnlineLLC(m, mse, **opts)
        train(m, mon, True)
        ref = mlp()
        rmon = OnlineLLC(ref, mse, **opts)
        train(ref, rmon, False)
        out[sampler] = {
            "identical": all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(m.parameters(), plain.parameters())),
            "hist": record(mon), "ref": record(rmon),
            "divergences": mon.divergences, "shift": mon.sampler.evaluator.num_sampled(),
        }
        if sampler == "sgld":
            out[sampler]["group"], out[sampler]["ref_group"] = record(mon, "first"), record(rmon, "first")
            out["probe"] = record(mon, probes="held") + record(mon, "first", "held")
            out["ref_probe"] = record(rmon, probes="held") + record(rmon, "first", "held")
            out["local_numel"] = sum(t.numel() for t in mon.sampler.offsets[0].values())
            out["full_numel"] = sum(t.numel() for t in rmon.sampler.offsets[0].values())

    # Resume: every rank's state holds the chains' full tensors, so rank 0's restores every rank.
    opts = dict(num_samples=N, every_n_steps=2, window=5, num_chains=2, seed=3, warmup=0, gradient="plain")
    m = shard(mlp()); mon = OnlineLLC(m, mse, **opts); train(m, mon, True)
    m2 = shard(mlp()); mon2 = OnlineLLC(m2, mse, **opts)
    opt = train(m2, mon2, True, range(1, 31))
    state = mon2.state_dict()
    out["state_shapes_full"] = all(
        tuple(t.shape) == tuple(p.shape) for t, (_, p) in zip(state["sampler"]["offsets"][0].values(), m2.named_parameters())
    )
    box = [state]
    dist.broadcast_object_list(box, src=0)
    mon3 = OnlineLLC(m2, mse, **opts)
    mon3.load_state_dict(box[0])
    mon3.reseed_for_rank(rank)  # a no-op for sharded chains
    train(m2, mon3, True, range(31, STEPS + 1), opt)
    out["resumed"], out["uninterrupted"] = record(mon3), record(mon)

    # The unsharded monitor at step 30 holds the same offsets as the gathered sharded state.
    ref = mlp(); rmon = OnlineLLC(ref, mse, **opts); train(ref, rmon, False, range(1, 31))
    out["state_vs_unsharded"] = max(
        float((state["sampler"]["offsets"][c][n] - rmon.sampler.offsets[c][n]).abs().max()) for c in range(2) for n in state["sampler"]["offsets"][c]
    )

    # Checkpoints in shards: each rank saves its own 1/R of the chains (groups too); its own state
    # restores it exactly, and every rank's states merged are the gathered full state, which
    # restores any world size, here an unsharded monitor. Another rank's shards are refused.
    from online_llc.monitor.shards import merge_shards
    gopts = dict(opts, groups={"first": ["0.*"]})
    m = shard(mlp()); mon = OnlineLLC(m, mse, **gopts); opt = train(m, mon, True, range(1, 31))
    own, full = mon.state_dict(shards=True), mon.state_dict()
    torch.save(own, os.path.join(sys.argv[1], f"shard{rank}.pt"))
    dist.barrier()
    shards = [torch.load(os.path.join(sys.argv[1], f"shard{r}.pt"), weights_only=True) for r in (1, 0)]
    merged = merge_shards(shards)
    def tensors(s):
        parts = [s["sampler"]] + [g["sampler"] for g in s["groups"].values()]
        return [t for p in parts for k in ("offsets", "aux", "updates") for d in p[k] if d is not None for t in d.values()]
    out["merged_equals_full"] = len(tensors(merged)) == len(tensors(full)) > 0 and all(
        torch.equal(a, b) for a, b in zip(tensors(merged), tensors(full)))
    out["shard_numel"] = sum(t.numel() for t in tensors(own))
    out["full_state_numel"] = sum(t.numel() for t in tensors(full))
    restored = OnlineLLC(m, mse, **gopts)
    restored.load_state_dict(torch.load(os.path.join(sys.argv[1], f"shard{rank}.pt"), weights_only=True))
    for t in range(31, STEPS + 1):  # the uninterrupted monitor and the restored one, side by side
        xs, ys = batches(t)
        opt.zero_grad(); mse(m, (xs[rank], ys[rank])).mean().backward(); opt.step()
        mon.update((xs[rank], ys[rank]), t); restored.update((xs[rank], ys[rank]), t)
    out["shards_resumed"] = record(restored) + record(restored, "first")
    out["shards_uninterrupted"] = record(mon) + record(mon, "first")
    unsharded = OnlineLLC(mlp(), mse, **gopts)
    unsharded.load_state_dict(merged)
    out["unsharded_offsets_equal"] = all(
        torch.equal(unsharded.sampler.offsets[c][n], full["sampler"]["offsets"][c][n]) for c in range(2) for n in full["sampler"]["offsets"][c])
    try:
        OnlineLLC(m, mse, **gopts).load_state_dict(shards[0] if rank == 0 else shards[1])  # the other rank's
        out["other_rank"] = "accepted"
    except ValueError as exc:
        out["other_rank"] = str(exc)
    try:
        merge_shards([own])
        out["one_rank"] = "accepted"
    except ValueError as exc:
        out["one_rank"] = str(exc)

    # Gradient accumulation: micro-batch 1 without gradient sync (FSDP2 keeps its gradient on the
    # unsharded parameter), a shadow step, micro-batch 2 with sync. The training gradient must be
    # bit-identical to the run without the monitor, and the shadow step the one taken with no
    # pending gradient.
    def accumulate(update_inside):
        m = shard(mlp())
        mon = OnlineLLC(m, mse, num_samples=N, every_n_steps=1, window=5, seed=3, warmup=0, gradient="plain")
        xs, ys = batches(1)
        x, y, h = xs[rank], ys[rank], B // 2
        if not update_inside:
            mon.update((x, y), 1)
        m.set_requires_gradient_sync(False)
        mse(m, (x[:h], y[:h])).mean().backward()
        if update_inside:
            mon.update((x, y), 1)
        m.set_requires_gradient_sync(True)
        mse(m, (x[h:], y[h:])).mean().backward()
        grads = [p.grad.to_local().clone() for p in m.parameters()]
        return grads, [t.clone() for t in mon.sampler.offsets[0].values()]

    inside, outside = accumulate(True), accumulate(False)
    out["nosync_grads_identical"] = all(torch.equal(a, b) for a, b in zip(inside[0], outside[0]))
    out["nosync_offsets_gap"] = max(float((a - b).abs().max()) for a, b in zip(inside[1], outside[1]))
    out["nosync_offsets_scale"] = max(float(b.abs().max()) for b in outside[1])

    try:
        OnlineLLC(shard(mlp()), mse, num_samples=N, gather=lambda a: a)
        out["gather"] = "accepted"
    except ValueError as exc:
        out["gather"] = str(exc)
    try:
        xs, ys = batches(0)
        OnlineLLC(shard(mlp()), mse, num_samples=N, probes={"p": (xs[rank], ys[rank])})  # each rank its own
        out["probes"] = "accepted"
    except ValueError as exc:
        out["probes"] = str(exc)
    try:
        OnlineLLC(shard(mlp()), mse, num_samples=N, gradient="control_variate")
        out["cv"] = "accepted"
    except ValueError as exc:
        out["cv"] = str(exc)
    try:
        estimate_llc(shard(mlp()), mse, [batches(0)[0][rank], batches(0)[1][rank]], num_samples=N, num_draws=5)
        out["offline"] = "accepted"
    except ValueError as exc:
        out["offline"] = str(exc)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    """
)


def run_two_processes(tmp_path, script: str) -> list:
    """Run ``script`` on two CPU processes (``torch.distributed.run``, gloo) with ``tmp_path`` as its
    argument and working directory; each rank writes ``rank<r>.json`` there, returned in rank order."""
    path = tmp_path / "run.py"
    path.write_text(script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(path), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def _assert_close_histories(got, want):
    """Equal window by window: statuses and steps exactly, numbers to float tolerance. The
    tolerance: the two float64 runs differ only in the order of sums (the ranks' gradients are
    averaged after, not inside, each rank's mean; the forward passes see batches of another
    size), about 1e-16 relative per operation; 1e-8 relative (1e-10 absolute) leaves room for its
    growth over 30 shadow steps and through the heat's ratio, and is many orders below any effect
    of a wrong shard, noise slice or pooled statistic (whole percents of the draw)."""
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g[0] == w[0] and g[6] == w[6]
        for a, b in zip(g[1:6] + g[7:], w[1:6] + w[7:]):
            if isinstance(b, float) and b != b:  # NaN (no heat before the calibration)
                assert a != a
            else:
                assert a == pytest.approx(b, rel=1e-8, abs=1e-10)


@pytest.mark.slow
def test_fsdp2_chain_is_the_unsharded_chain_on_the_union_of_the_batches(tmp_path):
    """Two processes, a model sharded with ``fully_shard`` (unevenly: 3 rows over 2 ranks), 60
    training steps with the monitor after each: for SGLD (with a parameter group), RMSProp-SGLD
    and SGHMC, every window of the sharded run (mean, band, raw mean and standard error, heat,
    step size, status) equals the unsharded monitor's on the union of the ranks' batches, and is
    the same on both ranks; training is bit-identical to a run without the monitor (and its
    ``.grad`` fields are untouched, asserted in the script); each rank keeps about half the
    chain; a checkpoint taken at step 30 holds the full tensors (equal to the unsharded chain's
    offsets), and restoring it continues exactly; a probe set's windows (beside the whole model's
    and the group's chains) equal the unsharded monitor's; ``gather``, the control-variate
    gradient, probe sets that differ between the ranks and the offline estimator are refused with
    messages naming the argument."""
    ranks = run_two_processes(tmp_path, SCRIPT)
    for out in ranks:
        for sampler in ("sgld", "rmsprop_sgld", "sghmc"):
            got = out[sampler]
            assert got["identical"] is True
            assert len(got["hist"]) == 6 and got["divergences"] == 0
            _assert_close_histories(got["hist"], got["ref"])
            assert got["hist"][-1][6] == "tracking"
        _assert_close_histories(out["sgld"]["group"], out["sgld"]["ref_group"])
        # Probe sets: every window of the set beside the whole model's and the group's chains.
        assert len(out["probe"]) == 12
        _assert_close_histories(out["probe"], out["ref_probe"])
        assert out["resumed"] == out["uninterrupted"]
        assert out["state_shapes_full"] is True
        assert out["state_vs_unsharded"] < 1e-10
        # Checkpoints in shards: about half the chain per rank (67 and 62 of 129 entries), the
        # merge is the gathered state bit for bit, and restoring its own shards continues exactly.
        assert out["merged_equals_full"] is True and out["unsharded_offsets_equal"] is True
        assert out["shard_numel"] <= 0.53 * out["full_state_numel"]
        assert out["shards_resumed"] == out["shards_uninterrupted"] and len(out["shards_resumed"]) > 6
        assert out["other_rank"].startswith("Expected a full monitor state or this rank's own shards, got the shards of rank")
        assert "merge every rank's state first" in out["other_rank"]
        assert out["one_rank"].startswith("Expected one state per rank of a run on 2 ranks, got the states of ranks [")
        assert out["gather"].startswith("Expected `gather` to be None for a model sharded by FSDP2")
        assert out["cv"] == "Expected gradient='auto' or 'plain' for a model sharded by FSDP2, got 'control_variate'."
        assert out["probes"].startswith("Expected the same `probes` on every rank of a model sharded by FSDP2")
        assert out["offline"].startswith("Expected `model`") and "FSDP2 (fully_shard)" in out["offline"]
        # A shadow step inside a no-sync block leaves the accumulated training gradient as it is,
        # and the chain steps as it does with no pending gradient (float64: any leak of the
        # pending gradient, about the size of the offsets, would show at full size).
        assert out["nosync_grads_identical"] is True
        assert out["nosync_offsets_scale"] > 0 and out["nosync_offsets_gap"] <= 1e-12 * out["nosync_offsets_scale"]
    # Both ranks hold the same windows, bit for bit (pooled numbers, no gather).
    for sampler in ("sgld", "rmsprop_sgld", "sghmc"):
        assert ranks[0][sampler]["hist"] == ranks[1][sampler]["hist"]
    # Memory: each rank keeps its shard of every chain, half of the 129 entries give or take the
    # uneven layer (67 and 62).
    full = ranks[0]["full_numel"]
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == full == 129
    assert max(r["local_numel"] for r in ranks) <= 0.53 * full


def test_layouts_follow_torch_chunk_and_refuse_two_dimensional_meshes():
    """A rank's shard of a parameter sharded along ``dim`` over ``R`` ranks is ``torch.chunk``'s
    piece (FSDP2's rule: ``ceil(n / R)`` rows each, the last ranks shorter or empty); a 2-D mesh
    (HSDP, tensor parallelism) is refused naming ``model``."""
    shard = types.SimpleNamespace(is_shard=lambda: True, dim=0)

    def fake(shape, rank, size, ndim=1, placements=(shard,)):
        mesh = types.SimpleNamespace(ndim=ndim, size=lambda: size, get_local_rank=lambda: rank)
        t = torch.empty(shape)
        return types.SimpleNamespace(device_mesh=mesh, placements=placements, shape=t.shape, dim=t.dim)

    for rows, size in ((7, 2), (3, 4), (10, 3), (1, 2)):
        full = torch.arange(rows * 2).view(rows, 2)
        pieces = full.chunk(size, 0)
        for r in range(size):
            lay = _layout(fake((rows, 2), r, size))
            want = pieces[r] if r < len(pieces) else full[:0]
            assert torch.equal(lay.take(full), want)
    with pytest.raises(ValueError, match=r"Expected `model` to be sharded by FSDP2 over a 1-D device mesh"):
        _layout(fake((4, 2), 0, 2, ndim=2, placements=(shard, shard)))


LIGHTNING_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset
    from online_llc.callbacks import OnlineLLCCallback

    out_dir = sys.argv[1]

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))

        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for m in (self.net[0], self.net[2], self.net):
                fully_shard(m, mesh=mesh)

        def per_sample_loss(self, batch):
            x, y = batch
            return 0.5 * ((self.net(x) - y) ** 2).sum(1)

        def training_step(self, batch, i):
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def loader():
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(512, 6, generator=g), torch.randn(512, 3, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=16)  # 16 steps per epoch on 2 ranks

    def trainer(callbacks, steps, **kw):
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        kw.setdefault("enable_checkpointing", False)
        return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, callbacks=callbacks,
                          logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=out_dir, **kw)

    def record(cb):
        return [[e.step, e.mean, e.std, e.status] for e in cb.monitor.history()]

    opts = dict(every_n_steps=2, window=5, num_chains=2, seed=3, warmup=0)
    cb = OnlineLLCCallback(**opts)
    module = Regressor()
    t = trainer([cb], 40)
    t.fit(module, loader())
    plain = Regressor()
    trainer([], 40).fit(plain, loader())
    identical = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(module.parameters(), plain.parameters()))
    # A distributed checkpoint at an epoch's end (step 16; Lightning restarts a partial epoch),
    # then resumed to step 40.
    first = OnlineLLCCallback(**opts)
    ckpt = ModelCheckpoint(dirpath=os.path.join(out_dir, "ck"), every_n_train_steps=16, save_top_k=-1)
    trainer([first, ckpt], 16, enable_checkpointing=True).fit(Regressor(), loader())
    resumed = OnlineLLCCallback(**opts)
    path = os.path.join(out_dir, "ck", os.listdir(os.path.join(out_dir, "ck"))[0])
    trainer([resumed], 40).fit(Regressor(), loader(), ckpt_path=path)
    with open(os.path.join(out_dir, f"rank{t.global_rank}.json"), "w") as f:
        json.dump({"hist": record(cb), "identical": identical, "resumed": record(resumed),
                   "gathers": cb.monitor._model.stats.gather is None}, f)
    """
)


@pytest.mark.slow
def test_lightning_model_parallel_strategy_with_fully_shard(tmp_path):
    """Lightning's ``ModelParallelStrategy`` with ``fully_shard`` applied in ``configure_model``,
    two CPU processes: the callback runs sharded chains without a gather, both ranks log the same
    windows, training is bit-identical to a run without the callback, and a run resumed from
    Lightning's distributed checkpoint (the callback's state is saved from rank 0 only: it holds
    the chains' full tensors) continues exactly as the uninterrupted one."""
    pytest.importorskip("lightning.pytorch")
    ranks = run_two_processes(tmp_path, LIGHTNING_SCRIPT)
    for out in ranks:
        assert out["identical"] is True and out["gathers"] is True
        assert len(out["hist"]) == 4 and out["hist"][-1][3] == "tracking"
        assert out["resumed"] == out["hist"]
    assert ranks[0]["hist"] == ranks[1]["hist"]


FAILURE_SCRIPT = textwrap.dedent(
    """
    import datetime, json, os, sys, warnings, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from online_llc import OnlineLLC
    from online_llc.callbacks._failure import monitor_failed, placeholders_after_failure, placeholders_stopped

    # A short timeout: without the agreement a hung collective fails the test in seconds, not minutes.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.get_rank()
    B, N, STEPS, BOOM_STEP = 8, 4096, 20, 12
    inject = {"call": None, "calls": 0}  # raise on rank 1 at this loss_fn call of the shadow step

    def mse(model, batch):
        x, y = batch
        out = model(x)  # the forward (and its all-gathers) happens on every rank
        if inject["call"] is not None:
            inject["calls"] += 1
            if rank == 1 and inject["calls"] == inject["call"]:
                raise ValueError("a malformed batch on rank 1")
        return 0.5 * ((out - y) ** 2).sum(dim=1)

    def run(call):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
        for m in (model[0], model[2], model):
            fully_shard(m)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = OnlineLLC(model, mse, num_samples=N, every_n_steps=1, window=5, warmup=0, seed=0) if call else None
        failure, failed_at = None, None
        for step in range(1, STEPS + 1):
            g = torch.Generator().manual_seed(100 + step)
            x, y = torch.randn(2, B, 6, generator=g)[rank], torch.randn(2, B, 3, generator=g)[rank]
            opt.zero_grad()
            mse(model, (x, y)).mean().backward()
            opt.step()
            if mon is None:
                continue
            # What both callbacks do (callbacks/_failure.py), world size 2.
            if failure is not None:
                if not placeholders_stopped(failure):
                    failure = placeholders_after_failure("test", mon, step, failure)
                continue
            inject.update(call=call if step == BOOM_STEP else None, calls=0)
            try:
                mon.update((x, y), step)
            except Exception as exc:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    failure = monitor_failed("test", mon, step, exc, strict=False, world_size=2)
                failed_at = step
            inject["call"] = None
        return model, failure, failed_at

    plain, _, _ = run(None)
    out = {}
    for call in (1, 2):  # the first forward of the shadow step, and the second (followed by a backward)
        model, failure, failed_at = run(call)
        same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), plain.parameters()))
        out[call] = {"failure": failure, "failed_at": failed_at, "identical": same}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    # Straight out: gloo's worker threads torn down during interpreter finalization abort now and
    # then ("terminate called without an active exception"), after the work is written.
    sys.stdout.flush()
    os._exit(0)
    """
)


@pytest.mark.slow
def test_a_loss_fn_failing_on_one_rank_stops_the_step_on_every_rank_and_nothing_hangs(tmp_path):
    """Two processes, an FSDP2-sharded model, a plain loop that handles a monitor failure as the
    callbacks do: at step 12 ``loss_fn`` raises on rank 1 only, after the model's forward (in the
    shadow step's first forward, then, in a second run, in its second, which a backward follows).
    Every rank's monitor fails at that step (rank 1 with its own error, rank 0 told which rank
    failed), training runs on to the end bit-identical to a run without the monitor, and nothing
    hangs (the process group's 20 s timeout would fail the run). Without the ranks' agreement
    after each forward, rank 0 went on to the next collective alone."""
    ranks = run_two_processes(tmp_path, FAILURE_SCRIPT)
    for call in ("1", "2"):
        r0, r1 = ranks[0][call], ranks[1][call]
        assert r0["identical"] is True and r1["identical"] is True
        assert r0["failed_at"] == r1["failed_at"] == 12
        assert "ValueError: a malformed batch on rank 1" in r1["failure"]
        assert "MonitorError: rank 1 failed in the shadow step's forward" in r0["failure"]
        assert "placeholders stopped" not in r0["failure"] + r1["failure"]


def test_private_fsdp_state_out_of_reach_warns_once(monkeypatch):
    """Where a torch keeps FSDP2's sync flags and pending gradients elsewhere (here: a module with
    no FSDP state at all), the shadow step's passes cannot protect a no-sync block: the monitor
    says so once, names the way out, and leaves the module as it is."""
    import online_llc.kernel.fsdp_guards as fsdp

    monkeypatch.setattr(fsdp, "_PRIVATE_STATE_WARNED", False)
    module = torch.nn.Linear(2, 2)
    with pytest.warns(RuntimeWarning, match=r"outside no-sync blocks"):
        assert fsdp._sync_state([module]) == ([], [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fsdp._sync_state([module]) == ([], [])


def test_a_resume_at_another_world_size_merges_every_ranks_shards(tmp_path):
    """The Hugging Face callback's resume under FSDP2 (``callbacks/_resume.read_merged``): rank 0's
    saved shards alone restore no rank, so every saving rank's file is read and merged into the
    full tensors (placed by each shard's layout: rows 0-1 and row 2 of a 3 x 2 offset); a missing
    rank's file is reported, never raised; an unsharded state passes as it is."""
    from online_llc.callbacks._resume import read_merged

    full = torch.arange(6.0).view(3, 2)

    def state(rank):
        start, length = (0, 2) if rank == 0 else (2, 1)
        sampler = {"offsets": [{"w": full[start:start + length].clone()}], "aux": [{}], "updates": [None],
                   "shards": {"rank": rank, "world": 2, "layouts": {"w": [[3, 2], 0, start, length]}}}
        return {"format": 1, "world_size": 2, "sampler": sampler, "groups": {}}

    path_of = lambda r: str(tmp_path / f"online_llc.rank{r}.pt")  # noqa: E731
    for r in (0, 1):
        torch.save(state(r), path_of(r))
    merged, why = read_merged(state(0), path_of, 1)
    assert why is None and torch.equal(merged["sampler"]["offsets"][0]["w"], full)
    assert "shards" not in merged["sampler"] and merged["sampler"]["updates"] == [None]
    os.remove(path_of(1))
    merged, why = read_merged(state(0), path_of, 1)
    assert merged is None and path_of(1) in why and "one shard per rank" in why
    plain = {"format": 1, "world_size": 2, "sampler": {"offsets": [{"w": full}]}}
    assert read_merged(plain, path_of, 1) == (plain, None)
