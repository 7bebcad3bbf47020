"""Step-size alarm validation: which step sizes bias the estimate, and which diagnostics see it.

On four models with a known learning coefficient (reference table / :mod:`online_llc.models.theory`),
``estimate_llc`` runs at multiples of the default SGLD step (4 chains x 1000 draws, burn-in
500 / multiple so that small steps equilibrate too). Per step it prints the error against theory,
against the sampler's own small-step limit (a straight-line fit of the estimate against the step
over the three smallest steps, extrapolated to zero: the bias that is the step's own), the
draws' dispersion ``var / mean`` (about the chain's temperature) and what the two alarms say:

* the live alarm (``OnlineLLC.health()``): dispersion above 2.5;
* the pilot (``recommend_step_size``, run separately with its default ladder and budget): its
  verdict at that step (``hot``, ``biased`` by step halving, ``ok``, ...), and the step it
  recommends.

A step "biases the estimate by more than 20%" when its error against theory is beyond 20%.

Run:  python benchmarks/step_size.py      (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from online_llc import estimate_llc, recommend_step_size
from online_llc.calibration.step import DEFAULT_MAX_HEAT, resolve_hyperparameters
from online_llc.models.toy import deep_linear_problem

MODELS = [([10, 1], 1), ([10, 3, 5], 1), ([16, 8, 16, 8], 4), ([4, 12, 12, 12, 4], 2)]
MULTS = [0.25, 0.5, 1.0, 2.0, 3.0, 4.0]


def main() -> None:
    torch.set_num_threads(1)
    flagged_live = flagged_pilot = big = 0
    false_live = false_pilot = good = tried = 0
    for widths, r in MODELS:
        p = deep_linear_problem(widths, r, seed=0)
        base = resolve_hyperparameters(num_samples=p.num_samples, nbeta=None, localization=None,
                                       step_size=None).step_size
        rows = []
        for m in MULTS:
            res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=p.num_samples, step_size=m * base,
                               burn_in=math.ceil(500 / m), seed=1)
            rows.append((m, res.mean, res.std, res.heat))
        small = np.array([(m, e) for m, e, _, _ in rows[:3]])
        limit = float(np.polyval(np.polyfit(small[:, 0], small[:, 1], 1), 0.0))
        rec = recommend_step_size(p.model, p.loss_fn, p.batches, num_samples=p.num_samples, seed=2)
        verdicts = {round(run.multiplier, 6): run.verdict for run in rec.runs}
        chosen = next(run for run in rec.runs if run.step_size == rec.step_size)
        print(f"\n{p.name}: lambda {p.lam}, small-step limit {limit:.2f}; pilot recommends "
              f"{rec.step_size / base:g}x default ({'ok' if rec.ok else 'no rung passed'}; its estimate there "
              f"{chosen.mean:.2f}, {chosen.mean / p.lam - 1:+.2f} against theory)")
        print(f"{'x default':>9s} {'estimate':>14s} {'vs theory':>9s} {'vs limit':>8s} {'T':>7s} "
              f"{'live alarm':>10s} {'pilot':>10s}")
        for m, mean, std, temp in rows:
            err = mean / p.lam - 1
            live = math.isfinite(temp) and temp > DEFAULT_MAX_HEAT
            pilot = verdicts.get(round(m, 6), "-")
            pilot_flag = pilot in ("hot", "biased", "diverged")
            print(f"{m:9g} {mean:8.2f} ± {std:4.2f} {err:+9.2f} {mean / limit - 1:+8.2f} {temp:7.2f} "
                  f"{str(live):>10s} {pilot:>10s}")
            if abs(err) > 0.2 and m >= 1:  # a too-large step (small steps' errors are localization's)
                big += 1
                flagged_live += live
                flagged_pilot += pilot_flag if pilot != "-" else 0
                tried += pilot != "-"
            if abs(err) <= 0.1:
                good += 1
                false_live += live
                false_pilot += pilot_flag if pilot != "-" else 0
    # Noisy gradients: batches of 16 make the default step hot (the estimate ~4x lambda).
    p = deep_linear_problem([16, 8, 16, 8], 4, batch_size=16, seed=0)
    rec = recommend_step_size(p.model, p.loss_fn, p.batches, num_samples=p.num_samples, seed=2,
                              multipliers=(1, 0.5, 0.25, 0.125, 0.0625, 0.03125))
    print(f"\n{p.name} with batches of 16 (lambda {p.lam}): the pilot on a ladder down to 1/32 of the default")
    print(rec)
    print(f"{'x default':>9s} {'estimate':>14s} {'vs theory':>9s}")
    for m in (1.0, rec.step_size / rec.default_step_size):
        res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=p.num_samples,
                           step_size=m * rec.default_step_size, burn_in=math.ceil(500 / m), seed=1)
        print(f"{m:9g} {res.mean:8.2f} ± {res.std:4.2f} {res.mean / p.lam - 1:+9.2f}")
    print(f"\nsteps >= default biased by more than 20% against theory: {big}; flagged by the live alarm "
          f"{flagged_live}; by the pilot {flagged_pilot} of the {tried} it tried (its ladder has no 3x rung)")
    print(f"steps within 10% of theory: {good}; live alarm fired on {false_live}, pilot rejected {false_pilot}")


if __name__ == "__main__":
    main()
