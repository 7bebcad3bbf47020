"""Batched chains against chains one after another: estimate_llc's wall time at the same settings.

For each model, ``estimate_llc`` runs at one fixed step size, burn-in and draw count (so both
sides take exactly the same number of steps) with ``batched=False`` (the chains one after
another, as before batching) and ``batched=True`` (one vectorized pass for all chains), in
alternating order over ``--repeats`` rounds; the time ratio and both estimates (mean and
multi-chain standard error) are printed side by side, with what ``batched=None`` picks
(:func:`online_llc.kernel.batched.pays`). Models: deep linear networks (8 and 72 parameters), a
d = 12 linear regression, and MLPs of 9.6k, 51k and 0.13M parameters on synthetic classification
data. One thread.

Run:  python benchmarks/batched_chains.py                 (about 5 minutes on 2 cores)
      python benchmarks/batched_chains.py --chains 8 --draws 400
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from online_llc import estimate_llc
from online_llc.kernel.batched import pays
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.models.toy import ShuffledBatches, deep_linear_problem


class Case(NamedTuple):
    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    batches: Any
    num_samples: int
    step_size: float


def _ce(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _mse(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x)[:, 0] - y) ** 2


def _mlp_case(hidden: int, n: int = 20000, batch: int = 128) -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 256, generator=g)
    y = (x @ torch.randn(256, 10, generator=g) / 16 + 0.5 * torch.randn(n, 10, generator=g)).argmax(-1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    params = sum(p.numel() for p in model.parameters())
    return Case(f"MLP 256-{hidden}-{hidden}-10 ({params / 1e3:.1f}k)", model, _ce,
                ShuffledBatches(x, y, batch_size=batch, seed=0), n, 1e-6)


def _regression_case(d: int = 12, n: int = 100000, batch: int = 64) -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution[:, 0][None])
    return Case(f"regression d={d}", model, _mse, ShuffledBatches(x, y, batch_size=batch, seed=0), n, 2e-4)


def cases() -> List[Case]:
    out = []
    for widths, r in (([4, 2], 2), ([6, 6, 6], 6)):
        p = deep_linear_problem(widths, r=r, seed=0)
        params = sum(t.numel() for t in p.model.parameters())
        out.append(Case(f"DLN {'-'.join(map(str, widths))} ({params} params)", p.model, p.loss_fn, p.batches,
                        p.num_samples, 1e-4))
    out.append(_regression_case())
    out += [_mlp_case(h) for h in (32, 128, 256)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--burn-in", type=int, default=200)
    ap.add_argument("--draws", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds per model (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"estimate_llc, {args.chains} chains x ({args.burn_in} burn-in + {args.draws} draws) at a fixed step, "
          f"one thread; times are medians of {args.repeats} alternating rounds")
    print(f"{'model':34s} {'one at a time':>14s} {'batched':>9s} {'speedup':>8s}   {'estimate one at a time':>24s} "
          f"{'estimate batched':>20s}  {'batched=None picks':>18s}")
    for case in cases():
        times = {False: [], True: []}
        results = {}
        for k in range(args.repeats):
            for batched in ((False, True) if k % 2 == 0 else (True, False)):
                t = time.perf_counter()
                results[batched] = estimate_llc(
                    case.model, case.loss_fn, case.batches, num_samples=case.num_samples, step_size=case.step_size,
                    num_chains=args.chains, burn_in=args.burn_in, num_draws=args.draws, batched=batched,
                    progress=False, seed=k,
                )
                times[batched].append(time.perf_counter() - t)
        seq, bat = (sorted(times[b])[len(times[b]) // 2] for b in (False, True))
        a, b = results[False], results[True]
        print(f"{case.name:34s} {seq:13.1f}s {bat:8.1f}s {seq / bat:7.2f}x   {a.mean:14.3f} ± {a.std:7.3f} "
              f"{b.mean:10.3f} ± {b.std:7.3f}  {'batched' if pays(LossEvaluator(case.model, case.loss_fn)) else 'one at a time':>18s}",
              flush=True)


if __name__ == "__main__":
    main()
