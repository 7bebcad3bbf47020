"""How often the monitor must measure the heat: the calibration at ``measure_every`` 1, 2, 4 and 8.

The monitor measures the heat (minibatch and discretization) on a schedule
(:func:`online_llc.monitor.policy.measuring`): every window of a regime until its heat is known,
then one window in ``measure_every``; the others run the plain shadow step, cheaper and lighter.
The calibration lives on those measurements: the step is cooled when their pooled heat is gross
(:func:`online_llc.monitor.policy.cooled_step`). This script runs the two problems on which the
tests check the online calibration, at frozen weights with known targets (linear regression at
its least-squares optimum, ``tests/test_heat.py``), for several ``measure_every`` and seeds:

* ``stiff``: inputs scaled by 2 (every curvature 4x), full batch (n = 10240), two chains: the
  default step is about 18% hot by its discretization alone, which the monitor must measure and
  cool (1200 shadow steps, windows of 40, warm-up 50);
* ``minibatch``: n = 1e5 at batch 16, one chain, 800 shadow steps: the batch-sized default step
  runs 3.75% hot at unit gradient noise, which needs no cooling; the health heat must read it.

Printed per problem and ``measure_every``, over the seeds: the final step, the health heat, the
mean draw of the windows at the final step against the discrete chain's expectation (the exact
continuous target plus the discretization excess of that step, as in the tests), and the share of
windows that measured. ``measure_every = 1`` is the monitor before the schedule. (The minibatch
chain relaxes over about 2370 shadow steps, longer than the run, so its draw reads low whatever
the schedule; the chains move the same way at every ``measure_every``, so its column only tells
that the schedule left them alone.)

Run:  python benchmarks/measure_every.py                (about 2 minutes on 2 cores)
      python benchmarks/measure_every.py --seeds 0 1 2 3 4 --every 1 4
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Dict, List

import torch

from online_llc import OnlineLLC
from online_llc.models.toy import deep_linear_problem


def regression_at_optimum(n: int, batch: int, input_scale: float, seed: int = 0):
    """The 4 -> 3 linear regression moved to its least-squares optimum: ``(problem, h, outputs)``
    with ``h`` the input covariance's eigenvalues (as ``tests/test_heat.py``)."""
    p = deep_linear_problem([4, 3], r=3, num_samples=n, batch_size=batch, seed=seed)
    x, y = p.dataset.tensors
    x.mul_(input_scale)
    xd, yd = x.double(), y.double()
    w = torch.linalg.solve(xd.T @ xd, xd.T @ yd).T
    with torch.no_grad():
        p.model[0].weight.copy_(w.float())
    return p, torch.linalg.eigvalsh(xd.T @ xd / n), 3


def run(problem: str, every: int, seed: int) -> Dict[str, float]:
    stiff = problem == "stiff"
    n, batch, scale, chains, steps = (10240, 10240, 2.0, 2, 1200) if stiff else (100000, 16, 1.0, 1, 800)
    p, h, outputs = regression_at_optimum(n, batch, scale)
    mon = OnlineLLC(p.model, p.loss_fn, num_samples=n, every_n_steps=1, window=40, warmup=50, num_chains=chains,
                    seed=seed, measure_every=every)
    batches = iter(p.batches)
    full = next(batches) if stiff else None  # the full batch, at every step
    for t in range(1, steps + 1):
        mon.update(full if stiff else next(batches), step=t)
    history = mon.history()
    tracking = [e for e in history if e.status == "tracking"]
    eps = tracking[-1].step_size
    late = [e for e in tracking if e.step_size == eps]
    nbeta, gamma = 256.0, 0.09 * 256.0
    hd = h.double()
    # E[d] of the discrete chain at step eps: the continuous target plus the discretization excess.
    target = float(outputs * 0.5 * torch.sum(nbeta * hd / (nbeta * hd + gamma)))
    a = nbeta * hd + gamma
    excess = float(outputs * torch.sum(eps * nbeta * hd / (8 * (1 - eps * a / 4))))
    draw = sum(e.raw_mean for e in late) / len(late)
    return {
        "step": eps,
        "heat": mon.health().heat,
        "draw": draw / (target + excess) - 1,
        "measured": sum(math.isfinite(e.heat_bias) for e in history) / len(history),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"seeds {args.seeds}; mean (min .. max) over the seeds")
    print(f"{'problem':10s} {'every':>5s} {'final step':>24s} {'health heat':>22s} {'mean draw vs expected':>28s} "
          f"{'measured':>9s}")
    for problem in ("stiff", "minibatch"):
        for every in args.every:
            rows: List[Dict[str, float]] = [run(problem, every, s) for s in args.seeds]

            def cell(key: str, fmt: str) -> str:
                v = [r[key] for r in rows]
                return f"{statistics.fmean(v):{fmt}} ({min(v):{fmt}} .. {max(v):{fmt}})"

            print(f"{problem:10s} {every:5d} {cell('step', '.3g'):>24s} {cell('heat', '.3f'):>22s} "
                  f"{cell('draw', '+.3f'):>28s} {statistics.fmean(r['measured'] for r in rows):9.2f}")


if __name__ == "__main__":
    main()
