"""Hugging Face Trainer demo: a tiny GPT-2 learns to copy, and its LLC and per-head LLCs are drawn
where people look (TensorBoard's Custom Scalars tab and ``online-llc plot``).

Each training sequence is ``L`` random tokens followed by the same ``L`` tokens again: the first
half cannot be predicted, the repeated half can once the model learns to copy (induction). The
model is a 2-layer, 2-head GPT-2 built from its config (no download); the
:class:`~online_llc.callbacks.OnlineLLCTrainerCallback` tracks the whole model and each attention
head (``groups_by_head``) at its defaults and reports through ``report_to=["tensorboard"]``.

The demo then reads the run back as a user would:

* ``online-llc plot`` on the ``output_dir`` (its ``trainer_state.json``): ``trainer_gpt2.png``,
  the band with the training loss and a panel of the heads;
* the TensorBoard event file: ``tensorboard_margin.png`` draws the Margin charts of the
  custom-scalars layout the callback wrote (the chart series are read from the layout itself,
  the values from the scalars), as TensorBoard's Custom Scalars tab shows them.

Run:  online-llc demo trainer --out out      (about a minute on 2 cores; needs the ``hf`` extra)
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch

VOCAB, HALF = 48, 12


class CopyTask(torch.utils.data.Dataset):
    """``n`` sequences of ``HALF`` random tokens followed by the same tokens again (seeded)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        first = torch.randint(1, VOCAB, (n, HALF), generator=g)
        self.ids = torch.cat([first, first], dim=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def margin_charts(log_dir: str) -> Dict[str, Tuple[List[int], List[float], List[float], List[float]]]:
    """The Margin charts of the custom-scalars layout in ``log_dir``'s event files, with their
    values: ``{chart title: (steps, value, lower, upper)}``, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts: Dict[str, Tuple[List[int], List[float], List[float], List[float]]] = {}
    for events in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"),
                                                               recursive=True)}):
        acc = event_accumulator.EventAccumulator(events, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        layouts = acc.Tensors("custom_scalars__config__") if "custom_scalars__config__" in acc.Tags()["tensors"] else []
        for event in layouts:
            layout = layout_pb2.Layout()
            layout.ParseFromString(event.tensor_proto.string_val[0])
            for chart in (c for category in layout.category for c in category.chart):
                for s in chart.margin.series:
                    if {s.value, s.lower, s.upper} <= tags:
                        series = [{int(e.step): e.value for e in acc.Scalars(t)} for t in (s.value, s.lower, s.upper)]
                        steps = sorted(set(series[0]) & set(series[1]) & set(series[2]))
                        charts[chart.title] = (steps, *([d[k] for k in steps] for d in series))  # type: ignore[assignment]
    return charts


def draw_margin_charts(log_dir: str, png: str, limit: int = 5) -> int:
    """Draw up to ``limit`` Margin charts of ``log_dir`` side by side into ``png``, in the look of
    TensorBoard's Custom Scalars tab (a line between its lower and upper series); returns how
    many charts the layout held."""
    import matplotlib.pyplot as plt

    charts = margin_charts(log_dir)
    shown = list(charts.items())[:limit]
    if not shown:
        raise ValueError(f"{log_dir}: no custom-scalars Margin chart with logged values")
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (title, (steps, value, lower, upper)) in zip(axes.flat, shown):
        ax.fill_between(steps, lower, upper, color="#ff7043", alpha=0.25, linewidth=0)
        ax.plot(steps, value, color="#ff7043", linewidth=1.4)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(color="#e0e0e0", linewidth=0.6)
        ax.tick_params(labelsize=7)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("TensorBoard Custom Scalars: the LLC bands (Margin charts)", fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return len(charts)


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Run the demo; ``argv`` are its command-line options (``--help`` lists them)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="folder for the Trainer's output_dir and the PNGs (default: out)")
    ap.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bar (a docs build)")
    args = ap.parse_args(argv)
    if args.steps < 20:
        ap.error(f"--steps must be at least 20, got {args.steps}")
    try:
        import tensorboard  # noqa: F401
        from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    except ImportError as exc:
        print(f"online-llc demo trainer: needs the hf extra ({exc.name} is missing): pip install 'online-llc[hf,demos]'",
              file=sys.stderr)
        return 2
    from online_llc.callbacks import OnlineLLCTrainerCallback
    from online_llc.models.heads import groups_by_head

    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=2 * HALF,
                                       bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    run_dir = os.path.join(args.out, "trainer_gpt2")
    training = TrainingArguments(
        output_dir=run_dir, max_steps=args.steps,
        per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=args.steps // 20, weight_decay=0.0,
        logging_steps=10, save_strategy="no", report_to=["tensorboard"], use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=args.quiet,
    )
    trainer = Trainer(model=model, args=training, train_dataset=CopyTask(8192, seed=args.seed))
    llc = OnlineLLCTrainerCallback(groups=groups_by_head(model), seed=args.seed).attach(trainer)
    print(f"Training a 2-layer GPT-2 ({sum(p.numel() for p in model.parameters())} parameters) to copy for "
          f"{args.steps} steps; the LLC of the model and of its 4 heads is logged to TensorBoard ({run_dir}/runs).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    trainer.save_state()  # output_dir/trainer_state.json: the log history online-llc plot reads

    monitor = llc.monitor
    est = monitor.estimate
    if est is not None and est.filtered:
        print(f"Final LLC {est.mean:.1f} (90% band {est.lower:.1f} .. {est.upper:.1f}), status {est.status}")
    heads = monitor.group_estimates()
    print("Per head: " + ", ".join(f"{n.replace('transformer.', '')} {g.mean:.1f}" if g is not None else f"{n} warming up"
                                   for n, g in heads.items()))
    health = monitor.health()
    if health.short_run:
        print(f"A short run for its chains (relaxation {health.relaxation_steps:.0f} shadow steps): the band is mostly lag.")

    import matplotlib

    matplotlib.use("Agg")
    from online_llc.plot import plot_run
    from online_llc.runlogs import read_log

    png = os.path.join(args.out, "trainer_gpt2.png")
    # What `online-llc plot` draws from the output_dir: read back from trainer_state.json.
    plot_run(read_log(run_dir), png, title="Live LLC of a tiny GPT-2 (from trainer_state.json)")
    print(f"Wrote {png} (as online-llc plot {run_dir} draws it)")
    margin = os.path.join(args.out, "tensorboard_margin.png")
    n = draw_margin_charts(os.path.join(run_dir, "runs"), margin)
    print(f"Wrote {margin} ({n} Margin charts in the run's custom-scalars layout; open them live with "
          f"tensorboard --logdir {run_dir}/runs, tab Custom Scalars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
