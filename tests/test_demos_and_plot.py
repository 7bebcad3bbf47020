"""The main demo end to end (short), CSV round trips and the plot."""

from __future__ import annotations

import csv
import math

import pytest

from online_llc import OnlineLLC
from online_llc.plot import read_run, write_csv
from online_llc.toy import ShuffledBatches, deep_linear_problem, stagewise_dln_problem

def test_main_demo_runs_and_writes_csv_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    from online_llc.demos.stagewise_dln import main

    assert main(["--out", str(tmp_path), "--steps", "4000", "--every-n-steps", "5", "--window", "20"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "stagewise_dln.csv")))
    assert len(rows) == 4000 // (5 * 20)
    assert {"step", "mean", "lower", "upper", "status", "train_loss", "sv1"} <= set(rows[0])
    assert (tmp_path / "stagewise_dln.png").stat().st_size > 10_000
    # The first plateau is a saddle: after warm-up the demo reports it as such.
    assert any(r["status"] == "not_at_minimum" for r in rows)


def test_stagewise_problem_learns_its_first_mode():
    p = stagewise_dln_problem(num_samples=2048, seed=0)
    assert p.lam_final == 16.5 and max(p.learned_singular_values()) < 0.1
    import torch

    opt = torch.optim.SGD(p.model.parameters(), lr=0.01)
    before = p.full_loss()
    for _ in range(150):  # 1200 steps: past the first plateau at this learning rate
        for batch in p.batches:
            opt.zero_grad()
            p.loss_fn(p.model, batch).mean().backward()
            opt.step()
    assert p.learned_singular_values()[0] > 1.5 and p.full_loss() < before - 1.0


def test_csv_round_trip_and_lightning_style_csv(tmp_path):
    p = deep_linear_problem([3, 2], 2, num_samples=512, batch_size=32, seed=0)
    monitor = OnlineLLC(p.model, p.loss_fn, num_samples=512, every_n_steps=1, window=5, warmup=5)
    batches = list(p.batches)
    for s in range(40):
        monitor.update(batches[s % len(batches)])
    hist = monitor.history()
    path = tmp_path / "run.csv"
    write_csv(str(path), hist, [{"train_loss": 1.0}] * len(hist))
    back = read_run(str(path))
    assert [(e.step, e.status) for e in back] == [(e.step, e.status) for e in hist]
    for a, b in zip(back, hist):
        for f in ("mean", "std", "lower", "upper", "raw_mean", "nis"):
            x, y = getattr(a, f), getattr(b, f)
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12)

    # Lightning's CSVLogger layout: llc/* columns, numeric status, other metrics on other rows.
    light = tmp_path / "metrics.csv"
    with open(light, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "llc/lower", "llc/mean", "llc/status", "llc/std", "llc/upper", "step", "train_loss"])
        w.writerow([0, 1.0, 2.0, 1.0, 0.5, 3.0, 10, ""])
        w.writerow([0, "", "", "", "", "", 10, 0.7])
        w.writerow([0, -5.0, -4.0, 3.0, 0.5, -3.0, 20, ""])
    got = read_run(str(light))
    assert [(e.step, e.mean, e.status) for e in got] == [(10, 2.0, "tracking"), (20, -4.0, "not_at_minimum")]


def test_read_run_rejects_files_without_llc_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"no LLC columns"):
        read_run(str(bad))
    worse = tmp_path / "worse.csv"
    worse.write_text("step,mean,status\n10,abc,tracking\n")
    with pytest.raises(ValueError, match=r"line 2: not a valid LLC row"):
        read_run(str(worse))


def test_plot_llc_draws_band_theory_and_symlog(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from online_llc.plot import plot_llc

    p = stagewise_dln_problem(num_samples=1024, seed=0)
    monitor = OnlineLLC(p.model, p.loss_fn, num_samples=1024, every_n_steps=1, window=10, warmup=10)
    batches = list(p.batches)
    for s in range(60):
        monitor.update(batches[s % len(batches)])
    ax = plot_llc(monitor.history(), theory=16.5, loss=([1, 2, 3], [5.0, 0.5, 0.05]))
    assert ax.get_yscale() == "symlog"  # negative saddle values next to a positive theory line
    twin = [a for a in ax.figure.axes if a is not ax]
    assert len(twin) == 1 and twin[0].get_yscale() == "log" and twin[0].get_ylabel() == "training loss"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("90% band" in t for t in labels) and any("16.5" in t for t in labels)


def test_shuffled_batches_validation_and_reshuffle():
    import torch

    x = torch.arange(10.0).unsqueeze(1)
    sb = ShuffledBatches(x, x, batch_size=4, seed=0)
    assert len(sb) == 2 and len(list(sb)) == 2
    first = [b[0].flatten().tolist() for b in sb]
    second = [b[0].flatten().tolist() for b in sb]
    assert first != second  # each pass reshuffles
    with pytest.raises(ValueError, match=r"Expected `batch_size` to be at most the number of samples 10, got 11\."):
        ShuffledBatches(x, x, batch_size=11)
    with pytest.raises(ValueError, match=r"Expected `batch_size` to be a positive int, got 0\."):
        ShuffledBatches(x, x, batch_size=0)
