"""The Lightning adapter, ``online_llc.callbacks.OnlineLLCCallback``: the product's acceptance
criteria for it.

Everything runs on CPU with tiny models (a 4-8-2 regression MLP, 64 samples, batch 8: 8 batches
per epoch) and one thread. Comparisons with the core estimator are exact: the callback is a thin
adapter, so the estimates it produces must be the very numbers a plain PyTorch loop calling
``OnlineLLC.update`` produces for the same seeds.
"""

from __future__ import annotations

import copy
import csv
import datetime
import json
import math
import os
import re
import types
import warnings
from typing import Any, Dict, List, Optional

import pytest

pytest.importorskip("lightning")

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, Logger  # noqa: E402
from conftest import tensorboard_margins  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, TensorDataset  # noqa: E402

from online_llc import STATUSES, LLCEstimate, MonitorError, OnlineLLC  # noqa: E402
from online_llc.callbacks import ESTIMATE_KEYS, LOGGED_KEYS, OnlineLLCCallback  # noqa: E402
from online_llc.monitor.cadence import auto_cadence  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*number of training batches .* is smaller than the logging interval"),
]

NUM_SAMPLES = 64
BATCH_SIZE = 8  # 8 batches per epoch
# Every optimizer step runs a shadow step; a window closes every 5 steps; the first window warms up.
FAST = dict(every_n_steps=1, window=5, warmup=5, seed=0)


# ---- helpers ---------------------------------------------------------------------------------------


def dataset() -> TensorDataset:
    """A fixed regression problem (private generator: the global RNG is not touched)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(NUM_SAMPLES, 4, generator=g)
    w = torch.randn(4, 2, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(NUM_SAMPLES, 2, generator=g)
    return TensorDataset(x, y)


def loader(shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset(), batch_size=BATCH_SIZE, shuffle=shuffle)


def per_sample_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).sum(-1)


class Regressor(pl.LightningModule):
    """4-8-2 MLP; optionally with BatchNorm1d and Dropout; SGD (optionally with momentum)."""

    def __init__(self, *, batchnorm: bool = False, dropout: float = 0.0, momentum: float = 0.0) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Linear(4, 8)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(8))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(8, 2))
        self.net = nn.Sequential(*layers)
        self.momentum = momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)


class ZeroConfigRegressor(Regressor):
    """Defines ``per_sample_loss(batch)``: the callback needs no ``loss_fn``."""

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return per_sample_loss(self, batch)


def make_module(cls: type = Regressor, **kwargs: Any) -> nn.Module:
    """The same initial weights every time."""
    torch.manual_seed(0)
    return cls(**kwargs)


def make_trainer(callbacks: List[Any], *, max_steps: int, **overrides: Any) -> pl.Trainer:
    opts: Dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(overrides)
    return pl.Trainer(callbacks=callbacks, **opts)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_same_history(got: List[LLCEstimate], expected: List[LLCEstimate]) -> None:
    """Exact, NaN-aware equality of two histories (field by field, types included)."""
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        gd, ed = g.to_dict(), e.to_dict()
        assert gd.keys() == ed.keys()
        bad = {k: (gd[k], ed[k]) for k in gd if not _same_value(gd[k], ed[k])}
        assert not bad, f"window {i} differs: {bad}"


class ListLogger(Logger):
    """Records every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: List[tuple] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class BatchCounter(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1


# ---- 1. logging: exactly the core's numbers ----------------------------------------------------------


def test_tensorboard_logger_draws_each_band_as_a_margin_chart(tmp_path):
    """With a TensorBoardLogger the callback writes TensorBoard's custom-scalars layout once: a
    Margin chart of ``llc/mean`` between ``llc/lower`` and ``llc/upper`` for the whole model and
    for each group, over the tags the logger holds."""
    from lightning.pytorch.loggers import TensorBoardLogger

    cb = OnlineLLCCallback(per_sample_loss, groups={"first": ["net.0.*"]}, group_budget=1, **FAST)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    make_trainer([cb], max_steps=40, logger=logger, log_every_n_steps=1).fit(make_module(), loader())
    margins = tensorboard_margins(logger.log_dir)
    assert margins == {
        "LLC, whole model": ("llc/mean", "llc/lower", "llc/upper"),
        "LLC, first": ("llc/first/mean", "llc/first/lower", "llc/first/upper"),
    }
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(logger.log_dir)
    acc.Reload()
    assert {t for chart in margins.values() for t in chart} <= set(acc.Tags()["scalars"])
    # online-llc plot reads the same directory back: every window's step and status, the group's too.
    from online_llc.runlogs import read_log

    run = read_log(logger.log_dir)
    assert run.kind == "tensorboard"
    assert [(e.step, e.status) for e in run.history] == [(e.step, e.status) for e in cb.monitor.history()]
    assert [(e.step, e.status) for e in run.groups["first"]] == [(e.step, e.status) for e in cb.monitor.group_history("first")]
    filtered = [e for e in cb.monitor.history() if e.filtered]
    assert [e.mean for e in run.history if e.filtered] == pytest.approx([e.mean for e in filtered], rel=1e-6)


def test_probe_sets_are_logged_beside_the_estimate(tmp_path):
    """``OnlineLLCCallback(probes={...})``: at every window each probe set logs its status and raw
    mean, its band when the filter absorbed the window (the monitor's own records, to the logger's
    float32), and ``online-llc plot`` does not take the probe sets for parameter groups."""
    from online_llc.runlogs import read_log

    x, y = dataset().tensors
    cb = OnlineLLCCallback(per_sample_loss, probes={"held": (x[:16], y[:16])}, **FAST)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    make_trainer([cb], max_steps=40, logger=logger, log_every_n_steps=1).fit(make_module(), loader())
    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    hist = cb.monitor.probes.history("held")
    assert len(rows) == len(hist) == len(cb.monitor.history())
    for row, e in zip(rows, hist):
        assert float(row["llc/probe/held/status"]) == STATUSES.index(e.status)
        assert _same_value(float(row["llc/probe/held/raw_mean"]), e.raw_mean)
        assert (row["llc/probe/held/mean"] != "") == e.filtered
        if e.filtered:
            assert _same_value(float(row["llc/probe/held/mean"]), e.mean)
    assert any(e.filtered for e in hist)
    run = read_log(logger.log_dir)  # a CSVLogger version directory: its metrics.csv
    assert run.kind == "csv" and len(run.history) == len(hist) and run.groups == {}


def test_csv_logger_rows_are_the_core_estimates(tmp_path):
    cb = OnlineLLCCallback(per_sample_loss, **FAST)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer = make_trainer([cb], max_steps=40, logger=logger, log_every_n_steps=1)
    trainer.fit(make_module(), loader())

    history = cb.monitor.history()
    assert len(history) == 8  # windows close at steps 5, 10, ..., 40
    assert history[0].status == "warming_up" and history[-1].status != "warming_up"
    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) - {"step", "epoch"} == set(LOGGED_KEYS)
    assert len(rows) == len(history)
    for row, est in zip(rows, history):
        assert int(row["step"]) == est.step
        expected = {
            "llc/mean": est.mean,
            "llc/std": est.std,
            "llc/lower": est.lower,
            "llc/upper": est.upper,
            "llc/status": float(STATUSES.index(est.status)),
            "llc/raw_mean": est.raw_mean,
            "llc/var_channel": est.var_channel,
            "llc/ratio": est.ratio,
            "llc/dispersion": est.dispersion,
            "llc/heat": est.heat,
            "llc/step_size": est.step_size,
        }
        health = ("llc/relaxation_steps", "llc/short_run")  # the chains' health at that window
        assert list(expected) + list(health) == list(LOGGED_KEYS)
        assert float(row["llc/short_run"]) in (0.0, 1.0) and float(row["llc/relaxation_steps"]) > 0
        for key, value in expected.items():
            if key in ESTIMATE_KEYS and not est.filtered:
                # A warm-up window is logged under its status only: no LLC value, no band.
                assert row[key] == "", (key, row[key])
            else:
                assert _same_value(float(row[key]), float(value)), (key, row[key], value)
    assert [row["llc/mean"] == "" for row in rows] == [e.status == "warming_up" for e in history]
    final = cb.monitor.health()  # the last window logs the health the run ends with
    assert float(rows[-1]["llc/short_run"]) == float(final.short_run)
    assert float(rows[-1]["llc/relaxation_steps"]) == pytest.approx(final.relaxation_steps, rel=1e-6)


def test_estimates_equal_a_plain_pytorch_loop():
    """Same init, same unshuffled batches, same SGD, same loss: Lightning's run and a hand-written
    loop calling ``OnlineLLC.update(batch, step)`` after each optimizer step give equal histories."""
    steps = 40
    cb = OnlineLLCCallback(per_sample_loss, **FAST)
    module = make_module()
    make_trainer([cb], max_steps=steps).fit(module, loader())

    model = make_module()
    monitor = OnlineLLC(model, per_sample_loss, num_samples=NUM_SAMPLES, **FAST)
    opt = model.configure_optimizers()
    step = 0
    while step < steps:
        for batch in loader():
            opt.zero_grad(set_to_none=True)
            x, y = batch
            F.mse_loss(model(x), y).backward()
            opt.step()
            step += 1
            monitor.update(batch, step)
            if step == steps:
                break

    for name, p in model.state_dict().items():
        assert torch.equal(p, module.state_dict()[name]), name
    assert cb.monitor.num_samples == monitor.num_samples == NUM_SAMPLES
    assert_same_history(cb.monitor.history(), monitor.history())


# ---- 2. non-interference ---------------------------------------------------------------------------


def _fit_noisy(with_callback: bool) -> tuple:
    lightning.seed_everything(0, verbose=False)
    module = Regressor(batchnorm=True, dropout=0.3, momentum=0.9)
    callbacks = [OnlineLLCCallback(per_sample_loss, **FAST)] if with_callback else []
    trainer = make_trainer(callbacks, max_steps=24)
    trainer.fit(module, loader(shuffle=True))
    return module, trainer, callbacks, torch.get_rng_state()


def test_training_is_bit_identical_with_and_without_the_callback():
    ref_module, ref_trainer, _, ref_rng = _fit_noisy(False)
    module, trainer, (cb,), rng = _fit_noisy(True)

    assert len(cb.monitor.history()) == 4
    ref_state, state = ref_module.state_dict(), module.state_dict()
    assert ref_state.keys() == state.keys()
    assert any("running_mean" in k for k in state)
    for k in state:
        assert torch.equal(ref_state[k], state[k]), k

    ref_opt, opt = ref_trainer.optimizers[0].state_dict(), trainer.optimizers[0].state_dict()
    assert ref_opt["param_groups"] == opt["param_groups"]
    assert ref_opt["state"].keys() == opt["state"].keys() and opt["state"]
    for i in opt["state"]:
        for k, v in opt["state"][i].items():
            assert torch.equal(ref_opt["state"][i][k], v), (i, k)
    # The global RNG stream (shuffling, dropout) ended in the same state too.
    assert torch.equal(ref_rng, rng)


# ---- 3, 4. checkpoint and resume --------------------------------------------------------------------


def _resume_run(tmp_path, make_callbacks, total: int = 48) -> tuple:
    """An uninterrupted run of ``total`` steps, and a run resumed from its step-``total/2`` checkpoint."""
    half = total // 2
    full_cbs = make_callbacks()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=half, save_top_k=-1)
    trainer = make_trainer([*full_cbs, ckpt], max_steps=total, enable_checkpointing=True)
    trainer.fit(make_module(), loader())
    path = tmp_path / "ckpt" / f"epoch={half // (NUM_SAMPLES // BATCH_SIZE) - 1}-step={half}.ckpt"
    assert path.exists(), sorted(os.listdir(tmp_path / "ckpt"))

    # The checkpoint is plain data: torch's safe loader reads it.
    state = torch.load(path, weights_only=True)
    for cb in full_cbs:
        assert cb.state_key in state["callbacks"]
        assert state["callbacks"][cb.state_key]["step"] == half

    resumed_cbs = make_callbacks()
    trainer2 = make_trainer(resumed_cbs, max_steps=total)
    trainer2.fit(make_module(), loader(), ckpt_path=str(path), weights_only=True)
    assert trainer2.global_step == total
    return full_cbs, resumed_cbs


def test_resume_from_a_checkpoint_continues_the_history_exactly(tmp_path):
    (full,), (resumed,) = _resume_run(tmp_path, lambda: [OnlineLLCCallback(per_sample_loss, **FAST)])
    history = resumed.monitor.history()
    assert len(history) == 48 // 5
    assert_same_history(history, full.monitor.history())
    assert resumed.monitor.shadow_steps == full.monitor.shadow_steps == 48


def test_a_checkpoint_that_cannot_restore_the_monitor_starts_a_fresh_one(tmp_path):
    """A saved monitor state that does not load (here: of another version) or whose monitor had
    failed no longer kills training or disables the monitor for good: the resumed run starts a
    fresh monitor with one warning that says why (strict: a MonitorError, except for a saved
    failure, which belongs to the run that failed) and estimates again."""
    full, _ = _resume_run(tmp_path, lambda: [OnlineLLCCallback(per_sample_loss, **FAST)])
    key = full[0].state_key
    path = tmp_path / "ckpt" / f"epoch={24 // (NUM_SAMPLES // BATCH_SIZE) - 1}-step=24.ckpt"
    saved = torch.load(path, weights_only=True)
    cases = {
        "version": ({"version": 99}, r"does not load into this monitor \(ValueError: Expected an OnlineLLC state of version 1"),
        "failed": ({"failure": "RuntimeError('boom') at step 3"}, r"a saved monitor that had failed \(RuntimeError"),
    }
    for name, (change, expect) in cases.items():
        changed = tmp_path / f"{name}.ckpt"
        ckpt = copy.deepcopy(saved)
        ckpt["callbacks"][key].update(change)
        torch.save(ckpt, changed)
        cb = OnlineLLCCallback(per_sample_loss, **FAST)
        with pytest.warns(RuntimeWarning, match=expect + r".*starts afresh at step 24"):
            make_trainer([cb], max_steps=48).fit(make_module(), loader(), ckpt_path=str(changed), weights_only=True)
        assert cb.failure is None and cb.monitor.shadow_steps == 24 and len(cb.monitor.history()) == 24 // 5
    strict = OnlineLLCCallback(per_sample_loss, strict=True, **FAST)
    with pytest.raises(MonitorError, match=r"does not load into this monitor"):
        make_trainer([strict], max_steps=48).fit(make_module(), loader(), ckpt_path=str(tmp_path / "version.ckpt"),
                                                 weights_only=True)


def test_two_callbacks_keep_their_own_state(tmp_path):
    def make() -> List[OnlineLLCCallback]:
        return [
            OnlineLLCCallback(per_sample_loss, **FAST),
            OnlineLLCCallback(per_sample_loss, every_n_steps=2, window=4, warmup=2, seed=1, num_chains=2),
        ]

    a, b = make()
    assert a.state_key != b.state_key
    # Instances that differ only in settings outside the sampler's config get distinct keys too:
    # a shared key would hand one instance the other's (incompatible) state on resume.
    c = OnlineLLCCallback(per_sample_loss, **FAST, num_chains=2)
    d = OnlineLLCCallback(per_sample_loss, **{**FAST, "warmup": 3})
    assert len({a.state_key, c.state_key, d.state_key}) == 3
    # The loss function is deliberately not part of the key (renaming it must not orphan a
    # checkpoint's state): instances that differ only in the loss need another setting to differ.
    e = OnlineLLCCallback(lambda m, b: per_sample_loss(m, b), **FAST)
    assert e.state_key == a.state_key
    assert OnlineLLCCallback(per_sample_loss, **FAST).state_key == a.state_key  # stable across runs

    full, resumed = _resume_run(tmp_path, make)
    assert len(full[0].monitor.history()) == 48 // 5
    assert len(full[1].monitor.history()) == 48 // 2 // 4
    for f, r in zip(full, resumed):
        assert_same_history(r.monitor.history(), f.monitor.history())
    assert resumed[1].monitor.num_chains == 2


# ---- 5. DDP on CPU --------------------------------------------------------------------------------


class _RankReport(Callback):
    """Writes what the rank's OnlineLLCCallback holds to tmp_path/rank<r>.json (the parent's
    callback object is not updated under ddp_fork)."""

    def __init__(self, llc: OnlineLLCCallback, out_dir: str) -> None:
        self.llc = llc
        self.out_dir = out_dir

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        m = self.llc.monitor
        past = m.stats.state_dict()["past"]
        tracks = {None: m._model, **m._groups}
        report = {
            "world_size": trainer.world_size,
            "filter": json.dumps(m.filter.state_dict()),
            "history": len(m.history()),
            "statuses": [e.status for e in m.history()],
            "means": [e.mean for e in m.history()],
            "chains_in_last_window": len(past[-1]) if past else None,
            "failure": self.llc.failure,
            "seed0": int(m.sampler.generators[0].initial_seed()),
            "groups": {g: [[e.step, e.status, e.mean] for e in m.group_history(g)] for g in m.groups},
            # Each track's chain 0: its noise stream's state and its offset's first entry.
            "noise": {str(g): t.sampler.generators[0].get_state().tolist() for g, t in tracks.items()},
            "offset": {str(g): next(iter(t.sampler.offsets[0].values())).flatten()[0].item() for g, t in tracks.items()},
        }
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)


def test_ddp_fork_two_ranks_share_one_filter(tmp_path):
    cb = OnlineLLCCallback(per_sample_loss, **FAST)
    trainer = make_trainer(
        [cb, _RankReport(cb, str(tmp_path))], max_steps=20, strategy="ddp_fork", devices=2
    )
    trainer.fit(make_module(), loader())

    files = [tmp_path / f"rank{r}.json" for r in range(2)]
    assert all(f.exists() for f in files), os.listdir(tmp_path)
    r0, r1 = (json.loads(f.read_text()) for f in files)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["failure"] is None and r1["failure"] is None
    assert r0["history"] == r1["history"] == 4  # steps 5, 10, 15, 20 (4 batches per rank-epoch)
    assert r0["filter"] == r1["filter"]
    assert r0["means"] == r1["means"] and r0["statuses"] == r1["statuses"]
    # Each rank ran its own chain (its own seed) and every window was summarized over both.
    assert r0["seed0"] != r1["seed0"]
    assert r0["chains_in_last_window"] == r1["chains_in_last_window"] == 2


def test_ddp_fork_resume_keeps_ranks_in_step(tmp_path):
    """Under DDP only rank 0's state is saved and every rank gets it back: the ranks must still
    agree after resuming (a checkpoint in the middle of a window, at step 12 of 5-step windows)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    cb = OnlineLLCCallback(per_sample_loss, **FAST)
    make_trainer([cb, ckpt], max_steps=12, strategy="ddp_fork", devices=2, enable_checkpointing=True).fit(
        make_module(), loader()
    )
    path = tmp_path / "ckpt" / "epoch=2-step=12.ckpt"  # 4 batches per rank-epoch
    assert path.exists(), os.listdir(tmp_path / "ckpt")
    saved = torch.load(path, weights_only=True)["callbacks"][cb.state_key]
    assert saved["step"] == 12 and len(saved["history"]) == 2 and saved["window_stats"]["count"] == 2

    out = tmp_path / "out"
    out.mkdir()
    cb2 = OnlineLLCCallback(per_sample_loss, **FAST)
    make_trainer([cb2, _RankReport(cb2, str(out))], max_steps=20, strategy="ddp_fork", devices=2).fit(
        make_module(), loader(), ckpt_path=str(path)
    )
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["failure"] is None and r1["failure"] is None
    # Windows closed at 5 and 10 before the checkpoint; the half-filled window (steps 11-12, rank
    # 0's draws on every rank) was dropped on resume; the next one closed at step 17.
    assert r0["history"] == r1["history"] == 3
    assert r0["filter"] == r1["filter"] and r0["means"] == r1["means"]
    # Rank 1's chains, copies of rank 0's, warmed up again: that window is reported warming up.
    assert r0["statuses"] == r1["statuses"] and r0["statuses"][2] == "warming_up"


def test_ddp_fork_resume_gives_every_track_its_own_chains(tmp_path):
    """After a DDP resume every rank holds rank 0's state: every track, groups included, must
    draw fresh noise per rank, and rank 1's chains, copies of rank 0's, must warm up again (their
    draws are correlated with rank 0's) before the windows feed the filters."""
    opts = dict(groups={"first": ["net.0.*"], "last": ["net.2.*"]}, group_budget=2, **FAST)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    cb = OnlineLLCCallback(per_sample_loss, **opts)
    make_trainer([cb, ckpt], max_steps=12, strategy="ddp_fork", devices=2, enable_checkpointing=True).fit(
        make_module(), loader()
    )
    out = tmp_path / "out"
    out.mkdir()
    cb2 = OnlineLLCCallback(per_sample_loss, **opts)
    make_trainer([cb2, _RankReport(cb2, str(out))], max_steps=20, strategy="ddp_fork", devices=2).fit(
        make_module(), loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=2-step=12.ckpt")
    )
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["failure"] is None and r1["failure"] is None
    for track in ("None", "first", "last"):  # the whole model and both groups
        assert r0["noise"][track] != r1["noise"][track]
    # Windows closed at 5 and 10; the resume dropped the pending one; the window of steps 13-17
    # holds rank 1's re-warming draws: warming up on both ranks, for every track.
    assert r0["statuses"] == r1["statuses"] and r0["filter"] == r1["filter"]
    assert r0["statuses"][2] == "warming_up"
    for g in ("first", "last"):
        assert r0["groups"][g] == r1["groups"][g]
        assert [w[:2] for w in r0["groups"][g]][2] == [17, "warming_up"]


# ---- 6, 7. gradient accumulation, mixed precision --------------------------------------------------


def test_gradient_accumulation_one_shadow_step_per_optimizer_step():
    cb, counter = OnlineLLCCallback(per_sample_loss, **FAST), BatchCounter()
    trainer = make_trainer([cb, counter], max_steps=10, accumulate_grad_batches=4)
    trainer.fit(make_module(), DataLoader(dataset(), batch_size=2))  # 32 batches per epoch
    assert trainer.global_step == 10
    assert counter.batches == 40
    assert cb.monitor.shadow_steps == trainer.global_step
    assert cb.monitor.step == trainer.global_step
    assert [e.step for e in cb.monitor.history()] == [5, 10]


def test_bf16_mixed_precision():
    cb, logger = OnlineLLCCallback(per_sample_loss, **FAST), ListLogger()
    trainer = make_trainer([cb], max_steps=20, precision="bf16-mixed", logger=logger)
    trainer.fit(make_module(), loader())
    rows = [m for _, m in logger.rows if "llc/mean" in m]
    assert len(cb.monitor.history()) == 4
    assert len(rows) == sum(e.filtered for e in cb.monitor.history()) == 3  # the first window warms up
    assert all(math.isfinite(m["llc/mean"]) for m in rows)
    offsets = cb.monitor.sampler.offsets[0]
    assert offsets and all(t.dtype == torch.float32 for t in offsets.values())
    name = next(iter(offsets))
    assert cb.monitor.sampler.offsets[0][name].dtype == torch.float32
    assert cb.failure is None


# ---- 8. failures -----------------------------------------------------------------------------------


def _raising_on_call(n: int):
    calls = {"n": 0}

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("boom from loss_fn")
        return per_sample_loss(model, batch)

    return loss_fn, calls


def test_a_failing_monitor_warns_once_and_training_continues():
    # One call to check the first batch, then two per shadow step while the chain warms up (plain
    # steps: the centre's and the sample's whole batch): fails at the first call of the 2nd
    # shadow step (step 2).
    loss_fn, calls = _raising_on_call(4)
    cb = OnlineLLCCallback(loss_fn, **FAST)
    trainer = make_trainer([cb], max_steps=16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(make_module(), loader())
    assert trainer.global_step == 16
    ours = [w for w in rec if issubclass(w.category, RuntimeWarning) and "OnlineLLCCallback" in str(w.message)]
    assert len(ours) == 1
    assert "boom from loss_fn" in str(ours[0].message) and "strict=True" in str(ours[0].message)
    assert cb.failure == "step 2: RuntimeError: boom from loss_fn"
    assert calls["n"] == 4  # no further updates
    assert cb.monitor.shadow_steps == 1 and cb.monitor.history() == []


def test_a_failing_monitor_raises_when_strict():
    loss_fn, _ = _raising_on_call(4)
    cb = OnlineLLCCallback(loss_fn, strict=True, **FAST)
    with pytest.raises(MonitorError, match=r"OnlineLLCCallback failed at step 2: RuntimeError\('boom from loss_fn'\)"):
        make_trainer([cb], max_steps=16).fit(make_module(), loader())


def test_prog_bar_shows_the_estimate():
    cb = OnlineLLCCallback(per_sample_loss, prog_bar=True, **FAST)
    trainer = make_trainer([cb], max_steps=10)
    trainer.fit(make_module(), loader())
    assert trainer.progress_bar_metrics["llc"] == pytest.approx(cb.monitor.estimate.mean, rel=1e-6)


# ---- 9. set-up checks, zero-config -----------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_setup_rejects_sharded_strategies(strategy):
    fake = types.SimpleNamespace(strategy=type(strategy, (), {})())
    cb = OnlineLLCCallback(per_sample_loss)
    with pytest.raises(ValueError) as err:
        cb.setup(fake, make_module(), "fit")
    assert str(err.value) == (
        f"OnlineLLCCallback does not support the {strategy} strategy (sharded or partitioned "
        "parameters it cannot move); use a single device, DDP, or FSDP2: ModelParallelStrategy with "
        "fully_shard applied in configure_model."
    )


def test_setup_needs_a_loss():
    fake = types.SimpleNamespace(strategy=type("SingleDeviceStrategy", (), {})())
    with pytest.raises(ValueError) as err:
        OnlineLLCCallback().setup(fake, make_module(), "fit")
    assert str(err.value) == (
        "Expected `loss_fn` to be given, or the LightningModule to define per_sample_loss(batch) "
        "returning per-sample losses of shape [B]; got neither."
    )
    # The same through a real Trainer: fails before any training step.
    with pytest.raises(ValueError, match="Expected `loss_fn` to be given"):
        make_trainer([OnlineLLCCallback(**FAST)], max_steps=4).fit(make_module(), loader())


def test_zero_config_uses_the_modules_per_sample_loss():
    cb = OnlineLLCCallback(**FAST)
    make_trainer([cb], max_steps=10).fit(make_module(ZeroConfigRegressor), loader())
    ref = OnlineLLCCallback(per_sample_loss, **FAST)
    make_trainer([ref], max_steps=10).fit(make_module(ZeroConfigRegressor), loader())
    assert len(cb.monitor.history()) == 2
    assert_same_history(cb.monitor.history(), ref.monitor.history())


# ---- 10, 11. arguments ------------------------------------------------------------------------------


class _Stream(IterableDataset):
    def __iter__(self):
        ds = dataset()
        for i in range(0, NUM_SAMPLES, BATCH_SIZE):
            yield ds.tensors[0][i : i + BATCH_SIZE], ds.tensors[1][i : i + BATCH_SIZE]


def test_num_samples_defaults_to_the_dataset_length():
    cb = OnlineLLCCallback(per_sample_loss, **FAST)
    make_trainer([cb], max_steps=2).fit(make_module(), loader())
    assert cb.monitor.num_samples == NUM_SAMPLES
    explicit = OnlineLLCCallback(per_sample_loss, num_samples=1000, **FAST)
    make_trainer([explicit], max_steps=2).fit(make_module(), loader())
    assert explicit.monitor.num_samples == 1000


def test_num_samples_is_required_without_a_dataset_length():
    cb = OnlineLLCCallback(per_sample_loss, **FAST)
    with pytest.raises(ValueError) as err:
        make_trainer([cb], max_steps=4).fit(make_module(), DataLoader(_Stream(), batch_size=None))
    assert str(err.value) == (
        "Expected `num_samples` to be given: the train dataloader's dataset has no length "
        "(an IterableDataset or a combined loader), so n cannot be known."
    )
    ok = OnlineLLCCallback(per_sample_loss, num_samples=NUM_SAMPLES, **FAST)
    make_trainer([ok], max_steps=10).fit(make_module(), DataLoader(_Stream(), batch_size=None))
    assert len(ok.monitor.history()) == 2


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(every_n_steps=0), ValueError, "Expected `every_n_steps` to be a positive int or 'auto', got 0."),
        (dict(window=1), ValueError, "Expected `window` to be an int >= 2 or 'auto', got 1."),
        (dict(mode="inference"), ValueError, "Expected `mode` to be one of 'eval', 'train', 'as_is', got 'inference'."),
        (dict(total_steps=-5), ValueError, "Expected `total_steps` to be a positive int, got -5."),
        (dict(num_samples=0), ValueError, "Expected `num_samples` to be a positive int, got 0."),
        (dict(bogus=1), TypeError, "OnlineLLCCallback() got unexpected keyword argument(s): `bogus`."),
        (
            dict(loss_fn=3),
            TypeError,
            "Expected `loss_fn` to be callable as loss_fn(pl_module, batch), got 3.",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, exc, message):
    with pytest.raises(exc) as err:
        OnlineLLCCallback(**kwargs)
    assert str(err.value) == message


def test_construction_draws_nothing_from_the_global_rng():
    before = torch.get_rng_state()
    OnlineLLCCallback(per_sample_loss, **FAST)
    assert torch.equal(before, torch.get_rng_state())


# ---- 12. the pytorch_lightning namespace ------------------------------------------------------------


def test_pytorch_lightning_trainer_accepts_the_callback():
    ptl = pytest.importorskip("pytorch_lightning")

    class PTLRegressor(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    cb = OnlineLLCCallback(per_sample_loss, **FAST)
    trainer = ptl.Trainer(
        callbacks=[cb],
        max_steps=20,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(0)
    trainer.fit(PTLRegressor(), loader())
    assert len(cb.monitor.history()) == 4
    assert math.isfinite(float(trainer.callback_metrics["llc/mean"]))


# ---- 13. other callbacks read the metrics -----------------------------------------------------------


class _MetricReader(Callback):
    def __init__(self, llc: OnlineLLCCallback) -> None:
        self.llc = llc
        self.seen: List[tuple] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        est = self.llc.monitor.estimate
        if est is not None and est.step == trainer.global_step:
            self.seen.append((est.status, trainer.callback_metrics.get("llc/mean")))


def test_callback_metrics_feed_other_callbacks():
    cb = OnlineLLCCallback(per_sample_loss, **FAST)
    reader = _MetricReader(cb)
    # The first window (step 5) warms up and writes no llc/mean: the strict EarlyStopping is made
    # non-strict (else its check at the end of the first epoch, step 8, would raise). The second
    # window (step 10) is an estimate below the threshold: it stops at the end of epoch 2 (step 16).
    stopper = EarlyStopping(monitor="llc/mean", mode="min", stopping_threshold=1e9, check_on_train_epoch_end=True)
    trainer = make_trainer([cb, reader, stopper], max_steps=40)
    with pytest.warns(UserWarning, match=r"OnlineLLCCallback set EarlyStopping\(monitor='llc/mean'\) to strict=False"):
        trainer.fit(make_module(), loader())
    assert trainer.global_step == 16 and trainer.should_stop and stopper.strict is False
    first, second = cb.monitor.history()[:2]
    # callback_metrics holds float32 tensors, like values logged with self.log; loggers get floats.
    assert reader.seen[0] == ("warming_up", None)
    assert reader.seen[1][0] == second.status != "warming_up"
    assert reader.seen[1][1].item() == torch.tensor(second.mean).item()
    assert set(LOGGED_KEYS) <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["llc/status"]) == STATUSES.index(cb.monitor.estimate.status)
    # A warm-up window's raw mean is logged under its own key.
    assert first.status == "warming_up" and math.isfinite(first.raw_mean)


# ---- known limitation: rank-local events under DDP -------------------------------------------------


def _nan_or_raise_on_rank1(kind: str):
    calls = {"n": 0}

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        out = per_sample_loss(model, batch)
        # Rank 1's 2nd shadow step: after the first batch's check and the 1st step's four calls
        # (its 1st, before the ranks agree on the batch size, for "raise_first").
        if torch.distributed.get_rank() == 1 and calls["n"] == (2 if kind == "raise_first" else 6):
            if kind != "nan":
                raise RuntimeError("rank-1 failure")
            return out * float("nan")  # the chain diverges and is reset on rank 1 only
        return out

    return loss_fn


class _FailGroupOnce(Callback):
    """On rank 1, makes group ``group``'s ``at``-th shadow step raise (after the whole model's
    draw of that step was added)."""

    def __init__(self, llc: OnlineLLCCallback, group: str, at: int) -> None:
        self.llc, self.group, self.at = llc, group, at

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank != 1:
            return
        sampler = self.llc.monitor._groups[self.group].sampler
        step, calls = sampler.step, {"n": 0}

        def failing(batch: Any, measure: bool = True) -> Any:
            calls["n"] += 1
            if calls["n"] == self.at:
                raise RuntimeError("rank-1 group failure")
            return step(batch, measure)

        sampler.step = failing


def test_ddp_group_failure_on_one_rank_keeps_every_track_in_step(tmp_path):
    """A *group*'s shadow step raises on rank 1 only, after the whole model's draw of that step
    was added: the failure handler owes placeholders for exactly the tracks that did not draw,
    so every track's windows still close, and gather, together on both ranks."""
    groups = {"first": ["net.0.*"], "last": ["net.2.*"]}
    cb = OnlineLLCCallback(per_sample_loss, groups=groups, group_budget=2, every_n_steps=1, window=5, warmup=0, seed=0)
    strategy = DDPStrategy(start_method="fork", timeout=datetime.timedelta(seconds=5))
    callbacks = [cb, _FailGroupOnce(cb, "last", at=2), _RankReport(cb, str(tmp_path))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        make_trainer(callbacks, max_steps=20, strategy=strategy, devices=2).fit(make_module(), loader())
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["failure"] is None and "rank-1 group failure" in r1["failure"]
    assert r0["filter"] == r1["filter"] and r0["statuses"] == r1["statuses"] and r0["history"] == 4
    for g in groups:  # both groups' windows closed at the same steps, with the same verdicts
        assert r0["groups"][g] == r1["groups"][g]
        assert [w[0] for w in r0["groups"][g]] == [5, 10, 15, 20]
    # Rank 1's placeholders of step 2 in "last" (not in "first", which drew) and from step 3 on.
    assert [w[1] for w in r0["groups"]["last"]] == ["diverged"] * 4


class _GatherFailsOnceOnRank1(OnlineLLCCallback):
    """The first window's collective completes, then rank 1's gather raises (as a failed copy of
    the gathered array would): the ranks stay in step, rank 1 must disable itself cleanly."""

    @staticmethod
    def _gather(trainer: Any) -> Any:
        inner, calls = OnlineLLCCallback._gather(trainer), {"n": 0}

        def gather(arr: Any) -> Any:
            out = inner(arr)
            calls["n"] += arr.shape[-1] > 1  # windows only: not the first step's batch-size agreement
            if trainer.global_rank == 1 and calls["n"] == 1 and arr.shape[-1] > 1:
                raise RuntimeError("rank-1 gather failure")
            return out

        return gather


class _Warnings(Callback):
    """Records the rank's warnings during fit to tmp_path/warnings<r>.json."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self._ctx, self._seen = out_dir, None, []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._ctx = warnings.catch_warnings(record=True)
        self._seen = self._ctx.__enter__()
        warnings.simplefilter("always")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._ctx.__exit__(None, None, None)
        with open(os.path.join(self.out_dir, f"warnings{trainer.global_rank}.json"), "w") as f:
            json.dump([str(w.message) for w in self._seen], f)


def test_ddp_failed_gather_on_one_rank_disables_it_without_stopping_training(tmp_path):
    """A gather that raises on rank 1 (strict=False): one warning, rank 1 disables itself and
    keeps joining the windows' collectives with placeholders; no IndexError from a window left
    full, and training runs to the end on both ranks."""
    cb = _GatherFailsOnceOnRank1(per_sample_loss, every_n_steps=1, window=5, warmup=0, seed=0)
    strategy = DDPStrategy(start_method="fork", timeout=datetime.timedelta(seconds=5))
    trainer = make_trainer([cb, _Warnings(str(tmp_path)), _RankReport(cb, str(tmp_path))], max_steps=20, strategy=strategy, devices=2)
    trainer.fit(make_module(), loader())
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    w1 = json.loads((tmp_path / "warnings1.json").read_text())
    assert r0["failure"] is None and "rank-1 gather failure" in r1["failure"]
    assert "IndexError" not in r1["failure"]
    assert sum("disabled itself" in w and "rank-1 gather failure" in w for w in w1) == 1
    # Rank 1 lost the first window (its summary never arrived); the next three closed together,
    # each holding rank 1's placeholders.
    assert r0["history"] == 4 and r1["history"] == 3
    assert r0["statuses"][1:] == r1["statuses"] == ["diverged"] * 3


@pytest.mark.parametrize("kind", ["nan", "raise", "raise_first"])
def test_ddp_rank_local_divergence_or_failure_keeps_ranks_in_step(tmp_path, kind):
    cb = OnlineLLCCallback(_nan_or_raise_on_rank1(kind), every_n_steps=1, window=5, warmup=0)
    strategy = DDPStrategy(start_method="fork", timeout=datetime.timedelta(seconds=5))
    trainer = make_trainer([cb, _RankReport(cb, str(tmp_path))], max_steps=20, strategy=strategy, devices=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(make_module(), loader())
    # A chain reset or a monitor failure on rank 1 only: both ranks still close every window
    # together (rank 1 adds flagged placeholders), so nothing hangs, and both reach the same
    # verdict (`diverged`) about the windows rank 1 could not fill.
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["filter"] == r1["filter"] and r0["history"] == r1["history"] == 4
    assert r0["statuses"] == r1["statuses"] and r0["means"] == r1["means"]
    assert "diverged" in r0["statuses"]
    if kind == "raise":
        assert r0["failure"] is None and "rank-1 failure" in r1["failure"]
        # After the failure every window holds rank 1's placeholders: reported diverged everywhere.
        assert r0["statuses"][1:] == ["diverged"] * 3
    elif kind == "raise_first":
        # Failed in its first shadow step, rank 1 still joins the ranks' agreement on the batch
        # size (with no batch of its own), then every window's collective.
        assert r0["failure"] is None and "rank-1 failure" in r1["failure"]
        assert r0["statuses"] == ["diverged"] * 4
    else:
        assert r0["failure"] is None and r1["failure"] is None


def test_health_alarm_is_warned_once_on_a_hot_chain() -> None:
    """A hand-set step of 0.05 (about 10x the default here) runs the chain hot; the callback warns
    once with the monitor's heat alarm, and training goes on."""
    cb = OnlineLLCCallback(per_sample_loss, every_n_steps=1, window=20, warmup=0, seed=0, step_size=0.05)
    trainer = make_trainer([cb], max_steps=200)
    with pytest.warns(RuntimeWarning, match="lower step_size") as record:
        trainer.fit(make_module(), loader())
    warned = [str(w.message) for w in record if "lower step_size" in str(w.message)]
    assert len(warned) == 1
    assert trainer.global_step == 200 and cb.failure is None
    # The alarm states the heat it saw, past the threshold (a number, or inf: hotter than
    # measurable). The health at the run's end may read NaN: the chain keeps diverging at this
    # step (5 resets here), and the pooled mean of its last windows need not be clearly positive.
    heat = re.search(r"is (\S+) > 1\.1", warned[0])
    assert heat is not None and float(heat.group(1)) > 1.1, warned[0]


# ---- runs of any length: the cadence from trainer.estimated_stepping_batches ------------------------


def test_auto_cadence_is_sized_to_the_run_and_explicit_values_rule():
    cb = OnlineLLCCallback(per_sample_loss, seed=0)  # every_n_steps and window "auto"
    trainer = make_trainer([cb], max_steps=60)
    with pytest.warns(UserWarning, match=r"^OnlineLLC: a 60-step run is too short for the 10% overhead budget") as rec:
        trainer.fit(make_module(), loader())
    assert sum("60-step run" in str(w.message) for w in rec) == 1  # one line
    assert trainer.estimated_stepping_batches == 60
    assert cb.monitor.cadence == auto_cadence(60)
    assert (cb.monitor.every_n_steps, cb.monitor.window, cb.monitor.cadence.min_warmup) == (1, 10, 20)
    assert cb.monitor.shadow_steps == 60 and [e.step for e in cb.monitor.history()] == [10, 20, 30, 40, 50, 60]

    explicit = OnlineLLCCallback(per_sample_loss, every_n_steps=2, window=5, seed=0)
    make_trainer([explicit], max_steps=60).fit(make_module(), loader())
    c = explicit.monitor.cadence
    assert (c.every_n_steps, c.window, c.total_steps, c.message) == (2, 5, 60, None)
    assert [e.step for e in explicit.monitor.history()][:2] == [10, 20]


@pytest.mark.filterwarnings("ignore:OnlineLLC. a .*-step run:UserWarning")
def test_auto_resume_keeps_the_checkpointed_schedule(tmp_path):
    """A resumed "auto" run keeps the schedule its checkpoint was sized for, even when the new
    run is longer (the estimate continues exactly instead of failing on different settings)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=24, save_top_k=-1)
    full = OnlineLLCCallback(per_sample_loss, seed=0)
    make_trainer([full, ckpt], max_steps=48, enable_checkpointing=True).fit(make_module(), loader())
    path = tmp_path / "ckpt" / "epoch=2-step=24.ckpt"
    assert full.monitor.cadence.total_steps == 48

    resumed = OnlineLLCCallback(per_sample_loss, seed=0)
    make_trainer([resumed], max_steps=64).fit(make_module(), loader(), ckpt_path=str(path), weights_only=True)
    assert resumed.monitor.cadence == full.monitor.cadence
    n = len(full.monitor.history())
    assert n >= 2
    assert_same_history(resumed.monitor.history()[:n], full.monitor.history())
    assert resumed.monitor.step == 64


# ---- a real short run: 220 steps on scikit-learn's digits, EarlyStopping on llc/mean -----------------


def digits() -> TensorDataset:
    """scikit-learn's digits (shipped with the package): 1797 8x8 images, intensities 0..16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return TensorDataset(torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target, dtype=torch.long))


class DigitsClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.per_sample_loss(batch).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _FirstCheck(Callback):
    """Whether `llc/mean` existed at each validation end (the checks EarlyStopping makes)."""

    def __init__(self) -> None:
        self.seen: List[bool] = []

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.seen.append("llc/mean" in trainer.callback_metrics)


def test_a_220_step_run_with_defaults_tracks_and_early_stopping_on_llc_mean_works(tmp_path):
    data = digits()
    train = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(data, batch_size=256)
    cb, logger, probe = OnlineLLCCallback(), ListLogger(), _FirstCheck()
    # patience: EarlyStopping must run its checks without error, not stop this short run.
    stopper = EarlyStopping(monitor="llc/mean", patience=1000)
    # ModelCheckpoint has no strict flag: unguarded, it raised at the first validation after
    # the first one (MisconfigurationException: could not find the monitored key).
    keeper = ModelCheckpoint(dirpath=tmp_path, monitor="llc/mean", mode="min", save_top_k=1, every_n_train_steps=10)
    torch.manual_seed(0)
    trainer = make_trainer(
        [cb, probe, stopper, keeper], max_steps=220, logger=logger, val_check_interval=10, limit_val_batches=1,
        enable_checkpointing=True,
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(DigitsClassifier(), train, val)
    messages = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert sum(m.startswith("OnlineLLC: a 220-step run is too short for the 10% overhead budget") for m in messages) == 1
    assert sum("set EarlyStopping(monitor='llc/mean') to strict=False" in m for m in messages) == 1
    assert sum("ModelCheckpoint(monitor='llc/mean') skips its top-k save until the first" in m for m in messages) == 1
    assert trainer.global_step == 220 and cb.failure is None

    history = cb.monitor.history()
    estimates = [e for e in history if e.filtered]
    assert cb.monitor.cadence.every_n_steps == 1 and cb.monitor.cadence.window == 10
    assert len(estimates) >= 10, [e.status for e in history]
    # The warm-up's floor is 10% of the run; the data decide when it ends (here well before half).
    assert cb.monitor.cadence.min_warmup == 22 and history[0].status == "warming_up"
    assert estimates[0].step <= 110
    # The first checks came before the first estimate: a strict EarlyStopping would have raised.
    assert probe.seen[0] is False and probe.seen[-1] is True
    assert torch.isfinite(stopper.best_score)
    assert any(torch.tensor(e.mean).item() == stopper.best_score.item() for e in estimates)
    # The best checkpoint is ranked by an estimate and was written after the first one.
    assert keeper.best_model_path and os.path.exists(keeper.best_model_path)
    assert any(torch.tensor(e.mean).item() == keeper.best_model_score.item() for e in estimates)
    # Only estimates write llc/mean; warm-up windows log their status and raw mean.
    rows = [m for _, m in logger.rows if "llc/status" in m]
    assert len(rows) == len(history)
    for m, e in zip(rows, history):
        assert ("llc/mean" in m) == e.filtered and m["llc/raw_mean"] == e.raw_mean


def test_placeholders_that_raise_after_a_failure_never_reach_training():
    """Under DDP a failed rank keeps adding placeholder draws at every step; when those raise too
    (a broken process group), the callback must not raise into training: one warning, the
    failure's description says so, and it stops calling ``skip_step``."""

    class _Monitor:
        calls = 0

        def skip_step(self, step: int) -> None:
            type(self).calls += 1
            if step >= 3:
                raise RuntimeError("gather failed: peer gone")

    cb = OnlineLLCCallback(per_sample_loss, every_n_steps=1, window=5)
    cb.monitor, cb.failure, cb._world_size = _Monitor(), "step 1: RuntimeError: boom", 2
    for step in (2, 3):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            cb.on_train_batch_end(types.SimpleNamespace(global_step=step), None, None, None, step)
        assert len(seen) == (step == 3)
    assert _Monitor.calls == 2 and "placeholders stopped at step 3" in cb.failure
    assert "peer gone" in str(seen[0].message)
    for step in (4, 5):  # no further calls, no further warnings
        cb.on_train_batch_end(types.SimpleNamespace(global_step=step), None, None, None, step)
    assert _Monitor.calls == 2
