"""Known-lambda suite at the defaults: reduced-rank regressions and deep linear networks at aligned
minimal-rank true parameters (every layer of rank exactly r), across data and batch sizes, scored
against the theoretical learning coefficient; and batch-size invariance on a deep linear network.

Each cell runs :func:`online_llc.estimate_llc` with every sampler setting at its default (nbeta,
localization, step size, burn-in) and prints estimate / lambda with the heat it measured and the
settings it chose. The last block compares batch 32 with batch 1024 on one network, in units of
their combined reported standard error.

Run: ``python benchmarks/known_lambda.py`` (about an hour on 2 cores); ``--sizes 100000`` for one
data size, ``--no-invariance`` to skip the last block.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from online_llc import estimate_llc
from online_llc.toy import deep_linear_problem

MODELS = [([10, 3, 5], 1), ([6, 6, 6], 2), ([5, 3, 4, 6, 2], 1), ([8, 8, 8, 8], 2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--no-invariance", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(v) for v in args.sizes.split(",")]
    print("model                 lambda        n  batch | estimate/lambda  se/lambda  heat | nbeta  gamma  step      burn-in")
    worst = 0.0
    for widths, r in MODELS:
        for n in sizes:
            for b in [int(v) for v in args.batches.split(",")]:
                p = deep_linear_problem(widths, r, num_samples=n, batch_size=b, seed=0)
                t = time.time()
                res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, num_chains=args.chains, seed=1)
                rel = res.mean / p.lam
                worst = max(worst, abs(rel - 1))
                print(f"{str(widths):20s} {p.lam:6.1f} {n:8d} {b:6d} | {rel:8.3f} {res.std / p.lam:10.3f} {res.heat:7.3f} |"
                      f" {res.nbeta:5.0f} {res.localization:6.2f} {res.step_size:.3g} {res.burn_in:7d}  ({time.time() - t:.0f} s)",
                      flush=True)
    print(f"worst |estimate / lambda - 1| = {worst:.3f}")
    if args.no_invariance:
        return

    print("\nbatch-size invariance, dln [8, 8, 8, 8] r=2, n = 100000")
    out = {}
    for b in (32, 1024):
        p = deep_linear_problem([8, 8, 8, 8], 2, num_samples=100000, batch_size=b, seed=0)
        res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=100000, num_chains=4, seed=2)
        out[b] = res
        print(f"batch {b:5d}: {res.mean:.3f} +- {res.std:.3f}  heat {res.heat:.3f}  step {res.step_size:.3g}")
    diff = out[32].mean - out[1024].mean
    se = math.hypot(out[32].std, out[1024].std)
    print(f"difference {diff:+.3f} = {diff / se:+.2f} combined standard errors")


if __name__ == "__main__":
    main()
