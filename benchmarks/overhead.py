"""Training-time overhead of the online monitor, measured side by side in one run.

A small MLP (784-256-256-10, ~270k parameters) is trained with Adam on synthetic classification
data (batch 128). Two identical copies are trained in interleaved blocks of steps, one with an
``OnlineLLC`` attached and one without; the ratio of their total times is printed for several
``every_n_steps`` (the default marked). Interleaving keeps machine noise (other processes, CPU
frequency) from landing on one side only.

Run:  python benchmarks/overhead.py            (about 1 minute on 2 cores)
      python benchmarks/overhead.py --blocks 20 --cadences 5 10 20 50
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from online_llc import OnlineLLC
from online_llc.config import DEFAULT_EVERY_N_STEPS, DEFAULT_WINDOW


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 784, generator=g)
    w = torch.randn(784, 10, generator=g) / 28
    y = (x @ w + 0.5 * torch.randn(n, 10, generator=g)).argmax(-1)
    return x, y


def per_sample_ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def run_block(model, opt, batches, monitor: Optional[OnlineLLC]) -> float:
    t = time.perf_counter()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        per_sample_ce(model, batch).mean().backward()
        opt.step()
        if monitor is not None:
            monitor.update(batch)
    return time.perf_counter() - t


def measure(every_n_steps: int, blocks: int, block_steps: int, batch_size: int, threads: int) -> tuple[float, float, int]:
    torch.set_num_threads(threads)
    n = 8192
    x, y = make_data(n)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)][:block_steps]
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    plain, watched = base, copy.deepcopy(base)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-3)
    opt_watched = torch.optim.Adam(watched.parameters(), lr=1e-3)
    monitor = OnlineLLC(watched, per_sample_ce, num_samples=n, every_n_steps=every_n_steps, window=DEFAULT_WINDOW)
    # Warm up both (allocator, first-call overheads) before timing.
    run_block(plain, opt_plain, batches[:10], None)
    run_block(watched, opt_watched, batches[:10], monitor)
    t_plain: List[float] = []
    t_watched: List[float] = []
    for b in range(blocks):
        # Alternate which side goes first so drifts in machine speed cancel.
        if b % 2 == 0:
            t_plain.append(run_block(plain, opt_plain, batches, None))
            t_watched.append(run_block(watched, opt_watched, batches, monitor))
        else:
            t_watched.append(run_block(watched, opt_watched, batches, monitor))
            t_plain.append(run_block(plain, opt_plain, batches, None))
    return sum(t_watched) / sum(t_plain), sum(t_plain) / (blocks * len(batches)), monitor.shadow_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=10, help="interleaved block pairs per cadence (default 10)")
    ap.add_argument("--block-steps", type=int, default=60, help="training steps per block (default 60)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--cadences", type=int, nargs="+", default=[1, 5, DEFAULT_EVERY_N_STEPS, 50])
    args = ap.parse_args()
    print(f"MLP 784-256-256-10, Adam, batch {args.batch_size}, {args.threads} thread(s); "
          f"{args.blocks} interleaved block pairs of {args.block_steps} steps per cadence")
    print(f"{'every_n_steps':>13s} {'time ratio (with / without)':>28s} {'ms per plain step':>18s} {'shadow steps':>13s}")
    for k in args.cadences:
        ratio, plain_step, shadow = measure(k, args.blocks, args.block_steps, args.batch_size, args.threads)
        mark = "  <- default" if k == DEFAULT_EVERY_N_STEPS else ""
        print(f"{k:13d} {ratio:28.3f} {plain_step * 1e3:18.2f} {shadow:13d}{mark}")


if __name__ == "__main__":
    main()
