"""The shadow passes' mode on a dropout model: train mode (the old behaviour) against eval mode
(the default), at the same frozen weights.

A deep linear network at its known-lambda true parameter with ``Dropout(0.2)`` after every
hidden layer. In eval mode dropout is the identity, so the network is the deep linear network and
its learning coefficient is Aoyagi's (``lambda``, printed beside; the estimate reads a little low
from the localization's pull). In train mode every shadow pass drops a fresh 20% of the hidden
units (the centre's and the moved weights' passes share their masks): the estimate describes
another, randomly thinned network. Printed: ``estimate_llc`` (4 chains, default draws) and the
online monitor (weights frozen, one shadow step per step, windows of 50, mean of the tracking
windows' filtered means over the last half) in each mode.

Run:  python benchmarks/dropout_mode.py
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from online_llc import OnlineLLC, estimate_llc
from online_llc.models.toy import deep_linear_problem


def with_dropout(model: nn.Sequential, p: float) -> nn.Sequential:
    """The same layers with Dropout(p) after every one but the last (the hidden layers)."""
    layers = []
    for i, layer in enumerate(model):
        layers.append(layer)
        if i < len(model) - 1:
            layers.append(nn.Dropout(p))
    return nn.Sequential(*layers).train()


def online(model, prob, mode: str, steps: int = 3000) -> float:
    monitor = OnlineLLC(model, prob.loss_fn, num_samples=prob.num_samples, every_n_steps=1, window=50, seed=5, mode=mode)
    batches = list(prob.batches)
    for s in range(steps):
        monitor.update(batches[s % len(batches)])
    tail = [e.mean for e in monitor.history()[len(monitor.history()) // 2 :] if e.filtered]
    return float(np.mean(tail))


def main() -> None:
    torch.set_num_threads(1)
    print("Dropout(0.2) after every hidden layer; frozen weights at the true parameter; seed 1 offline, 5 online")
    print(f"  {'model':22s} {'lambda':>6s}   {'offline train':>16s} {'offline eval':>16s}   "
          f"{'online train':>12s} {'online eval':>12s}   train / eval")
    for widths, r in [([6, 6, 6], 2), ([8, 8, 8, 8], 3)]:
        prob = deep_linear_problem(widths, r, seed=0)
        model = with_dropout(prob.model, 0.2)
        off = {m: estimate_llc(model, prob.loss_fn, prob.batches, num_samples=prob.num_samples, seed=1, mode=m)
               for m in ("train", "eval")}
        on = {m: online(model, prob, m) for m in ("train", "eval")}
        print(f"  {prob.name:22s} {prob.lam:6.2f}   "
              f"{off['train'].mean:8.2f} ± {off['train'].std:5.2f} {off['eval'].mean:8.2f} ± {off['eval'].std:5.2f}   "
              f"{on['train']:12.2f} {on['eval']:12.2f}   {off['train'].mean / off['eval'].mean:5.2f} (offline), "
              f"{on['train'] / on['eval']:5.2f} (online)")


if __name__ == "__main__":
    main()
