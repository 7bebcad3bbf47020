"""Online vs offline at fixed weights, and the lag after a step change.

1. Frozen training (learning rate 0) at a known-lambda point: the online monitor (one shadow step
   per training step, windows of 50) against ``estimate_llc`` with 4 chains x 4000 draws at the
   same hyperparameters: final estimate, band coverage of the offline value after warm-up.
2. Step change: weights and data switch from reduced-rank regression 10-3-5 at rank 1 to rank 3
   mid-run; lag (windows until the estimate is within 10% or its 90% band of the new offline
   value) and band coverage before and after, over several chain seeds.
3. Moving weights: a stagewise deep linear network trained with SGD (the monitor at its default
   cadence and window), and at five checkpoints (window ends, across the stages) the live
   estimate against ``estimate_llc`` at the weights of that step and the monitor's own estimand
   (its nbeta, localization and current step), with 4 chains x 4000 draws: the ratio, the
   distance in the live band's standard deviations, and whether the 90% band covers it. The
   co-moving chain lags a moving centre; this shows by how much.
4. Batch-size invariance of the live estimate: frozen known-lambda networks at n = 1e5, the
   monitor (defaults, one shadow step per training step, 4 chains) fed batches of 32 and of 1024;
   the mean of the tracking windows' means with its standard error (Geyer's, over the windows
   of all chains pooled by window), the pooled heat (minibatch alone, and with the measured
   discretization bias) and the step the monitor settled on.

Run:  python benchmarks/online_vs_offline.py      (about 5 minutes on 2 cores; ``--part moving``,
      ``--part invariance``)
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from scipy.stats import norm

from online_llc import OnlineLLC, estimate_llc
from online_llc.calibration.step import resolve_hyperparameters
from online_llc.models.toy import ShuffledBatches, deep_linear_problem, stagewise_dln_problem
from online_llc.offline.batches import batches_forever as _batches_forever  # re-iterates the loader, reshuffling each pass
from online_llc.stats.mcse import mean_standard_error

Z90 = float(norm.ppf(0.95))


def drive(monitor, batches, steps, start=0):
    return [e for s in range(start, start + steps) if (e := monitor.update(batches[s % len(batches)])) is not None]


def frozen(widths, r):
    p = deep_linear_problem(widths, r, seed=0)
    off = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=p.num_samples, num_draws=4000, seed=1,
                       localization=resolve_hyperparameters(num_samples=p.num_samples, nbeta=None, localization=None, step_size=None, online=True).localization)
    mon = OnlineLLC(p.model, p.loss_fn, num_samples=p.num_samples, every_n_steps=1, window=50, seed=5)
    drive(mon, list(p.batches), 4000)
    after = [e for e in mon.history() if e.status != "warming_up"]
    cov = np.mean([e.lower <= off.mean <= e.upper for e in after])
    f = mon.estimate
    z = (f.mean - off.mean) / np.hypot(f.std, off.std)
    print(f"  {p.name:22s} lambda {p.lam:5.1f}  offline {off.mean:6.2f} ± {off.std:4.2f}  online final "
          f"{f.mean:6.2f} ± {f.std:4.2f} (z = {z:+.2f})  coverage {cov:.2f} over {len(after)} windows  "
          f"mean of window means {np.mean([e.raw_mean for e in after]):6.2f}")


def step_change(seed):
    a = deep_linear_problem([10, 3, 5], 1, seed=0)
    b = deep_linear_problem([10, 3, 5], 3, seed=0)
    loc = resolve_hyperparameters(num_samples=a.num_samples, nbeta=None, localization=None, step_size=None, online=True).localization
    off_a = estimate_llc(a.model, a.loss_fn, a.batches, num_samples=a.num_samples, seed=1, localization=loc).mean
    off_b = estimate_llc(b.model, b.loss_fn, b.batches, num_samples=b.num_samples, seed=1, localization=loc).mean
    mon = OnlineLLC(a.model, a.loss_fn, num_samples=a.num_samples, every_n_steps=1, window=50, seed=seed)
    before = drive(mon, list(a.batches), 1500)
    with torch.no_grad():
        for pa, pb in zip(a.model.parameters(), b.model.parameters()):
            pa.copy_(pb)
    after = drive(mon, list(b.batches), 2500, start=1500)
    close = lambda e, t: abs(e.mean - t) <= max(0.1 * abs(t), Z90 * e.std)  # noqa: E731
    lag = next((i + 1 for i, e in enumerate(after) if close(e, off_b)), None)
    cov_a = np.mean([e.lower <= off_a <= e.upper for e in before if e.status != "warming_up"])
    cov_b = np.mean([e.lower <= off_b <= e.upper for e in after[5:]])
    flagged = [i + 1 for i, e in enumerate(after[:5]) if e.status == "transition"]
    print(f"  seed {seed}: offline {off_a:5.2f} -> {off_b:5.2f}; lag {lag} windows; transition flagged at windows "
          f"{flagged}; band coverage before {cov_a:.2f}, after (from window 6) {cov_b:.2f}")


def moving(seed: int, steps: int = 36000, checkpoints: int = 5) -> list:
    p = stagewise_dln_problem(seed=seed)
    opt = torch.optim.SGD(p.model.parameters(), lr=0.01)
    mon = OnlineLLC(p.model, p.loss_fn, num_samples=p.num_samples, seed=seed + 7)
    targets = [steps * (k + 1) // (checkpoints + 1) for k in range(checkpoints)]
    rows = []
    for step, batch in zip(range(steps), _batches_forever(p.batches)):
        opt.zero_grad()
        p.loss_fn(p.model, batch).mean().backward()
        opt.step()
        est = mon.update(batch, step=step)
        # The first tracking window to close after each target step is a checkpoint.
        if est is not None and targets and est.step >= targets[0] and est.status != "warming_up":
            targets.pop(0)
            cfg = mon.sampler.config
            snap = copy.deepcopy(p.model)
            off = estimate_llc(snap, p.loss_fn, ShuffledBatches(p.inputs, p.targets, batch_size=256, seed=99), num_samples=p.num_samples, nbeta=cfg.nbeta,
                               localization=cfg.localization, step_size=cfg.step_size, num_draws=4000, burn_in=2000,
                               seed=seed + 11)
            rows.append((est.step, est.mean, est.std, est.lower, est.upper, off.mean, off.std, est.status))
    return rows


def invariance(widths, r, shadow_steps: int, n: int = 100000) -> None:
    out = {}
    for b in (32, 1024):
        p = deep_linear_problem(widths, r, num_samples=n, batch_size=b, seed=0)
        mon = OnlineLLC(p.model, p.loss_fn, num_samples=n, every_n_steps=1, num_chains=4, seed=3)
        for _, batch in zip(range(shadow_steps), _batches_forever(p.batches)):
            mon.update(batch)
        # Windows after the first third: the chain's relaxation at batch 32 (about 1200 shadow
        # steps) is well inside it.
        hist = [e for e in mon.history() if e.status == "tracking"]
        hist = hist[len(hist) // 3 :]
        means = np.array([e.raw_mean for e in hist])
        se = mean_standard_error(means)
        heat = float(np.mean(means) / (np.mean(means) - np.mean([e.heat_bias for e in hist])))
        total = float(np.mean(means) / (np.mean(means) - np.mean([e.total_bias for e in hist])))
        out[b] = (float(means.mean()), se)
        print(f"  {p.name:22s} lambda {p.lam:5.1f} batch {b:5d}: live {means.mean():6.2f} ± {se:4.2f} over {len(hist)} windows"
              f"  heat {heat:.3f} (with discretization {total:.3f})  step {mon.sampler.config.step_size:.3g}"
              f"  localization {mon.sampler.config.localization:.3g}", flush=True)
    (m32, s32), (m1k, s1k) = out[32], out[1024]
    print(f"    batch 32 / batch 1024 = {m32 / m1k:.3f}, {(m32 - m1k) / np.hypot(s32, s1k):+.2f} combined standard errors")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["all", "frozen", "step", "moving", "invariance"], default="all")
    ap.add_argument("--shadow-steps", type=int, default=24000, help="shadow steps per run of the invariance part")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of the moving part")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part in ("all", "frozen"):
        print("1. Frozen weights: online vs offline at the same hyperparameters (defaults)")
        for widths, r in [([6, 6, 6], 2), ([16, 8, 16, 8], 4)]:
            frozen(widths, r)
    if args.part in ("all", "step"):
        print("2. Step change rank 1 -> rank 3 (reduced-rank regression 10-3-5), windows of 50 draws")
        for seed in range(5):
            step_change(seed)
    if args.part in ("all", "moving"):
        print("3. Moving weights: stagewise DLN trained with SGD, live vs offline at five checkpoints")
        covered, total, ratios = 0, 0, []
        for seed in args.seeds:
            for step, m, sd, lo, hi, om, osd, status in moving(seed):
                inside = lo <= om <= hi
                covered += inside
                total += 1
                ratios.append(m / om)
                print(f"  seed {seed} step {step:6d}: live {m:6.2f} [{lo:6.2f}, {hi:6.2f}] ({status})  offline {om:6.2f} "
                      f"± {osd:4.2f}  live / offline {m / om:5.3f}  (live - offline) / live std {(m - om) / sd:+5.2f}  "
                      f"{'covered' if inside else 'MISSED'}", flush=True)
        print(f"  coverage {covered}/{total}; live / offline from {min(ratios):.3f} to {max(ratios):.3f}")
    if args.part in ("all", "invariance"):
        print("4. Batch-size invariance of the live estimate: frozen networks, n = 1e5, batches 32 and 1024")
        for widths, r in [([10, 3, 5], 1), ([8, 8, 8, 8], 2)]:
            invariance(widths, r, args.shadow_steps)


if __name__ == "__main__":
    main()
