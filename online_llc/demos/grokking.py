"""Grokking demo: modular addition learned long after it is memorised, with the LLC tracked live.

An MLP (one-hot a and b -> 128 ReLU units -> p logits) is trained full-batch with AdamW and weight
decay on a fraction of the table ``(a + b) mod p`` (p = 53). Training accuracy reaches 100% almost
at once (memorisation); test accuracy stays near chance for a while and then climbs to ~100%
(grokking). An ``OnlineLLC`` monitor rides along on the training batch.

What the LLC does (measured with the defaults below, seed 0): it rises steeply while the
network memorises the training pairs and peaks (about 96) when training accuracy reaches 100%
at step ~320, with test accuracy still 0. Then, while test accuracy climbs from 0 to 95%, the LLC
falls steadily: about 58 when test accuracy passes 50% (step ~1760), about 50 at 90% (step ~3960),
and about 39 at the end. The generalising solution is *simpler* (more degenerate) than the
memorising one, and the LLC sees it while it happens, from the training data alone.

Per layer (weight-refined LLC, tracked as parameter groups beside the whole model): the output
layer's falls early, from about 18 at step 400 to about 7 by step 1600 (while test accuracy is
still under 50%) and about 4 from step ~3600 on; the input layer's declines slowly through the
whole run, from about 72 to 32. The two layers change at different times.

Run:  online-llc demo grokking --out out            (about 1 minute on 2 cores)
Writes ``grokking.csv`` (one row per window, with train/test accuracy) and ``grokking.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from online_llc import OnlineLLC


def modular_addition(p: int, train_fraction: float, seed: int):
    """One-hot inputs ``[a, b]``, labels ``(a + b) mod p``, and a random train/test split."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()
    y = (a + b) % p
    perm = torch.randperm(p * p, generator=g)
    n_train = int(train_fraction * p * p)
    tr, te = perm[:n_train], perm[n_train:]
    return (x[tr], y[tr]), (x[te], y[te])


def per_sample_ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def accuracy(model: nn.Module, batch) -> float:
    with torch.no_grad():
        x, y = batch
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv: List[str] | None = None, prog: str | None = None) -> int:
    """Run the demo; ``argv`` are its command-line options (``--help`` lists them)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="folder for the CSV and PNG (default: out)")
    ap.add_argument("--p", type=int, default=53, help="the modulus (default: 53)")
    ap.add_argument("--train-fraction", type=float, default=0.5, help="fraction of the table trained on (default: 0.5)")
    ap.add_argument("--steps", type=int, default=6000, help="full-batch training steps (default: 6000)")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    ap.add_argument("--weight-decay", type=float, default=2.0, help="AdamW weight decay (default: 2.0)")
    ap.add_argument("--every-n-steps", type=int, default=2, help="training steps per shadow step (default: 2)")
    ap.add_argument("--window", type=int, default=20, help="shadow draws per window (default: 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    train, test = modular_addition(args.p, args.train_fraction, args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(2 * args.p, 128), nn.ReLU(), nn.Linear(128, args.p))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    monitor = OnlineLLC(
        model, per_sample_ce, num_samples=len(train[1]), every_n_steps=args.every_n_steps, window=args.window,
        seed=args.seed, warmup=args.window,  # memorisation is over within ~500 steps: a short warm-up
        groups={"input layer": ["0.*"], "output layer": ["2.*"]},  # per-layer (weight-refined) LLC
    )
    print(
        f"Modular addition mod {args.p}: {len(train[1])} training pairs, {len(test[1])} test pairs; "
        f"AdamW lr {args.lr}, weight decay {args.weight_decay}, full batch.\n"
        f"Monitor: nbeta = {monitor.config.nbeta:.1f}, one shadow step every {args.every_n_steps} steps, "
        f"windows of {args.window} draws.\n"
    )
    rows, estimates = [], []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        per_sample_ce(model, train).mean().backward()
        opt.step()
        est = monitor.update(train, step)
        if est is not None:
            row = {"train_acc": accuracy(model, train), "test_acc": accuracy(model, test),
                   "train_loss": float(per_sample_ce(model, train).mean().detach())}
            for name, g in monitor.group_estimates().items():
                row[f"llc_{name.replace(' ', '_')}"] = g.mean if g is not None else float("nan")
            estimates.append(est)
            rows.append(row)
            if len(estimates) % 10 == 0:
                print(f"step {step:6d}  train acc {row['train_acc']:.3f}  test acc {row['test_acc']:.3f}  "
                      f"LLC {est.mean:6.1f} ± {est.std:4.1f} (input layer {row['llc_input_layer']:5.1f}, output layer "
                      f"{row['llc_output_layer']:5.1f})  {est.status:14s} ({time.perf_counter() - t0:5.1f}s)",
                      flush=True)

    os.makedirs(args.out, exist_ok=True)
    from online_llc.plot import write_csv

    csv_path = os.path.join(args.out, "grokking.csv")
    write_csv(csv_path, estimates, rows)
    # What happened, in numbers: when test accuracy crossed 50% and 90%, and the LLC then.
    def first(th: float) -> int | None:
        return next((i for i, r in enumerate(rows) if r["test_acc"] >= th), None)

    memorised = next((i for i, r in enumerate(rows) if r["train_acc"] >= 0.99), None)
    half, ninety = first(0.5), first(0.9)
    if memorised is not None:
        e = estimates[memorised]
        print(f"\nMemorised (train acc >= 99%) by step {e.step}: LLC {e.mean:.1f}")
    peak = max(range(len(estimates)), key=lambda i: estimates[i].mean)
    print(f"LLC peak {estimates[peak].mean:.1f} at step {estimates[peak].step} "
          f"(test acc then {rows[peak]['test_acc']:.2f})")
    for name, i in (("50%", half), ("90%", ninety)):
        if i is not None:
            print(f"Test accuracy reached {name} at step {estimates[i].step}: LLC {estimates[i].mean:.1f}")
    print(f"Final: train acc {rows[-1]['train_acc']:.3f}, test acc {rows[-1]['test_acc']:.3f}, "
          f"LLC {estimates[-1].mean:.1f} ± {estimates[-1].std:.1f}\nWrote {csv_path}")

    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from online_llc.plot import plot_llc

        steps = [e.step for e in estimates]
        fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                            gridspec_kw={"height_ratios": [1, 1.4, 1.2]})
        ax1.plot(steps, [r["train_acc"] for r in rows], label="train accuracy")
        ax1.plot(steps, [r["test_acc"] for r in rows], label="test accuracy")
        ax1.set_ylabel("accuracy")
        ax1.set_title(f"Grokking modular addition (p = {args.p}) with the live LLC")
        ax1.legend(loc="center right")
        plot_llc(estimates, ax=ax2)
        ax2.set_xlabel("")
        from online_llc.plot import plot_groups

        plot_groups({n: monitor.group_history(n) for n in monitor.groups}, ax=ax3)
        ax3.set_xlabel("training step")
        fig.tight_layout()
        png = os.path.join(args.out, "grokking.png")
        fig.savefig(png, dpi=110)
        print(f"Wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
