"""The main demo end to end (short), CSV round trips and the plot."""

from __future__ import annotations

import csv
import math

import pytest

from online_llc import OnlineLLC
from online_llc.models.toy import ShuffledBatches, deep_linear_problem, stagewise_dln_problem
from online_llc.plot import read_run, write_csv


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


def _legend(ax):
    return sorted(t.get_text() for t in ax.get_legend().get_texts())


def test_plot_labels_what_it_draws_from_a_lightning_csv(tmp_path):
    """A Lightning metrics.csv holds the filtered mean and band (estimates only), the status of
    every window and, since llc/raw_mean is logged, every window's mean. The dots are labelled
    window means only when they are; an older file without llc/raw_mean gets its filtered means
    drawn and labelled as such."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from online_llc.plot import plot_llc

    new = tmp_path / "metrics.csv"
    with open(new, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "llc/lower", "llc/mean", "llc/raw_mean", "llc/status", "llc/std", "llc/upper", "step", "train_loss"])
        w.writerow([0, "", "", 0.5, 0.0, "", "", 10, ""])  # a warm-up window: status and raw mean only
        w.writerow([0, "", "", "", "", "", "", 10, 0.7])  # another metric's row
        w.writerow([0, 1.0, 2.0, 2.5, 1.0, 0.5, 3.0, 20, ""])
        w.writerow([0, 1.5, 2.2, 1.9, 1.0, 0.4, 2.9, 30, ""])
    got = read_run(str(new))
    assert [(e.step, e.status, e.raw_mean) for e in got] == [(10, "warming_up", 0.5), (20, "tracking", 2.5), (30, "tracking", 1.9)]
    assert math.isnan(got[0].mean) and math.isnan(got[0].upper) and got[1].mean == 2.0
    ax = plot_llc(got)
    assert _legend(ax) == ["90% band", "online LLC (filtered)", "window mean: tracking", "window mean: warming_up"]
    line = next(li for li in ax.get_lines() if li.get_label() == "online LLC (filtered)")
    assert list(line.get_xdata()) == [20, 30] and list(line.get_ydata()) == [2.0, 2.2]  # estimates only
    dots = {c.get_label(): c.get_offsets().tolist() for c in ax.collections if c.get_label().startswith("window")}
    assert dots == {"window mean: warming_up": [[10, 0.5]], "window mean: tracking": [[20, 2.5], [30, 1.9]]}

    old = tmp_path / "old_metrics.csv"
    with open(old, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "llc/lower", "llc/mean", "llc/status", "llc/std", "llc/upper", "step"])
        w.writerow([0, 0.0, 0.5, 0.0, 0.5, 1.0, 10])  # logged before warm-up windows lost llc/mean
        w.writerow([0, 1.0, 2.0, 1.0, 0.5, 3.0, 20])
    ax = plot_llc(read_run(str(old)))
    assert _legend(ax) == ["90% band", "filtered mean: tracking", "online LLC (filtered)", "window mean: warming_up"]


def test_induction_phase_change_is_the_steepest_fall():
    from online_llc.demos.induction import phase_change

    steps = list(range(10, 210, 10))
    rep = [3.5] * 8 + [3.0, 2.0, 0.8, 0.4] + [0.3] * 8  # plateau, then the fall from step 90 to 120
    pc = phase_change(steps, rep)
    assert pc["step"] == 110 and pc["onset"] == 90 and pc["end"] == 120
    assert phase_change(steps, [3.5 - 0.01 * i for i in range(20)]) is None  # no fall by half: no phase change


def test_induction_model_heads_are_disjoint_groups():
    import torch

    from online_llc.demos.induction import AttentionOnlyTransformer, per_sample_ce, repeated_sequences
    from online_llc.models.groups import resolve_group_masks
    from online_llc.models.heads import attention_heads

    model = AttentionOnlyTransformer(vocab=8, seq_len=8, d_model=8, num_heads=2)
    seqs = repeated_sequences(5, 8, 4, seed=0)
    assert torch.equal(seqs[:, :4], seqs[:, 4:]) and per_sample_ce(model, seqs).shape == (5,)
    groups = {}
    for i, layer in enumerate(model.layers):
        groups.update(attention_heads(layer, f"layers.{i}"))
    masks = resolve_group_masks(model, groups)
    q = sum(m["layers.0.q_proj.weight"].int() for g, m in masks.items() if g.startswith("layers.0."))
    assert torch.equal(q, torch.ones(8, 8, dtype=torch.int))  # the heads tile layer 0's query projection
