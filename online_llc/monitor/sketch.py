"""A copy-free sketch of the training weights: how far they moved between two shadow steps.

Flow: training loop -> **ShadowSampler (weight sketch)** -> warm-up checks (weight jumps) ->
WindowStats -> LLCFilter. The shadow sampler sketches the centre weights at every shadow step and
reports the distance to the previous sketch as ``center_shift``;
:class:`~online_llc.monitor.warmup.WeightJumpDetector` decides from it whether the weights jumped.

Keeping the previous weights would cost a copy of the model. The sketch is every tensor's norm
and a random signed fold of the weights: each group of tensors (:func:`fold_groups`; most small
models are one group), flattened one after another (``w``, ``n`` entries), is folded into
``m = min(1021, n)`` buckets (a CountSketch whose hash is the position modulo ``m``)::

    f_i = sum_b sigma_b w_{b m + i},       sigma_b = +-1 at random, one per block of m entries,

with the signs regenerated from a fixed seed (``n / m`` numbers, never stored on disk). For a
move ``delta`` of the weights, ``E_sigma sum_i (f_i - f'_i)^2 = ||delta||^2``: the fold
estimates the distance without bias whatever the direction of the move (relative spread about
``sqrt(2 / m)``, 4.4%, when the move is spread over many blocks), while the norms alone give only
the lower bound ``| ||w|| - ||w'|| |``, which is 0 for any norm-preserving change (a rotated or
permuted weight matrix, swapped layers). A prime ``m`` spreads the entries of a matrix's row and
of its column over different buckets for any row length that is not a multiple of 1021. The
reported shift is the larger of the two::

    shift = max( sqrt(sum_p (||w_p|| - ||w'_p||)^2),  sqrt(sum_g sum_i (f_gi - f'_gi)^2) ).

Cost per shadow step: one ``_foreach_norm`` call and a few operations per fold, in float32
(float64 where a tensor is float64). The weights are folded in groups (:func:`fold_groups`),
each with its own signs (the cross terms of independent signs vanish in expectation, so the
estimate stays unbiased): a tensor of :data:`ALONE_ENTRIES` entries or more alone, in place, and
runs of smaller tensors joined by one concatenation (a copy of small tensors, at most
:data:`GROUP_ENTRIES` entries, freed before the passes). So the number of operations is bounded
by the model's size, not by its number of tensors: a 36-tensor MLP of 18k parameters folds once.
An earlier version folded every tensor on its own, about ten operations per tensor (22 us each
on a CPU, a fifth of that MLP's shadow step; on a GPU a launch each). The signs are kept
between steps by a :class:`Sketcher` up to :data:`SIGN_CACHE_ENTRIES` of them. There is no host
sync (the shift stays on the device until the sampler reads all its numbers at once). Float32
sums round at ~1e-7 of the weights' norm, ample for a detector that looks for moves ten times
the usual one.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors

from online_llc.errors import check_nonneg_int, check_positive_int

__all__ = [
    "ALONE_ENTRIES", "GROUP_ENTRIES", "SIGN_CACHE_ENTRIES", "SKETCH_VERSION", "Sketcher", "fold_groups", "sign_count", "sketch",
    "sketch_shift", "sketch_shift_sharded",
]

#: Buckets of the fold (fewer for fewer entries); prime, see the module docstring.
BUCKETS = 1021
#: Seed of the signs: fixed, so sketches taken by different runs and processes (a resumed run,
#: every DDP rank) are comparable.
SKETCH_SEED = 0x51_CE7C
#: Bumped whenever the sketch's layout or signs change: a stored sketch of another version is not
#: compared with a new one (version 1 folded each tensor on its own into 61 buckets).
SKETCH_VERSION = 2
#: The most entries of small tensors joined in one group (a copy of at most this many entries,
#: 64 MiB in float32).
GROUP_ENTRIES = 1 << 24
#: Tensors of at least this many entries are folded alone, in place: joining them to others
#: would copy them, which costs more than their fold's few operations.
ALONE_ENTRIES = 1 << 16
#: The most random signs a :class:`Sketcher` keeps between steps (float32, 16 MiB): every
#: group's signs for models of up to about 4G parameters (n / 1021 per group).
SIGN_CACHE_ENTRIES = 1 << 22


def sign_count(n: int) -> int:
    """How many random signs a group of ``n`` entries folds with: one per block of ``m`` entries
    and one for the remainder, ``n // m + 1``."""
    return n // max(min(BUCKETS, n), 1) + 1


def fold_groups(sizes: Sequence[int], group_entries: int = GROUP_ENTRIES) -> List[Tuple[int, int]]:
    """The groups of consecutive tensors folded together, as ``(first, stop)`` index ranges: a
    tensor of :data:`ALONE_ENTRIES` entries or more is a group of its own (folded in place,
    without a copy), and runs of smaller ones are joined while a group stays within
    ``group_entries``. There are at most ``2 P / ALONE_ENTRIES + P / group_entries + 1`` groups
    for ``P`` entries, however many tensors hold them."""
    groups: List[Tuple[int, int]] = []
    start, total = 0, 0
    for i, n in enumerate(sizes):
        if i > start and (n >= ALONE_ENTRIES or sizes[i - 1] >= ALONE_ENTRIES or total + n > group_entries):
            groups.append((start, i))
            start, total = i, 0
        total += n
    if sizes:
        groups.append((start, len(sizes)))
    return groups


def _signs(n: int, index: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """The :func:`sign_count` random signs (float32, +-1) of group ``index`` with ``n`` entries."""
    generator.manual_seed(SKETCH_SEED + index)
    return torch.randint(0, 2, (sign_count(n),), generator=generator, device=device).float().mul_(2).sub_(1)


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors' entries one after another, in float32 at least: a view of a lone contiguous
    tensor, else one concatenation (a single call for tensors of one dtype, which torch's
    ``flatten_dense_tensors`` joins without a Python step per tensor; ``torch.cat`` promotes
    mixed dtypes)."""
    if len(tensors) == 1:
        flat = tensors[0].reshape(-1)
    elif all(t.dtype == tensors[0].dtype for t in tensors):
        flat = _flatten_dense_tensors(list(tensors))
    else:
        flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def _fold(w: Tensor, index: int, generator: torch.Generator, signs: Optional[Tensor] = None) -> Tensor:
    n = w.numel()
    m = min(BUCKETS, n)  # n >= 1: :func:`sketch` folds no empty group
    q, rem = divmod(n, m)
    if signs is None:
        signs = _signs(n, index, generator, w.device)
    if signs.dtype != w.dtype:
        signs = signs.to(w.dtype)
    f = torch.mv(w[: q * m].view(q, m).T, signs[:q])
    if rem:
        f[:rem].add_(w[q * m :] * signs[q])
    return f


def sketch(
    tensors: Sequence[Tensor],
    generator: torch.Generator,
    signs: Optional[Callable[[int, int, torch.device], Optional[Tensor]]] = None,
    group_entries: int = GROUP_ENTRIES,
) -> Tensor:
    """The sketch of ``tensors`` (float64, on their device): their norms, then the folds of their
    groups (:func:`fold_groups`).

    ``generator`` is a scratch generator on the tensors' device (reseeded here for every group,
    so its state does not matter). ``signs(n, index, device)``, when given, returns group
    ``index``'s signs kept from an earlier call, or None to have them drawn (:class:`Sketcher`)."""
    # Under no_grad no result keeps a graph: the tensors need no detaching.
    with torch.no_grad():
        # Each norm in float32 at least (a bfloat16 norm rounds at 1e-3), float64 for float64
        # tensors (a fixed float32 would be a narrowing, which torch refuses).
        # One foreach call for the float32 tensors (most models'), one norm per tensor otherwise.
        if all(t.dtype == torch.float32 for t in tensors):
            norms = torch.stack(torch._foreach_norm(list(tensors)))
        else:
            norms = torch.stack(
                [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)).double() for t in tensors]
            )
        folds = []
        for g, (a, b) in enumerate(fold_groups([t.numel() for t in tensors], group_entries)):
            w = _flat(tensors[a:b])
            if w.numel():
                folds.append(_fold(w, g, generator, None if signs is None else signs(w.numel(), g, w.device)))
        # One cast to float64 for all of it (a float32 fold is exact to its rounding).
        return torch.cat([norms.to(folds[0].dtype) if folds else norms] + folds).double()


class Sketcher:
    """:func:`sketch` with the random signs kept between calls (the same sketch, fewer
    operations), up to ``max_cached`` signs in all; groups past that budget have theirs
    regenerated at every call.

    Args:
        device: where the tensors to sketch live (the scratch generator's device).
        max_cached: the most signs kept (an int >= 0; default :data:`SIGN_CACHE_ENTRIES`; 0 keeps
            none).
        group_entries: the most entries folded in one group (an int >= 1; default
            :data:`GROUP_ENTRIES`).

    Raises:
        ValueError: naming ``max_cached`` or ``group_entries``, for a value outside its range.
    """

    def __init__(self, device: torch.device, max_cached: int = SIGN_CACHE_ENTRIES, group_entries: int = GROUP_ENTRIES) -> None:
        self.max_cached = check_nonneg_int("max_cached", max_cached)
        self.group_entries = check_positive_int("group_entries", group_entries)
        self.generator = torch.Generator(device=device)
        self._signs: Dict[Tuple[int, int], Tensor] = {}
        self._kept = 0

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        """The sketch of ``tensors``, equal to ``sketch(tensors, generator, group_entries=...)``."""
        return sketch(tensors, self.generator, self._cached_signs, self.group_entries)

    def _cached_signs(self, n: int, index: int, device: torch.device) -> Optional[Tensor]:
        key = (index, n)
        signs = self._signs.get(key)
        if signs is None and self._kept + sign_count(n) <= self.max_cached:
            signs = self._signs[key] = _signs(n, index, self.generator, device)
            self._kept += signs.numel()
        return signs if signs is not None and signs.device == device else None


def sketch_shift(new: Tensor, old: Tensor, num_tensors: int) -> Tensor:
    """How far the weights moved between the sketches ``old`` and ``new`` of ``num_tensors``
    tensors (see the module docstring), a 0-dim float64 tensor on their device."""
    diff = new - old
    bound = torch.linalg.vector_norm(diff[:num_tensors])
    estimate = torch.linalg.vector_norm(diff[num_tensors:])
    return torch.maximum(bound, estimate)


def sketch_shift_sharded(new: Tensor, old: Tensor, num_tensors: int, all_reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
    """:func:`sketch_shift` of sharded tensors, from each rank's sketch of its shards: the squared
    bound and squared estimate are sums over shards (each shard's norm change bounds its move from
    below, and each rank's fold is unbiased for its shards' squared move), so they are summed over
    the ranks (``all_reduce_sum``) before the square roots."""
    diff = new - old
    squares = torch.stack([diff[:num_tensors].square().sum(), diff[num_tensors:].square().sum()])
    return all_reduce_sum(squares).max().sqrt()
