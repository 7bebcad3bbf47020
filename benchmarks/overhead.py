"""Training-time overhead of the online monitor, measured side by side in one run.

A small MLP (784-256-256-10, ~270k parameters) is trained with Adam on synthetic classification
data (batch 128). Identical copies are trained in interleaved blocks of steps, one without an
``OnlineLLC`` attached and two with; the ratio of their total times is printed for several
``every_n_steps`` (the default marked), and beside it the ratio of a third copy whose monitor
measures the heat in every window (``measure_every=1``, as before the measuring schedule). "inside
update" is each monitor's time inside ``update`` over the plain copy's time: when the ratio's excess
equals it, the monitor costs the training steps themselves nothing (no cache effects); the time
per shadow step counts every ``update`` call (the windows' closing work included) per shadow step. Interleaving keeps
machine noise (other processes, CPU frequency) from landing on one side only. Before the timed
blocks each monitor runs past its warm-up and its first measured windows at the untrained weights,
and the blocks together span one cycle of the measuring schedule (``measure_every`` windows: one
that measures the heat, the others plain; :func:`online_llc.monitor.policy.measuring`), so the
ratio is the steady state's.

``--profile`` prints instead where a shadow step's time goes, section by section, for a plain
shadow step and a measuring one (the heat and discretization measured; the monitor runs one
window in ``measure_every`` so), each section's functions wrapped in a timer for the run (the
model is on the CPU, so every operation has finished when its function returns), with the aten
operations per shadow step (the PyTorch profiler), beside a training step of the same copy.

Run:  python benchmarks/overhead.py            (about 5 minutes on 2 cores)
      python benchmarks/overhead.py --profile  (the per-section profile, half a minute)
      python benchmarks/overhead.py --blocks 20 --cadences 5 10 20 50
      python benchmarks/overhead.py --hidden 1024   (a wider MLP: the model's passes dominate)
      python benchmarks/overhead.py --profile --hidden 32 --depth 17   (36 small tensors: per-tensor work)
      python benchmarks/overhead.py --probes 64 --cadences 35   (the default monitor with 64 probe samples)
      python benchmarks/overhead.py --compile --cadences 1 35   (the default monitor with compile=True)
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from online_llc import OnlineLLC
from online_llc.monitor.cadence import DEFAULT_EVERY_N_STEPS, DEFAULT_WINDOW
from online_llc.monitor.policy import MEASURE_EVERY, MIN_HEAT_WINDOWS
from online_llc.monitor.track import MAX_AUTO_WARMUP


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 784, generator=g)
    w = torch.randn(784, 10, generator=g) / 28
    y = (x @ w + 0.5 * torch.randn(n, 10, generator=g)).argmax(-1)
    return x, y


def per_sample_ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def run_block(model, opt, batches, monitor: Optional[OnlineLLC]) -> tuple[float, float]:
    """``(seconds for the block, seconds of it inside monitor.update)``."""
    t = time.perf_counter()
    inside = 0.0
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        per_sample_ce(model, batch).mean().backward()
        opt.step()
        if monitor is not None:
            u = time.perf_counter()
            monitor.update(batch)
            inside += time.perf_counter() - u
    return time.perf_counter() - t, inside


class Overhead(NamedTuple):
    """What :func:`measure` measured: the ratios of the monitored copies' times to the plain
    copy's, each monitor's time inside ``update`` as a share of the plain copy's time
    (the rest of the ratio's excess is what the monitor costs the training steps themselves:
    caches), the seconds per plain step and per timed shadow step, and how many of the windows
    closed while timing measured the heat."""

    ratio: float
    ratio_every: float
    inside: float
    inside_every: float
    plain_step: float
    shadow_step: float
    shadow_steps: int
    measured: str


def measure(
    every_n_steps: int, blocks: int, block_steps: int, batch_size: int, threads: int, hidden: int = 256, settle: bool = True,
    probes: int = 0, compile: bool = False,
) -> Overhead:
    """Three copies of the model trained in interleaved blocks: plain, with the default monitor,
    and with a monitor that measures the heat in every window (or, with ``probes``, a default
    monitor with a probe set of that many held-out samples; with ``compile``, a default monitor
    with ``compile=True``)."""
    torch.set_num_threads(threads)
    n = 8192
    x, y = make_data(n)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]
    batches = (batches * (block_steps // len(batches) + 1))[:block_steps]
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    models = [base, copy.deepcopy(base), copy.deepcopy(base)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    held = make_data(max(probes, 1), seed=1)  # held-out samples of the same task
    third = probes or compile  # the third copy is a default monitor with probes or compiled
    monitors = [None] + [
        OnlineLLC(m, per_sample_ce, num_samples=n, every_n_steps=every_n_steps, window=DEFAULT_WINDOW, measure_every=every,
                  probes={"held": (held[0][:probes], held[1][:probes])} if probes and k == 1 else None,
                  compile=compile and k == 1)
        for k, (m, every) in enumerate(zip(models[1:], (MEASURE_EVERY, MEASURE_EVERY if third else 1)))
    ]
    # Warm up all three (allocator, first-call overheads) before timing.
    for m, o, mon in zip(models, opts, monitors):
        run_block(m, o, batches[:10], mon)
    if settle:
        # Past the chains' warm-up (at most MAX_AUTO_WARMUP shadow steps) and the first measured
        # windows, at the untrained weights: the timed blocks see the steady schedule, one
        # measuring window in MEASURE_EVERY.
        for mon in monitors[1:]:
            while mon.shadow_steps < MAX_AUTO_WARMUP + (MIN_HEAT_WINDOWS + MEASURE_EVERY) * DEFAULT_WINDOW:
                mon.update(batches[mon.step % len(batches)])
    settled, closed = monitors[1].shadow_steps, len(monitors[1].history())
    times: List[List[float]] = [[], [], []]
    inside = [0.0, 0.0, 0.0]
    for b in range(blocks):
        # Rotate which side goes first so drifts in machine speed cancel.
        for k in range(3):
            i = (b + k) % 3
            elapsed, spent = run_block(models[i], opts[i], batches, monitors[i])
            times[i].append(elapsed)
            inside[i] += spent
    plain = sum(times[0])
    shadow = monitors[1].shadow_steps - settled
    timed = monitors[1].history()[closed:]
    measured = sum(math.isfinite(e.heat_bias) for e in timed)
    return Overhead(sum(times[1]) / plain, sum(times[2]) / plain, inside[1] / plain, inside[2] / plain,
                    plain / (blocks * len(batches)), inside[1] / max(shadow, 1), shadow, f"{measured}/{len(timed)}")


#: The sections of a shadow step: (label, module, attribute) of the function each one times.
SECTIONS = [
    ("the model's passes (forward and backward)", "online_llc.kernel.evaluator", "LossEvaluator.paired"),
    ("combining the halves (gradient, heat)", "online_llc.kernel.step", "_combine_halves"),
    ("the step's statistics", "online_llc.kernel.evaluator", "LossEvaluator.step_stats"),
    ("the update (noise, drift, pull)", "online_llc.kernel.step", "_update"),
    ("the discretization dots", "online_llc.monitor.shadow", "ShadowSampler._dot"),
    ("the weight sketch", "online_llc.monitor.sketch", "Sketcher.__call__"),
    ("the shadow step (all of the above and the rest)", "online_llc.monitor.shadow", "ShadowSampler.step"),
]


def mlp(hidden: int, depth: int = 2) -> nn.Module:
    """784-hidden-...-hidden-10 with ``depth`` hidden layers (2: the benchmark's MLP)."""
    layers: List[nn.Module] = [nn.Linear(784, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, 10))


def profile_shadow_step(steps: int, batch_size: int, threads: int, hidden: int, depth: int = 2) -> None:
    """Per-section milliseconds of a shadow step, plain and measuring (the monitor's schedule
    decides which, :func:`online_llc.monitor.policy.measuring`; here every window after the
    warm-up measures the heat, and every shadow step is profiled once as each), and its aten
    operation count, beside a training step."""
    import importlib

    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    n = 8192
    x, y = make_data(n)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]
    batches = (batches * (steps // len(batches) + 2))[: steps + 20]
    torch.manual_seed(0)
    model = mlp(hidden, depth)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = OnlineLLC(model, per_sample_ce, num_samples=n, every_n_steps=1)
    sampler = monitor.sampler
    modes = ("plain", "measuring")
    spent = {m: {label: 0.0 for label, _, _ in SECTIONS} for m in modes}
    mode = ["plain"]
    restore = []
    for label, module_name, attr in SECTIONS:
        owner: object = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def timed(*args, _f=original, _label=label, **kwargs):
            t = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[mode[0]][_label] += time.perf_counter() - t

        setattr(owner, name, timed)
        restore.append((owner, name, original))
    try:
        train = 0.0
        for k, batch in enumerate(batches):
            if k == 20:  # after a warm-up (allocator, first calls)
                for m in modes:
                    spent[m].update({label: 0.0 for label in spent[m]})
                train = 0.0
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            per_sample_ce(model, batch).mean().backward()
            opt.step()
            train += time.perf_counter() - t
            # The same weights and batch, one shadow step of each kind.
            for m in modes:
                mode[0] = m
                sampler.step(batch, measure=m == "measuring")
    finally:
        for owner, name, original in restore:
            setattr(owner, name, original)
    ops = {}
    for m in modes:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[:20]:
                sampler.step(batch, measure=m == "measuring")
        ops[m] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / 20
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[:20]:
            opt.zero_grad(set_to_none=True)
            per_sample_ce(model, batch).mean().backward()
            opt.step()
    train_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / 20
    per_train = train / steps
    shape = "-".join(["784"] + [str(hidden)] * depth + ["10"])
    print(f"MLP {shape} ({2 * depth + 2} tensors), Adam, batch {batch_size}, {threads} thread(s), {steps} training steps, "
          "each followed by one plain and one measuring shadow step; ms per step and in training steps")
    print(f"{'section':50s} {'plain ms':>9s} {'steps':>6s} {'measuring ms':>13s} {'steps':>6s}")
    print(f"{'a training step (forward, backward, Adam)':50s} {per_train * 1e3:9.2f} {1.0:6.2f}")
    for label, _, _ in SECTIONS:
        cells = [(spent[m][label] / steps * 1e3, spent[m][label] / steps / per_train) for m in modes]
        print(f"{label:50s} {cells[0][0]:9.2f} {cells[0][1]:6.2f} {cells[1][0]:13.2f} {cells[1][1]:6.2f}")
    print(f"aten operations per shadow step: {ops['plain']:.0f} plain, {ops['measuring']:.0f} measuring; "
          f"{train_ops:.0f} per training step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=10, help="interleaved rounds (one block per copy) per cadence (default 10)")
    ap.add_argument("--block-steps", type=int, default=None,
                    help="training steps per block (default: the blocks together span one cycle of the measuring "
                         "schedule, measure_every windows of shadow steps, at least 60)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden width of the MLP (default 256; 1024: 1.8M parameters)")
    ap.add_argument("--depth", type=int, default=2,
                    help="hidden layers of the MLP in --profile (default 2; 17 with --hidden 32: 36 small tensors, where "
                         "per-tensor work shows)")
    ap.add_argument("--cadences", type=int, nargs="+", default=[1, 5, 25, DEFAULT_EVERY_N_STEPS])
    ap.add_argument("--profile", action="store_true", help="where a shadow step's time goes, section by section")
    ap.add_argument("--profile-steps", type=int, default=300, help="shadow steps the profile times (default 300)")
    ap.add_argument("--probes", type=int, default=0,
                    help="the third copy's monitor takes a probe set of this many held-out samples instead of measuring "
                         "every window (its columns then read 'with K probes')")
    ap.add_argument("--compile", action="store_true",
                    help="the third copy's monitor is the default one with compile=True (its columns read 'compiled')")
    args = ap.parse_args()
    if args.profile:
        profile_shadow_step(args.profile_steps, args.batch_size, args.threads, args.hidden, args.depth)
        return
    span = (f"of {args.block_steps} steps" if args.block_steps else
            f"spanning one cycle of the measuring schedule ({MEASURE_EVERY} windows of {DEFAULT_WINDOW} shadow steps)")
    print(f"MLP 784-{args.hidden}-{args.hidden}-10, Adam, batch {args.batch_size}, {args.threads} thread(s); "
          f"{args.blocks} interleaved rounds of three blocks per cadence, {span}, after the warm-up")
    third = f"with {args.probes} probes" if args.probes else "compiled" if args.compile else "measuring every window"
    short = "probes" if args.probes else "compiled" if args.compile else "every window"
    print(f"{'every_n_steps':>13s} {'time ratio (with / without)':>28s} {third:>23s} "
          f"{'inside update':>14s} {'same, ' + short:>19s} {'ms per plain step':>18s} "
          f"{'ms per shadow step':>19s} {'shadow steps':>13s} {'measured windows':>17s}")
    for k in args.cadences:
        block_steps = args.block_steps or max(60, -(-MEASURE_EVERY * DEFAULT_WINDOW * k // args.blocks))
        m = measure(k, args.blocks, block_steps, args.batch_size, args.threads, args.hidden, probes=args.probes,
                    compile=args.compile)
        mark = "  <- default" if k == DEFAULT_EVERY_N_STEPS else ""
        print(f"{k:13d} {m.ratio:28.3f} {m.ratio_every:23.3f} {m.inside:14.3f} {m.inside_every:19.3f} {m.plain_step * 1e3:18.2f} "
              f"{m.shadow_step * 1e3:19.2f} {m.shadow_steps:13d} {m.measured:>17s}{mark}")


if __name__ == "__main__":
    main()
