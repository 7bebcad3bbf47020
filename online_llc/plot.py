"""Plots of LLC estimates (needs the ``demos`` extra: ``pip install online-llc[demos]``).

matplotlib is imported when a function is called, never at ``import online_llc``.
"""

from __future__ import annotations

import csv
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from online_llc.records import STATUSES, LLCEstimate
from online_llc.runlogs import RunLog, column_series, read_log

__all__ = ["plot_llc", "plot_groups", "plot_run", "write_csv", "read_run", "read_loss", "CSV_FIELDS"]

#: The line a plot's title gains for a run shorter than three relaxation times of its chains.
SHORT_RUN_TITLE = "short run: shorter than three relaxation times of the chains, the band is mostly their lag"

#: Columns of the CSV written by :func:`write_csv` (LLCEstimate fields, then extra columns).
CSV_FIELDS = list(LLCEstimate.__dataclass_fields__)

_STATUS_COLORS = {
    "warming_up": "#bbbbbb",
    "tracking": "#1f77b4",
    "transition": "#ff7f0e",
    "not_at_minimum": "#d62728",
    "diverged": "#000000",
}


def write_csv(path: str, history: Sequence[LLCEstimate], extra: Optional[Sequence[Dict[str, Any]]] = None) -> None:
    """Write estimates (and optional extra columns per row, e.g. the training loss) to ``path``."""
    extra = list(extra) if extra is not None else [{} for _ in history]
    if len(extra) != len(history):
        raise ValueError(f"Expected `extra` to have one dict per estimate ({len(history)}), got {len(extra)}.")
    extra_fields: List[str] = []
    for row in extra:
        extra_fields += [k for k in row if k not in extra_fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS + extra_fields)
        writer.writeheader()
        for est, row in zip(history, extra):
            writer.writerow({**est.to_dict(), **row})


def plot_llc(
    history: Sequence[LLCEstimate],
    *,
    ax: Any = None,
    theory: Optional[float] = None,
    theory_label: str = "theory",
    show_raw: bool = True,
    title: Optional[str] = None,
    loss: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
    smoothed: Optional[Sequence[Any]] = None,
) -> Any:
    """Draw the LLC band over training steps.

    The filtered mean is a line with its band (``lower``..``upper``), over the windows the filter
    absorbed (warm-up and diverged windows have no filtered value); window means are dots
    coloured by status; a horizontal line marks a theoretical value. A history read from a
    Lightning ``metrics.csv`` logged before ``llc/raw_mean`` existed has no window means: its
    dots are then the filtered means, drawn as crosses and labelled so. When the values span more than two
    decades or change sign, the y-axis is symmetric-log (linear within ``±linthresh``), so
    negative LLCs at saddles stay visible next to small positive ones.

    Args:
        history: estimates, oldest first.
        ax: a matplotlib Axes (a new figure when ``None``).
        theory: a learning coefficient to draw as a dashed line.
        theory_label: its legend label.
        show_raw: draw the window means (or, without them, the filtered means) as dots by status.
        title: axes title.
        loss: ``(steps, values)`` of a training loss, drawn on a second y-axis (log scale when
            positive and spanning more than a decade).
        smoothed: the retrospective curve (:meth:`online_llc.OnlineLLC.smoothed`), drawn dashed.

    Returns:
        The Axes (the LLC one).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4.5))
    if not history:
        ax.text(0.5, 0.5, "no estimates yet", ha="center", va="center", transform=ax.transAxes)
        return ax
    filtered = [e for e in history if e.filtered and math.isfinite(e.mean)]
    if filtered:
        steps = [e.step for e in filtered]
        ax.fill_between(steps, [e.lower for e in filtered], [e.upper for e in filtered], color="#1f77b4", alpha=0.25,
                        linewidth=0, label="90% band")
        ax.plot(steps, [e.mean for e in filtered], color="#1f77b4", linewidth=1.5, label="online LLC (filtered)")
    if show_raw:
        # Window means; where a history has none (a Lightning CSV logged before llc/raw_mean
        # existed), the filtered means, labelled as such. (A warm-up or diverged window's `mean`
        # is its window mean.)
        groups: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
        for e in history:
            if math.isfinite(e.raw_mean):
                name, value = "window mean", e.raw_mean
            else:
                name, value = ("filtered mean" if e.filtered else "window mean"), e.mean
            if math.isfinite(value):
                groups.setdefault((name, e.status), []).append((e.step, value))
        for name in ("window mean", "filtered mean"):
            for status in STATUSES:
                pts = groups.get((name, status))
                if pts:
                    ax.scatter(*zip(*pts), s=9, color=_STATUS_COLORS[status], zorder=3, label=f"{name}: {status}",
                               marker="o" if name == "window mean" else "x")
    if smoothed:
        ax.plot([p.step for p in smoothed], [p.mean for p in smoothed], color="#2ca02c", linestyle="--",
                linewidth=1.2, label="smoothed (retrospective)")
    if theory is not None:
        ax.axhline(theory, color="k", linestyle="--", linewidth=1, label=f"{theory_label} = {theory:g}")
    # The scale follows the equilibrated windows: a wide warm-up band should not force symlog.
    settled = [e for e in history if e.status != "warming_up"] or list(history)
    values = [v for e in settled for v in (e.lower, e.upper, e.raw_mean) if math.isfinite(v)]
    if theory is not None:
        values.append(theory)
    if not values:
        values = [0.0]
    lo, hi = min(values), max(values)
    positive = [abs(v) for v in values if v != 0]
    if positive and (lo < 0 < hi or max(positive) / max(min(positive), 1e-12) > 100):
        linthresh = max(1.0, 10 ** math.floor(math.log10(max(min(positive), 1e-12))))
        if theory is not None and abs(theory) > 0:
            linthresh = max(1.0, 10 ** math.floor(math.log10(abs(theory))))
        ax.set_yscale("symlog", linthresh=linthresh)
    ax.axhline(0, color="#888888", linewidth=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("LLC")
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    # Transition windows as shaded spans, so stage boundaries stand out at a glance.
    for e in history:
        if e.status == "transition":
            ax.axvspan(e.window_start, e.step, color=_STATUS_COLORS["transition"], alpha=0.12, linewidth=0)
    if loss is not None and len(loss[0]):
        ax2 = ax.twinx()
        ax2.plot(list(loss[0]), list(loss[1]), color="#555555", linewidth=1, alpha=0.8, label="training loss")
        vals = [v for v in loss[1] if math.isfinite(v)]
        if vals and min(vals) > 0 and max(vals) / min(vals) > 10:
            ax2.set_yscale("log")
        ax2.set_ylabel("training loss")
        ax2.legend(loc="lower right", fontsize=8)
    return ax


def read_loss(path: str, column: str = "train_loss") -> Tuple[List[int], List[float]]:
    """``(steps, values)`` of ``column`` in a CSV (ours or Lightning's); empty when absent."""
    with open(path, newline="") as fh:
        return column_series(list(csv.DictReader(fh)), column)


def read_run(path: str) -> List[LLCEstimate]:
    """Read the whole model's estimates back from a CSV written by :func:`write_csv` or by
    Lightning's ``CSVLogger`` with :class:`online_llc.callbacks.OnlineLLCCallback` (columns
    ``llc/mean``, ``llc/std``, ``llc/lower``, ``llc/upper``, ``llc/status``, ``llc/raw_mean``,
    ...), or from any other log :func:`online_llc.runlogs.read_log` reads (a Hugging Face
    ``trainer_state.json`` or ``output_dir``, a TensorBoard event directory). Rows without an
    LLC window (other metrics a logger wrote) are skipped; fields the log lacks are NaN. A
    warm-up or diverged window logged by a callback has a status but no ``llc/mean``: its
    ``mean`` and band are NaN, and ``raw_mean`` is its logged window mean (NaN in files logged
    before ``llc/raw_mean`` existed).

    Raises:
        ValueError: the log has no LLC columns, or a value is not a number.
    """
    return read_log(path).history


def plot_groups(histories: Mapping[str, Sequence[LLCEstimate]], *, ax: Any = None, title: Optional[str] = None) -> Any:
    """Every group's LLC band on one axes (symmetric-log when values change sign or span decades).

    Args:
        histories: group name -> its estimates (``OnlineLLC.group_history(name)``).
        ax: a matplotlib Axes (a new figure when ``None``).
        title: axes title.

    Returns:
        The Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4.5))
    values: List[float] = []
    for i, (name, history) in enumerate(histories.items()):
        color = f"C{i}"
        settled = [e for e in history if e.status != "warming_up"] or list(history)
        if not settled:
            continue
        steps = [e.step for e in settled]
        ax.fill_between(steps, [e.lower for e in settled], [e.upper for e in settled], color=color, alpha=0.2,
                        linewidth=0)
        ax.plot(steps, [e.mean for e in settled], color=color, linewidth=1.5, label=name)
        values += [v for e in settled for v in (e.lower, e.upper) if math.isfinite(v)]
    if values and (min(values) < 0 < max(values)):
        ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="#888888", linewidth=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("weight-refined LLC")
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return ax


def plot_run(run: RunLog, path: str, *, title: Optional[str] = None, theory: Optional[float] = None) -> None:
    """Draw a run read back from its log (:func:`online_llc.runlogs.read_log`) into ``path``: the
    whole model's band over the training loss, and a panel of the groups when the log holds them
    (what ``online-llc plot`` writes). A short run (``run.short_run``) says so under the title.

    Args:
        run: the run.
        path: the image file to write (its extension picks the format).
        title: the title (default: the run's name).
        theory: a learning coefficient to draw as a dashed line.
    """
    import matplotlib.pyplot as plt

    title = title or run.title
    if run.short_run:  # said where the reader looks: the band of a moving LLC is then mostly lag
        title += "\n" + SHORT_RUN_TITLE
    panels = 2 if run.groups else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 4.5 * panels), squeeze=False)
    plot_llc(run.history, ax=axes[0][0], theory=theory, title=title, loss=run.loss)
    if run.groups:
        plot_groups(run.groups, ax=axes[1][0], title=f"{len(run.groups)} groups")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
