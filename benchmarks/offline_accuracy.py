"""Offline estimator vs theory: accuracy at the defaults, step-size diagnostics, ordinality,
convergence with the budget and calibration of the reported std.

Run:  python benchmarks/offline_accuracy.py            (about 25 minutes on 2 cores)
      python benchmarks/offline_accuracy.py --quick    (accuracy table only, about 10 minutes)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from online_llc import estimate_llc
from online_llc.calibration.step import DEFAULT_STEP_SCALE
from online_llc.config import DEFAULT_LOCALIZATION_SCALE, DEFAULT_NBETA_CAP
from online_llc.models.toy import deep_linear_problem

MODELS = [
    ([10, 1], 1),
    ([6, 6, 6], 2),
    ([10, 3, 5], 1),
    ([6, 6, 6], 3),
    ([16, 8, 16, 8], 4),
    ([4, 12, 12, 12, 4], 2),
    ([8, 8, 8, 8], 2),
    ([5, 3, 4, 6, 2], 1),
    ([6, 6, 6, 6, 6], 3),
]


def run(p, **kw):
    return estimate_llc(p.model, p.loss_fn, p.batches, num_samples=p.num_samples, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="accuracy table only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"defaults: nbeta=min(n/log n, {DEFAULT_NBETA_CAP}), localization={DEFAULT_LOCALIZATION_SCALE} sqrt(nbeta), "
          f"step calibrated on the measured heat (at most {DEFAULT_STEP_SCALE}/nbeta), burn-in and draws from the "
          "relaxation time; n=10240, batch 256, 4 chains\n")

    print("1. Accuracy at the defaults")
    print(f"{'model':28s} {'m':>2s} {'lambda':>7s} {'estimate':>15s} {'rel.err':>8s} {'heat':>6s} {'step':>8s} "
          f"{'burn-in':>7s} {'draws':>6s} {'sec':>5s}")
    for widths, r in MODELS:
        p = deep_linear_problem(widths, r, seed=0)
        t = time.perf_counter()
        res = run(p)
        dt = time.perf_counter() - t
        print(f"{p.name:28s} {p.multiplicity:2d} {p.lam:7.2f} {res.mean:8.2f} ± {res.std:4.2f} {res.mean / p.lam - 1:+8.3f} "
              f"{res.heat:6.3f} {res.step_size:8.2e} {res.burn_in:7d} {res.num_draws:6d} {dt:5.1f}")
    if args.quick:
        return

    print("\n2. Step size on reduced-rank regression 6-6-6, r=2 (lambda = 16)")
    p = deep_linear_problem([6, 6, 6], 2, seed=0)
    nbeta = min(p.num_samples / math.log(p.num_samples), DEFAULT_NBETA_CAP)
    for mult in (0.25, 0.5, 1.0, 3.0):
        res = run(p, step_size=mult * DEFAULT_STEP_SCALE / nbeta)
        print(f"  step_size = {mult:4.2f} x the largest default: estimate {res.mean:6.2f} ± {res.std:4.2f} "
              f"(rel.err {res.mean / p.lam - 1:+.3f})  heat {res.heat:5.3f}")

    print("\n3. Ordinality on reduced-rank regression 10-3-5")
    for r in (1, 2):
        p = deep_linear_problem([10, 3, 5], r, seed=0)
        res = run(p)
        print(f"  r = {r}: lambda {p.lam:5.2f}  estimate {res.mean:6.2f} ± {res.std:4.2f}")

    print("\n4. Convergence with the budget on dln[16, 8, 16, 8] r=4 (lambda = 48)")
    p = deep_linear_problem([16, 8, 16, 8], 4, seed=0)
    base = None
    for k in (1, 4, 16):
        res = run(p, num_draws=1000 * k, seed=0)
        base = base or res
        print(f"  {k:2d}x draws: estimate {res.mean:7.3f} ± {res.std:5.3f}   "
              f"moved {res.mean - base.mean:+.3f} from 1x (= {(res.mean - base.mean) / base.std:+.2f} x the 1x std)")

    print("\n5. Calibration of the reported std over 20 chain seeds, reduced-rank regression 6-6-6, r=2, at "
          "the largest default step (a seed whose calibration picks another step moves with that step's bias)")
    p = deep_linear_problem([6, 6, 6], 2, seed=0)
    results = [run(p, seed=200 + s, step_size=DEFAULT_STEP_SCALE / DEFAULT_NBETA_CAP) for s in range(20)]
    means = np.array([r.mean for r in results])
    observed = means.std(ddof=1)
    reported = math.sqrt(np.mean([r.std**2 for r in results]))
    print(f"  estimates {np.round(means, 2).tolist()}")
    print(f"  observed sd {observed:.3f}   rms reported std {reported:.3f}   ratio observed/reported {observed / reported:.2f}")


if __name__ == "__main__":
    main()
