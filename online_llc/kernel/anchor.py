"""The control variate's anchor: the full-data gradient ``grad L_n(w*)`` at the centre.

The control-variate gradient ``grad L_B(w* + xi) - grad L_B(w*) + grad L_n(w*)`` (Baker,
Fearnhead, Fox and Nemeth 2019, "Control variates for stochastic gradient MCMC") has the plain
minibatch gradient's expectation, and batch noise only from the difference of the two batch
gradients: along a direction of curvature ``h`` about ``||xi||`` times the spread of the
per-sample curvatures, where the plain gradient carries the spread of the per-sample gradients
themselves. Offline its anchor is computed once per centre, with one pass over the data
(:func:`full_gradient`); online, where the centre is the moving training weights, it is the
running mean of the centre's batch gradients the shadow steps take anyway (:class:`RunningAnchor`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.passes import moved_items
from online_llc.kernel.randomness import private_rng
from online_llc.kernel.updates import state_dtype

__all__ = ["full_gradient", "RunningAnchor", "StepAnchor", "FixedAnchor", "AnchorStream", "ANCHOR_RELAXATIONS", "STREAM_MIN_ENTRIES", "STREAM_MEAN_ENTRIES"]

#: The online anchor's horizon in relaxation times of the chain's slowest direction
#: (:func:`online_llc.calibration.step.relaxation_steps`): long enough that its error acts as a
#: small static tilt rather than as fresh batch noise (which the chain would integrate as it does
#: the plain gradient's), short enough to follow the centre's gradient as training moves it.
ANCHOR_RELAXATIONS: float = 4.0


def full_gradient(
    evaluator: LossEvaluator, center: Mapping[str, Tensor], batches: Iterable[Any], *, generator: torch.Generator
) -> Dict[str, Tensor]:
    """``grad L_n(w*) = sum_b |b| grad L_b(w*) / sum_b |b|`` over one pass of ``batches``.

    The passes run as the kernel's do: in the evaluator's mode, with the model's own randomness
    drawn from ``generator``, the model, its ``.grad`` fields and buffers untouched. The sums are
    accumulated in float64.

    Returns:
        The gradient by parameter name, in the chain state's dtype (float32, or float64 for a
        float64 parameter).

    Raises:
        ValueError: ``batches`` yields no batch.
    """
    zero = {n: torch.zeros_like(t, dtype=state_dtype(t.dtype)).requires_grad_(True) for n, t in center.items()}
    leaves = list(zero.values())
    total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in zero.items()}
    count = 0
    with evaluator.mode_context(), private_rng(center, generator), torch.enable_grad(), evaluator.pass_session():
        for batch in batches:
            losses = evaluator.losses(moved_items(center, zero), batch)
            for (name, acc), g in zip(total.items(), evaluator.grads(losses.sum(), leaves)):
                if g is not None:
                    acc.add_(g.double())
            count += losses.numel()
    if count == 0:
        raise ValueError("Expected `batches` to yield at least one batch, got an empty iterable.")
    return {n: (acc / count).to(zero[n].dtype) for n, acc in total.items()}


class RunningAnchor:
    """The online anchor: an estimate of ``grad L_n(w*)`` from the centre's batch gradients.

    Each shadow step folds its batch's centre gradient ``c_t`` in *before* the step uses the
    anchor: ``A_t = A_{t-1} + (c_t - A_{t-1}) / min(t, H)``, the mean of every batch gradient since
    the last :meth:`reset` until there are ``H`` of them (``horizon``), an exponential mean over
    about the last ``H`` after. The first step's anchor is its own batch gradient, so the
    control-variate gradient ``grad L_B(w* + xi) - c_t + A_t`` starts as the plain one and moves
    to the control variate as the anchor fills (the fresh share of ``c_t``'s noise is ``1 / t``).

    What the anchor's error costs: an error ``e`` of the anchor is a constant force ``nbeta e`` on
    the chain for as long as the error lasts, which tilts the localized posterior. Its effect on the
    draws is second order in ``e``, ``(nbeta / 2) e^T (H + gamma / nbeta)^-1 H (H + gamma / nbeta)^-1 e``,
    about ``nbeta q / (B t)`` of a regular model's LLC after ``t`` batches of size ``B`` (``q``
    the per-sample gradient noise over the curvature, 1 for a well-specified likelihood): the
    halves' heat does not see it, so the horizon is long, several of the chain's relaxation times
    (:data:`ANCHOR_RELAXATIONS`), and the anchor is reset when the weights jump.
    ``benchmarks/online_cv.py`` measures the level it leaves at rest against the exact target.

    Args:
        horizon: ``H`` (``inf``: the plain running mean since the reset).
    """

    def __init__(self, horizon: float = math.inf) -> None:
        self.horizon = horizon
        self.mean: Optional[List[Tensor]] = None
        self.count = 0

    def reset(self) -> None:
        """Forget every batch gradient (after a jump of the weights, or a fresh start)."""
        self.mean, self.count = None, 0

    def fold(
        self, centre_grads: Tuple[List[Optional[Tensor]], List[Optional[Tensor]]], halves: Tuple[int, int], like: List[Tensor]
    ) -> List[Tensor]:
        """Fold one batch's centre gradient in and return the anchor, one tensor per ``like``
        (the offsets). ``centre_grads``: the halves' gradients of their mean losses (the second
        all None for a batch taken whole), weighted by the halves' sizes ``halves``; a parameter
        the loss does not reach has gradient 0."""
        b1, b2 = halves
        self.count += 1
        if self.mean is None:
            self.mean = _weighted_all(centre_grads[0], centre_grads[1], b1, b2, like)
            return self.mean
        # A <- (1 - r) A + r (b1 c1 + b2 c2) / B in place, each half added to the anchor as it is:
        # forming the batch gradient first would be one more copy of the parameters, alive beside
        # the step's gradients at its peak.
        rate = 1.0 / min(self.count, self.horizon)
        torch._foreach_mul_(self.mean, 1.0 - rate)
        for grads, size in zip(centre_grads, halves):
            pairs = [(m, g) for m, g in zip(self.mean, grads) if g is not None] if size > 0 else []
            same = [(m, g) for m, g in pairs if g.dtype == m.dtype]
            if same:
                torch._foreach_add_([m for m, _ in same], [g for _, g in same], alpha=rate * size / (b1 + b2))
            for m, g in pairs:
                if g.dtype != m.dtype:
                    m.add_(g.to(m.dtype), alpha=rate * size / (b1 + b2))
        return self.mean

    def _begin(self, like: List[Tensor], halves: Tuple[int, int]) -> None:
        """Start folding one batch's centre gradient tensor by tensor, half by half
        (:class:`AnchorStream`), with :meth:`fold`'s arithmetic."""
        b1, b2 = halves
        self.count += 1
        rate = 1.0 / min(self.count, self.horizon)
        self._like = like
        self._fresh = self.mean is None
        if self._fresh:
            # The first batch's gradient itself, each tensor formed when its first half arrives.
            self._weights = (b1 / (b1 + b2), b2 / (b1 + b2))
            self._parts: List[Optional[Tensor]] = [None] * len(like)
        else:
            torch._foreach_mul_(self.mean, 1.0 - rate)
            self._weights = (rate * b1 / (b1 + b2), rate * b2 / (b1 + b2))

    def _fold_one(self, half: int, j: int, grad: Tensor) -> None:
        """Fold in tensor ``j`` of half ``half``'s centre gradient."""
        w = self._weights[half]
        if self._fresh:
            part = self._parts[j]
            if part is None:
                self._parts[j] = grad.to(self._like[j].dtype) * w
            else:
                part.add_(grad.to(part.dtype), alpha=w)
        else:
            assert self.mean is not None
            self.mean[j].add_(grad.to(self.mean[j].dtype), alpha=w)

    def _end(self) -> None:
        """Finish the fold :meth:`_begin` started (a tensor no half's loss reached counts as 0)."""
        if self._fresh:
            self.mean = [torch.zeros_like(t) if p is None else p for p, t in zip(self._parts, self._like)]
            del self._parts

    def state_dict(self) -> Dict[str, Any]:
        """The anchor (tensors, or None) and the count of batches folded."""
        return {"mean": None if self.mean is None else [t.detach().clone() for t in self.mean], "count": self.count}

    def load_state_dict(self, state: Optional[Mapping[str, Any]], like: List[Tensor]) -> None:
        """Restore a :meth:`state_dict` whose tensors match ``like`` (else start afresh)."""
        mean = None if state is None else state.get("mean")
        if mean is None or len(mean) != len(like) or any(tuple(m.shape) != tuple(t.shape) for m, t in zip(mean, like)):
            self.reset()
            return
        self.mean = [m.detach().to(device=t.device, dtype=t.dtype, copy=True) for m, t in zip(mean, like)]
        self.count = int(state["count"])


def _weighted_all(
    g1s: List[Optional[Tensor]], g2s: List[Optional[Tensor]], b1: int, b2: int, like: List[Tensor]
) -> List[Tensor]:
    """:func:`_weighted` of every tensor, in one or two ``_foreach`` calls where every gradient is
    there in its offset's dtype (one kernel per call on a GPU, not one per tensor)."""
    both = b2 > 0
    if all(g is not None and g.dtype == t.dtype for g, t in zip(g1s, like)) and (
        not both or all(g is not None and g.dtype == t.dtype for g, t in zip(g2s, like))
    ):
        out = torch._foreach_mul(list(g1s), b1 / (b1 + b2))  # type: ignore[arg-type]
        if both:
            torch._foreach_add_(out, list(g2s), alpha=b2 / (b1 + b2))  # type: ignore[arg-type]
        return list(out)
    return [_weighted(g1, g2, b1, b2, t) for g1, g2, t in zip(g1s, g2s, like)]


def _weighted(g1: Optional[Tensor], g2: Optional[Tensor], b1: int, b2: int, like: Tensor) -> Tensor:
    """``(b1 g1 + b2 g2) / (b1 + b2)`` in ``like``'s dtype (a missing gradient is 0)."""
    out = torch.zeros_like(like) if g1 is None else g1.to(like.dtype) * (b1 / (b1 + b2))
    if g2 is not None and b2 > 0:
        out = out + g2.to(like.dtype) * (b2 / (b1 + b2))
    return out


#: When a plain step takes the centre's gradient tensor by tensor (:class:`AnchorStream`): from
#: :data:`STREAM_MIN_ENTRIES` sampled entries (4 MiB in float32; below, the copy it saves is small)
#: and :data:`STREAM_MEAN_ENTRIES` per tensor on average (each tensor then costs a few operations
#: of its own, about 6 us on a CPU). Measured on one CPU thread, control-variate plain steps at
#: batch 64, minimum of 8 runs of 100: an MLP of 6 tensors of 45k entries on average 5.16-5.17 ms
#: streamed against 5.07-5.14 ms, one of 36 tensors of 500 entries 4.90 against 4.69 ms.
STREAM_MIN_ENTRIES = 1 << 20
STREAM_MEAN_ENTRIES = 1 << 12


class StepAnchor:
    """One shadow step's anchor for its chains: the first chain to ask folds the step's centre
    gradient into the running anchor, the others (the same batch) reuse the result. The kernel
    calls it with the centre's gradients (``anchor(grads, halves, like)``), or takes the centre's
    gradient tensor by tensor through :meth:`stream` where ``streams`` (False where the chains
    share the centre's passes, which then keep its gradient for the next chain)."""

    def __init__(self, running: RunningAnchor, streams: bool = True) -> None:
        self.running = running
        self.streams = streams
        self.folded = False

    def __call__(
        self, centre_grads: Tuple[List[Optional[Tensor]], List[Optional[Tensor]]], halves: Tuple[int, int], like: List[Tensor]
    ) -> List[Tensor]:
        if not self.folded:
            self.running.fold(centre_grads, halves, like)
            self.folded = True
        assert self.running.mean is not None
        return self.running.mean

    def stream(self, like: List[Tensor], corrections: bool = False) -> Optional["AnchorStream"]:
        """An :class:`AnchorStream` for one chain's step (it folds when no chain has yet), or None
        where the anchor does not stream or streaming does not pay (:data:`STREAM_MIN_ENTRIES`).
        ``corrections``: the stream also forms the control-variate draw's corrections, which need
        the finished anchor as each tensor arrives: None where this step still folds it in."""
        entries = sum(t.numel() for t in like)
        pays = entries >= STREAM_MIN_ENTRIES and entries >= STREAM_MEAN_ENTRIES * len(like)
        if not (self.streams and pays) or (corrections and not self.folded):
            return None
        return AnchorStream(self, like, corrections)


class FixedAnchor(StepAnchor):
    """A fixed anchor (offline: the full-data gradient at the centre, :func:`full_gradient`) as a
    :class:`StepAnchor`, so that a chain run one at a time takes the centre's gradients tensor by
    tensor too; nothing is folded, so its streams can form the control-variate draw's
    corrections (:meth:`AnchorStream.kappa`)."""

    def __init__(self, anchor: Mapping[str, Tensor]) -> None:
        running = RunningAnchor()
        running.mean = list(anchor.values())
        super().__init__(running)
        self.folded = True


class AnchorStream:
    """The control variate taken one tensor at a time, as the backward passes produce the centre's
    gradients ``c_k`` (one per half of the batch, or one of the whole batch in a plain step): each
    tensor is folded into the running anchor (when this is the step's first chain) and subtracted
    from the sample's gradient of the same half, in place, then freed, so the centre's gradients are
    never held whole (one or two copies of the parameters fewer at the step's peak); :meth:`end`
    adds the anchor ``gbar``, complete only then. The arithmetic of :meth:`RunningAnchor.fold` and
    the kernel's ``_control_variate`` on whole gradients, operation for operation.

    Use: :meth:`begin` with the sample's gradients, :meth:`take` per tensor of each ``c_k``,
    :meth:`end`."""

    def __init__(self, owner: StepAnchor, like: List[Tensor], corrections: bool = False) -> None:
        self.owner, self.like, self.corrections = owner, like, corrections
        self.started = False

    def begin(self, grads: Sequence[List[Optional[Tensor]]], halves: Tuple[int, int]) -> None:
        """Start with each half's sample gradients (one list for a batch taken whole), corrected
        in place, and the halves' sizes (``(B, 0)`` for a whole batch)."""
        self.grads = grads
        self.fold = not self.owner.folded
        self.owner.folded = True
        self.corrected = [[False] * len(self.like) for _ in grads]
        self._kappa: List[List[Tensor]] = [[], []]
        if self.fold:
            self.owner.running._begin(self.like, halves)
        self.started = True

    def take(self, half: int, j: int, centre_grad: Tensor) -> None:
        """Tensor ``j`` of half ``half``'s centre gradient."""
        if self.fold:
            self.owner.running._fold_one(half, j, centre_grad)
        if self.corrections:
            # The draw's correction against the offset before the update, as the kernel's
            # _draw_corrections forms it from whole gradients (the anchor is finished: no fold).
            gbar = self.owner.running.mean[j]  # type: ignore[index]
            x = self.like[j]
            self._kappa[half].append(torch.dot((centre_grad - gbar).reshape(-1).to(torch.float64), x.reshape(-1).to(torch.float64)))
        g = self.grads[half][j]
        if g is not None:
            g.sub_(centre_grad)
            self.corrected[half][j] = True

    def end(self) -> None:
        """Complete the anchor and add it to every corrected gradient (a parameter the centre's
        loss does not reach keeps its sample gradient as it is, as on whole gradients)."""
        if self.fold:
            self.owner.running._end()
        mean = self.owner.running.mean
        assert mean is not None
        for grads, flags in zip(self.grads, self.corrected):
            idx = [j for j, done in enumerate(flags) if done]
            if idx:
                torch._foreach_add_([grads[j] for j in idx], [mean[j] for j in idx])  # type: ignore[misc]
        # The kernel consumes the gradients (a buffer it frees must not stay referenced here).
        del self.grads

    def abort(self) -> None:
        """The centre's passes failed midway: forget the running anchor where this stream was
        folding into it (it restarts from the next batch, as after a jump of the weights)."""
        if self.fold:
            self.owner.running.reset()

    def kappa(self) -> Tensor:
        """``[(c_1 - gbar) . xi, (c_2 - gbar) . xi]`` (float64) of a stream with ``corrections``."""
        zero = torch.zeros((), dtype=torch.float64, device=self.like[0].device)
        return torch.stack([torch.stack(t).sum() if t else zero for t in self._kappa])
