"""Heat grid: regular linear regression at its least-squares optimum, where the localized, tempered
posterior's target is known exactly, across data sizes, batch sizes and dimensions.

    target = 1/2 * sum_j nbeta h_j / (nbeta h_j + gamma),   h_j = eig(X^T X / n) (each output),

for the ``nbeta`` and ``gamma`` the estimator reports it used. Prints, per cell, estimate / target
at the old fixed defaults (``nbeta = n / log n``, ``gamma = 100``, ``step = 0.15 / nbeta``) and at
the current defaults, with the measured heat (``LLCResult.total_heat``, its interval for the old
defaults) beside each: on this model the heat should equal the ratio.

``--new-only`` runs only the current defaults. ``--old-only`` runs only the old defaults, on shuffled epochs and on independent batches, to check
the heat diagnostic (10 minutes for the whole grid).

Run: ``python benchmarks/heat_grid.py`` (the full grid takes hours on 2 cores: small batches need
many small steps); ``--dims 12 --sizes 2000,20000,200000 --batches 64,256`` for a subset;
``--new-only --chains 4 --seeds 1 2 3 4 5 6`` repeats each calibrated cell at the estimator's
default chains over several chain seeds (their mean and spread beside the reported errors).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from online_llc import estimate_llc
from online_llc.config import default_estimand
from online_llc.models.toy import RandomBatches, deep_linear_problem

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
    ap.add_argument("--old-draws", type=int, default=2000, help="draws per chain at the old defaults")
    ap.add_argument("--old-only", action="store_true", help="only the old defaults (the heat diagnostic's check)")
    ap.add_argument("--new-only", action="store_true", help="only the calibrated defaults (no old-default columns)")
    ap.add_argument("--localization-scale", type=float, default=None,
                    help="calibrated columns at localization = scale * sqrt(nbeta) instead of the default")
    ap.add_argument("--full-batch", action="store_true", help="also the full batch where n <= 20000")
    ap.add_argument("--chains", type=int, default=2, help="chains of the calibrated columns (default 2; the estimator's default is 4)")
    ap.add_argument("--gradient", default="auto", choices=("auto", "plain", "control_variate"),
                    help="the calibrated columns' gradient (default: the estimator's, auto)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1],
                    help="chain seeds of the calibrated columns, one line each and their mean (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dims = [int(v) for v in args.dims.split(",")]
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    print("    d        n  batch | old defaults: ratio  +-se   heat [low, high]       | independent batches: ratio  +-se"
          "   heat | calibrated defaults: ratio  +-se   heat   nbeta  gamma  step  gradient  burn-in  draws  wall")
    worst_new, cells = 0.0, []
    for d in dims:
        for n in sizes:
            for b in batches + ([n] if args.full_batch and n <= 20000 else []):
                if b > n:
                    continue
                p, h, dout = problem(d, n, b, seed=0)
                nb_old = n / math.log(n)
                t_old = target(h, dout, nb_old, 100.0)
                # The old fixed defaults, with more draws than they had (400) so that the ratio and
                # the heat it is compared with are both measured to a few percent: on the shuffled
                # epochs users have, and on independent batches (RandomBatches), where the heat is
                # all there is (within an epoch the draw's batch is one the chain has not fitted).
                row = []
                for batches_ in () if args.new_only else (p.batches, RandomBatches(*p.dataset.tensors, batch_size=min(b, n), seed=2)):
                    old = estimate_llc(p.model, p.loss_fn, batches_, num_samples=n, nbeta=nb_old, localization=100.0,
                                       step_size=0.15 / nb_old, num_chains=2, num_draws=args.old_draws, burn_in=200,
                                       seed=1)
                    row.append((old.mean / t_old, old.std / t_old, old.total_heat, *old.heat_interval))
                if args.new_only:
                    line = f"{d:5d} {n:8d} {b:6d} | {'-':>19} | {'-':>26} |"
                else:
                    cells.append(row)
                    (r, se, t, lo, hi), (ri, sei, ti, _, _) = row
                    line = (f"{d:5d} {n:8d} {b:6d} | {r:19.3f} {se:5.3f} {t:7.3f} [{lo:.3f}, {hi:.3f}] | "
                            f"{ri:26.3f} {sei:5.3f} {ti:6.3f} |")
                if args.old_only:
                    print(line, flush=True)
                    continue
                extra = {}
                if args.localization_scale is not None:
                    nb, _ = default_estimand(n)
                    extra = {"nbeta": nb, "localization": args.localization_scale * math.sqrt(nb)}
                ratios = []
                for seed in args.seeds:
                    start = time.perf_counter()
                    new = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, num_chains=args.chains, seed=seed,
                                       gradient=args.gradient, progress=False, **extra)
                    wall = time.perf_counter() - start
                    t_new = target(h, dout, new.nbeta, new.localization)
                    r_new = new.mean / t_new
                    ratios.append(r_new)
                    worst_new = max(worst_new, abs(r_new - 1))
                    tag = f"  (seed {seed})" if len(args.seeds) > 1 else ""
                    print(f"{line} {r_new:26.3f} {new.std / t_new:5.3f} {new.total_heat:6.3f} {new.nbeta:7.1f} "
                          f"{new.localization:6.2f} {new.step_size:.3g}  {new.gradient:>15} {new.burn_in:7d} "
                          f"{new.num_draws:6d} {wall:5.1f}s{tag}", flush=True)
                if len(ratios) > 1:
                    print(f"{d:5d} {n:8d} {b:6d} | mean over {len(ratios)} seeds {statistics.mean(ratios):.3f}, "
                          f"spread {statistics.stdev(ratios):.3f}", flush=True)
    if not args.old_only:
        print(f"calibrated defaults: worst |ratio - 1| = {worst_new:.3f}")
    if args.new_only:
        return
    # The heat (LLCResult.total_heat: minibatch and discretization together) against the measured
    # ratio on the old defaults, whose step is fixed and often hot. The alarm (estimate_llc's
    # warning) fires when the heat reads above 1.05 and its lower end above 1.
    shuffled = [c[0] for c in cells]
    fired = [r for r, _, t, lo, _ in shuffled if t > 1.05 and lo > 1]
    print(f"old defaults: alarm on {sum(r > 1.2 for r in fired)} of {sum(c[0] > 1.2 for c in shuffled)} cells with "
          f"ratio > 1.2; on {sum(r < 1.05 for r in fired)} of {sum(c[0] < 1.05 for c in shuffled)} with ratio < 1.05")
    for name, k in (("shuffled epochs", 0), ("independent batches", 1)):
        rows = [c[k] for c in cells]
        within = sum(1 for r, _, t, *_ in rows if abs(t / r - 1) < 0.1)
        covered = sum(1 for r, se, _, lo, hi in rows if lo <= r + 2 * se and r - 2 * se <= hi)
        resolved = [(r, t) for r, _, t, lo, hi in rows if hi / lo < 1.2]
        print(f"old defaults, {name}: heat within 10% of the ratio on {within} of {len(rows)} cells "
              f"({sum(abs(t / r - 1) < 0.1 for r, t in resolved)} of the {len(resolved)} whose heat interval is "
              f"narrower than 20%); its interval meets the ratio's +-2 se on {covered}")

if __name__ == "__main__":
    main()
