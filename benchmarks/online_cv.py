"""The online control-variate gradient against the plain one, side by side in one run.

Part ``rest``: linear regressions at their least-squares optimum (frozen weights), where the
localized target at the monitor's ``nbeta`` and ``localization`` is known exactly
(``benchmarks/heat_grid.py``'s ``target``), at small batches on shuffled epochs. The monitor
runs a shadow step per training step with 4 chains, ``gradient="plain"`` and the default
``"auto"`` (the control variate at ``B < nbeta / 2``). Printed per cell and gradient: the step the
chains ended on, their relaxation time ``2 / (epsilon gamma)`` in shadow steps, the shadow step
at which the first filtered estimate was logged, the level (mean of the window means after
warm-up, over the last half of the run) over the exact target with its standard error, the
same over the shadow steps 200-600 (what a short run reads), and the time per shadow step.

Part ``gpt2``: a tiny Hugging Face GPT-2 (2 layers, 2 heads, width 32) trained with Adam at batch
16 on synthetic repeated sequences for ``--train-steps`` steps, a shadow step per training step,
one chain: the step and relaxation time each gradient ends on, when the first estimate is
logged, and the final band.

Part ``heads``: the same GPT-2 and data for 600 steps with ``groups=groups_by_head(model)`` and
otherwise default settings (``total_steps=600``, as the Hugging Face callback passes it; the
``"auto"`` group budget), printing the budget taken and the training step of each head's first
estimate past warm-up (the first ``llc/<head>/...`` keys a callback logs).

Run: ``python benchmarks/online_cv.py`` (about 15 minutes on 2 cores);
``--part rest --dims 12 --batches 16`` for one cell.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from heat_grid import problem, target  # noqa: E402

from online_llc import OnlineLLC  # noqa: E402
from online_llc.calibration.step import relaxation_steps  # noqa: E402
from online_llc.models.toy import ShuffledBatches  # noqa: E402


def level(history, lo: int, hi: int):
    """Mean and standard error of the window means (non-warm-up) whose last step is in [lo, hi)."""
    xs = [e.raw_mean for e in history if lo <= e.step < hi and e.status != "warming_up" and math.isfinite(e.raw_mean)]
    if len(xs) < 2:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def rest_cell(d: int, n: int, batch: int, gradient: str, steps: int, seed: int):
    p, h, dout = problem(d, n, batch, 0)
    x, y = p.dataset.tensors
    batches = ShuffledBatches(x, y, batch_size=batch, seed=seed)
    mon = OnlineLLC(p.model, p.loss_fn, num_samples=n, every_n_steps=1, window=40, num_chains=4, seed=seed,
                    gradient=gradient, total_steps=steps)
    it = iter(batches)
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        try:
            b = next(it)
        except StopIteration:
            it = iter(batches)
            b = next(it)
        mon.update(b, step=t)
    dt = (time.perf_counter() - t0) / steps
    cfg = mon.chain_config
    tgt = target(h, dout, cfg.nbeta, cfg.localization)
    hist = mon.history()
    first = next((e.step for e in hist if e.status != "warming_up"), None)
    late, late_se = level(hist, steps // 2, steps + 1)
    early, early_se = level(hist, 200, 600)
    return cfg, tgt, first, late / tgt, late_se / tgt, early / tgt, early_se / tgt, dt


def gpt2_cell(gradient: str, train_steps: int, seed: int, heads: bool = False):
    import transformers

    from online_llc.models.heads import groups_by_head

    torch.manual_seed(seed)
    vocab, seq, batch = 16, 16, 16
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, n_positions=seq, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed)
    n = 4096
    half = torch.randint(1, vocab, (n, seq // 2), generator=g)
    data = torch.cat([half, half], dim=1)

    def loss_fn(m, b):
        logits = m(input_ids=b).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), b[:, 1:].reshape(-1), reduction="none")
        return ce.view(b.shape[0], -1).mean(dim=1)

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    if heads:
        mon = OnlineLLC(model, loss_fn, num_samples=n, seed=seed, groups=groups_by_head(model), total_steps=train_steps)
    else:
        mon = OnlineLLC(model, loss_fn, num_samples=n, every_n_steps=1, seed=seed, gradient=gradient,
                        total_steps=train_steps)
    t0 = time.perf_counter()
    for t in range(1, train_steps + 1):
        b = data[torch.randint(0, n, (batch,), generator=g)]
        model.train()
        loss = loss_fn(model, b).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.update(b, step=t)
    dt = time.perf_counter() - t0
    hist = mon.history()
    first = next((e.step for e in hist if e.status != "warming_up"), None)
    last = hist[-1] if hist else None
    if heads:
        return mon, {g: next((e.step for e in mon.group_history(g) if e.status != "warming_up"), None) for g in mon.groups}
    return mon.chain_config, first, last, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["rest", "gpt2", "heads", "all"], default="all")
    ap.add_argument("--dims", default="12,32")
    ap.add_argument("--size", type=int, default=100000)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--steps", type=int, default=3000, help="shadow steps per rest cell")
    ap.add_argument("--train-steps", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part in ("rest", "all"):
        print(f"rest: n = {args.size}, {args.steps} shadow steps, 4 chains, exact target at the monitor's localization")
        print("d  B    gradient          step      relax  first  level/target (last half)  level/target (200-600)  ms/step")
        for d in map(int, args.dims.split(",")):
            for b in map(int, args.batches.split(",")):
                for grad in ("plain", "auto"):
                    cfg, tgt, first, r, se, r0, se0, dt = rest_cell(d, args.size, b, grad, args.steps, args.seed)
                    print(f"{d:<2} {b:<4} {grad:>5}={cfg.gradient:<15} {cfg.step_size:.3g}  {relaxation_steps(cfg):6.0f}  "
                          f"{first!s:>5}  {r:.3f} +- {se:.3f} (target {tgt:.2f})   {r0:.3f} +- {se0:.3f}          "
                          f"{1e3 * dt:.2f}", flush=True)
    if args.part in ("gpt2", "all"):
        print(f"gpt2: tiny GPT-2, Adam, batch 16, {args.train_steps} training steps, a shadow step per step, 1 chain")
        print("gradient               step      relax  first estimate  final estimate (90% band)        seconds")
        for grad in ("plain", "auto"):
            cfg, first, last, dt = gpt2_cell(grad, args.train_steps, args.seed)
            band = "none" if last is None else f"{last.mean:.2f} ({last.lower:.2f} .. {last.upper:.2f}) {last.status}"
            print(f"{grad:>5}={cfg.gradient:<15} {cfg.step_size:.3g}  {relaxation_steps(cfg):6.0f}  {first!s:>14}  "
                  f"{band:<32} {dt:.1f}", flush=True)

    if args.part in ("heads", "all"):
        mon, firsts = gpt2_cell("auto", 600, args.seed, heads=True)
        print(f"heads: tiny GPT-2, batch 16, 600 steps, groups_by_head, defaults: every_n_steps {mon.every_n_steps}, "
              f"group_budget {mon.group_budget}, gradient {mon.chain_config.gradient}")
        for g, first in firsts.items():
            print(f"  {g:<30} first estimate at step {first}")
        print(f"  every head estimated by step 300: {all(f is not None and f <= 300 for f in firsts.values())}")


if __name__ == "__main__":
    main()
