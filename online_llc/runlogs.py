"""Reading a run's LLC estimates back from whatever log it left, for ``online-llc plot``.

Four kinds of log hold them:

* a CSV: one written by :func:`online_llc.plot.write_csv` (a demo's), or Lightning's
  ``metrics.csv`` from ``CSVLogger`` with :class:`online_llc.callbacks.OnlineLLCCallback`;
* a Hugging Face ``trainer_state.json`` (its ``log_history``), or an ``output_dir`` (its own
  ``trainer_state.json``, else the latest ``checkpoint-*``'s);
* a TensorBoard event directory (or one event file), written by Lightning's
  ``TensorBoardLogger`` (``llc/mean``, ...) or the Trainer's integration (``train/llc/mean``).

Every kind is turned into the same rows, ``{"step": ..., "llc/mean": ..., ...}``, and the rows
into :class:`~online_llc.records.LLCEstimate` records: the whole model's (``llc/<key>``) and
each group's (``llc/<group>/<key>``, logged by the callbacks as ``mean``, ``std``, ``lower``,
``upper``, ``status`` and ``raw_mean``). No framework import: TensorBoard's own reader is imported
only for an event directory.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

from online_llc.records import STATUSES, LLCEstimate

__all__ = ["RunLog", "column_series", "read_log"]

# A group's key as the callbacks log it: llc/<group>/<key> (a group's name may hold slashes; the
# probe sets' llc/probe/<set>/<key> are not groups).
_GROUP_KEY = re.compile(r"^llc/(?!probe/)(.+)/(mean|std|lower|upper|status|raw_mean)$")
# The prefixes a framework puts before the keys (the Hugging Face TensorBoard integration's).
_PREFIXES = ("train/",)
# Columns of the training loss, in the order they are looked for.
_LOSS_COLUMNS = ("train_loss", "loss", "train/loss")


@dataclass
class RunLog:
    """A run's estimates as read back from its log.

    Attributes:
        history: the whole model's windows, in step order.
        groups: each group's windows, by group name.
        loss: ``(steps, values)`` of the training loss where the log holds one (else empty).
        title: a name for the run (its file, directory or checkpoint).
        kind: ``"csv"``, ``"trainer_state"`` or ``"tensorboard"``.
        short_run: whether the last logged ``llc/short_run`` was 1: the run was shorter than three
            relaxation times of its chains, so a moving LLC's band is mostly the chain's lag.
    """

    history: List[LLCEstimate]
    groups: Dict[str, List[LLCEstimate]] = field(default_factory=dict)
    loss: Tuple[List[int], List[float]] = field(default_factory=lambda: ([], []))
    title: str = ""
    kind: str = "csv"
    short_run: bool = False


def read_log(path: str, loss_column: str = "train_loss") -> RunLog:
    """Read a run's estimates from ``path``: a CSV, a ``trainer_state.json``, a Hugging Face
    ``output_dir``, or a TensorBoard event directory or file (see the module docstring).

    Args:
        path: the log.
        loss_column: the training loss's column, looked for before the usual names.

    Raises:
        ValueError: no log of a known kind at ``path``, or one without LLC keys, or a value that is
            not a number.
    """
    kind, source = _locate(path)
    if kind == "csv":
        with open(source, newline="") as fh:
            rows: List[Dict[str, Any]] = list(csv.DictReader(fh))
        title = os.path.basename(source)
    elif kind == "trainer_state":
        with open(source) as fh:
            rows = [dict(r) for r in json.load(fh).get("log_history", [])]
        title = os.path.basename(os.path.dirname(os.path.abspath(source))) or source
    else:
        rows = _tensorboard_rows(source)
        title = os.path.basename(os.path.abspath(source))
    rows = [{_strip(k): v for k, v in r.items()} for r in rows]
    history, groups = _estimates(rows, source, "line" if kind == "csv" else "entry")
    flags = column_series(rows, "llc/short_run")[1]
    return RunLog(history, groups, _loss(rows, loss_column), title, kind, short_run=bool(flags) and flags[-1] == 1)


def _locate(path: str) -> Tuple[str, str]:
    """The log's kind and the file (or event directory) to read."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return "trainer_state", os.path.join(path, "trainer_state.json")
        checkpoints = glob.glob(os.path.join(path, "checkpoint-*", "trainer_state.json"))
        if checkpoints:  # the latest checkpoint's state holds the longest log history
            return "trainer_state", max(checkpoints, key=lambda p: int(re.sub(r"\D", "", os.path.basename(os.path.dirname(p))) or 0))
        if glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True):
            return "tensorboard", path
        if os.path.isfile(os.path.join(path, "metrics.csv")):  # a Lightning CSVLogger's version directory
            return "csv", os.path.join(path, "metrics.csv")
        raise ValueError(
            f"{path}: no log found (expected a trainer_state.json, checkpoint-*/trainer_state.json, TensorBoard event "
            "files or a Lightning metrics.csv)."
        )
    if not os.path.isfile(path):
        raise ValueError(f"no such file or directory: {path}")
    if os.path.basename(path).startswith("events.out.tfevents."):
        return "tensorboard", os.path.dirname(os.path.abspath(path))
    if path.endswith(".json"):
        return "trainer_state", path
    return "csv", path


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p + "llc/"):
            return key[len(p):]
    return key


def _tensorboard_rows(directory: str) -> List[Dict[str, Any]]:
    """Every scalar of the event files under ``directory``, as one row per step."""
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError as exc:
        raise ValueError(f"{directory}: reading TensorBoard event files needs tensorboard: pip install tensorboard") from exc
    by_step: Dict[int, Dict[str, Any]] = {}
    for events in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"),
                                                               recursive=True)}):
        acc = event_accumulator.EventAccumulator(events, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for s in acc.Scalars(tag):
                by_step.setdefault(int(s.step), {"step": int(s.step)})[tag] = float(s.value)
    return [by_step[k] for k in sorted(by_step)]


def _num(row: Mapping[str, Any], key: str) -> float:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else math.nan


def _status(value: Any) -> str:
    """A status as logged: its index in :data:`STATUSES` (the callbacks) or its name (our CSV)."""
    if isinstance(value, str) and value in STATUSES:
        return value
    return STATUSES[int(float(value))]


def _estimate(row: Mapping[str, Any], prefix: str) -> LLCEstimate:
    num = lambda k: _num(row, prefix + k)  # noqa: E731
    return LLCEstimate(
        step=int(float(row["step"])), mean=num("mean"), std=num("std"), lower=num("lower"), upper=num("upper"),
        status=_status(row.get(prefix + "status", "tracking")), raw_mean=num("raw_mean"), raw_se=num("raw_se"),
        slope=num("slope"), var_channel=num("var_channel"), ratio=num("ratio"), dispersion=num("dispersion"),
        ess=num("ess"), nis=num("nis"), window_start=int(float(row.get("window_start") or row["step"])),
        shadow_steps=int(float(row.get("shadow_steps") or 0)), divergences=int(float(row.get("divergences") or 0)),
        heat=num("heat"), heat_bias=num("heat_bias"), step_size=num("step_size"),
    )


def _estimates(
    rows: List[Dict[str, Any]], where: str, unit: str
) -> Tuple[List[LLCEstimate], Dict[str, List[LLCEstimate]]]:
    """The whole model's and each group's windows. A window's row is one with a status (the
    callbacks log one at every closed window) or, in our CSV, a mean."""
    keys = {k for r in rows for k in r}
    prefix = "llc/" if "llc/mean" in keys or "llc/status" in keys else "" if "mean" in keys else None
    if prefix is None:
        raise ValueError(f"{where}: no LLC columns (expected `mean` or `llc/mean`).")
    marker = "llc/status" if prefix else "mean"
    names = sorted({m.group(1) for k in keys if (m := _GROUP_KEY.match(k))})
    history: List[LLCEstimate] = []
    groups: Dict[str, List[LLCEstimate]] = {n: [] for n in names}
    for i, row in enumerate(rows, start=2 if unit == "line" else 1):  # a CSV's line 1 is its header
        try:
            if row.get(marker) not in ("", None):
                history.append(_estimate(row, prefix))
            for name in names:
                if row.get(f"llc/{name}/status") not in ("", None) or row.get(f"llc/{name}/mean") not in ("", None):
                    groups[name].append(_estimate(row, f"llc/{name}/"))
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"{where}, {unit} {i}: not a valid LLC row ({exc}).") from None
    return history, {n: g for n, g in groups.items() if g}


def _loss(rows: List[Dict[str, Any]], column: str) -> Tuple[List[int], List[float]]:
    """``(steps, values)`` of the first loss column the rows hold at more than one step, else of
    the first they hold at all: a Trainer's final ``trainer_state.json`` (``save_state``) also
    holds ``train_loss``, the whole run's mean, once at its last step, beside the logged ``loss``."""
    found = [s for s in (column_series(rows, col) for col in (column, *_LOSS_COLUMNS)) if s[0]]
    return next((s for s in found if len(s[0]) > 1), found[0] if found else ([], []))


def column_series(rows: List[Mapping[str, Any]], column: str) -> Tuple[List[int], List[float]]:
    """``(steps, values)`` of ``column`` over the rows that hold it and a step (rows whose value
    or step is not a number are skipped)."""
    steps: List[int] = []
    values: List[float] = []
    for r in rows:
        v, s = r.get(column, ""), r.get("step", "")
        if v in ("", None) or s in ("", None):
            continue
        try:
            step, value = int(float(s)), float(v)
        except (TypeError, ValueError):
            continue
        steps.append(step)
        values.append(value)
    return steps, values
