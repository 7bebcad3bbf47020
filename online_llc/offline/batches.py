"""What :func:`online_llc.estimate_llc` needs to know of its ``batches``: an endless stream of them
(a re-iterable is cycled, a DataLoader reshuffling on each pass), and how many samples one holds."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator

import torch

from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.halves import split_halves

__all__ = ["batches_forever", "batch_size_of"]


def batches_forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Cycle through a re-iterable (a DataLoader reshuffles on each pass)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("Expected `batches` to yield at least one batch, got an empty iterable.")


def batch_size_of(evaluator: LossEvaluator, center: Dict[str, torch.Tensor], batch: Any) -> int:
    """Samples in ``batch``: the leading size of its tensors, or the length of its per-sample losses."""
    parts = split_halves(batch)
    if parts is not None:
        return parts[2]
    with torch.no_grad(), evaluator.mode_context():
        return int(evaluator.losses(center, batch).numel())
