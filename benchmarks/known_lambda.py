"""Known-lambda suite at the defaults: reduced-rank regressions and deep linear networks at aligned
minimal-rank true parameters (every layer of rank exactly r), across data and batch sizes, scored
against the theoretical learning coefficient; and batch-size invariance on a deep linear network.

Each cell runs :func:`online_llc.estimate_llc` with every sampler setting at its default (nbeta,
localization, step size, burn-in) and prints estimate / lambda with the heat it measured and the
settings it chose. A second block runs normal crossings built from data,
``y = w1^a w2^b x + e`` at ``w* = 0`` with the noise made exactly orthogonal to ``x``, so that
``L_n(w) - L_n(0) = c w1^(2a) w2^(2b)`` with ``c = mean(x^2) / 2`` exactly while every minibatch
still carries gradient noise; its target is ``nbeta E[K]`` under ``exp(-nbeta K - gamma |w|^2 / 2)``
at the nbeta and localization the estimator reports, integrated on a grid here (independently of
the estimator). The last block compares batch 32 with batch 1024 on one network, in units of
their combined reported standard error.

Run: ``python benchmarks/known_lambda.py`` (about an hour on 2 cores); ``--sizes 100000`` for one
data size; ``--part networks|crossings|invariance`` for one block; ``--models 8-8-8-8`` for some
networks; ``--localization-scale 0.2`` for
localization ``0.2 sqrt(nbeta)`` instead of the default; ``--part invariance --seeds 2 3 4`` repeats
the invariance block at other chain seeds and prints the spread of the readings beside their
reported standard errors (``--invariance-batches 1024`` for one batch size).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from online_llc import estimate_llc
from online_llc.config import default_estimand
from online_llc.models.toy import ShuffledBatches, deep_linear_problem

MODELS = [([10, 3, 5], 1), ([6, 6, 6], 2), ([5, 3, 4, 6, 2], 1), ([8, 8, 8, 8], 2)]
BY_NAME = {"-".join(map(str, widths)): (widths, r) for widths, r in MODELS}  # --models picks by name
CROSSINGS = [(1, 1), (1, 2)]  # lambda 1/2 (m = 2) and 1/4
SCALE = None  # --localization-scale: localization = SCALE * sqrt(nbeta), else the default


def _estimand(n: int) -> dict:
    """``nbeta`` and ``localization`` for estimate_llc: the defaults, or the given scale."""
    if SCALE is None:
        return {}
    nbeta, _ = default_estimand(n)
    return {"nbeta": nbeta, "localization": SCALE * math.sqrt(nbeta)}


class CrossingRegression(nn.Module):
    """``f(x) = w1^a w2^b x``, at ``w* = 0``."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w[0] ** self.a * self.w[1] ** self.b * x


def crossing_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * (y - model(x)).pow(2)


def crossing_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = np.random.default_rng(seed)
    x = g.standard_normal(n)
    e = g.standard_normal(n)
    e -= x * (x @ e) / (x @ x)  # exactly orthogonal: no linear term in L_n, so w* = 0 is the minimum
    return torch.tensor(x, dtype=torch.float32), torch.tensor(e, dtype=torch.float32), float(x @ x / n / 2)


def crossing_target(a: int, b: int, c: float, nbeta: float, gamma: float, points: int = 4001) -> float:
    """``nbeta E[K]`` under ``exp(-nbeta c w1^(2a) w2^(2b) - gamma |w|^2 / 2)``, by the midpoint rule
    on ``[-R, R]^2`` with ``R = 9 / sqrt(gamma)`` (the Gaussian factor is below e^-40 outside)."""
    r = 9.0 / math.sqrt(gamma)
    w = (np.arange(points) + 0.5) / points * 2 * r - r
    k = c * np.outer(w ** (2 * a), w ** (2 * b))
    logp = -nbeta * k - 0.5 * gamma * (w[:, None] ** 2 + w[None, :] ** 2)
    p = np.exp(logp - logp.max())
    return float(nbeta * (p * k).sum() / p.sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--part", choices=["all", "networks", "crossings", "invariance"], default="all")
    ap.add_argument("--models", default=None, help="networks to run, e.g. 8-8-8-8,10-3-5 (default: all four)")
    ap.add_argument("--localization-scale", type=float, default=None,
                    help="localization = scale * sqrt(nbeta) instead of the default (networks and crossings)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2], help="chain seeds of the invariance block (default 2)")
    ap.add_argument("--invariance-batches", default="32,1024", help="batch sizes of the invariance block (default 32,1024)")
    args = ap.parse_args()
    global SCALE
    SCALE = args.localization_scale
    torch.set_num_threads(1)
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    if args.part in ("all", "networks"):
        wanted = list(BY_NAME) if args.models is None else args.models.split(",")
        unknown = sorted(set(wanted) - set(BY_NAME))
        if unknown:
            ap.error(f"--models: unknown {unknown}; choose from {list(BY_NAME)}")
        networks(sizes, batches, args.chains, [m for name, m in BY_NAME.items() if name in wanted])
    if args.part in ("all", "crossings"):
        crossings(sizes, batches, args.chains)
    if args.part in ("all", "invariance"):
        invariance(args.seeds, [int(v) for v in args.invariance_batches.split(",")])


def networks(sizes: list[int], batches: list[int], chains: int, models: list = MODELS) -> None:
    print("model                 lambda        n  batch | estimate/lambda  se/lambda  heat | nbeta  gamma  step      burn-in  draws")
    worst = 0.0
    for widths, r in models:
        for n in sizes:
            for b in batches:
                p = deep_linear_problem(widths, r, num_samples=n, batch_size=b, seed=0)
                t = time.time()
                res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, num_chains=chains, seed=1, progress=False, **_estimand(n))
                rel = res.mean / p.lam
                worst = max(worst, abs(rel - 1))
                print(f"{str(widths):20s} {p.lam:6.1f} {n:8d} {b:6d} | {rel:8.3f} {res.std / p.lam:10.3f} {res.heat:7.3f} |"
                      f" {res.nbeta:5.0f} {res.localization:6.2f} {res.step_size:.3g} {res.burn_in:7d} {res.draws.shape[1]:6d}"
                      f"  {res.gradient}  ({time.time() - t:.0f} s)", flush=True)
    print(f"worst |estimate / lambda - 1| = {worst:.3f}")


def crossings(sizes: list[int], batches: list[int], chains: int) -> None:
    print("\nnormal crossings from data; target = nbeta E[K] at the reported nbeta and localization")
    print("K                lambda        n  batch | target  estimate/target  se/target  heat | nbeta  gamma  step      burn-in")
    worst = 0.0
    for a, b in CROSSINGS:
        for n in sizes:
            x, y, c = crossing_data(n, seed=0)
            for bs in batches:
                t = time.time()
                res = estimate_llc(CrossingRegression(a, b), crossing_loss, ShuffledBatches(x, y, batch_size=bs, seed=0),
                                   num_samples=n, num_chains=chains, seed=1, progress=False, **_estimand(n))
                target = crossing_target(a, b, c, res.nbeta, res.localization)
                rel = res.mean / target
                worst = max(worst, abs(rel - 1))
                print(f"w1^{2 * a} w2^{2 * b}        {1 / (2 * max(a, b)):6.3f} {n:8d} {bs:6d} | {target:6.3f} {rel:11.3f} "
                      f"{res.std / target:10.3f} {res.heat:7.3f} | {res.nbeta:5.0f} {res.localization:6.2f} "
                      f"{res.step_size:.3g} {res.burn_in:7d}  {res.gradient}  ({time.time() - t:.0f} s)", flush=True)
    print(f"worst |estimate / target - 1| = {worst:.3f}")


def invariance(seeds: list[int], batches: list[int]) -> None:
    print("\nbatch-size invariance, dln [8, 8, 8, 8] r=2, n = 100000, 4 chains")
    out: dict[int, list] = {b: [] for b in batches}
    for seed in seeds:
        for b in batches:
            p = deep_linear_problem([8, 8, 8, 8], 2, num_samples=100000, batch_size=b, seed=0)
            res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=100000, num_chains=4, seed=seed)
            out[b].append(res)
            print(f"seed {seed} batch {b:5d}: {res.mean:.3f} +- {res.std:.3f}  heat {res.heat:.3f}  step {res.step_size:.3g}", flush=True)
        if len(batches) == 2:
            x, y = out[batches[0]][-1], out[batches[1]][-1]
            diff, se = x.mean - y.mean, math.hypot(x.std, y.std)
            print(f"seed {seed}: difference {diff:+.3f} = {diff / se:+.2f} combined standard errors")
    for b, runs in out.items():
        if len(runs) > 1:
            means = np.array([r.mean for r in runs])
            rms_se = float(np.sqrt(np.mean([r.std**2 for r in runs])))
            print(f"batch {b:5d}: {len(runs)} seeds, mean {means.mean():.3f}, spread {means.std(ddof=1):.3f} "
                  f"against the reported standard error {rms_se:.3f} (rms)")


if __name__ == "__main__":
    main()
