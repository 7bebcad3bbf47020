"""Probe sets: fixed samples whose losses the chains evaluate at every draw, checked once and
evaluated at any weights (the offline estimator's :mod:`online_llc.offline.probes` and the
monitor's :mod:`online_llc.monitor.probes` share them; :mod:`online_llc.stats.probes` has the
statistics).

Flow: the user's ``probes={name: batch}`` -> **ProbeBatches** -> losses at ``w* + xi`` and at
``w*`` -> their differences ``delta_k`` beside each draw.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from online_llc.errors import describe
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.randomness import cuda_devices
from online_llc.records import ProbeResult
from online_llc.stats.probes import ProbeMoments

__all__ = ["MAX_KERNEL_BYTES", "MAX_PROBES", "ProbeBatches", "check_kernel_size", "check_probe_loss_fn", "kernel_blocks", "probe_results",
           "require_probes"]

#: The most probe samples over all sets: each is one loss per draw and chain.
MAX_PROBES = 1 << 16
#: The most memory the loss kernels' sums may take (float64, every set's ``K x K`` per segment
#: and chain): 1 GiB.
MAX_KERNEL_BYTES = 1 << 30
#: The seed of the probe passes' forked generators.
PROBE_SEED = 20231



class ProbeBatches:
    """Probe sets, checked: names, their batches, their sizes.

    Args:
        probes: ``{name: batch}`` or ``{name: iterable of batches}`` (what ``loss_fn`` takes; a
            tensor, or a tuple, list or dict of tensors, is one batch; a DataLoader is read once,
            in its order).
        evaluator: gives the per-sample losses (``loss_fn``'s).
        loss_fn: the probes' own loss, ``loss_fn(model, batch)`` returning a tensor of any shape
            whose entries are the probes (per token: ``[B, T]``, ``reduction="none"``); ``None``:
            the evaluator's per-sample ``loss_fn``. Each set's :attr:`shapes` keeps the shape.

    Raises:
        ValueError: not a mapping of names to batches, an empty set or name, a ``loss_fn`` that
            does not give one loss per probe sample (or a probe ``loss_fn`` that gives no tensor),
            or more than :data:`MAX_PROBES` probes.
    """

    def __init__(self, probes: Mapping[str, Any], evaluator: LossEvaluator, loss_fn: Optional[Callable[..., Tensor]] = None) -> None:
        if not isinstance(probes, Mapping) or not probes:
            raise ValueError(f"Expected `probes` to be a non-empty mapping of names to batches, got {describe(probes)}.")
        self.evaluator, self.loss_fn = evaluator, check_probe_loss_fn(loss_fn)
        self._vectorize = True  # :meth:`losses_at` in one vmap pass until it fails once
        self.names: List[str] = []
        self.batches: List[List[Any]] = []
        for name, value in probes.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Expected the names of `probes` to be non-empty strings, got {name!r}.")
            batches = [value] if _is_batch(value) else list(value)
            if not batches:
                raise ValueError(f"Expected the probe set {name!r} to hold at least one sample, got none.")
            self.names.append(name)
            self.batches.append(batches)
        # One pass over every set at the evaluator's weights checks the losses and sizes the sets.
        per_batch = self._per_batch(evaluator.center(), [b for bs in self.batches for b in bs], flat=False)
        ends = np.cumsum([len(bs) for bs in self.batches])
        #: Each set's probe shape: ``(K,)``, or with a probe ``loss_fn`` the samples and the rest of its
        #: output's shape (``(K,)`` where the batches' trailing shapes differ).
        self.shapes = [_set_shape([t.shape for t in per_batch[e - len(bs):e]]) for e, bs in zip(ends, self.batches)]
        per_batch = [t.reshape(-1) for t in per_batch]
        self.sizes = [int(sum(len(t) for t in per_batch[e - len(bs):e])) for e, bs in zip(ends, self.batches)]
        #: Every probe sample's loss at the weights the sets were checked at (all sets, in order).
        self.initial_losses = torch.cat(per_batch)
        if sum(self.sizes) > MAX_PROBES:
            raise ValueError(f"Expected at most {MAX_PROBES} probe samples over all sets, got {sum(self.sizes)}.")

    def losses(self, params: Mapping[str, Tensor]) -> Tensor:
        """Every probe sample's loss (all sets in order) with ``params``
        substituted, without gradients: one substitution for all the passes, in the evaluator's
        mode. The global generators are forked and seeded for the passes: training's random
        streams are untouched, and a model that draws random numbers in that mode (dropout with
        ``mode="train"``) draws the same ones at every point, so the differences are paired."""
        return torch.cat(self._per_batch(params, [b for bs in self.batches for b in bs]))

    def losses_at(self, center: Mapping[str, Tensor], offsets: List[Mapping[str, Tensor]]) -> Tensor:
        """Every probe's loss at ``center`` and at ``center + offset`` for each offset ``[1 + C, K]``.

        One vectorized pass over the ``1 + C`` points (``torch.func.vmap``, the same random draws
        at every point, as the passes one at a time draw them) where the evaluator holds whole
        parameters and the model allows it; otherwise, and for good after a first failure (a
        model that vmap cannot run), one pass per point."""
        points = [dict(center)] + [{n: (center[n] + o[n]).to(center[n].dtype) for n in center} for o in offsets]
        if self._vectorize and not self.evaluator.sharded:
            try:
                stacked = {n: torch.stack([p[n] for p in points]) for n in center}
                return torch.func.vmap(lambda p: self.losses(p), randomness="same")(stacked)
            except Exception:  # noqa: BLE001 - the per-point passes below raise a model's own errors
                self._vectorize = False
        return torch.stack([self.losses(p) for p in points])

    def _per_batch(self, params: Mapping[str, Tensor], batches: List[Any], flat: bool = True) -> List[Tensor]:
        with torch.no_grad(), self.evaluator.mode_context(), torch.random.fork_rng(devices=cuda_devices(params)):
            torch.default_generator.manual_seed(PROBE_SEED)
            for d in cuda_devices(params):
                torch.cuda.default_generators[d].manual_seed(PROBE_SEED)
            out = self.evaluator.passes(params, lambda loss: [_probe_losses(loss(b, self.loss_fn)) for b in batches])
        return [t.reshape(-1) for t in out] if flat else out


def require_probes(probes: Any, probe_kernel: bool, probe_loss_fn: Any) -> None:
    """Refuse the probe sets' own options without probe sets.

    Raises:
        ValueError: ``probe_kernel`` or ``probe_loss_fn`` given while ``probes`` is None."""
    if (probe_kernel or probe_loss_fn is not None) and probes is None:
        raise ValueError("Expected `probes` with probe_kernel or probe_loss_fn (they are the probe sets' own), got none.")


def check_probe_loss_fn(loss_fn: Any) -> Optional[Callable[..., Tensor]]:
    """``loss_fn`` when it is None or callable (the probe sets' own loss).

    Raises:
        ValueError: naming ``probe_loss_fn``, for anything else."""
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"Expected `probe_loss_fn` to be callable as probe_loss_fn(model, batch), got {describe(loss_fn)}.")
    return loss_fn


def _probe_losses(out: Any) -> Tensor:
    """A probe ``loss_fn``'s output, detached: a tensor with at least one dimension and one entry.

    Raises:
        ValueError: naming ``probe_loss_fn``, for anything else."""
    if not isinstance(out, Tensor) or out.dim() == 0 or out.numel() == 0:
        raise ValueError(
            "Expected `probe_loss_fn` to return the probes' losses as a tensor with a sample dimension first "
            f"(per token: [B, T], reduction='none'), got {describe(out)}."
        )
    return out.detach()


def _set_shape(shapes: List[torch.Size]) -> Tuple[int, ...]:
    """A set's probe shape from its batches' loss shapes: the samples, then the common rest."""
    rest = {tuple(s[1:]) for s in shapes}
    if len(rest) != 1:
        return (int(sum(int(np.prod(s)) for s in shapes)),)
    return (int(sum(s[0] for s in shapes)), *rest.pop())


def kernel_blocks(sizes: List[int]) -> List[Tuple[int, int]]:
    """Each set's range ``(lo, hi)`` among all the probes, in order (the sets' results and their
    loss kernels' blocks)."""
    ends = np.cumsum(sizes).tolist()
    return [(int(e - k), int(e)) for e, k in zip(ends, sizes)]


def check_kernel_size(sizes: List[int], copies: int) -> None:
    """Refuse loss kernels whose sums would not fit in :data:`MAX_KERNEL_BYTES`: each set's
    ``K x K`` float64 sums held ``copies`` times (segments times chains).

    Raises:
        ValueError: with the size it would take and what to change.
    """
    need = 8 * copies * sum(k * k for k in sizes)
    if need > MAX_KERNEL_BYTES:
        raise ValueError(
            f"Expected the probe sets' loss kernels to fit in {MAX_KERNEL_BYTES / 2**30:.0f} GiB, got "
            f"{need / 2**30:.1f} GiB ({copies} copies of K x K float64 sums for sets of sizes {sizes}): pass "
            "probe_kernel=False, or smaller probe sets (the memory grows with K^2)."
        )


def probe_results(
    moments: ProbeMoments, names: List[str], sizes: List[int], nbeta: float, shapes: List[Tuple[int, ...]]
) -> Dict[str, ProbeResult]:
    """Each set's :class:`ProbeResult` (its probes' ``shapes``, :attr:`ProbeBatches.shapes`) from
    ``moments`` over all sets' samples, in order."""
    out: Dict[str, ProbeResult] = {}
    for name, size, shape, (lo, hi) in zip(names, sizes, shapes, kernel_blocks(sizes)):
        s = moments.select(lo, hi).summary(nbeta)
        out[name] = ProbeResult(
            name=name, llc=s["llc"], llc_std=s["llc_std"], influence=s["influence"], influence_std=s["influence_std"],
            correlation=s["correlation"], correlation_std=s["correlation_std"], num_probes=size, count=s["count"],
            susceptibility=s["susceptibility"], susceptibility_std=s["susceptibility_std"],
            kernel=s["kernel"], kernel_std=s["kernel_std"], shape=tuple(shape),
        )
    return out


def _is_batch(value: Any) -> bool:
    """A batch itself (a tensor, or a tuple, list or dict of tensors), not an iterable of batches."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, Mapping):
        return all(isinstance(v, Tensor) for v in value.values())
    if isinstance(value, (tuple, list)):
        return bool(value) and all(isinstance(v, Tensor) for v in value)
    return False
