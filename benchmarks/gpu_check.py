"""The GPU check, prepared for a CUDA machine: CUDA test variants, device syncs, overhead, compile, kernels.

1. ``tests``: runs the test suite's CUDA variants (``pytest -k cuda``; they are skipped on CPU).
2. ``syncs``: counts the device syncs of one shadow step with ``torch.cuda.set_sync_debug_mode``
   ("warn": every synchronizing call emits a warning, counted here) and with
   :class:`online_llc.kernel.hostreads.HostReads`, for SGLD and RMSProp-SGLD with 1 and 4 chains, on
   the transformer below. The kernel reads its numbers on the host once per shadow step.
3. ``overhead``: a decoder-only transformer of about 110M parameters (d 768, 12 layers, 12 heads,
   vocabulary 32000, sequences of 256) trained with AdamW under bf16 autocast ("bf16-mixed"),
   two identical copies in interleaved blocks, one with an ``OnlineLLC`` at the README's defaults
   (``every_n_steps=25``, ``window=40``); prints the ratio of their times. Target: at most 1.05.
4. ``compile``: the same transformer's shadow steps at frozen weights with ``compile=False``,
   ``"default"`` (fused kernels) and ``"reduce-overhead"`` (CUDA graphs): the compiler's first
   calls, the time per shadow step against eager, and how far the window means are from eager's
   (float rounding expected; a mode that fails is reported and the others still run).
5. ``kernels``: the GPU kernels launched by one plain and one measuring shadow step of the same
   transformer (its 12 layers hold about 150 parameter tensors), beside a training step (forward,
   backward, AdamW), counted by the profiler; and the same for a copy with twice the layers, so
   the kernels per extra tensor show: the monitor's own work (noise, update, weight sketch) should
   add none, the model's passes about what a training step's forward and backward add.

Run on a CUDA machine:  python benchmarks/gpu_check.py            (all five; about 9 minutes)
Dry run on CPU (a 2-layer model, small batches; checks that the script runs, measures nothing):
                        python benchmarks/gpu_check.py --device cpu --tiny --parts syncs overhead compile kernels
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from online_llc import OnlineLLC
from online_llc.kernel.hostreads import HostReads


class Decoder(nn.Module):
    """A GPT-style decoder: token and position embeddings, pre-norm blocks, tied output."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.norm(h) @ self.tok.weight.T


def per_sequence_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, shape [B]."""
    logits = model(ids[:, :-1]).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(dim=1)


def build(args: argparse.Namespace) -> tuple:
    torch.manual_seed(0)
    if args.tiny:
        vocab, d, layers, heads, seq, batch = 512, 64, 2, 4, 32, 4
    else:
        vocab, d, layers, heads, seq, batch = 32000, 768, 12, 12, 256, 8
    model = Decoder(vocab, d, layers, heads, seq).to(args.device)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (batch, seq), generator=g).to(args.device) for _ in range(16)]
    return model, data


def autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def part_tests() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests/"]
    print("1. CUDA test variants:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(f"   pytest exit code {done.returncode}", flush=True)


def part_syncs(args: argparse.Namespace) -> None:
    print("2. Device syncs per shadow step (sync debug mode 'warn' / host reads counted)", flush=True)
    model, data = build(args)
    for sampler in ("sgld", "rmsprop_sgld"):
        for chains in (1, 4):
            mon = OnlineLLC(model, per_sequence_loss, num_samples=1_000_000, every_n_steps=1, window=40,
                            num_chains=chains, sampler=sampler, seed=0)
            with autocast(args.device):
                mon.update(data[0], step=1)  # first call: loss check, sizing, lazy state
                sync(args.device)
                reads = HostReads()
                with warnings.catch_warnings(record=True) as caught, reads:
                    warnings.simplefilter("always")
                    if args.device == "cuda":
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        mon.update(data[1], step=2)
                    finally:
                        if args.device == "cuda":
                            torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchronizing" in str(w.message).lower() for w in caught) if args.device == "cuda" else "n/a"
            print(f"   {sampler:13s} chains {chains}: sync-debug warnings {syncs}, host reads {reads.count}", flush=True)


def part_overhead(args: argparse.Namespace) -> None:
    print("3. Overhead at the README's defaults (every_n_steps=25, window=40), bf16 autocast, interleaved",
          flush=True)
    base, data = build(args)
    print(f"   model: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, batch {tuple(data[0].shape)}",
          flush=True)
    twins = [base, copy.deepcopy(base)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in twins]
    mon = OnlineLLC(twins[1], per_sequence_loss, num_samples=1_000_000, every_n_steps=25, window=40, seed=0)
    steps = [0, 0]
    times = [0.0, 0.0]

    def block(i: int, n: int) -> None:
        model, opt = twins[i], opts[i]
        sync(args.device)
        t = time.perf_counter()
        for _ in range(n):
            batch = data[steps[i] % len(data)]
            with autocast(args.device):
                loss = per_sequence_loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps[i] += 1
            if i == 1:
                with autocast(args.device):
                    mon.update(batch, step=steps[i])
        sync(args.device)
        times[i] += time.perf_counter() - t

    block(0, 10)  # warm-up both (kernels, allocator, the monitor's first call)
    block(1, 10)
    times[:] = [0.0, 0.0]
    for k in range(args.blocks):
        order = (0, 1) if k % 2 == 0 else (1, 0)
        for i in order:
            block(i, args.block_steps)
    ratio = times[1] / times[0]
    per = times[0] / (args.blocks * args.block_steps)
    print(f"   {args.blocks} blocks of {args.block_steps} steps each: {per * 1e3:.1f} ms per training step; "
          f"overhead ratio {ratio:.3f} (target <= 1.05); windows closed {len(mon.history())}", flush=True)


def part_compile(args: argparse.Namespace) -> None:
    print("4. compile=: shadow steps at frozen weights (every_n_steps=1, window 20), eager against compiled, "
          "bf16 autocast", flush=True)
    base, data = build(args)
    eager_means, eager_ms = None, None
    for mode in (False, "default", "reduce-overhead"):
        model = copy.deepcopy(base)
        try:
            mon = OnlineLLC(model, per_sequence_loss, num_samples=1_000_000, every_n_steps=1, window=20, seed=0,
                            warmup=0, compile=mode)
            t0 = time.perf_counter()
            with autocast(args.device):
                for k in range(40):  # the compiler's first calls, and the plain and measuring steps' shapes
                    mon.update(data[k % len(data)], step=k + 1)
            sync(args.device)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            with autocast(args.device):
                for k in range(40, 200):
                    mon.update(data[k % len(data)], step=k + 1)
            sync(args.device)
            per = (time.perf_counter() - t0) / 160
            means = [e.raw_mean for e in mon.history()]
            if mode is False:
                eager_means, eager_ms = means, per
            worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager_means or means, means))
            print(f"   compile={mode!r:19s} first 40 steps {first:6.1f} s, then {per * 1e3:7.2f} ms per shadow step "
                  f"(x{per / (eager_ms or per):.2f} of eager); window means vs eager: worst relative "
                  f"difference {worst:.1e} over {len(means)} windows", flush=True)
        except Exception as err:  # report and go on: the other modes still run
            print(f"   compile={mode!r}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)


def _kernels(device: str, fn) -> int:
    """Kernels on the GPU (CUDA activity events) run by ``fn()``; on the CPU, the top-level aten
    operations (the dry run)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    if device == "cuda":
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def part_kernels(args: argparse.Namespace) -> None:
    print("5. Kernels per step: a plain and a measuring shadow step beside a training step, at 1x and 2x the layers",
          flush=True)
    rows = []
    for scale in (1, 2):
        torch.manual_seed(0)
        tiny = args.tiny
        vocab, d, layers, heads, seq, batch = (512, 64, 2, 4, 32, 4) if tiny else (32000, 768, 12, 12, 256, 8)
        model = Decoder(vocab, d, layers * scale, heads, seq).to(args.device)
        g = torch.Generator().manual_seed(1)
        data = [torch.randint(0, vocab, (batch, seq), generator=g).to(args.device) for _ in range(4)]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        mon = OnlineLLC(model, per_sequence_loss, num_samples=1_000_000, every_n_steps=1, window=40, seed=0)
        sampler = mon.sampler

        def train() -> None:
            opt.zero_grad(set_to_none=True)
            per_sequence_loss(model, data[0]).mean().backward()
            opt.step()

        with autocast(args.device):
            mon.update(data[0], step=1)  # first call: loss check, sizing, lazy state
            for measure in (False, True):
                sampler.step(data[1], measure=measure)  # warm
            counts = [_kernels(args.device, train)] + [
                _kernels(args.device, lambda m=m: sampler.step(data[1], measure=m)) for m in (False, True)
            ]
        tensors = sum(1 for _ in model.parameters())
        rows.append((tensors, counts))
        print(f"   {layers * scale:3d} layers, {tensors:4d} tensors: training step {counts[0]:6d}, plain shadow step "
              f"{counts[1]:6d}, measuring {counts[2]:6d}", flush=True)
    (t1, c1), (t2, c2) = rows
    per = [(b - a) / max(t2 - t1, 1) for a, b in zip(c1, c2)]
    print(f"   per extra tensor: training step {per[0]:.2f}, plain shadow step {per[1]:.2f}, measuring {per[2]:.2f}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: check the script, measure nothing")
    parts = ["tests", "syncs", "overhead", "compile", "kernels"]
    ap.add_argument("--parts", nargs="+", default=parts, choices=parts)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block-steps", type=int, default=50)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: pass --device cpu --tiny for a dry run")
    if "tests" in args.parts:
        part_tests()
    if "syncs" in args.parts:
        part_syncs(args)
    if "overhead" in args.parts:
        part_overhead(args)
    if "compile" in args.parts:
        part_compile(args)
    if "kernels" in args.parts:
        part_kernels(args)


if __name__ == "__main__":
    main()
