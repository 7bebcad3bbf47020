"""Memory and host syncs of the shadow sampler: what it keeps between steps, its peak during a step.

A 3.6M-parameter MLP (768 -> 6 x [768 -> 768, tanh] -> 10, fp32, batch 64, 14 parameter tensors,
the largest 0.17 P) runs shadow steps with each sampler and 1 and 4 chains. With ``P`` the bytes
of one copy of the sampled parameters, the script prints, per sampler and chain count:

* ``step``: ``plain`` for the shadow steps outside measuring windows (whole-batch passes, no
  last update kept), ``measuring`` for those of a window that measures the heat and the
  discretization bias (:func:`online_llc.monitor.policy.measuring`; one window in four once the
  heat is known);
* ``kept``: bytes the sampler holds between shadow steps (offsets, sampler state, last updates
  in measuring windows, sketch), per chain;
* ``step peak``: the peak of the bytes allocated during one shadow step, above what was live
  before it (the training state plus the kept state): the step's own working memory;
* ``total``: ``kept (all chains) + step peak``, the most the monitor adds to the training state;
* ``syncs``: host reads of tensor values during one shadow step (see :class:`HostReads`).

How it is measured. On CUDA, ``torch.cuda.max_memory_allocated`` around one step (the caching
allocator's count of bytes in live tensors, not the reserved pool). On CPU, nothing keeps a peak,
so every allocation and free of the step is recorded by ``torch.profiler`` with
``profile_memory=True`` (it hooks c10's allocator: each event carries the signed byte count),
the events are ordered by time, and the peak is the maximum of their running sum. Unlike process
RSS this sees exactly the tensors torch allocates, with no allocator caching or page reuse in the
way; unlike ``tracemalloc`` it sees torch's allocations at all. The activations of a half
batch (32 x 768 x 6 layers x 2 saved tensors, 0.08 P) are part of the step peak and are the same
for every sampler. A warm-up step runs before the measured one, so that one-time allocations
(the lazily created sampler state) count as kept, not as step peak.

With ``--fsdp`` the same model is sharded with FSDP2 (``fully_shard`` on every linear layer and
the root) over two CPU processes (gloo; the script launches them itself), and rank 0 prints the
same columns for the sharded chain, still in units of one *full* copy ``P``: ``kept`` is then
about ``P / 2`` per chain (each rank keeps its shard; counted from the chain's tensors, see
``measure``), and the step peak includes what FSDP itself allocates in the shadow passes (each
layer's all-gathered weights and unsharded gradient) besides the chain's saved shard, gradients
and one tensor's full-shape noise. The profiler misses FSDP's frees, so that peak is an upper
bound; the same measurement of a plain FSDP training step is printed beside it. Two more columns
give the size per chain of the checkpoint a rank writes (``torch.save`` of the sampler's state):
``shards``, its own shards (``state_dict(shards=True)``), and ``gathered``, the full tensors
every rank holds with ``state_dict()``.

Run:  python benchmarks/memory.py                 (about 2 minutes on 2 busy cores)
      python benchmarks/memory.py --device cuda   (when CUDA is present)
      python benchmarks/memory.py --fsdp          (two CPU processes, about 1 minute)
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import os
import subprocess
import sys
from typing import Callable, List, Tuple

import torch
from torch import nn

from online_llc.config import SGLDConfig
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.hostreads import HostReads
from online_llc.monitor.shadow import ShadowSampler


def make_model(width: int, depth: int, dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def per_sample_mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum(-1)


def _cpu_profile(fn: Callable[[], None]) -> Tuple[int, int]:
    """``(net, peak)`` bytes allocated by ``fn`` on CPU, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node) -> None:
        if "Allocation" in str(node.tag):
            fields = node.extra_fields
            if fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    running = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        running += size
        peak = max(peak, running)
    return running, peak


def _cuda_profile(fn: Callable[[], None]) -> Tuple[int, int]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before, torch.cuda.max_memory_allocated() - before


def checkpoint_bytes(state) -> int:
    """The size of ``state`` as ``torch.save`` writes it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()


def measure(
    sampler: str, chains: int, args, heat: bool = True, gradient: str = "plain"
) -> Tuple[float, float, float, int, Tuple[float, float]]:
    """``(kept per chain, step peak, total)`` in units of P, the host syncs of one step, for
    measuring shadow steps (``heat``) or plain ones, with the plain or the control-variate
    gradient (and draw), and under FSDP2 the size per chain of this rank's checkpoint, in shards
    and gathered (P), else NaNs."""
    model = make_model(args.width, args.depth, getattr(torch, args.dtype), args.device)
    for p in model.parameters():
        p.requires_grad_(True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=g).to(args.device, getattr(torch, args.dtype))
    y = torch.randn(args.batch, 10, generator=g).to(args.device, getattr(torch, args.dtype))
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        from online_llc.kernel.fsdp import ShardedLossEvaluator

        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        ev: LossEvaluator = ShardedLossEvaluator(model, per_sample_mse)
    else:
        ev = LossEvaluator(model, per_sample_mse)
    cfg = SGLDConfig(nbeta=100.0, localization=100.0, step_size=1e-4, sampler=sampler, gradient=gradient)
    profile_fn = _cuda_profile if args.device == "cuda" else _cpu_profile
    if args.fsdp:
        # A training step first: FSDP's own lazy initialisation and buffers are not the chain's.
        per_sample_mse(model, (x, y)).mean().backward()
        model.zero_grad(set_to_none=True)
    holder: List[ShadowSampler] = []

    def build_and_warm() -> None:
        s = ShadowSampler(ev, cfg, num_chains=chains, seed=0)
        s.step((x, y), measure=heat)
        holder.append(s)

    gc.collect()
    kept, _ = profile_fn(build_and_warm)
    if args.fsdp:
        # The profiler sees FSDP's allocations but not its frees (it releases the unsharded
        # weights by resizing their storage: a plain training step reads as +0.5 P net, while
        # the process's memory stays flat over hundreds of steps), so the kept state is counted
        # from the chain's own tensors.
        # (the last updates, kept for the discretization measurement, included),
        updates = [u for u in holder[0]._updates if u is not None]
        kept = sum(t.numel() * t.element_size() for off in holder[0].offsets + holder[0].aux + updates for t in off.values())
        # The control variate's running anchor (one copy per sampler, this rank's shards).
        kept += sum(t.numel() * t.element_size() for t in holder[0].anchor.mean or [])
    gc.collect()
    _, transient = profile_fn(lambda: holder[0].step((x, y), measure=heat))
    with HostReads() as reads:
        holder[0].step((x, y), measure=heat)
    ckpt = (math.nan, math.nan)
    if args.fsdp:  # what each rank writes: its own shards, or the gathered full tensors
        ckpt = tuple(checkpoint_bytes(holder[0].state_dict(shards=s)) / chains / param_bytes for s in (True, False))
    return kept / chains / param_bytes, transient / param_bytes, (kept + transient) / param_bytes, reads.count, ckpt


def train_step_peak(args) -> float:
    """The profiler's peak of one forward and backward of the FSDP2 model (after one unmeasured),
    in units of P."""
    from torch.distributed.fsdp import fully_shard

    model = make_model(args.width, args.depth, getattr(torch, args.dtype), args.device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(args.batch, args.width, generator=g), torch.randn(args.batch, 10, generator=g)

    def step() -> None:
        per_sample_mse(model, (x, y)).mean().backward()
        model.zero_grad(set_to_none=True)

    step()
    gc.collect()
    return _cpu_profile(step)[1] / param_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--samplers", nargs="+", default=["sgld", "rmsprop_sgld", "sghmc"])
    parser.add_argument("--chains", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--gradients", nargs="+", default=["plain", "control_variate"], choices=["plain", "control_variate"],
                        help="the chains' gradient (the monitor's default below a batch of nbeta / 2 is control_variate, with the plain draw)")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 over 2 CPU processes")
    args = parser.parse_args()
    if args.fsdp and "RANK" not in os.environ:
        if args.device != "cpu":
            parser.error("--fsdp runs on two CPU processes (gloo); leave --device at cpu")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", *sys.argv]
        raise SystemExit(subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode)
    if args.fsdp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")
    else:
        torch.set_num_threads(2)
    model = make_model(args.width, args.depth, getattr(torch, args.dtype), "cpu")
    n = sum(p.numel() for p in model.parameters())
    biggest = max(p.numel() for p in model.parameters())
    print(f"model: {n / 1e6:.2f}M parameters in {len(list(model.parameters()))} tensors ({args.dtype}), "
          f"largest tensor {biggest / n:.2f} P; batch {args.batch}; device {args.device}"
          + ("; FSDP2 over 2 processes, figures of rank 0" if args.fsdp else ""))
    print("P = bytes of one copy of the sampled parameters")
    if args.fsdp:
        print(f"a plain FSDP training step, measured the same way: peak {train_step_peak(args):.2f}P")
    gradients = [g for g in args.gradients if g == "plain"] if args.fsdp else args.gradients
    if len(gradients) < len(args.gradients):
        print("(a sharded chain keeps the plain gradient: the monitor takes the control variate on whole parameters only)")
    ckpt_head = f"{'ckpt/chain shards':>19}{'gathered':>10}" if args.fsdp else ""
    print(f"{'sampler':<14}{'gradient':>10}{'step':>10}{'chains':>7}{'kept/chain':>12}{'step peak':>11}{'total':>8}{'syncs':>7}{ckpt_head}")
    for gradient in gradients:
        for sampler in args.samplers:
            for heat in (False, True):
                for chains in args.chains:
                    kept, transient, total, syncs, ckpt = measure(sampler, chains, args, heat, gradient)
                    kind = "measuring" if heat else "plain"
                    grad = "cv" if gradient == "control_variate" else "plain"
                    tail = f"{ckpt[0]:>18.2f}P{ckpt[1]:>9.2f}P" if args.fsdp else ""
                    print(f"{sampler:<14}{grad:>10}{kind:>10}{chains:>7}{kept:>11.2f}P{transient:>10.2f}P{total:>7.2f}P{syncs:>7}{tail}")
    if args.fsdp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
