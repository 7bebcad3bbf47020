"""The `online-llc` command line: help texts, demos, plotting, one-line errors with exit code 2."""

from __future__ import annotations

import csv
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from online_llc.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "online_llc.cli", *args], capture_output=True, text=True, timeout=300)


def test_entry_point_is_installed():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("online-llc") == "online_llc.cli:main"


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["plot", "--help"], ["demo", "stagewise", "--help"]])
def test_help_texts(args):
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout
    if args == ["--help"]:
        assert "demo" in res.stdout and "plot" in res.stdout and "local learning coefficient" in res.stdout
    if args[:2] == ["demo", "stagewise"]:
        assert "online-llc demo stagewise" in res.stdout and "--steps" in res.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    missing = run_cli("plot", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "no such file" in missing.stderr
    broken = tmp_path / "broken.csv"
    broken.write_text("step,mean,status\n10,not-a-number,tracking\n")
    res = run_cli("plot", str(broken))
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "line 2" in res.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    res = run_cli("plot", str(empty))
    assert res.returncode == 2 and "no LLC columns" in res.stderr
    assert main(["demo", "nope"]) == 2
    assert main(["demo"]) == 2


def test_plot_errors_on_directories_and_trainer_states_are_one_line(tmp_path, capsys):
    """What ``online-llc plot`` says, in one line with exit status 2, about a directory that holds
    no log, a ``trainer_state.json`` that is not JSON, and one whose LLC entry is not a number."""

    def error(path) -> str:
        assert main(["plot", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0
        return err

    (tmp_path / "empty_dir").mkdir()
    assert "no log found (expected a trainer_state.json, checkpoint-*/trainer_state.json, TensorBoard event files or a Lightning metrics.csv)" in error(
        tmp_path / "empty_dir")
    bad = tmp_path / "bad" / "trainer_state.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    assert "online-llc: error: Expecting property name" in error(bad.parent)
    wrong = tmp_path / "wrong" / "trainer_state.json"
    wrong.parent.mkdir()
    wrong.write_text('{"log_history": [{"step": 3, "llc/status": 0, "llc/raw_mean": 1.5}, '
                     '{"step": 6, "llc/status": 1, "llc/mean": "high"}]}')
    assert "trainer_state.json, entry 2: not a valid LLC row" in error(wrong.parent)


def test_demo_and_plot_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["demo", "grokking", "--out", str(tmp_path), "--steps", "600"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "grokking.csv")))
    assert len(rows) == 600 // (2 * 20)
    assert {"train_acc", "test_acc", "mean", "status", "llc_input_layer", "llc_output_layer"} <= set(rows[0])
    assert (tmp_path / "grokking.png").stat().st_size > 10_000
    out_png = tmp_path / "replot.png"
    assert main(["plot", str(tmp_path / "grokking.csv"), "-o", str(out_png), "--theory", "10"]) == 0
    assert out_png.stat().st_size > 10_000
    assert "Wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_lightning_demo_csv_plots(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("matplotlib")
    assert main(["demo", "lightning", "--out", str(tmp_path), "--epochs", "4"]) == 0
    metrics = sorted(tmp_path.glob("lightning_logs/version_*/metrics.csv"))[-1]
    out_png = tmp_path / "from_lightning.png"
    assert main(["plot", str(metrics), "-o", str(out_png)]) == 0
    assert out_png.stat().st_size > 10_000


def test_groups_demo_writes_every_unit(tmp_path):
    assert main(["demo", "groups", "--out", str(tmp_path), "--steps", "1500", "--no-plot"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "groups.csv")))
    assert {r["unit"] for r in rows} == {"model", "fast", "slow"}


def test_induction_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tiny = ["--steps", "240", "--vocab", "8", "--half", "4", "--d-model", "8", "--heads", "2", "--num-sequences", "512",
            "--batch-size", "16", "--lr", "0.01", "--head-budget", "2", "--bin", "10"]
    assert main(["demo", "induction", "--out", str(tmp_path), *tiny]) == 0
    rows = list(csv.DictReader(open(tmp_path / "induction.csv")))
    assert rows and {"step", "mean", "lower", "upper", "status", "loss_first_half", "loss_repeated_half",
                     "llc_layer0", "llc_layer1", "llc_L0H0", "llc_L0H1", "llc_L1H0", "llc_L1H1"} <= set(rows[0])
    assert (tmp_path / "induction.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "Wrote" in out and ("Phase change" in out or "No phase change" in out)


def test_trainer_demo_draws_tensorboards_margin_charts_and_the_plot_of_its_output_dir(tmp_path, capsys):
    """``online-llc demo trainer`` (a tiny GPT-2 under the Hugging Face Trainer, per-head groups,
    ``report_to=["tensorboard"]``): the Margin charts it draws are those of the layout in its
    event file, one for the whole model and one per head, and their values are the windows that
    ``trainer_state.json`` holds (two readers of two logs agree, to TensorBoard's float32); the
    plot of its ``output_dir`` is written. The docs build runs the same demo for its images."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from online_llc.demos.trainer_gpt2 import margin_charts
    from online_llc.runlogs import read_log

    assert main(["demo", "trainer", "--out", str(tmp_path), "--steps", "100", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Wrote" in out and (tmp_path / "trainer_gpt2.png").stat().st_size > 10_000
    assert (tmp_path / "tensorboard_margin.png").stat().st_size > 10_000
    charts = margin_charts(str(tmp_path / "trainer_gpt2" / "runs"))
    heads = [f"transformer.h.{layer}.attn.head{h}" for layer in (0, 1) for h in (0, 1)]
    assert sorted(charts) == sorted(["LLC, whole model"] + [f"LLC, {h}" for h in heads])
    run = read_log(str(tmp_path / "trainer_gpt2"))
    for title, history in [("LLC, whole model", run.history)] + [(f"LLC, {h}", run.groups[h]) for h in heads]:
        steps, value, lower, upper = charts[title]
        filtered = [e for e in history if e.filtered]
        assert filtered and steps == [e.step for e in filtered]
        assert value == pytest.approx([e.mean for e in filtered], rel=1e-6)
        assert lower == pytest.approx([e.lower for e in filtered], rel=1e-6)
        assert upper == pytest.approx([e.upper for e in filtered], rel=1e-6)


@pytest.mark.slow
def test_probes_demo_sees_the_first_mode_learned_in_its_own_probe_set(tmp_path, capsys):
    """``online-llc demo probes`` for 5000 steps (the first of the stagewise network's three modes
    is learned at about step 3600): the first mode's observable-refined LLC ends positive, the two
    modes not yet learned still read negative (the network sits at a saddle along them), and the
    report names where the first turned positive."""
    pytest.importorskip("matplotlib")
    assert main(["demo", "probes", "--out", str(tmp_path), "--steps", "5000"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "probes_dln.csv")))
    last = rows[-1]
    assert float(last["mode1_llc"]) > 0 > max(float(last["mode2_llc"]), float(last["mode3_llc"]))
    assert {"mode1_susceptibility", "mode1_susceptibility_std"} <= set(last)
    out = capsys.readouterr().out
    assert "mode1: observable-refined LLC positive from step" in out and (tmp_path / "probes_dln.png").is_file()
