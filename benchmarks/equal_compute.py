"""Equal-compute curve accuracy: the online LLC curve against offline ``estimate_llc`` at evenly
spaced checkpoints, both spending the same number of gradient evaluations, scored against a gold
curve.

The run: the main demo's deep linear network (:mod:`online_llc.demos.stagewise_dln`,
``stagewise_dln_problem(seed=0)``, SGD at lr 0.003, 30000 steps) learns three modes in stages; its
LLC goes from about -2900 (rank-0 saddle plateau) through -670 and -120 to about +20 at the final
minimum. An ``OnlineLLC`` rides along with the demo's settings (one shadow step every 5 training
steps, windows of 40 draws, one chain, every other setting at its default).

Compute is counted in gradient evaluations: one SGLD step is one forward+backward at the moved
weights. Each SGLD step, online or offline, also does one forward pass at the centre for the
reference loss ``L_B(w*)``; both sides do exactly one per gradient evaluation, so they are not
added to either count. Training's own gradients are not counted (an offline user trains too).

* Online: ``monitor.shadow_steps * num_chains`` (6000 = 30000 / 5 * 1), warm-up included.
* Offline at equal compute: ``K`` checkpoints at steps ``30000 * k / K`` (k = 1..K), each with
  ``6000 / K`` SGLD steps in one chain: at a fixed budget extra chains only add burn-in, so one
  chain keeps the most draws. Burn-in is 100 steps, the monitor's fixed warm-up count (the same
  equilibration allowance the online chain got; the chain's slowest relaxation time is
  2 / (epsilon * gamma) = 150 steps, its fast directions relax within about 15), capped at a
  quarter of the per-checkpoint budget when the budget is short (K = 20, 40). Same ``nbeta``,
  ``localization`` and ``step_size`` as the monitor (``monitor.config``). Between checkpoints the
  offline curve is linear interpolation; before the first it holds the first value. Other splits
  of the K = 10 budget (burn-in 50, 150, 300; two chains) are scored too, to show the split is
  not what decides the comparison.
* Gold: ``estimate_llc`` at every 500th step (60 checkpoints), 4 chains x 2000 draws after 500
  burn-in (100x the online budget), with its own data order and chain seeds. Its reported std is
  printed, and checked against the spread of its 4 per-chain means.

Online curves at a gold checkpoint: (i) live, the ``mean`` of the last ``LLCEstimate`` with
``step <= checkpoint`` (what a user sees at that moment); (ii) the retrospective RTS curve
``monitor.smoothed()``, interpolated linearly. Gold checkpoints before the first non-warming-up
estimate are left out of every figure (the count is printed).

Because the LLC spans about -2900 .. +20, one RMSE over the run is mostly the large-valued early
segments' RMSE. So the RMSEs are also printed per stage, the stage of a checkpoint being the
number of teacher modes the network has learned there (end-to-end singular value above half the
teacher's), read from the weights, not from any estimate. A single scale-free summary is also printed: the RMS of
``(estimate - gold) / max(|gold|, lambda_final)``, relative to the gold's magnitude but floored at
the final minimum's theoretical LLC (16.5) so that the zero crossing in the last transition does
not blow it up. Two more columns split the checkpoints into plateaus and those within one window
(200 training steps) of a ``transition`` window, which shows where each curve's error comes from.
Gold noise enters every RMSE (``RMSE^2`` = error^2 + gold variance); the RMS gold std is printed
beside them.

Calibration: coverage of the gold by the online 90% bands (live and smoothed) on plateaus, i.e.
leaving out checkpoints within one window (200 training steps) of a ``transition`` window, per
stage, with the mean signed error and mean band half-width there (bias vs band width).

Run:  python benchmarks/equal_compute.py      (about 5 minutes on 2 cores)
Deterministic: every generator is seeded (training, monitor, offline and gold chains and data order).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from online_llc import OnlineLLC, estimate_llc
from online_llc.demos.stagewise_dln import train
from online_llc.models.toy import ShuffledBatches, stagewise_dln_problem

STEPS = 30000
LR = 0.003
EVERY_N_STEPS = 5
WINDOW = 40
GOLD_EVERY = 500
GOLD_CHAINS, GOLD_DRAWS, GOLD_BURN_IN = 4, 2000, 500
KS = (5, 10, 20, 40)
TABLE_K = 10
OFFLINE_BURN_IN = 100  # SGLD steps: the monitor's fixed warm-up count (see the docstring)
GOLD_SEED, OFFLINE_SEED = 10_000, 20_000  # the monitor's chains use seed 0, training data order seed 1


def stage_of(problem) -> int:
    """Teacher modes learned at the model's current weights."""
    sv = problem.learned_singular_values()
    return sum(s > 0.5 * t for s, t in zip(sv, problem.teacher_singular_values))


def rms(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.sqrt(np.mean(x**2))) if x.size else math.nan


def main() -> None:
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    problem = stagewise_dln_problem(seed=0)
    monitor = OnlineLLC(problem.model, problem.loss_fn, num_samples=problem.num_samples,
                        every_n_steps=EVERY_N_STEPS, window=WINDOW)
    cfg = monitor.config
    gold_steps = list(range(GOLD_EVERY, STEPS + 1, GOLD_EVERY))
    off_steps = {k: [STEPS * j // k for j in range(1, k + 1)] for k in KS}
    wanted = sorted(set(gold_steps).union(*off_steps.values()))
    estimates, _, snapshots = train(problem, monitor, steps=STEPS, lr=LR, verbose=False, checkpoints=wanted)
    t_train = time.perf_counter() - t_start

    def offline(step: int, seed: int, **kw):
        problem.model.load_state_dict(snapshots[step])
        # A fresh data order per estimate: results do not depend on the order of the calls.
        batches = ShuffledBatches(problem.inputs, problem.targets, batch_size=problem.batches.batch_size, seed=seed)
        return estimate_llc(problem.model, problem.loss_fn, batches, num_samples=problem.num_samples,
                            nbeta=cfg.nbeta, localization=cfg.localization, step_size=cfg.step_size, seed=seed, **kw)

    online_evals = monitor.shadow_steps * monitor.num_chains
    print(f"Stagewise DLN {problem.widths}, teacher singular values {problem.teacher_singular_values}, "
          f"n = {problem.num_samples}; SGD lr {LR}, {STEPS} steps (training {t_train:.0f} s with the monitor).")
    print(f"SGLD: nbeta = {cfg.nbeta:.1f}, localization = {cfg.localization:g}, step_size = {cfg.step_size:.3g} "
          f"(the monitor's, used by every estimate below).")
    print("\nCompute in gradient evaluations (each also does one forward pass at the centre for the reference "
          "loss, on both sides alike, not added):")
    print(f"  online:       {monitor.shadow_steps} shadow steps x {monitor.num_chains} chain = {online_evals} "
          f"(one shadow step every {EVERY_N_STEPS} training steps, windows of {WINDOW}, warm-up {monitor.warmup!r})")
    split = {}
    for k in KS:
        per = online_evals // k
        burn = min(OFFLINE_BURN_IN, per // 4)
        split[k] = (burn, per - burn)
        print(f"  offline K={k:<3d} {k} checkpoints x 1 chain x ({burn} burn-in + {per - burn} draws) = {k * per}")
    gold_evals = len(gold_steps) * GOLD_CHAINS * (GOLD_BURN_IN + GOLD_DRAWS)
    print(f"  gold:         {len(gold_steps)} checkpoints (every {GOLD_EVERY}) x {GOLD_CHAINS} chains x "
          f"({GOLD_BURN_IN} burn-in + {GOLD_DRAWS} draws) = {gold_evals} ({gold_evals / online_evals:.0f}x online)")

    # ---- gold ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    gold, gold_std, stage, chain_sd = [], [], [], []
    for i, s in enumerate(gold_steps):
        res = offline(s, GOLD_SEED + i, num_chains=GOLD_CHAINS, num_draws=GOLD_DRAWS, burn_in=GOLD_BURN_IN)
        gold.append(res.mean)
        gold_std.append(res.std)
        chain_sd.append(res.per_chain.std(ddof=1) / math.sqrt(GOLD_CHAINS) / res.std)
        stage.append(stage_of(problem))
    gold, gold_std, stage = np.array(gold), np.array(gold_std), np.array(stage)
    t_gold = time.perf_counter() - t0

    # ---- offline at equal compute -------------------------------------------------------------
    t0 = time.perf_counter()
    off_curve = {}
    for k in KS:
        burn, draws = split[k]
        vals = [offline(s, OFFLINE_SEED + 100 * k + j, num_chains=1, num_draws=draws, burn_in=burn).mean
                for j, s in enumerate(off_steps[k])]
        off_curve[k] = np.interp(gold_steps, off_steps[k], vals)
    # How the K=10 budget is split (chains, burn-in, draws per chain): the main split and others.
    per10 = online_evals // TABLE_K
    alt_splits = [(1, b, per10 - b) for b in (50, 150, 300)] + [(2, 100, per10 // 2 - 100)]
    alt_curve = {}
    for n, (chains, burn, draws) in enumerate(alt_splits):
        vals = [offline(s, OFFLINE_SEED + 10_000 * (n + 1) + j, num_chains=chains, num_draws=draws, burn_in=burn).mean
                for j, s in enumerate(off_steps[TABLE_K])]
        alt_curve[f"K={TABLE_K} {chains}x({burn}+{draws})"] = np.interp(gold_steps, off_steps[TABLE_K], vals)
    t_off = time.perf_counter() - t0

    # ---- online curves ------------------------------------------------------------------------
    def live_at(step: int):
        before = [e for e in estimates if e.step <= step]
        return before[-1] if before else None

    lives = [live_at(s) for s in gold_steps]
    live = np.array([e.mean if e is not None else math.nan for e in lives])
    live_lo = np.array([e.lower if e is not None else math.nan for e in lives])
    live_hi = np.array([e.upper if e is not None else math.nan for e in lives])
    sm = monitor.smoothed()
    sm_steps = [p.step for p in sm]
    smooth = np.interp(gold_steps, sm_steps, [p.mean for p in sm])
    sm_lo = np.interp(gold_steps, sm_steps, [p.lower for p in sm])
    sm_hi = np.interp(gold_steps, sm_steps, [p.upper for p in sm])

    first = next(e.step for e in estimates if e.status != "warming_up")
    used = np.array([s >= first for s in gold_steps])
    span = EVERY_N_STEPS * WINDOW
    trans = [e for e in estimates if e.status == "transition"]
    near_jump = np.array([any(e.window_start - span <= s <= e.step + span for e in trans) for s in gold_steps])

    print(f"\nGold curve and the curves scored against it (offline: K={TABLE_K}; * = near a transition window)")
    print(f"{'step':>6s} {'stage':>5s} {'gold ± std':>20s} {'online live':>12s} {'smoothed':>10s} "
          f"{f'offline K={TABLE_K}':>13s}  status of live window")
    for i, s in enumerate(gold_steps):
        mark = "*" if near_jump[i] else " "
        note = lives[i].status if lives[i] is not None else "-"
        if not used[i]:
            note += " (excluded)"
        print(f"{s:6d}{mark}{stage[i]:5d} {gold[i]:11.2f} ± {gold_std[i]:6.2f} {live[i]:12.2f} {smooth[i]:10.2f} "
              f"{off_curve[TABLE_K][i]:13.2f}  {note}")
    excluded = [s for s, u in zip(gold_steps, used) if not u]
    print(f"Excluded from all figures: {len(excluded)} gold checkpoint(s) {excluded}, before the first "
          f"non-warming-up online estimate (step {first}); {int(used.sum())} remain.")

    # ---- RMSE ---------------------------------------------------------------------------------
    stages = sorted(set(stage[used].tolist()))
    scale = np.maximum(np.abs(gold), problem.lam_final)
    curves = {"online live": live, "online smoothed": smooth, **{f"offline K={k}": off_curve[k] for k in KS}}

    def scores(curve):
        err = curve - gold
        out = {"all": rms(err[used])}
        for g in stages:
            out[g] = rms(err[used & (stage == g)])
        out["rel"] = rms((err / scale)[used])
        out["plateau"] = rms(err[used & ~near_jump])
        out["jump"] = rms(err[used & near_jump])
        return out

    table = {name: scores(c) for name, c in curves.items()}
    counts = [int((used & (stage == g)).sum()) for g in stages]
    n_plat, n_jump = int((used & ~near_jump).sum()), int((used & near_jump).sum())
    head = (f"{'curve':24s} {'all':>8s} " + " ".join(f"{f'stage {g} ({c})':>13s}" for g, c in zip(stages, counts))
            + f" {'rel':>7s} {f'plateau ({n_plat})':>13s} {f'near jump ({n_jump})':>15s}")
    print(f"\nRMSE against the gold over {int(used.sum())} checkpoints. Stage = teacher modes learned (in brackets: "
          f"checkpoints); rel = RMS of (est - gold) / max(|gold|, {problem.lam_final:g});\nplateau / near jump: "
          f"checkpoints farther than / within {span} steps of a transition window.")
    print(head)

    def row(name, sc):
        print(f"{name:24s} {sc['all']:8.2f} " + " ".join(f"{sc[g]:13.2f}" for g in stages)
              + f" {sc['rel']:7.3f} {sc['plateau']:13.2f} {sc['jump']:15.2f}")

    for name, sc in table.items():
        row(name, sc)
    print("other splits of the K=10 budget, chains x (burn-in + draws):")
    for name, c in alt_curve.items():
        row(name, scores(c))
    gsd = {"all": rms(gold_std[used]), **{g: rms(gold_std[used & (stage == g)]) for g in stages}}
    print(f"{'gold std (rms)':24s} {gsd['all']:8.2f} " + " ".join(f"{gsd[g]:13.2f}" for g in stages))
    print(f"Gold self-check: RMS over checkpoints of sd(per-chain means) / sqrt({GOLD_CHAINS}) / reported std = "
          f"{rms(chain_sd):.2f} (about 1 when the reported std is right; {GOLD_CHAINS} chains make it rough).")

    print("\nRatios online / offline at equal compute (target: <= 0.5)")
    print(f"{'':28s} {'all':>7s} " + " ".join(f"{f'stage {g}':>8s}" for g in stages) + f" {'rel':>7s}")
    for which in ("online live", "online smoothed"):
        for k in KS:
            a, b = table[which], table[f"offline K={k}"]
            cols = ["all", *stages, "rel"]
            r = [a[c] / b[c] for c in cols]
            met = "met" if r[0] <= 0.5 else "NOT met"
            print(f"{which + f' / K={k}':28s} {r[0]:7.3f} " + " ".join(f"{x:8.3f}" for x in r[1:-1])
                  + f" {r[-1]:7.3f}   overall target {met}")

    # ---- calibration --------------------------------------------------------------------------
    plateau = used & ~near_jump
    cov_live = (live_lo <= gold) & (gold <= live_hi)
    cov_sm = (sm_lo <= gold) & (gold <= sm_hi)
    print(f"\n90% band coverage of the gold on plateaus ({int(plateau.sum())} checkpoints; left out: "
          f"{int((used & near_jump).sum())} within {span} steps of a transition window)")
    print(f"{'':10s} {'all':>6s} " + " ".join(f"{f'stage {g}':>8s}" for g in stages))
    for name, cov in (("live", cov_live), ("smoothed", cov_sm)):
        per = [cov[plateau & (stage == g)] for g in stages]
        print(f"{name:10s} {cov[plateau].mean():6.2f} "
              + " ".join(f"{c.mean():8.2f}" if c.size else f"{'-':>8s}" for c in per))
    print(f"{'(n)':10s} {int(plateau.sum()):6d} " + " ".join(f"{int((plateau & (stage == g)).sum()):8d}" for g in stages))
    print("Mean signed error (est - gold) and mean band half-width on the same plateau checkpoints:")
    for name, c, half in (("live", live, (live_hi - live_lo) / 2), ("smoothed", smooth, (sm_hi - sm_lo) / 2)):
        cells = []
        for g in stages:
            m = plateau & (stage == g)
            cells.append(f"stage {g}: {np.mean((c - gold)[m]):+8.2f} (±{np.mean(half[m]):6.2f})" if m.any() else "")
        print(f"  {name:9s} " + "  ".join(cells))

    total = time.perf_counter() - t_start
    print(f"\nRuntime {total:.0f} s (training {t_train:.0f} s, gold {t_gold:.0f} s, offline {t_off:.0f} s).")


if __name__ == "__main__":
    main()
