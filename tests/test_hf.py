"""The Hugging Face adapter, ``online_llc.callbacks.hf.OnlineLLCTrainerCallback``, on a tiny GPT-2
built from a config (random weights, nothing downloaded) and a synthetic token dataset: what
reaches TensorBoard, non-interference, checkpoint/resume, gradient accumulation, DDP, the
default losses and the failure policy. Everything runs on CPU with one thread."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from typing import Any, Dict, List

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from online_llc import STATUSES, MonitorError, OnlineLLC  # noqa: E402
from conftest import tensorboard_margins  # noqa: E402
from online_llc.callbacks import (
    LOGGED_KEYS,  # noqa: E402
    hf,  # noqa: E402
)
from online_llc.callbacks.hf import OnlineLLCTrainerCallback  # noqa: E402
from online_llc.models.heads import attention_heads  # noqa: E402
from online_llc.models.losses import causal_lm_loss, sequence_classification_loss  # noqa: E402
from online_llc.monitor.settings import MonitorSettings  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*loss_type=None"),
    # Tiny batches of random tokens: the chain's heat alarm is expected and beside the point here.
    pytest.mark.filterwarnings("ignore:OnlineLLCTrainerCallback at step .*chain runs hot"),
]

VOCAB, LENGTH, NUM_SAMPLES, BATCH = 64, 16, 64, 8
FAST = dict(every_n_steps=1, window=3, warmup=2, seed=0)


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences (a private generator); every third one is padded at its end
    (``attention_mask`` 0, ``labels`` -100), as a collator would pad shorter texts."""

    def __init__(self, n: int = NUM_SAMPLES) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.mask = torch.ones(n, LENGTH, dtype=torch.long)
        self.mask[::3, -5:] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def config(**kw: Any) -> GPT2Config:
    return GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, **kw)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)  # dropout stays on (0.1): training draws from the global RNG
    return GPT2LMHeadModel(config())


def train(out: Any, callback: OnlineLLCTrainerCallback | None = None, *, resume: Any = None,
          extra: List[TrainerCallback] = (), trainer_cls: type = Trainer, catch: bool = True,
          **overrides: Any) -> Trainer:
    kw = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=BATCH, use_cpu=True, report_to=[],
              save_strategy="no", logging_steps=4, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    kw.update(overrides)
    trainer = trainer_cls(model=gpt2(), args=TrainingArguments(**kw), train_dataset=TokenDataset(), callbacks=list(extra))
    if callback is not None:
        callback.attach(trainer)
    if catch:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)
    else:
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def history(cb: OnlineLLCTrainerCallback) -> List[tuple]:
    return [(e.step, e.mean, e.std, e.status) for e in cb.monitor.history()]


# ---- logging ---------------------------------------------------------------------------------------


def test_llc_keys_reach_tensorboard(tmp_path):
    """``report_to=["tensorboard"]``: the event file holds every logged key (as the TensorBoard
    integration names them, ``train/llc/...``) at each closed window, with the monitor's values;
    the head groups' keys too."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    class Recorder(TrainerCallback):  # placed before the callback, as the integrations are
        logs: List[Dict[str, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    heads = attention_heads(gpt2().transformer.h[0].attn, "transformer.h.0.attn")
    cb = OnlineLLCTrainerCallback(groups=heads, group_budget=2, **FAST)
    trainer = train(tmp_path, cb, report_to=["tensorboard"], extra=[Recorder()])
    order = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert order.index("TensorBoardCallback") < order.index("Recorder") < order.index("OnlineLLCTrainerCallback")
    events = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(events) == 1
    acc = event_accumulator.EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in LOGGED_KEYS} <= tags
    # The bands are drawn in TensorBoard itself: a Margin chart per band, over logged tags.
    margins = tensorboard_margins(os.path.dirname(events[0]))
    assert margins["LLC, whole model"] == ("train/llc/mean", "train/llc/lower", "train/llc/upper")
    for h in ("head0", "head1"):
        base = f"train/llc/transformer.h.0.attn.{h}"
        assert margins[f"LLC, transformer.h.0.attn.{h}"] == (f"{base}/mean", f"{base}/lower", f"{base}/upper")
        assert {f"{base}/mean", f"{base}/lower", f"{base}/upper"} <= tags
    est = cb.monitor.history()
    assert [e.step for e in est] == [3, 6, 9, 12]
    # Every window logs its status and raw mean; only windows the filter absorbed log llc/mean.
    assert [s.step for s in acc.Scalars("train/llc/raw_mean")] == [3, 6, 9, 12]
    filtered = [e for e in est if e.filtered]
    assert filtered and len(filtered) < len(est)  # the first window is warm-up
    logged = acc.Scalars("train/llc/mean")
    assert [s.step for s in logged] == [e.step for e in filtered]
    assert [s.value for s in logged] == pytest.approx([e.mean for e in filtered], rel=1e-6)
    for h in ("head0", "head1"):
        group = [e for e in cb.monitor.group_history(f"transformer.h.0.attn.{h}") if e.filtered]
        values = [s.value for s in acc.Scalars(f"train/llc/transformer.h.0.attn.{h}/mean")]
        assert group and values == pytest.approx([e.mean for e in group], rel=1e-6)
    rows = [r for r in trainer.state.log_history if "llc/mean" in r]
    assert [r["step"] for r in rows] == [e.step for e in filtered]
    assert [r["llc/mean"] for r in Recorder.logs if "llc/mean" in r] == [e.mean for e in filtered]
    # The Trainer's own logs at the same steps still happen (loss every 4 steps).
    assert [r["step"] for r in trainer.state.log_history if "loss" in r] == [4, 8, 12]
    # The health keys at every window; 12 training steps are far shorter than three relaxation
    # times, and the last window logs what the monitor's health says at the end.
    health = cb.monitor.health()
    assert health.short_run
    assert [s.value for s in acc.Scalars("train/llc/short_run")][-1] == 1.0
    assert acc.Scalars("train/llc/relaxation_steps")[-1].value == pytest.approx(health.relaxation_steps, rel=1e-6)


def test_plot_reads_a_trainer_state_an_output_dir_and_a_tensorboard_directory(tmp_path, capsys):
    """``online-llc plot`` on what a Trainer run leaves: its ``output_dir`` (the latest
    checkpoint's ``trainer_state.json``), that file itself, and the TensorBoard integration's
    event directory all read back the monitor's windows (step, status, raw mean, and the estimate
    and band of every filtered window) and each head group's; the plot gets a groups panel."""
    from online_llc.cli import main
    from online_llc.runlogs import read_log

    heads = attention_heads(gpt2().transformer.h[0].attn, "transformer.h.0.attn")
    cb = OnlineLLCTrainerCallback(groups=heads, group_budget=2, **FAST)
    trainer = train(tmp_path, cb, report_to=["tensorboard"], save_strategy="steps", save_steps=6, logging_steps=4)

    def same(got, want):  # TensorBoard keeps float32: the numbers to its precision
        assert [(e.step, e.status) for e in got] == [(e.step, e.status) for e in want]
        numbers = lambda h: [v for e in h for v in (e.raw_mean,) + ((e.mean, e.lower, e.upper) if e.filtered else ())]
        assert numbers(got) == pytest.approx(numbers(want), rel=1e-6)

    runs = [glob.glob(str(tmp_path / "runs" / "*"))[0], tmp_path, tmp_path / "checkpoint-12" / "trainer_state.json"]
    for path, kind in zip(runs, ("tensorboard", "trainer_state", "trainer_state")):
        run = read_log(str(path))
        assert run.kind == kind
        same(run.history, cb.monitor.history())
        assert sorted(run.groups) == sorted(heads)
        for name in heads:
            same(run.groups[name], cb.monitor.group_history(name))
        assert run.loss[0] == [4, 8, 12]  # the Trainer's loss, for the second axis
        assert run.short_run  # 12 training steps: the last window logged llc/short_run = 1
    # The output_dir's own trainer_state.json (save_state) also holds the run's mean `train_loss`,
    # once at its last step: the logged loss is still the one drawn.
    trainer.save_state()
    run = read_log(str(tmp_path))
    assert run.kind == "trainer_state" and run.loss[0] == [4, 8, 12] and run.short_run
    same(run.history, cb.monitor.history())
    assert main(["plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "llc.png").is_file() and "4 windows, 2 groups, from trainer_state" in out
    assert "A short run for its chains (llc/short_run)" in out


def test_group_estimates_are_logged_once_between_shadow_steps(tmp_path):
    heads = attention_heads(gpt2().transformer.h[0].attn, "transformer.h.0.attn")
    cb = OnlineLLCTrainerCallback(groups=heads, group_budget=1, **{**FAST, "every_n_steps": 2})
    trainer = train(tmp_path, cb, max_steps=24)
    for name in heads:  # 12 shadow steps, one group each, round-robin: two windows of 3 per head
        rows = [r for r in trainer.state.log_history if f"llc/{name}/mean" in r]
        group = cb.monitor.group_history(name)
        assert len(group) == 2
        # Each filtered window once (a warm-up window logs no mean), never again in between.
        assert rows and [r[f"llc/{name}/mean"] for r in rows] == [e.mean for e in group if e.filtered]
        # Every window logs its status and raw mean; a filtered one its band too.
        closed = [r for r in trainer.state.log_history if f"llc/{name}/status" in r]
        assert [STATUSES[int(r[f"llc/{name}/status"])] for r in closed] == [e.status for e in group]
        assert [r[f"llc/{name}/raw_mean"] for r in closed] == [e.raw_mean for e in group]
        assert [(r[f"llc/{name}/lower"], r[f"llc/{name}/upper"]) for r in rows] == [
            (e.lower, e.upper) for e in group if e.filtered
        ]
        # group_estimates() holds estimates only: the latest filtered window.
        assert cb.monitor.group_estimates()[name] is next(e for e in reversed(group) if e.filtered)


def test_the_latest_estimate_shows_in_the_progress_line(tmp_path):
    """As Lightning's ``prog_bar=True`` shows ``llc``: after each closed window the Trainer's
    progress bar carries the estimate and its std (a warm-up window its status)."""

    class Probe(TrainerCallback):
        def __init__(self):
            self.seen = {}

        def on_step_end(self, args, state, control, **kwargs):
            bars = [c.training_bar for c in trainer.callback_handler.callbacks if type(c).__name__ == "ProgressCallback"]
            self.seen[state.global_step] = bars[0].postfix

    cb, probe = OnlineLLCTrainerCallback(**FAST), Probe()
    kw = dict(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=BATCH, use_cpu=True, report_to=[],
              save_strategy="no", disable_tqdm=False, seed=0)
    trainer = Trainer(model=gpt2(), args=TrainingArguments(**kw), train_dataset=TokenDataset())
    cb.attach(trainer)
    trainer.add_callback(probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    want = {e.step: f"llc {e.mean:.4g} ± {e.std:.2g}" if e.filtered else f"llc {e.status}" for e in cb.monitor.history()}
    assert want[3] == "llc warming_up" and len(want) == 4
    assert {step: probe.seen[step] for step in want} == want


def test_without_attach_it_warns_and_logs_to_the_state_only(tmp_path):
    cb = OnlineLLCTrainerCallback(**FAST)
    kw = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=BATCH, use_cpu=True, report_to=[],
              save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=gpt2(), args=TrainingArguments(**kw), train_dataset=TokenDataset(), callbacks=[cb])
    with pytest.warns(RuntimeWarning, match=r"not attached to its Trainer.*Call callback\.attach\(trainer\)"):
        trainer.train()
    filtered = [e.step for e in cb.monitor.history() if e.filtered]
    assert filtered and [r["step"] for r in trainer.state.log_history if "llc/mean" in r] == filtered
    assert [r["step"] for r in trainer.state.log_history if "llc/raw_mean" in r] == [3, 6]


# ---- non-interference --------------------------------------------------------------------------------


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    """Same seed, shuffled data, dropout on: weights, optimizer state, logged losses and the
    global RNG afterwards are bit-identical; the callback really ran (12 shadow steps)."""
    runs = []
    for cb in (None, OnlineLLCTrainerCallback(**FAST)):
        trainer = train(tmp_path / ("with" if cb else "without"), cb)
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        opt = {k: v.clone() for s in trainer.optimizer.state.values() for k, v in s.items() if torch.is_tensor(v)}
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        runs.append((params, opt, losses, torch.get_rng_state()))
        if cb is not None:
            assert cb.monitor.shadow_steps == 12 and len(cb.monitor.history()) == 4
            assert cb._hook is None  # removed at on_train_end
    (p0, o0, l0, r0), (p1, o1, l1, r1) = runs
    assert p0.keys() == p1.keys() and all(torch.equal(p0[n], p1[n]) for n in p0)
    assert o0.keys() == o1.keys() and all(torch.equal(o0[k], o1[k]) for k in o0)
    assert l0 == l1 and torch.equal(r0, r1)


# ---- checkpoints -------------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_a_trainer_checkpoint_continues_the_history_exactly(tmp_path):
    """14 steps straight against 7 steps, a Trainer checkpoint (mid-window: windows close every
    3 steps), and a resumed run of the other 7. The Trainer restores weights, optimizer, data
    order and RNG exactly, and the callback its chains, generators, half-filled window and filter:
    the resumed history is the straight one, entry for entry."""
    straight = OnlineLLCTrainerCallback(**FAST)
    train(tmp_path / "straight", straight, max_steps=14)
    first = OnlineLLCTrainerCallback(**FAST)
    train(tmp_path / "split", first, max_steps=14, save_strategy="steps", save_steps=7, extra=[StopAt(7)])
    saved = tmp_path / "split" / "checkpoint-7" / "online_llc.rank0.pt"
    assert saved.is_file() and len(first.monitor.history()) == 2
    resumed = OnlineLLCTrainerCallback(**FAST)
    train(tmp_path / "split", resumed, max_steps=14, resume=True)
    assert resumed.monitor.step == 14 and resumed.monitor.shadow_steps == 14
    assert history(resumed) == history(straight) and len(history(straight)) == 4
    # A checkpoint outside output_dir: found through restore_from; without it the estimate
    # restarts, and says so.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "split" / "checkpoint-7", elsewhere)
    moved = OnlineLLCTrainerCallback(**FAST).restore_from(elsewhere)
    train(tmp_path / "other", moved, max_steps=14, resume=str(elsewhere))
    assert history(moved) == history(straight)
    fresh = OnlineLLCTrainerCallback(**FAST)
    with pytest.warns(RuntimeWarning, match=r"no monitor state .*other.checkpoint-7.online_llc\.rank0\.pt.* starts afresh at step 7"):
        train(tmp_path / "other", fresh, max_steps=14, resume=str(elsewhere), catch=False)
    assert fresh.monitor.shadow_steps == 7 and fresh.monitor.step == 14


def test_a_resume_that_cannot_restore_starts_a_fresh_monitor(tmp_path):
    """What a checkpoint's monitor state cannot give goes through the failure policy instead of
    killing training or the monitor: a corrupt file, one of another format, one that does not load into this monitor
    (taken with other settings: 2 chains against 1) and one whose monitor had failed each start a
    fresh monitor with one warning that says why (strict: a MonitorError, except for a saved
    failure, which belongs to the run that failed), and the resumed run estimates again."""
    base = tmp_path / "base"
    train(base, OnlineLLCTrainerCallback(**FAST), max_steps=8, save_strategy="steps", save_steps=4, extra=[StopAt(4)])
    state = base / "checkpoint-4" / "online_llc.rank0.pt"

    def resume(name, change, expect, **options):
        out = tmp_path / name
        shutil.copytree(base, out)
        change(out / "checkpoint-4" / "online_llc.rank0.pt")
        cb = OnlineLLCTrainerCallback(**{**FAST, **options})
        with pytest.warns(RuntimeWarning, match=expect):
            train(out, cb, max_steps=8, resume=True, catch=False)
        assert cb.failure is None and cb.monitor.shadow_steps == 4 and len(cb.monitor.history()) == 1
        return out

    corrupt = lambda path: path.write_bytes(b"not a checkpoint")
    resume("corrupt", corrupt, r"found an unreadable monitor state .*rank0\.pt.*starts afresh at step 4")
    resume("format", lambda path: torch.save({**torch.load(path, weights_only=True), "format": 99}, path),
           r"found .*rank0\.pt', which is not a monitor state of format 1: the LLC estimate starts afresh at step 4")
    resume("other", lambda path: None, r"which does not load into this monitor \(ValueError: .*starts afresh at step 4",
           num_chains=2)

    def failed(path):
        saved = torch.load(path, weights_only=True)
        torch.save({**saved, "failure": "RuntimeError('boom') at step 3"}, path)

    resume("failed", failed, r"the monitor saved in .*checkpoint-4.* had failed \(RuntimeError\('boom'\) at step 3\)")
    out = tmp_path / "strict"
    shutil.copytree(base, out)
    corrupt(out / "checkpoint-4" / "online_llc.rank0.pt")
    with pytest.raises(MonitorError, match=r"unreadable monitor state"):
        train(out, OnlineLLCTrainerCallback(strict=True, **FAST), max_steps=8, resume=True, catch=False)
    assert state.is_file()


def test_state_file_loads_with_weights_only_and_names_its_version(tmp_path):
    cb = OnlineLLCTrainerCallback(**FAST)
    train(tmp_path, cb, max_steps=4, save_strategy="steps", save_steps=4)
    state = torch.load(tmp_path / "checkpoint-4" / "online_llc.rank0.pt", weights_only=True)
    assert state["format"] == 1 and state["step"] == 4 and state["failure"] is None
    other = OnlineLLC(gpt2(), causal_lm_loss, num_samples=NUM_SAMPLES, total_steps=4, **FAST)
    assert state["rank"] == 0 and state["world_size"] == 1
    other.load_state_dict({k: v for k, v in state.items() if k not in ("format", "failure", "rank", "world_size")})
    assert [e.mean for e in other.history()] == [e.mean for e in cb.monitor.history()]


# ---- gradient accumulation -----------------------------------------------------------------------------


class RecordingTrainer(Trainer):
    micro_batches: List[torch.Tensor]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, num_items_in_batch)


def test_gradient_accumulation_one_shadow_step_per_optimizer_step(tmp_path):
    """4 micro-batches per optimizer step, 6 optimizer steps: 24 training forwards, 6 shadow
    steps, each on the last micro-batch of its optimizer step."""
    seen: List[tuple] = []

    def loss_fn(model, batch):
        seen.append((cb.monitor.step, batch["input_ids"]))
        return causal_lm_loss(model, batch)

    cb = OnlineLLCTrainerCallback(loss_fn, **FAST)
    RecordingTrainer.micro_batches = []
    train(tmp_path, cb, max_steps=6, gradient_accumulation_steps=4, per_device_train_batch_size=4,
          trainer_cls=RecordingTrainer)
    micro = RecordingTrainer.micro_batches
    assert len(micro) == 24
    assert cb.monitor.step == 6 and cb.monitor.shadow_steps == 6 and len(cb.monitor.history()) == 2
    for step in range(1, 7):
        # Both windows are plain (the first, and one after a warm-up window, measure no heat):
        # each shadow step scores the whole batch at the centre and at the moved weights; the
        # first update also checks the loss's shape once, on the whole batch.
        calls = [ids for s, ids in seen if s == step]
        assert len(calls) == (3 if step == 1 else 2)
        if step == 1:
            assert torch.equal(calls[0], micro[3])
        assert torch.equal(calls[-2], micro[4 * step - 1]) and torch.equal(calls[-1], micro[4 * step - 1])


# ---- options ---------------------------------------------------------------------------------------------


def test_total_steps_comes_from_the_trainer_when_the_monitor_has_it(tmp_path, monkeypatch):
    """When ``MonitorSettings`` has ``total_steps`` and the user left it out, the monitor gets
    the Trainer's ``max_steps``; a value given is kept. (Simulated while the option is absent.)"""
    received: List[Dict[str, Any]] = []
    real = OnlineLLC
    has_it = "total_steps" in MonitorSettings.names()

    def recording(model, loss_fn, **kw):
        received.append(dict(kw))
        if not has_it:
            kw.pop("total_steps", None)
        return real(model, loss_fn, **kw)

    monkeypatch.setattr(hf, "OnlineLLC", recording)
    if not has_it:
        monkeypatch.setattr(MonitorSettings, "names", classmethod(lambda cls: tuple(f for f in ("total_steps",)) + tuple(
            f.name for f in __import__("dataclasses").fields(cls))))
    train(tmp_path, OnlineLLCTrainerCallback(**FAST), max_steps=5)
    assert received[-1]["total_steps"] == 5
    if has_it:
        train(tmp_path, OnlineLLCTrainerCallback(total_steps=100, **FAST), max_steps=5)
        assert received[-1]["total_steps"] == 100


def test_num_samples_defaults_to_the_dataset_length(tmp_path):
    cb = OnlineLLCTrainerCallback(**FAST)
    train(tmp_path, cb, max_steps=2)
    assert cb.monitor.num_samples == NUM_SAMPLES
    given = OnlineLLCTrainerCallback(num_samples=1000, **FAST)
    train(tmp_path, given, max_steps=2)
    assert given.monitor.num_samples == 1000


@pytest.mark.parametrize(
    "args, kwargs, exc, message",
    [
        ((), {"bogus": 1}, TypeError, r"OnlineLLCTrainerCallback\(\) got unexpected keyword argument\(s\): `bogus`\."),
        ((), {"every_n_steps": 0}, ValueError, r"Expected `every_n_steps` to be a positive int or 'auto', got 0\."),
        ((3,), {}, TypeError, r"Expected `loss_fn` to be callable"),
        ((), {"task": "translation"}, ValueError, r"Expected `task` to be one of 'auto', 'causal_lm', 'sequence_classification', got 'translation'\."),
        ((), {"name": "a/b"}, ValueError, r"Expected `name` to be a non-empty file stem"),
    ],
)
def test_bad_arguments_fail_at_construction(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        OnlineLLCTrainerCallback(*args, **kwargs)


def test_attach_needs_a_trainer_and_adds_the_callback_once(tmp_path):
    with pytest.raises(TypeError, match=r"Expected `trainer` to be a transformers\.Trainer, got int\."):
        OnlineLLCTrainerCallback().attach(3)
    cb = OnlineLLCTrainerCallback()
    trainer = Trainer(model=gpt2(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                      callbacks=[cb])
    assert cb.attach(trainer) is cb and cb.attach(trainer) is cb
    assert sum(c is cb for c in trainer.callback_handler.callbacks) == 1 and cb.trainer is trainer


# ---- failures ----------------------------------------------------------------------------------------------


def broken_loss(model, batch):
    raise RuntimeError("boom")


def test_a_failing_monitor_warns_once_and_training_continues(tmp_path):
    cb = OnlineLLCTrainerCallback(broken_loss, **FAST)
    kw = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=BATCH, use_cpu=True, report_to=[],
              save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=gpt2(), args=TrainingArguments(**kw), train_dataset=TokenDataset())
    cb.attach(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    mine = [w for w in caught if "OnlineLLCTrainerCallback disabled itself" in str(w.message)]
    assert len(mine) == 1 and "RuntimeError: boom" in str(mine[0].message)
    assert cb.failure == "step 1: RuntimeError: boom" and trainer.state.global_step == 6


def test_a_failing_monitor_raises_when_strict(tmp_path):
    with pytest.raises(MonitorError, match=r"OnlineLLCTrainerCallback failed at step 1: RuntimeError\('boom'\)"):
        train(tmp_path, OnlineLLCTrainerCallback(broken_loss, strict=True, **FAST), max_steps=3)


def test_unknown_task_needs_a_loss(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2Model(config())
    cb = OnlineLLCTrainerCallback(**FAST)
    with pytest.raises(ValueError, match=r"Expected `loss_fn` or `task` to be given: the task of a GPT2Model"):
        cb.on_train_begin(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                          transformers.TrainerState(), transformers.TrainerControl(), model=model)


# ---- default losses ----------------------------------------------------------------------------------------


def test_causal_lm_loss_is_the_models_own_per_sequence():
    model = gpt2().eval()
    batch = {k: torch.stack([TokenDataset()[i][k] for i in range(6)]) for k in ("input_ids", "attention_mask", "labels")}
    per_seq = causal_lm_loss(model, batch)
    assert per_seq.shape == (6,)
    with torch.no_grad():
        for i in range(6):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            assert per_seq[i].item() == pytest.approx(model(**one).loss.item(), rel=1e-5)
        # Full sequences (no padding): the batch mean is the model's token mean.
        full = {k: v[[1, 2, 4, 5]] for k, v in batch.items()}
        assert causal_lm_loss(model, full).mean().item() == pytest.approx(model(**full).loss.item(), rel=1e-5)
    # Without labels the targets are the input ids, padding ignored.
    unlabeled = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert torch.allclose(causal_lm_loss(model, unlabeled), per_seq)


def test_sequence_classification_loss_is_the_per_example_cross_entropy():
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config(num_labels=3)).eval()
    ids = torch.randint(1, VOCAB, (5, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1, 0])
    losses = sequence_classification_loss(model, {"input_ids": ids, "labels": labels})
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.allclose(losses, F.cross_entropy(logits, labels, reduction="none"))
        assert losses.mean().item() == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"Expected the batch to hold `labels`"):
        sequence_classification_loss(model, {"input_ids": ids})
    with pytest.raises(ValueError, match=r"Expected sequence_classification_loss's batch to be a mapping with `input_ids`"):
        sequence_classification_loss(model, (ids, labels))


def test_sequence_classification_loss_on_a_language_model_says_which_task_to_pass():
    """task="sequence_classification" on a causal LM used to fail inside cross-entropy ("Expected
    target size [16, 128], got [16, 32]"); it now says, in one line, what the logits are and what
    to pass."""
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"logits of shape \[batch, num_labels\], got \[4, 9, \d+\] .*task='causal_lm'") as exc:
        sequence_classification_loss(gpt2(), {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])})
    assert "\n" not in str(exc.value)


def test_sequence_classification_trains_with_the_default_loss(tmp_path):
    class Labeled(TokenDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {"input_ids": item["input_ids"], "attention_mask": item["attention_mask"], "labels": int(item["input_ids"][0]) % 3}

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config(num_labels=3))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=BATCH, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Labeled())
    cb = OnlineLLCTrainerCallback(**FAST).attach(trainer)
    trainer.train()
    assert cb.failure is None and len(cb.monitor.history()) == 2
    assert cb.monitor.evaluator.loss_fn is sequence_classification_loss


# ---- DDP ---------------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    import torch
    warnings.simplefilter("ignore")
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_hf import FAST, StopAt, TokenDataset, gpt2
    from transformers import Trainer, TrainingArguments
    from online_llc.callbacks.hf import OnlineLLCTrainerCallback

    torch.set_num_threads(1)
    root = sys.argv[1]

    def run(out, resume=None, stop=None, save_steps=None):
        args = TrainingArguments(output_dir=os.path.join(root, out), max_steps=8, per_device_train_batch_size=4,
                                 use_cpu=True, report_to=[], save_strategy="steps" if save_steps else "no",
                                 save_steps=save_steps or 500, disable_tqdm=True, seed=0)
        trainer = Trainer(model=gpt2(), args=args, train_dataset=TokenDataset(),
                          callbacks=[StopAt(stop)] if stop else [])
        cb = OnlineLLCTrainerCallback(**FAST).attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, cb

    trainer, straight = run("straight")
    _, first = run("split", stop=4, save_steps=4)
    _, resumed = run("split", resume=True)
    rank = torch.distributed.get_rank()
    run("fallback", stop=4, save_steps=4)
    torch.distributed.barrier()
    if rank == 0:  # rank 1's file goes missing: every rank must resume from rank 0's
        os.remove(os.path.join(root, "fallback", "checkpoint-4", "online_llc.rank1.pt"))
    torch.distributed.barrier()
    _, fallback = run("fallback", resume=True)
    # Rank 1's file corrupt: read as missing (no rank raises before the agreement). Rank 1's
    # monitor had failed: every rank starts afresh together.
    for name in ("corrupt", "failed"):
        run(name, stop=4, save_steps=4)
        torch.distributed.barrier()
        path = os.path.join(root, name, "checkpoint-4", "online_llc.rank1.pt")
        if rank == 1 and name == "corrupt":
            with open(path, "wb") as f:
                f.write(b"not a checkpoint")
        if rank == 1 and name == "failed":
            torch.save({**torch.load(path, weights_only=True), "failure": "RuntimeError('boom')"}, path)
        torch.distributed.barrier()
    _, corrupt = run("corrupt", resume=True)
    _, failed = run("failed", resume=True)
    hist = lambda cb: [[e.step, e.mean, e.std, e.status] for e in cb.monitor.history()]
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump({"world": straight._world_size, "history": hist(straight), "resumed": hist(resumed),
                   "fallback": hist(fallback), "corrupt": hist(corrupt), "failed": hist(failed),
                   "failed_shadow_steps": failed.monitor.shadow_steps,
                   "offset0": float(next(iter(straight.monitor.sampler.offsets[0].values())).flatten()[0]),
                   "logged": [r["step"] for r in trainer.state.log_history if "llc/mean" in r],
                   "filtered": [e.step for e in straight.monitor.history() if e.filtered],
                   "windows": [r["step"] for r in trainer.state.log_history if "llc/raw_mean" in r]}, f)
    # A clean shutdown: a process group left to the interpreter's exit can abort a rank
    # ("terminate called without an active exception") after its work is done. The Trainer
    # (through accelerate) keeps its own reference to the group, so destroy_process_group alone
    # does not free it: gloo's worker threads are then torn down during interpreter finalization,
    # which aborts now and then. Every output is written and flushed by here, so the process
    # leaves without finalizing.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
    """
)


@pytest.mark.slow
def test_ddp_two_ranks_share_one_filter(tmp_path):
    """Two CPU processes (gloo) under ``torchrun``: each rank runs its own chain (different
    offsets) on its own batches, every window's draws are gathered, so both ranks hold the same
    history; each rank writes its own state file into the checkpoint, and 4 steps + resume + 4
    steps gives the straight 8 steps' history on both ranks. Without rank 1's file every rank
    resumes from rank 0's state instead."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TEST_DIR": os.path.dirname(__file__), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["history"] == r1["history"] and len(r0["history"]) == 2
    assert r0["offset0"] != r1["offset0"]  # each rank its own chain
    # Every window logs its raw mean; only filtered ones (not the warm-up) log llc/mean.
    assert r0["windows"] == r1["windows"] == [3, 6]
    assert r0["logged"] == r1["logged"] == r0["filtered"] and r0["filtered"]
    for r in (0, 1):
        assert (tmp_path / "split" / "checkpoint-4" / f"online_llc.rank{r}.pt").is_file()
    assert r0["resumed"] == r1["resumed"] == r0["history"]
    # A missing rank file: both ranks resume from rank 0's state (no deadlock), the history up to
    # the checkpoint is kept, and they still agree.
    assert r0["fallback"] == r1["fallback"] and len(r0["fallback"]) == 2
    assert r0["fallback"][0] == r0["history"][0]
    # A corrupt rank file reads as a missing one; a monitor that had failed on rank 1 gives every
    # rank a fresh monitor at the checkpoint's step (4 shadow steps after it, one window), together.
    assert r0["corrupt"] == r1["corrupt"] == r0["fallback"]
    assert r0["failed"] == r1["failed"] and len(r0["failed"]) == 1
    assert r0["failed_shadow_steps"] == r1["failed_shadow_steps"] == 4


def test_placeholders_that_raise_after_a_failure_never_reach_the_trainer():
    """The Trainer callback's twin of the Lightning test: after a failure under DDP, placeholder
    draws that raise give one warning and stop, and nothing reaches the Trainer."""
    import types

    class _Monitor:
        calls = 0

        def skip_step(self, step: int) -> None:
            type(self).calls += 1
            raise RuntimeError("gather failed: peer gone")

    cb = OnlineLLCTrainerCallback(**FAST)
    cb.monitor, cb.failure, cb._world_size = _Monitor(), "step 1: RuntimeError: boom", 2
    with pytest.warns(RuntimeWarning, match="peer gone"):
        cb.on_step_end(None, types.SimpleNamespace(global_step=2), None)
    cb.on_step_end(None, types.SimpleNamespace(global_step=3), None)
    assert _Monitor.calls == 1 and "placeholders stopped at step 2" in cb.failure
