"""The step's discretization bias: the estimate and the measured bias as the step shrinks.

On a deep linear network with full batches (no minibatch heat), the estimate at a fraction of the
largest default step (``0.08 / nbeta``), the measured ``discretization_bias``
(:func:`online_llc.calibration.heat.discretization_bias`) and the excess over the smallest step's estimate.

Run:  python benchmarks/discretization.py                       (about 10 minutes on 2 cores)
      python benchmarks/discretization.py --widths 6 6 6 --rank 2
"""

from __future__ import annotations

import argparse
import time

import torch

from online_llc import estimate_llc
from online_llc.calibration.step import DEFAULT_STEP_SCALE
from online_llc.config import DEFAULT_NBETA_CAP
from online_llc.models.toy import deep_linear_problem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 12, 12, 12, 4])
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    ap.add_argument("--chains", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = 10240
    p = deep_linear_problem(args.widths, args.rank, num_samples=n, batch_size=n, seed=0)
    print(f"{p.name}, lambda {p.lam:g}, n {n}, full batch, nbeta {DEFAULT_NBETA_CAP:g}, {args.chains} chains, "
          "burn-in and draws from the relaxation time")
    rows = []
    for frac in sorted(args.fractions, reverse=True):
        t = time.perf_counter()
        res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, num_chains=args.chains, seed=0,
                           step_size=frac * DEFAULT_STEP_SCALE / DEFAULT_NBETA_CAP)
        rows.append((frac, res, time.perf_counter() - t))
    ref = rows[-1][1].mean
    print(f"{'step':>8s} {'estimate':>16s} {'excess over smallest':>21s} {'measured bias':>14s} {'burn-in':>8s} {'sec':>5s}")
    for frac, res, dt in rows:
        print(f"{frac:8.4g} {res.mean:8.3f} ± {res.std:5.3f} {res.mean - ref:21.3f} {res.discretization_bias:14.3f} "
              f"{res.burn_in:8d} {dt:5.0f}")


if __name__ == "__main__":
    main()
