"""What :func:`online_llc.estimate_llc` needs to know of its ``batches``: an endless stream of them
(a re-iterable is cycled, a DataLoader reshuffling on each pass; a one-shot iterator is read as
the stream it is), and how many samples one holds."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator

import torch

from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.halves import split_halves

__all__ = ["batches_forever", "batch_size_of", "is_one_shot"]


def is_one_shot(batches: Iterable[Any]) -> bool:
    """Whether ``batches`` is an iterator (a generator, ``iter(loader)``, ``itertools.cycle``):
    one pass consumes it, so it cannot be cycled or passed over twice."""
    return iter(batches) is batches


def batches_forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Cycle through a re-iterable (a DataLoader reshuffles on each pass); read a one-shot
    iterator once, as the stream it is (an endless one never ends).

    Raises:
        ValueError: ``batches`` yields no batch, or a one-shot iterator runs out.
    """
    one_shot = is_one_shot(batches)
    count = 0
    while True:
        for b in batches:
            count += 1
            yield b
        if count == 0:
            raise ValueError("Expected `batches` to yield at least one batch, got an empty iterable.")
        if one_shot:
            raise ValueError(
                f"Expected `batches` to be re-iterable (a list of batches, a DataLoader) or an endless iterator; got "
                f"a one-shot iterator (a generator?) that ran out after {count} batches, which cannot be cycled. "
                "Pass the DataLoader itself or list(batches)."
            )


def batch_size_of(evaluator: LossEvaluator, center: Dict[str, torch.Tensor], batch: Any) -> int:
    """Samples in ``batch``: the leading size of its tensors, or the length of its per-sample losses."""
    parts = split_halves(batch)
    if parts is not None:
        return parts[2]
    with torch.no_grad(), evaluator.mode_context():
        return int(evaluator.losses(center, batch).numel())
