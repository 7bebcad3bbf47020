"""What the Hugging Face callback shows through the Trainer's own integrations, found among the
Trainer's callbacks by class name (no framework import): the bands as TensorBoard charts, and
the latest estimate in the progress line."""

from __future__ import annotations

import math
from typing import Any, Iterable

from online_llc.callbacks._metrics import band_layout
from online_llc.records import LLCEstimate

__all__ = ["add_band_layout", "show_in_progress_line"]


def add_band_layout(callbacks: Iterable[Any], groups: Iterable[str]) -> bool:
    """Write the bands' Margin charts (:func:`~online_llc.callbacks._metrics.band_layout`, keys
    as the integration names them, ``train/llc/...``) into the TensorBoard integration's writer;
    whether one was there (it exists on the main process once that integration's run began)."""
    written = False
    for c in callbacks:
        if type(c).__name__ == "TensorBoardCallback" and getattr(c, "tb_writer", None) is not None:
            c.tb_writer.add_custom_scalars(band_layout(list(groups), prefix="train/"))
            written = True
    return written


def show_in_progress_line(callbacks: Iterable[Any], est: LLCEstimate) -> None:
    """The latest estimate beside the Trainer's progress bar (``llc 12.3 ± 0.8``, as Lightning's
    ``prog_bar=True`` shows ``llc``); a window that is no estimate (warm-up) shows its status."""
    text = f"llc {est.mean:.4g} ± {est.std:.2g}" if est.filtered and math.isfinite(est.mean) else f"llc {est.status}"
    for c in callbacks:
        bar = getattr(c, "training_bar", None) if type(c).__name__ == "ProgressCallback" else None
        if bar is not None:
            bar.set_postfix_str(text, refresh=False)
