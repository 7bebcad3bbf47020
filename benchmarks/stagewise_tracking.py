"""Online vs offline LLC on the stagewise demo: late on each plateau, the online estimate is
compared with ``estimate_llc`` at the same weights and hyperparameters.

Trains the main demo's deep linear network (:mod:`online_llc.demos.stagewise_dln`) with the monitor
attached, saves the weights at a checkpoint late on each plateau, then runs the offline estimator
(4 chains x 1000 draws after 500 burn-in) at each checkpoint.

Run:  python benchmarks/stagewise_tracking.py      (about 1 minute on 2 cores)
"""

from __future__ import annotations

import torch

from online_llc import OnlineLLC, estimate_llc
from online_llc.demos.stagewise_dln import train
from online_llc.models.toy import stagewise_dln_problem

CHECKPOINTS = [3000, 10000, 14000, 30000]  # late on the rank-0, 1, 2 plateaus, and the final minimum


def main() -> None:
    torch.set_num_threads(1)
    problem = stagewise_dln_problem(seed=0)
    monitor = OnlineLLC(problem.model, problem.loss_fn, num_samples=problem.num_samples, every_n_steps=5, window=40)
    estimates, _, snapshots = train(problem, monitor, steps=30000, lr=0.003, verbose=False, checkpoints=CHECKPOINTS)
    by_step = {e.step: e for e in estimates}
    print(f"{'step':>6s} {'online mean ± std':>22s} {'90% band':>22s} {'status':>15s} {'offline ± std':>20s} "
          f"{'rel.diff':>9s} {'agrees':>7s}")
    for step in CHECKPOINTS:
        est = by_step.get(step) or max((e for e in estimates if e.step <= step), key=lambda e: e.step)
        problem.model.load_state_dict(snapshots[step])
        off = estimate_llc(problem.model, problem.loss_fn, problem.batches, num_samples=problem.num_samples,
                           localization=monitor.config.localization, step_size=monitor.config.step_size,
                           nbeta=monitor.config.nbeta, seed=1)
        rel = est.mean / off.mean - 1
        agrees = abs(rel) <= 0.15 or est.lower <= off.mean <= est.upper
        print(f"{step:6d} {est.mean:12.2f} ± {est.std:7.2f} {est.lower:10.2f} .. {est.upper:8.2f} {est.status:>15s} "
              f"{off.mean:11.2f} ± {off.std:6.2f} {rel:+9.3f} {str(agrees):>7s}")
    print(f"theory at the final minimum: {problem.lam_final}")


if __name__ == "__main__":
    main()
