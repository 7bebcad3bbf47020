"""A copy-free sketch of the training weights: how far they moved between two shadow steps.

Flow: training loop -> **ShadowSampler (weight sketch)** -> warm-up checks (weight jumps) ->
WindowStats -> LLCFilter. The shadow sampler sketches the centre weights at every shadow step and
reports the distance to the previous sketch as ``center_shift``;
:class:`~online_llc.monitor.warmup.WeightJumpDetector` decides from it whether the weights jumped.

Keeping the previous weights would cost a copy of the model. The sketch of a tensor ``w`` (``n``
entries, flattened) is its norm and a random signed fold of it into ``m = min(61, n)`` buckets (a
CountSketch whose hash is the position modulo ``m``)::

    f_i = sum_b sigma_b w_{b m + i},       sigma_b = +-1 at random, one per block of m entries,

with the signs regenerated at every step from a fixed seed (``n / m`` numbers, never stored). For a
move ``delta`` of the tensor, ``E_sigma sum_i (f_i - f'_i)^2 = ||delta||^2``: the fold estimates the
distance without bias whatever the direction of the move (relative spread about ``sqrt(2 / m)``,
18%, when the move is spread over many blocks), while the norms alone give only the lower bound
``| ||w|| - ||w'|| |``, which is 0 for any norm-preserving change (a rotated or permuted weight
matrix, swapped layers). A prime ``m`` spreads the entries of a matrix's row and of its column over
different buckets for any row length that is not a multiple of 61. The reported shift is the larger
of the two, over all tensors::

    shift = max( sqrt(sum_p (||w_p|| - ||w'_p||)^2),  sqrt(sum_p sum_i (f_pi - f'_pi)^2) ).

Cost per shadow step: one matrix-vector product over each tensor (a read of the weights) and
``n / 61`` random signs (kept between steps by a :class:`Sketcher` up to
:data:`SIGN_CACHE_ENTRIES` of them, regenerated otherwise), one tensor at a time and in float32 (a bfloat16 or float16 tensor is
upcast, one tensor's scratch), with no host sync (the shift stays on the device until the sampler
reads all its numbers at once). Float32 sums round at ~1e-7 of the weights' norm, ample for a
detector that looks for moves ten times the usual one.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from online_llc.errors import check_nonneg_int

__all__ = ["SIGN_CACHE_ENTRIES", "SKETCH_VERSION", "Sketcher", "sketch", "sketch_shift", "sketch_shift_sharded"]

#: Buckets per tensor (fewer for tensors with fewer entries); prime, see the module docstring.
BUCKETS = 61
#: Seed of the signs: fixed, so sketches taken by different runs and processes (a resumed run,
#: every DDP rank) are comparable.
SKETCH_SEED = 0x51_CE7C
#: Bumped whenever the sketch's layout or signs change: a stored sketch of another version is not
#: compared with a new one.
SKETCH_VERSION = 1
#: The most random signs a :class:`Sketcher` keeps between steps (float32, 16 MiB): every tensor's
#: signs for models of up to about 250M parameters (n / 61 per tensor). Regenerating them costs
#: four small operations per tensor per step, about 0.1 ms on a six-tensor MLP (2% of its shadow
#: step), nothing next to a large model's passes, so larger models regenerate them.
SIGN_CACHE_ENTRIES = 1 << 22


def _sign_count(n: int) -> int:
    """How many random signs a tensor of ``n`` entries folds with: one per block of ``m`` entries
    and one for the remainder, ``n // m + 1``."""
    return n // min(BUCKETS, n) + 1


def _signs(n: int, index: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """The :func:`_sign_count` random signs (float32, +-1) of tensor ``index`` with ``n`` entries."""
    generator.manual_seed(SKETCH_SEED + index)
    return torch.randint(0, 2, (_sign_count(n),), generator=generator, device=device).float().mul_(2).sub_(1)


def _fold(t: Tensor, index: int, generator: torch.Generator, signs: Optional[Tensor] = None) -> Tensor:
    w = t.detach().reshape(-1).float()
    n = w.numel()
    m = min(BUCKETS, n)
    q, rem = divmod(n, m)
    if signs is None:
        signs = _signs(n, index, generator, w.device)
    f = torch.mv(w[: q * m].view(q, m).T, signs[:q])
    if rem:
        f[:rem].add_(w[q * m :] * signs[q])
    return f


def sketch(
    tensors: Sequence[Tensor],
    generator: torch.Generator,
    signs: Optional[Callable[[int, int, torch.device], Optional[Tensor]]] = None,
) -> Tensor:
    """The sketch of ``tensors`` (float64, on their device): their norms, then their folds.

    ``generator`` is a scratch generator on the tensors' device (reseeded here for every tensor,
    so its state does not matter). ``signs(n, index, device)``, when given, returns tensor
    ``index``'s signs kept from an earlier call, or None to have them drawn (:class:`Sketcher`)."""
    with torch.no_grad():
        # Each norm in float32 at least (a bfloat16 norm rounds at 1e-3), float64 for float64
        # tensors (a fixed float32 would be a narrowing, which torch refuses).
        # One foreach call for the float32 tensors (most models'), one norm per tensor otherwise.
        if all(t.dtype == torch.float32 for t in tensors):
            norms = torch.stack(torch._foreach_norm([t.detach() for t in tensors])).double()
        else:
            norms = torch.stack(
                [torch.linalg.vector_norm(t.detach(), dtype=torch.promote_types(t.dtype, torch.float32)).double() for t in tensors]
            )
        folds = [
            _fold(t, i, generator, None if signs is None else signs(t.numel(), i, t.device)) for i, t in enumerate(tensors)
        ]
        return torch.cat([norms] + folds).double()


class Sketcher:
    """:func:`sketch` with the random signs kept between calls (the same sketch, fewer
    operations), up to ``max_cached`` signs in all; tensors past that budget have theirs
    regenerated at every call.

    Args:
        device: where the tensors to sketch live (the scratch generator's device).
        max_cached: the most signs kept (an int >= 0; default :data:`SIGN_CACHE_ENTRIES`; 0 keeps
            none).

    Raises:
        ValueError: naming ``max_cached``, for anything but a non-negative int.
    """

    def __init__(self, device: torch.device, max_cached: int = SIGN_CACHE_ENTRIES) -> None:
        self.max_cached = check_nonneg_int("max_cached", max_cached)
        self.generator = torch.Generator(device=device)
        self._signs: Dict[Tuple[int, int], Tensor] = {}
        self._kept = 0

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        """The sketch of ``tensors``, equal to ``sketch(tensors, generator)``."""
        return sketch(tensors, self.generator, self._cached_signs)

    def _cached_signs(self, n: int, index: int, device: torch.device) -> Optional[Tensor]:
        key = (index, n)
        signs = self._signs.get(key)
        if signs is None and self._kept + _sign_count(n) <= self.max_cached:
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
    below, and each shard's folds are unbiased for its squared move), so they are summed over the
    ranks (``all_reduce_sum``) before the square roots."""
    diff = new - old
    squares = torch.stack([diff[:num_tensors].square().sum(), diff[num_tensors:].square().sum()])
    return all_reduce_sum(squares).max().sqrt()
