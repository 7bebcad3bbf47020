"""Induction-head demo: a two-layer attention-only transformer learns to copy a repeated sequence.

Each training sequence is ``L`` random tokens followed by the same ``L`` tokens again. The first
half cannot be predicted (its loss stays at ``log V``); the repeated half can, once the model
forms induction heads (a previous-token head in layer 0 feeding a head in layer 1 that attends
to the token after the current token's earlier occurrence). The repeated-half loss falls sharply
when they form: the classic phase change of in-context learning.

The model: learned token and position embeddings, two causal self-attention layers (separate
``q_proj``/``k_proj``/``v_proj``/``o_proj``, no MLPs, no layer norm), an unembedding. Two
``OnlineLLC`` monitors ride along: one with a group per layer, one with a group per head
(groups must be disjoint, so layers and heads cannot share a monitor; each monitor also runs its
own whole-model chain). The per-sample loss is each sequence's mean token cross-entropy.

The phase change is marked at the step where the repeated-half training loss (averaged over
bins of ``--bin`` steps) falls fastest; its onset and end are where that loss has covered 10%
and 90% of its fall from the plateau (its highest bin after the first 5% of the run) to the
final value.

What it showed (defaults, seed 0): the repeated-half loss falls from 3.56 to 0.10, fastest at
step 2000 (10% of the fall by step 750, 90% by 2300). The whole-model LLC rose with the fall and
levelled off after it (188 at step 750, 619 at 2000, 754 at 2300, 782 at 3000), with no spike or
dip at the fastest fall; both layers' and all eight heads' LLCs rose together (heads 1-2 at step
750, 112-163 at 2300), no head standing apart; layer 1's fell back from 455 to 355 late in the run.

Run:  online-llc demo induction --out out      (about 3 min on 2 cores shared with other jobs)
Writes ``induction.csv`` (one row per whole-model window: the LLC and its band, the latest
per-layer and per-head LLC, the training loss on the first and repeated halves) and
``induction.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from online_llc import OnlineLLC
from online_llc.models.heads import attention_heads
from online_llc.records import FILTERED_STATUSES


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate, bias-free q/k/v/o projections (the layout
    :func:`online_llc.models.heads.attention_heads` splits into heads)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class AttentionOnlyTransformer(nn.Module):
    """Token + learned position embeddings, residual attention layers, unembedding."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, num_heads: int, num_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(seq_len, d_model))
        self.layers = nn.ModuleList([CausalSelfAttention(d_model, num_heads) for _ in range(num_layers)])
        self.unembed = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            h = h + layer(h)
        return self.unembed(h)


def repeated_sequences(n: int, vocab: int, half: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``half`` random tokens followed by the same tokens again."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (n, half), generator=g)
    return torch.cat([prefix, prefix], dim=1)


def token_ce(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, ``[batch, 2L - 1]``: column ``j`` predicts token ``j + 1``."""
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1), reduction="none").view(
        seqs.shape[0], -1
    )


def per_sample_ce(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean token cross-entropy (the monitor's per-sample loss)."""
    return token_ce(model, batch).mean(dim=1)


def half_losses(ce: torch.Tensor, half: int) -> tuple:
    """Mean loss on the first half's targets (tokens 1..L-1) and the repeated half's (L..2L-1)."""
    return float(ce[:, : half - 1].mean()), float(ce[:, half - 1 :].mean())


def phase_change(steps: List[int], rep: List[float], skip: float = 0.05) -> Optional[Dict[str, int]]:
    """The step where the binned repeated-half loss falls fastest, and the onset/end steps where it
    has covered 10% and 90% of its fall from the plateau (its highest value after the first
    ``skip`` of the bins) to the final value; ``None`` when it did not fall by half of that
    plateau (no phase change in the run)."""
    if len(rep) < 4:
        return None
    start = int(skip * len(rep))
    top = max(range(start, len(rep)), key=lambda i: rep[i])
    final = rep[-1]
    drop = rep[top] - final
    if drop < 0.5 * rep[top]:
        return None
    fastest = max(range(top + 1, len(rep)), key=lambda i: rep[i - 1] - rep[i])

    def crossing(frac: float) -> int:
        level = rep[top] - frac * drop
        return steps[next(i for i in range(top, len(rep)) if rep[i] <= level)]

    return {"plateau": steps[top], "onset": crossing(0.1), "step": steps[fastest], "end": crossing(0.9)}


def _filtered(est) -> float:
    return est.mean if est is not None and est.status in FILTERED_STATUSES else math.nan


def main(argv: List[str] | None = None, prog: str | None = None) -> int:
    """Run the demo; ``argv`` are its command-line options (``--help`` lists them)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="folder for the CSV and PNG (default: out)")
    ap.add_argument("--steps", type=int, default=3000, help="training steps (default: 3000)")
    ap.add_argument("--vocab", type=int, default=32, help="vocabulary size V (default: 32)")
    ap.add_argument("--half", type=int, default=12, help="L, the length of the random prefix (default: 12)")
    ap.add_argument("--d-model", type=int, default=32, help="residual width (default: 32)")
    ap.add_argument("--heads", type=int, default=4, help="heads per layer (default: 4)")
    ap.add_argument("--num-sequences", type=int, default=20000, help="training set size n (default: 20000)")
    ap.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    ap.add_argument("--head-budget", type=int, default=4,
                    help="head shadow steps per shadow step, round-robin over the heads (default: 4)")
    ap.add_argument("--warmup", type=int, default=40,
                    help="shadow draws each chain warms up before its windows count (default: 40)")
    ap.add_argument("--bin", type=int, default=50, help="steps per bin of the logged training loss (default: 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    L = args.half
    data = repeated_sequences(args.num_sequences, args.vocab, L, args.seed)
    probe = data[:1024]  # a fixed slice of the training set for the per-window losses
    torch.manual_seed(args.seed)
    model = AttentionOnlyTransformer(args.vocab, 2 * L, args.d_model, args.heads)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n_layers = len(model.layers)
    layer_groups = {f"layer{i}": [f"layers.{i}.*"] for i in range(n_layers)}
    head_groups: Dict[str, list] = {}
    for i, layer in enumerate(model.layers):
        for name, slices in attention_heads(layer, f"layers.{i}").items():
            head_groups[f"L{i}H{name.rsplit('head', 1)[1]}"] = slices
    # "auto" cadence and window sized to the run; a fixed, short warm-up: the weights move all along
    # (the loss never rests), so the data-driven one waits for an equilibrium that comes late.
    common = dict(num_samples=args.num_sequences, total_steps=args.steps, warmup=args.warmup)
    monitor = OnlineLLC(model, per_sample_ce, groups=layer_groups, seed=args.seed, group_budget=n_layers, **common)
    head_monitor = OnlineLLC(model, per_sample_ce, groups=head_groups, seed=args.seed + 1,
                             group_budget=min(args.head_budget, len(head_groups)), **common)
    print(
        f"Sequences of {L} random tokens (V = {args.vocab}) repeated once; {args.num_sequences} training sequences, "
        f"batch {args.batch_size}, Adam lr {args.lr}.\n"
        f"Model: {n_layers} attention-only layers x {args.heads} heads, d_model {args.d_model} "
        f"({sum(p.numel() for p in model.parameters())} parameters).\n"
        f"Monitors: nbeta = {monitor.config.nbeta:.1f}, one shadow step every {monitor.every_n_steps} steps, "
        f"windows of {monitor.window} draws; layers {list(layer_groups)} each at every shadow step, heads "
        f"{list(head_groups)} {head_monitor.group_budget} per shadow step.\n",
        flush=True,
    )

    g = torch.Generator().manual_seed(args.seed + 12345)
    bin_first, bin_rep, bin_steps, acc = [], [], [], []
    rows, estimates = [], []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = data[torch.randint(0, len(data), (args.batch_size,), generator=g)]
        ce = token_ce(model, batch)
        opt.zero_grad()
        ce.mean().backward()
        opt.step()
        acc.append(half_losses(ce.detach(), L))
        if len(acc) == args.bin or step == args.steps:
            bin_steps.append(step)
            bin_first.append(sum(a for a, _ in acc) / len(acc))
            bin_rep.append(sum(b for _, b in acc) / len(acc))
            acc = []
        est = monitor.update(batch, step)
        head_monitor.update(batch, step)
        if est is None:
            continue
        with torch.no_grad():
            first, rep = half_losses(token_ce(model, probe), L)
        row = {"loss_first_half": first, "loss_repeated_half": rep}
        for name, ge in {**monitor.group_estimates(), **head_monitor.group_estimates()}.items():
            row[f"llc_{name}"] = _filtered(ge)
        estimates.append(est)
        rows.append(row)
        layers = "  ".join(f"{n} {row['llc_' + n]:6.1f}" for n in layer_groups)
        print(f"step {step:5d}  loss first half {first:.3f} repeated half {rep:.3f}  LLC {est.mean:6.1f} ± {est.std:4.1f} "
              f"({est.status})  {layers}  ({time.perf_counter() - t0:5.1f}s)", flush=True)
    wall = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    from online_llc.plot import write_csv

    csv_path = os.path.join(args.out, "induction.csv")
    write_csv(csv_path, estimates, rows)

    pc = phase_change(bin_steps, bin_rep)
    print(f"\nTraining took {wall:.0f} s ({args.steps} steps). Repeated-half loss (bins of {args.bin} steps): "
          f"{bin_rep[0]:.3f} at the start, {max(bin_rep):.3f} at most, {bin_rep[-1]:.3f} at the end; first half "
          f"{bin_first[-1]:.3f} at the end (log V = {math.log(args.vocab):.3f}).")
    if pc is None:
        print("No phase change: the repeated-half loss did not fall by half. Try more --steps or a larger --lr.")
    else:
        print(f"Phase change: the repeated-half loss falls fastest at step {pc['step']} "
              f"(10% of its fall by step {pc['onset']}, 90% by step {pc['end']}).")
        histories = {"model": monitor.history(), **{n: monitor.group_history(n) for n in layer_groups},
                     **{n: head_monitor.group_history(n) for n in head_groups}}

        def at(history, when: int) -> str:
            # the last filtered window that closed at or before `when`
            hits = [e for e in history if e.step <= when and e.status in FILTERED_STATUSES]
            return f"{hits[-1].mean:7.1f}" if hits else "      -"

        marks = [(f"10% (step {pc['onset']})", pc["onset"]), (f"fastest ({pc['step']})", pc["step"]),
                 (f"90% ({pc['end']})", pc["end"]), (f"final ({args.steps})", args.steps)]
        print("LLC of the last filtered window closing by each mark ('-': none yet):")
        print(f"{'':8s}" + "".join(f"{label:>18s}" for label, _ in marks))
        for name, history in histories.items():
            print(f"{name:8s}" + "".join(f"{at(history, when):>18s}" for _, when in marks))
    print(f"Wrote {csv_path}")

    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from online_llc.plot import plot_groups, plot_llc

        fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True,
                                 gridspec_kw={"height_ratios": [1, 1.3, 1.1, 1.3]})
        axes[0].plot(bin_steps, bin_first, label="first half (random)")
        axes[0].plot(bin_steps, bin_rep, label="repeated half")
        axes[0].set_ylabel("training loss")
        axes[0].set_title(f"Induction heads: {n_layers}-layer attention-only transformer, live LLC")
        axes[0].legend(loc="center right")
        plot_llc(estimates, ax=axes[1])
        axes[1].set_xlabel("")
        plot_groups({n: monitor.group_history(n) for n in layer_groups}, ax=axes[2], title="per layer")
        axes[2].set_xlabel("")
        plot_groups({n: head_monitor.group_history(n) for n in head_groups}, ax=axes[3], title="per head")
        axes[3].set_xlabel("training step")
        if pc is not None:
            for ax in axes:
                ax.axvspan(pc["onset"], pc["end"], color="#ffcc66", alpha=0.25, linewidth=0)
                ax.axvline(pc["step"], color="#cc6600", linestyle="--", linewidth=1)
            axes[0].text(pc["step"], axes[0].get_ylim()[1], f" phase change (step {pc['step']})", va="top",
                         color="#cc6600", fontsize=8)
        fig.tight_layout()
        png = os.path.join(args.out, "induction.png")
        fig.savefig(png, dpi=110)
        print(f"Wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
