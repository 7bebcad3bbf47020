"""Sampler bias against known truth: SGLD, RMSProp-preconditioned SGLD and SGHMC.

For each sampler and three step sizes (0.5x, 1x, 2x its default), the offline estimate
(4 chains x 1000 draws after 500 burn-in, localization 100, nbeta = n / log n) on linear
regression, two reduced-rank regressions and two deep linear networks (lambda from
online_llc.models.theory, checked against the reference JSON), and on two normal-crossing potentials
``K = w1^(2a) w2^(2b)`` against the exact finite-nbeta target ``nbeta E[K]`` under a uniform prior
on [-1, 1]^2 (the box is a steep wall; no localization there). Prints relative error, the
effective temperature, and whether the diagnostic flags the setting (effective temperature
outside [0.67, 1.5]).

Run:  python benchmarks/sampler_bias.py          (about 6 minutes on 2 cores)
      python benchmarks/sampler_bias.py --quick  (one step size per sampler)
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from online_llc import estimate_llc
from online_llc.calibration.step import resolve_hyperparameters
from online_llc.models.theory import normal_crossing_target
from online_llc.models.toy import deep_linear_problem

MODELS = [([10, 1], 1), ([6, 6, 6], 2), ([10, 3, 5], 1), ([16, 8, 16, 8], 4), ([4, 12, 12, 12, 4], 2)]
CROSSINGS = [(1, 1, 1000.0), (1, 2, 1000.0)]  # (a, b, nbeta): targets 0.3873 and 0.2262 in the JSON
SAMPLERS = ("sgld", "rmsprop_sgld", "sghmc")


class Crossing(nn.Module):
    """``K(w) = w1^(2a) w2^(2b)`` plus a wall that keeps ``w`` in [-1, 1]^2 (the uniform prior's box),
    centred at the minimum ``w* = 0``."""

    def __init__(self, a: int, b: int, start: float = 0.0) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.w = nn.Parameter(torch.full((2,), start))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.w[0], self.w[1]
        k = w1 ** (2 * self.a) * w2 ** (2 * self.b)
        # Stiff enough that nbeta * wall is ~12 at 0.05 outside the box (nbeta = 1000), soft enough
        # that epsilon * nbeta * curvature stays below SGLD's stability limit at these step sizes.
        wall = 5.0 * torch.relu(self.w.abs() - 1).pow(2).sum()
        return (k + wall).expand(batch.shape[0])


def flagged(t: float) -> str:
    return "FLAG" if not (0.67 <= t <= 1.5) or math.isnan(t) else "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one step size per sampler")
    ap.add_argument("--part", choices=["all", "linear", "crossings"], default="all")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mults = (1.0,) if args.quick else (0.5, 1.0, 2.0)
    print(f"{'model':26s} {'target':>8s} {'sampler':>13s} {'step':>9s} {'estimate':>16s} {'rel.err':>8s} "
          f"{'T_eff':>6s} {'diag':>5s}")
    for widths, r in MODELS if args.part in ("all", "linear") else []:
        p = deep_linear_problem(widths, r, seed=0)
        for sampler in SAMPLERS:
            base = resolve_hyperparameters(num_samples=p.num_samples, nbeta=None, localization=100.0,
                                           step_size=None, sampler=sampler).step_size
            for m in mults:
                res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=p.num_samples, sampler=sampler,
                                   step_size=m * base, seed=1)
                print(f"{p.name:26s} {p.lam:8.3f} {sampler:>13s} {m * base:9.2e} {res.mean:8.3f} ± {res.std:5.3f} "
                      f"{res.mean / p.lam - 1:+8.3f} {res.dispersion:6.2f} {flagged(res.dispersion):>5s}",
                      flush=True)
    for a, b, nbeta in CROSSINGS if args.part in ("all", "crossings") else []:
        target = normal_crossing_target(a, b, 1.0, nbeta)
        name = f"w1^{2 * a} w2^{2 * b}, nbeta={nbeta:g}"
        for sampler in SAMPLERS:
            base = resolve_hyperparameters(num_samples=2, nbeta=nbeta, localization=0.0, step_size=None,
                                           sampler=sampler).step_size
            for m in mults:
                model = Crossing(a, b)
                res = estimate_llc(model, lambda mod, x: mod(x), [torch.zeros(4, 1)], num_samples=2, nbeta=nbeta,
                                   localization=0.0, step_size=m * base, sampler=sampler, num_draws=4000,
                                   burn_in=1000, seed=1)
                print(f"{name:26s} {target:8.4f} {sampler:>13s} {m * base:9.2e} {res.mean:8.4f} ± {res.std:5.4f} "
                      f"{res.mean / target - 1:+8.3f} {res.dispersion:6.2f} {flagged(res.dispersion):>5s}",
                      flush=True)


if __name__ == "__main__":
    main()
