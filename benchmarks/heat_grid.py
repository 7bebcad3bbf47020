"""Heat grid: regular linear regression at its least-squares optimum, where the localized, tempered
posterior's target is known exactly, across data sizes, batch sizes and dimensions.

    target = 1/2 * sum_j nbeta h_j / (nbeta h_j + gamma),   h_j = eig(X^T X / n) (each output),

for the ``nbeta`` and ``gamma`` the estimator reports it used. Prints, per cell, estimate / target
at the old fixed defaults (``nbeta = n / log n``, ``gamma = 100``, ``step = 0.15 / nbeta``) and at
the current defaults, with the measured heat beside each.

Run: ``python benchmarks/heat_grid.py`` (the full grid takes hours on 2 cores: small batches need
many small steps); ``--dims 12 --sizes 2000,20000,200000 --batches 64,256`` for a subset.
"""

from __future__ import annotations

import argparse
import math

import torch

from online_llc import estimate_llc
from online_llc.toy import deep_linear_problem

DIMS = {4: (2, 2), 12: (4, 3), 32: (8, 4)}


def problem(d: int, n: int, batch: int, seed: int):
    din, dout = DIMS[d]
    p = deep_linear_problem([din, dout], r=min(din, dout), num_samples=n, batch_size=min(batch, n), seed=seed)
    x, y = p.dataset.tensors
    with torch.no_grad():
        w_ls = torch.linalg.solve(x.T.double() @ x.double(), x.T.double() @ y.double()).T
        p.model[0].weight.copy_(w_ls.float())
    h = torch.linalg.eigvalsh((x.T.double() @ x.double()) / n)
    return p, h, dout


def target(h, dout: int, nbeta: float, gamma: float) -> float:
    return float(dout * 0.5 * torch.sum(nbeta * h / (nbeta * h + gamma)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="4,12,32")
    ap.add_argument("--sizes", default="2000,20000,200000,1000000")
    ap.add_argument("--batches", default="16,64,256,2048")
    ap.add_argument("--full-batch", action="store_true", help="also the full batch where n <= 20000")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dims = [int(v) for v in args.dims.split(",")]
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    print("    d        n  batch | old defaults: ratio   heat | calibrated defaults: ratio   heat  +-se   nbeta  gamma  step")
    worst_new, alarms = 0.0, []
    for d in dims:
        for n in sizes:
            for b in batches + ([n] if args.full_batch and n <= 20000 else []):
                if b > n:
                    continue
                p, h, dout = problem(d, n, b, seed=0)
                nb_old = n / math.log(n)
                old = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, nbeta=nb_old, localization=100.0,
                                   step_size=0.15 / nb_old, num_chains=2, num_draws=400, burn_in=200, seed=1)
                new = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, num_chains=2, seed=1)
                t_old = target(h, dout, old.nbeta, old.localization)
                t_new = target(h, dout, new.nbeta, new.localization)
                r_old, r_new = old.mean / t_old, new.mean / t_new
                worst_new = max(worst_new, abs(r_new - 1))
                alarms.append((r_old, old.heat))
                print(f"{d:5d} {n:8d} {b:6d} | {r_old:19.3f} {old.heat:6.3f} | {r_new:26.3f} {new.heat:6.3f} "
                      f"{new.std / t_new:5.3f} {new.nbeta:7.1f} {new.localization:6.2f} {new.step_size:.3g}", flush=True)
    print(f"calibrated defaults: worst |ratio - 1| = {worst_new:.3f}")
    # The heat alarm (OnlineLLC.health, recommend_step_size) fires above heat 1.1: on the old
    # defaults it must fire on every cell whose ratio is above 1.2 and on none below 1.05.
    fired_hot = sum(1 for r, t in alarms if r > 1.2 and t > 1.1)
    hot = sum(1 for r, _ in alarms if r > 1.2)
    false = sum(1 for r, t in alarms if r < 1.05 and t > 1.1)
    print(f"old defaults: alarm (heat > 1.1) on {fired_hot} of {hot} cells with ratio > 1.2; "
          f"on {false} of {sum(1 for r, _ in alarms if r < 1.05)} cells with ratio < 1.05")
    within = [abs(t * 1.0 / r - 1) for r, t in alarms if math.isfinite(t)]
    print(f"old defaults: heat / ratio within 10% on {sum(w < 0.1 for w in within)} of {len(within)} cells")


if __name__ == "__main__":
    main()
