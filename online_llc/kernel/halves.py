"""Half batches: the kernel takes the gradient of each half of a batch, and their difference
measures the minibatch gradient noise (:mod:`online_llc.calibration.heat`). :func:`split_halves` cuts a batch
of any nesting (tensors in tuples, lists, namedtuples, mappings) along its sample dimension."""

from __future__ import annotations

from collections.abc import Mapping as _Mapping
from typing import Any, Callable, Optional, Tuple

from torch import Tensor

__all__ = ["split_halves"]


def _leading_sizes(batch: Any, out: set) -> bool:
    """Collect the leading sizes of the tensors in ``batch``; False if one cannot be split."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            return False
        out.add(int(batch.shape[0]))
        return True
    if isinstance(batch, _Mapping):
        return all(_leading_sizes(v, out) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return all(_leading_sizes(v, out) for v in batch)
    return True  # other leaves (None, numbers, strings) are shared by both halves


def _map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (through tuples, lists, namedtuples and
    mappings); other leaves are kept as they are."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, _Mapping):
        parts = {k: _map_tensors(v, fn) for k, v in batch.items()}
        try:
            return type(batch)(parts)
        except Exception:  # a mapping type that cannot be rebuilt from a dict: a plain dict
            return parts
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def _take(batch: Any, lo: int, hi: int) -> Any:
    return _map_tensors(batch, lambda t: t[lo:hi])


def split_halves(batch: Any) -> Optional[Tuple[Any, Any, int]]:
    """``(first, second, size)``: samples ``[0, size // 2)`` and ``[size // 2, size)`` of ``batch``.

    A batch splits when every tensor in it (through tuples, lists, namedtuples and mappings) has
    the same leading size ``size >= 2``; other leaves go to both halves. ``None`` otherwise: the
    kernel then takes both half-batch gradients from one pass over the whole batch.
    """
    sizes: set = set()
    if not _leading_sizes(batch, sizes) or len(sizes) != 1:
        return None
    size = sizes.pop()
    if size < 2:
        return None
    half = size // 2
    return _take(batch, 0, half), _take(batch, half, size), size
