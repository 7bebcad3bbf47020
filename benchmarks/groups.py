"""Per-module LLC under a fixed budget: training-time overhead with 1 group vs several, and the
filter's cost per window with 5 vs 500 groups.

1. The MLP of ``benchmarks/overhead.py`` trained with Adam, interleaved blocks with and without
   the monitor (``every_n_steps`` default, ``group_budget = 1``): no groups, one group, three
   groups (one per Linear layer). The budget is fixed, so the ratio should not grow with the
   number of groups.
2. The state-space filter over G groups is block-diagonal: a window of one group touches one 2x2
   block. Time per window update with 5 and 500 groups (observations round-robin).

Run:  python benchmarks/groups.py            (about 1 minute on 2 cores)
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from overhead import make_data, per_sample_ce, run_block  # noqa: E402  (script in the same folder)
from torch import nn

from online_llc import OnlineLLC
from online_llc.models.groups import groups_by_linear
from online_llc.monitor.cadence import DEFAULT_EVERY_N_STEPS
from online_llc.stats.filter import LLCFilter


def overhead(groups, blocks: int = 8, block_steps: int = 60) -> float:
    torch.set_num_threads(1)
    n = 8192
    x, y = make_data(n)
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, n, 128)][:block_steps]
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    plain, watched = base, copy.deepcopy(base)
    opt_p = torch.optim.Adam(plain.parameters(), lr=1e-3)
    opt_w = torch.optim.Adam(watched.parameters(), lr=1e-3)
    spec = None if groups is None else groups(watched)
    monitor = OnlineLLC(watched, per_sample_ce, num_samples=n, groups=spec, group_budget=1)
    run_block(plain, opt_p, batches[:10], None)
    run_block(watched, opt_w, batches[:10], monitor)
    tp, tw = 0.0, 0.0
    for b in range(blocks):
        if b % 2 == 0:
            tp += run_block(plain, opt_p, batches, None)[0]
            tw += run_block(watched, opt_w, batches, monitor)[0]
        else:
            tw += run_block(watched, opt_w, batches, monitor)[0]
            tp += run_block(plain, opt_p, batches, None)[0]
    return tw / tp


def filter_cost(num_groups: int, windows_per_group: int = 20) -> float:
    rng = np.random.default_rng(0)
    filters = [LLCFilter() for _ in range(num_groups)]
    total = num_groups * windows_per_group
    zs = rng.normal(10.0, 1.0, size=total)
    t = time.perf_counter()
    for k in range(total):
        # Round-robin: group k % G observes at training step 100 * (k + 1); the others only
        # predict across the gap when they are next observed.
        filters[k % num_groups].update(float(zs[k]), 1.0, 100 * (k + 1))
    return (time.perf_counter() - t) / total


def main() -> None:
    print(f"1. Overhead (time with / without the monitor), every_n_steps = {DEFAULT_EVERY_N_STEPS}, group_budget = 1")
    cases = [
        ("no groups", None),
        ("1 group (all layers)", lambda m: {"all": ["*"]}),
        ("3 groups (one per Linear)", groups_by_linear),
    ]
    for name, spec in cases:
        print(f"  {name:28s} {overhead(spec):6.3f}")
    print("2. Filter update cost per window (block-diagonal state, one block touched per window)")
    for g in (5, 500):
        print(f"  {g:4d} groups: {filter_cost(g) * 1e6:8.1f} us per window")


if __name__ == "__main__":
    main()
