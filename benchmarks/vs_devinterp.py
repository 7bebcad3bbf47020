"""Time to accuracy against devinterp: ``online_llc.estimate_llc`` at its defaults beside
devinterp 2.0.1's ``devinterp.slt.llc.llc`` at its defaults and at our estimand, on models whose
target is known.

Each model gets five rows, each with its wall time, its estimate (and the spread it reports), the
target it is scored against and the relative error:

* ``ours (defaults)``: ``estimate_llc(model, loss_fn, batches, num_samples=n)``; the row also shows
  the burn-in, draws, step and gradient it chose.
* ``devinterp defaults``: ``llc(...)`` with everything at devinterp's defaults (4 chains, 200 draws,
  no burn-in, batch 32, no localization). ``lr`` and ``n_beta`` have no defaults there: ``n_beta``
  is its helper ``devinterp.utils.default_nbeta(32) = 32 / log 32`` (the one its docstrings point
  to) and ``lr = 1e-3``, the value of every example in its README.
* ``devinterp matched``: ``llc(...)`` at our ``nbeta``, ``localization``, calibrated step (as
  ``lr``), chains, burn-in, draws and batch size, i.e. aimed at the same estimand. devinterp
  averages the burn-in steps into its estimate, so this row still includes them.
* ``devinterp matched, burn-in dropped``: the same run, recomputed from its per-step
  ``loss_trace`` without the burn-in steps, ``n_beta * (mean trace after burn-in - init_loss)``.
* ``devinterp matched, burn-in dropped, L_n(w*)``: the same again with the full-data loss at
  ``w*`` in place of devinterp's ``init_loss`` (not something devinterp reports; it isolates the
  sampler from the init-loss error described below).

The targets: for the regressions (``reg4``, ``reg12``: linear regression at its least-squares
optimum, ``benchmarks/heat_grid.py``) the exact expectation of ``nbeta (L_n(w) - L_n(w*))`` under the
localized tempered posterior at the row's ``(nbeta, localization)`` (``d / 2`` at localization 0,
whatever ``nbeta``); for ``dln`` (deep linear network 6-6-6 at an aligned rank-2 truth) the
theoretical learning coefficient ``lambda = 16``, which a localized, tempered estimate approaches
only asymptotically (``online_llc.config`` quantifies the localization's pull).

The devinterp rows also print ``init offset = n_beta (init_loss - L_n(w*))``: devinterp measures the
loss at ``w*`` on its first 32 batches only (``num_init_loss_batches``), and at a large ``n_beta``
that subset's sampling error moves the estimate by this much whatever the chains do.

Run (devinterp is not a project dependency)::

    pip install devinterp==2.0.1
    PYTHONPATH=. python benchmarks/vs_devinterp.py [--models reg4,reg12,dln] [--quick]

``--quick`` runs tiny settings (2 chains, 100 burn-in steps and 200 draws for ours, 50 draws for
devinterp's defaults) to check that the script runs; its numbers mean nothing. The full run uses
every method's defaults; the matched devinterp rows then take as many steps as our defaults chose
(printed before they start), at a few milliseconds a step on a CPU.
"""

from __future__ import annotations

import os

# devinterp draws a tqdm bar per chain; tqdm reads TQDM_* variables when it is imported.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

from heat_grid import problem, target  # this script's folder is on sys.path when it is run

from online_llc import estimate_llc
from online_llc.models.toy import deep_linear_problem
from online_llc.records import LLCResult

try:
    from datasets import Dataset
    from devinterp.slt.llc import llc as devinterp_llc
    from devinterp.utils import default_nbeta as devinterp_default_nbeta
except ImportError as err:  # one line, not a traceback: devinterp is optional
    sys.exit(f"vs_devinterp.py needs devinterp 2.0.1 (pip install devinterp==2.0.1; not a project dependency): {err}")

DEVINTERP_VERSION = "2.0.1"
# The lr of every example in devinterp 2.0.1's README (its llc() has no default lr).
DEVINTERP_README_LR = 1e-3
# devinterp's own defaults (devinterp.slt.sampling.sample / SamplerConfig), written out so the
# table can show them; the defaults row passes none of them.
DEVINTERP_DEFAULT_BATCH = 32
DEVINTERP_DEFAULT_CHAINS = 4
DEVINTERP_DEFAULT_DRAWS = 200
DEVINTERP_DEFAULT_BURN_IN = 0

PerSampleLoss = Callable[[nn.Module, Tuple[Tensor, Tensor]], Tensor]


@dataclass
class Case:
    """One model with its data, loss, loader and a target function of ``(nbeta, localization)``."""

    name: str
    model: nn.Module
    loss_fn: PerSampleLoss
    batches: Any
    x: Tensor
    y: Tensor
    target: Callable[[float, float], float]
    target_kind: Callable[[float], str]

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def batch_size(self) -> int:
        return self.batches.batch_size


@dataclass
class Row:
    model: str
    method: str
    wall: float
    estimate: float
    spread: float
    spread_kind: str
    target: float
    target_kind: str
    notes: str

    @property
    def rel_err(self) -> float:
        return 100.0 * (self.estimate - self.target) / self.target


def regression_case(name: str, d: int, n: int, batch: int) -> Case:
    p, h, dout = problem(d, n, batch, seed=0)
    x, y = p.dataset.tensors

    def kind(gamma: float) -> str:
        return "exact, d/2 (gamma 0)" if gamma == 0 else "exact at (nbeta, gamma)"

    return Case(name, p.model, p.loss_fn, p.batches, x, y, lambda nb, g: target(h, dout, nb, g), kind)


def dln_case() -> Case:
    # Its own loader: ShuffledBatches of 256 over n = 10240 samples.
    p = deep_linear_problem([6, 6, 6], 2, seed=0)
    x, y = p.dataset.tensors
    return Case("dln", p.model, p.loss_fn, p.batches, x, y, lambda nb, g: p.lam, lambda g: "lambda (theory)")


CASES: Dict[str, Callable[[], Case]] = {
    "reg4": lambda: regression_case("reg4", 4, 20000, 32),
    "reg12": lambda: regression_case("reg12", 12, 100000, 32),
    "dln": dln_case,
}


def index_dataset(n: int) -> Dataset:
    """devinterp's data: a HuggingFace Dataset whose "input_ids" rows are ``[sample index, 0]``.

    devinterp is built for language models: it batches integer "input_ids" rows, checks that the
    loss has shape ``(batch, row length - 1)`` and stores every step's ids as int64. Rows holding
    the sample's index (plus a pad, since rows need length >= 2) meet all three, give a loss of
    shape ``(batch, 1)`` that is exactly the per-sample loss, and keep its per-step storage small.
    """
    ids = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], dim=1)
    ds = Dataset.from_dict({"input_ids": ids.numpy()})
    ds.set_format("torch", columns=["input_ids"])
    return ds


def devinterp_loss(case: Case) -> Callable[[nn.Module, Tensor], Tensor]:
    """``(model, input_ids) -> (batch, 1)``: the per-sample loss of the indexed samples.

    devinterp steps on the gradient of ``loss.mean()`` and averages the trace over both dimensions,
    so with one column both see the mean per-sample loss of the batch, as ours do.
    """

    def loss_fn(model: nn.Module, input_ids: Tensor) -> Tensor:
        idx = input_ids[:, 0].long()
        return case.loss_fn(model, (case.x[idx], case.y[idx])).unsqueeze(1)

    return loss_fn


def full_loss(case: Case) -> float:
    """``L_n(w*)`` over every sample (for devinterp's init-loss offset)."""
    with torch.no_grad():
        return float(case.loss_fn(case.model, (case.x, case.y)).double().mean())


def run_ours(case: Case, quick: bool) -> Tuple[LLCResult, float]:
    extra: Dict[str, Any] = {"num_chains": 2, "num_draws": 200, "burn_in": 100} if quick else {}
    start = time.perf_counter()
    res = estimate_llc(case.model, case.loss_fn, case.batches, num_samples=case.n, progress=False, **extra)
    return res, time.perf_counter() - start


def run_devinterp(case: Case, dataset: Dataset, *, lr: float, n_beta: float, **kwargs: Any) -> Tuple[Any, float]:
    """One ``devinterp.slt.llc.llc`` call and its wall time (data set already built, not timed).

    No observables: the LLC reads only the sampling losses, and each observable would add forward
    passes per draw. The zarr store goes to a temporary folder removed afterwards (devinterp
    writes every step's per-sample losses and input ids).
    """
    with tempfile.TemporaryDirectory(prefix="vs_devinterp_") as tmp:
        start = time.perf_counter()
        out = devinterp_llc(case.model, dataset, {}, lr=lr, n_beta=n_beta, loss_fn=devinterp_loss(case),
                            output_path=os.path.join(tmp, "samples.zarr"), **kwargs)
        out = out.load()  # read everything before the store is removed
        wall = time.perf_counter() - start
    return out, wall


def trace_without_burn_in(out: Any, n_beta: float, burn_in: int, init_loss: float) -> Tuple[float, float]:
    """``n_beta (mean loss_trace after burn-in - init_loss)`` per chain: mean and spread over chains.

    ``loss_trace[c, i]`` is chain ``c``'s batch loss at step ``i`` before its update (step 0 is at
    ``w*``), so with one step between draws the draws are steps ``burn_in`` onwards. The spread is
    the standard deviation over chains (ddof 0), as devinterp reports its ``llc_std``.
    """
    trace = torch.as_tensor(out["loss_trace"].values, dtype=torch.float64)
    per_chain = n_beta * (trace[:, burn_in:].mean(dim=1) - init_loss)
    return float(per_chain.mean()), float(per_chain.std(unbiased=False))


def rows_for(case: Case, quick: bool) -> List[Row]:
    rows: List[Row] = []
    ln_star = full_loss(case)

    def show(row: Row) -> None:
        rows.append(row)
        print_row(row)

    res, wall = run_ours(case, quick)
    show(Row(case.name, "ours (defaults)", wall, res.mean, res.std, "se", case.target(res.nbeta, res.localization),
             case.target_kind(res.localization),
             f"nbeta {res.nbeta:.4g}, gamma {res.localization:.3g}, step {res.step_size:.3g}, batch {case.batch_size}, "
             f"chains {res.num_chains}, burn-in {res.burn_in}, draws {res.num_draws}, gradient {res.gradient}, "
             f"draw {res.draw}"))

    dataset = index_dataset(case.n)

    # (a) devinterp at its defaults. default_nbeta's argument is the batch size (batch / log batch).
    nb_a = float(devinterp_default_nbeta(DEVINTERP_DEFAULT_BATCH))
    extra_a: Dict[str, Any] = {"num_chains": 2, "num_draws": 50} if quick else {}
    out, wall = run_devinterp(case, dataset, lr=DEVINTERP_README_LR, n_beta=nb_a, **extra_a)
    chains_a = extra_a.get("num_chains", DEVINTERP_DEFAULT_CHAINS)
    draws_a = extra_a.get("num_draws", DEVINTERP_DEFAULT_DRAWS)
    show(Row(case.name, "devinterp defaults", wall, float(out["llc_mean"]), float(out["llc_std"]), "sd/chains",
             case.target(nb_a, 0.0), case.target_kind(0.0),
             f"n_beta {nb_a:.4g}, localization 0, lr {DEVINTERP_README_LR:g}, batch {DEVINTERP_DEFAULT_BATCH}, "
             f"chains {chains_a}, burn-in {DEVINTERP_DEFAULT_BURN_IN}, draws {draws_a}, "
             f"init offset {nb_a * (float(out['init_loss']) - ln_star):+.3g}"))

    # (b) devinterp at our estimand and our step. Its update (SGMCMC.sgld, the sampler llc() uses)
    # is w <- w - (lr/2) (n_beta grad mean_B(l) + localization (w - w*)) + sqrt(lr) N(0, 1), ours
    # is xi <- xi - (eps/2) (nbeta grad L_B + gamma xi) + sqrt(eps) N(0, 1): the same, so lr = eps,
    # n_beta = nbeta and localization = gamma pass through unchanged. It has no control-variate
    # gradient, so where ours used one (gradient "control_variate") this step was sized for a
    # gradient with less batch noise than devinterp's.
    steps = res.burn_in + res.num_draws
    print(f"  devinterp matched: {res.num_chains} chains x {steps} steps ({res.burn_in} burn-in) at batch "
          f"{case.batch_size}", flush=True)
    out, wall = run_devinterp(case, dataset, lr=res.step_size, n_beta=res.nbeta, localization=res.localization,
                              num_chains=res.num_chains, num_burnin_steps=res.burn_in, num_draws=res.num_draws,
                              batch_size=case.batch_size)
    tgt = case.target(res.nbeta, res.localization)
    kind = case.target_kind(res.localization)
    offset = f"init offset {res.nbeta * (float(out['init_loss']) - ln_star):+.3g}"
    show(Row(case.name, "devinterp matched", wall, float(out["llc_mean"]), float(out["llc_std"]), "sd/chains", tgt,
             kind, f"same settings as ours; burn-in averaged in (devinterp's estimate); {offset}"))
    # (b') the same run without its burn-in; no extra sampling, so the same wall time.
    mean, spread = trace_without_burn_in(out, res.nbeta, res.burn_in, float(out["init_loss"]))
    show(Row(case.name, "devinterp matched, burn-in dropped", wall, mean, spread, "sd/chains", tgt, kind,
             f"from loss_trace steps >= {res.burn_in}; same run as above; {offset}"))
    # (b'') and against L_n(w*) instead of devinterp's init_loss (its first 32 batches): this
    # separates the sampler from the init-loss subset's error. The trace's batches cycle through
    # devinterp's first shuffled epoch (every sample here: n is a multiple of the batch), so a run
    # of many epochs averages them over exactly the samples of L_n.
    mean, spread = trace_without_burn_in(out, res.nbeta, res.burn_in, ln_star)
    show(Row(case.name, "devinterp matched, burn-in dropped, L_n(w*)", wall, mean, spread, "sd/chains", tgt, kind,
             "as above, minus the full-data loss at w* instead of init_loss (not devinterp's output)"))
    return rows


HEADER = (f"{'model':6} {'method':43} {'wall s':>8} {'estimate':>9} {'+-':>7} {'(kind)':10} {'target':>8} "
          f"{'target kind':24} {'err %':>7}  settings")


def print_row(row: Row) -> None:
    print(f"{row.model:6} {row.method:43} {row.wall:8.1f} {row.estimate:9.3f} {row.spread:7.3f} {row.spread_kind:10} "
          f"{row.target:8.3f} {row.target_kind:24} {row.rel_err:+7.1f}  {row.notes}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="reg4,reg12,dln", help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help="tiny settings, only to check that the script runs")
    args = ap.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in CASES]
    if unknown:
        sys.exit(f"Unknown --models {unknown}; choose from {list(CASES)}.")
    torch.set_num_threads(1)  # a fair single-core comparison (and the machine is shared)
    version = metadata.version("devinterp")
    if version != DEVINTERP_VERSION:
        print(f"warning: devinterp {version} installed; this comparison was written for {DEVINTERP_VERSION}")
    print(f"devinterp {version}, torch {torch.__version__}, 1 thread{', QUICK settings (numbers mean nothing)' if args.quick else ''}")
    print("err % = (estimate - target) / target; +- is our standard error (se) or devinterp's sd over chains")
    print(HEADER, flush=True)
    rows: List[Row] = []
    for name in names:
        rows += rows_for(CASES[name](), args.quick)
    print("\nsummary")
    print(HEADER)
    for row in rows:
        print_row(row)


if __name__ == "__main__":
    main()
