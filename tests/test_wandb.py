"""The keys reach Weights & Biases through both frameworks' own integrations (Lightning's
``WandbLogger``, the Trainer's ``report_to=["wandb"]``), offline (``WANDB_MODE=offline``): the
run's history, read back from its transaction log with W&B's own ``wandb leet inspect --json``,
holds every filtered window's ``llc/mean`` and band at its training step, and every window's
status."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import warnings
from typing import Any, Dict, List

import pytest

wandb = pytest.importorskip("wandb")

sys.path.insert(0, os.path.dirname(__file__))


def history(run_dir: str) -> List[Dict[str, Any]]:
    """The history records of the one offline run under ``run_dir`` (W&B's own reader)."""
    files = glob.glob(os.path.join(run_dir, "**", "offline-run-*", "run-*.wandb"), recursive=True)
    assert len(files) == 1, files
    exe = shutil.which("wandb") or os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run([exe, "leet", "inspect", "--json", files[0]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)
    yield tmp_path
    wandb.finish()
    wandb.teardown()  # the process's W&B settings (its directory) are not carried into the next test


def _check(items: List[Dict[str, Any]], monitor: Any, prefix: str, step_key: str) -> None:
    windows = [i for i in items if f"{prefix}llc/status" in i]
    est = monitor.history()
    assert [int(i[step_key]) for i in windows] == [e.step for e in est]
    assert [int(i[f"{prefix}llc/status"]) for i in windows] == [["warming_up", "tracking", "transition",
                                                                 "not_at_minimum", "diverged"].index(e.status) for e in est]
    logged = [(int(i[step_key]), i[f"{prefix}llc/mean"], i[f"{prefix}llc/lower"], i[f"{prefix}llc/upper"])
              for i in windows if f"{prefix}llc/mean" in i]
    want = [(e.step, e.mean, e.lower, e.upper) for e in est if e.filtered]
    assert logged and [s for s, *_ in logged] == [s for s, *_ in want]
    assert [v for _, *vals in logged for v in vals] == pytest.approx([v for _, *vals in want for v in vals], rel=1e-6)


def test_lightning_wandb_logger_charts_the_band_against_the_training_step(offline):
    from lightning.pytorch.loggers import WandbLogger
    from test_lightning import FAST, OnlineLLCCallback, loader, make_module, make_trainer, per_sample_loss

    cb = OnlineLLCCallback(per_sample_loss, **FAST)
    logger = WandbLogger(project="online-llc-test", save_dir=str(offline), offline=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([cb], max_steps=30, logger=logger, log_every_n_steps=1).fit(make_module(), loader())
    wandb.finish()
    _check(history(str(offline)), cb.monitor, "", "trainer/global_step")


def test_trainer_report_to_wandb_charts_the_band_against_the_training_step(offline):
    from test_hf import FAST, OnlineLLCTrainerCallback, train

    cb = OnlineLLCTrainerCallback(**FAST)
    train(offline / "out", cb, report_to=["wandb"], max_steps=12)
    wandb.finish()
    _check(history(str(offline)), cb.monitor, "train/", "train/global_step")
