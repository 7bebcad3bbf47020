"""The injected noise of one update: one stream of standard normal draws, in chunks.

Flow: training loop -> ShadowSampler -> **kernel (the update's noise)** -> WindowStats -> LLCFilter.
:func:`online_llc.kernel.updates._update` takes each step's noise from a :class:`Noise`: a stream
over the offsets' entries, tensor after tensor, drawn from the chain's generator in chunks
(:func:`noise_chunk`). SGLD adds each chunk to every tensor it covers in one ``_foreach`` call, so
the number of operations does not grow with the number of parameter tensors (on a GPU, two kernels
per chunk instead of one per tensor); RMSProp, SGHMC and sharded chains take each tensor's part of
the same stream, so a sharded chain receives exactly the unsharded chain's numbers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from online_llc.config import SGLDConfig

__all__ = ["MAX_NOISE_CHUNK", "MIN_NOISE_CHUNK", "Noise", "flat_views", "noise_chunk", "noise_std"]


def noise_std(config: SGLDConfig) -> float:
    """The injected noise's standard deviation, ``sqrt(epsilon) * noise_scale``."""
    return math.sqrt(config.step_size) * config.noise_scale


#: Bounds of the entries per draw of a step's noise stream (:func:`noise_chunk`).
MIN_NOISE_CHUNK, MAX_NOISE_CHUNK = 1 << 16, 1 << 24


def noise_chunk(total: int) -> int:
    """Entries per draw of the noise stream of ``total`` entries: a sixteenth of them (so the
    scratch is at most P / 16 and there are at most 16 draws), at least 2^16 (a small model's
    noise in one draw) and at most 2^24 (64 MiB of float32)."""
    return min(max(-(-total // 16), MIN_NOISE_CHUNK), MAX_NOISE_CHUNK)


class Noise:
    """The standard normal draws of one update: one stream over the offsets' entries, tensor after
    tensor in the offset's order (the order is part of a seed's trajectory), drawn from
    ``generator`` in chunks of :func:`noise_chunk` entries (the last one shorter), in the offsets'
    widest dtype. ``None`` without injected noise.

    The stream is served two ways with the same numbers: :meth:`add_to` and :meth:`copy_to` hand
    each chunk to every tensor it covers in one ``_foreach`` call (one draw and one call per
    chunk, however many tensors: on a GPU, two kernels instead of one per tensor), and
    :meth:`__call__` returns one tensor's part, for the updates that work tensor by tensor
    (RMSProp, SGHMC) and for shards. ``scratch`` (a consumed gradient buffer) receives it when
    given and ``reuse`` is set.

    ``layouts`` (sharded parameters, :mod:`online_llc.kernel.fsdp`): one per tensor in the offset's
    order; the stream then covers each tensor's full parameter and the shard is kept, so a sharded
    chain receives exactly the numbers of the unsharded chain with the same generator (one chunk
    and one full tensor of scratch at a time)."""

    def __init__(
        self, config: SGLDConfig, generator: torch.Generator, reuse: bool, like: Sequence[Tensor],
        layouts: Optional[Sequence[Any]] = None,
    ) -> None:
        self.on = noise_std(config) > 0
        self.generator, self.reuse = generator, reuse
        self.layouts, self.calls = layouts, 0
        sizes = [int(torch.Size(l.shape).numel()) for l in layouts] if layouts is not None else [t.numel() for t in like]
        self.total = sum(sizes)
        self.chunk = noise_chunk(self.total)
        self.dtype = torch.float32
        for dtype in {t.dtype for t in like}:  # each dtype once (promote_types is an operation)
            self.dtype = torch.promote_types(self.dtype, dtype)
        self.device = like[0].device if like else torch.device("cpu")
        self._buf: Optional[Tensor] = None
        self._pos = 0
        self._drawn = 0

    def _chunk(self) -> Tensor:
        """The current chunk with entries left, a new one drawn when the last is used up."""
        if self._buf is None or self._pos == self._buf.numel():
            self._buf = None  # freed before the next one is allocated
            size = min(self.chunk, self.total - self._drawn)
            if size <= 0:
                raise RuntimeError("The update asked for more noise than its tensors hold.")
            self._buf = torch.empty(size, dtype=self.dtype, device=self.device).normal_(generator=self.generator)
            self._drawn += size
            self._pos = 0
        return self._buf

    def _take(self, n: int, out: Optional[Tensor] = None) -> Tensor:
        """The stream's next ``n`` entries, flat: a view of the chunk when they lie in one and no
        ``out`` (a flat buffer of ``n`` entries) is given, else copied into ``out`` (new when
        None) chunk by chunk, each chunk freed once used (one chunk alive at a time)."""
        if out is None and self._buf is not None and self._buf.numel() - self._pos >= n:
            view = self._buf[self._pos : self._pos + n]
            self._pos += n
            return view
        if out is None:
            out = torch.empty(n, dtype=self.dtype, device=self.device)
        self._chunkwise([out], lambda d, s: torch._foreach_copy_(d, s))
        return out

    def __call__(self, like: Tensor, scratch: Optional[Tensor]) -> Optional[Tensor]:
        layout = None
        if self.layouts is not None:
            layout = self.layouts[self.calls]
            self.calls += 1
        if not self.on:
            return None
        if layout is not None:
            z = layout.take(self._take(int(torch.Size(layout.shape).numel())).view(layout.shape))
        elif scratch is not None and self.reuse and scratch.is_contiguous() and scratch.dtype == self.dtype:
            return self._take(like.numel(), scratch.view(-1)).view(like.shape)
        else:
            z = self._take(like.numel()).view(like.shape)
        if scratch is not None and self.reuse:
            return scratch.copy_(z)
        return z.to(device=like.device, dtype=like.dtype)

    def fused(self, targets: Sequence[Tensor]) -> bool:
        """Whether :meth:`add_to` and :meth:`copy_to` can serve ``targets`` (whole, contiguous
        tensors of the stream's dtype and device)."""
        return self.layouts is None and all(
            t.is_contiguous() and t.dtype == self.dtype and t.device == self.device for t in targets
        )

    def _chunkwise(self, targets: Sequence[Tensor], apply: Callable[[List[Tensor], List[Tensor]], None]) -> None:
        dst: List[Tensor] = []
        src: List[Tensor] = []
        for t in targets:
            flat, start, n = t.view(-1), 0, t.numel()
            while start < n:
                if self._buf is None or self._pos == self._buf.numel():
                    if dst:
                        apply(dst, src)
                        dst, src = [], []
                buf = self._chunk()
                k = min(n - start, buf.numel() - self._pos)
                dst.append(flat if k == n else flat[start : start + k])
                src.append(buf[self._pos : self._pos + k])
                self._pos += k
                start += k
                del buf  # the next chunk is drawn with this one freed (``src`` is applied first)
        if dst:
            apply(dst, src)

    def add_to(self, targets: Sequence[Tensor], alpha: float) -> None:
        """``t += alpha z`` for every target, chunk by chunk (see :meth:`fused`)."""
        if self.on:
            self._chunkwise(targets, lambda d, s: torch._foreach_add_(d, s, alpha=alpha))

    def copy_to(self, targets: Sequence[Tensor]) -> None:
        """``t <- z`` for every target, chunk by chunk (see :meth:`fused`); zeros without noise.
        Targets that are, in order, the whole of one flat buffer (:func:`flat_views`) receive the
        stream's chunks drawn in place: the same numbers, without a chunk of scratch."""
        if not self.on:
            torch._foreach_zero_(list(targets))
            return
        flat = _whole_buffer(targets)
        if flat is not None and self._drawn == 0 and flat.numel() == self.total:
            for start in range(0, self.total, self.chunk):
                flat[start : start + min(self.chunk, self.total - start)].normal_(generator=self.generator)
            self._drawn = self.total
            return
        self._chunkwise(targets, lambda d, s: torch._foreach_copy_(d, s))


def flat_views(like: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Buffers shaped like ``like``'s tensors, as consecutive views of one flat buffer where they
    share a dtype and device (:meth:`Noise.copy_to` then draws the noise into it in place), else
    one new tensor each."""
    tensors = list(like.values())
    if not tensors or any(t.dtype != tensors[0].dtype or t.device != tensors[0].device for t in tensors):
        return {n: torch.empty_like(t) for n, t in like.items()}
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    out, start = {}, 0
    for n, t in like.items():
        out[n] = flat[start : start + t.numel()].view(t.shape)
        start += t.numel()
    return out


def _whole_buffer(targets: Sequence[Tensor]) -> Optional[Tensor]:
    """The flat buffer that ``targets`` tile in order from its start to its end (views of it, as
    :func:`flat_views` makes them), or None."""
    base = targets[0]._base if targets else None
    if base is None or base.dim() != 1 or not base.is_contiguous():
        return None
    pos = 0
    for t in targets:
        if t._base is not base or not t.is_contiguous() or t.storage_offset() - base.storage_offset() != pos:
            return None
        pos += t.numel()
    return base if pos == base.numel() else None
