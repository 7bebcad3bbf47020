"""The kernel's passes: one program of forward and backward passes for whole and sharded models.

One SGLD step needs, on one batch, the per-sample losses at the centre ``w*`` and at the sample
``w* + xi`` (paired on the same samples), and the gradients of the batch's two halves at the
sample (their mean is the step's gradient, their difference its measured noise,
:mod:`online_llc.calibration.heat`). :func:`paired_losses_and_grads` is that program, written
once; an evaluator supplies its primitives:

* ``evaluator.passes(params, program)``: ``program(loss)`` with ``params`` (name, tensor pairs)
  in place of the sampled parameters, ``loss(batch)`` giving per-sample losses;
* ``evaluator.grads(out, leaves, retain_graph)``: the gradient of a scalar loss with respect to
  the offsets ``xi`` (or, on shards, of the parameters' shards, which the offsets move);
* ``evaluator.pass_session()``: what must hold around all the passes (on shards: the training
  run's gradients set aside and FSDP's gradient reduction switched on);
* three facts of the evaluator: ``grads_inside_passes`` (a backward needs the moved weights in
  place, as FSDP2's backward all-gathers them again), ``one_gradient_per_pass`` (a pass's graph
  cannot be differentiated twice, as FSDP2 reshards after a backward) and ``world`` (ranks whose
  batches together form the step's batch).

:func:`combine_step_stats` turns the per-rank counts, means and sums of squares of a step into
its numbers (one rank: the batch's own), so that one formula serves both too.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from online_llc.kernel.halves import split_halves

__all__ = ["Centre", "Paired", "paired_losses_and_grads", "step_rows", "combine_step_stats", "check_same"]

Grads = List[Optional[Tensor]]


class Centre(NamedTuple):
    """The centre's passes on one batch: its per-sample losses (one tensor per part of the batch)
    and, for the control-variate gradient, the gradients of the halves' mean losses at ``w*``
    (None when not taken). Reusable by every chain of a deterministic model on the same batch."""

    losses: Tuple[Tensor, ...]
    grads: Optional[Tuple[Grads, Grads]] = None


#: What the kernel's passes return: ``(l_center, l_sample, g1, g2, (B1, B2), centre)``
#: (:func:`paired_losses_and_grads`).
Paired = Tuple[Tensor, Tensor, Grads, Grads, Tuple[int, int], Centre]


def check_same(center: Tensor, sample: Tensor) -> None:
    """Raise unless the sample's per-sample losses have the centre's shape (naming ``loss_fn``)."""
    if sample.shape != center.shape:
        raise ValueError(
            "Expected `loss_fn` to return the same number of per-sample losses at every weight, "
            f"got {tuple(center.shape)} and {tuple(sample.shape)}."
        )


def moved_items(center: Mapping[str, Tensor], xi: Mapping[str, Tensor]) -> Any:
    """``(name, w* + xi)`` one parameter at a time, in the parameters' dtype: the offsets stay
    float32 (the sum is formed in the wider dtype, then cast for the forward; the gradient flows
    back to ``xi`` in float32). One addition per parameter, not one ``_foreach_add``: the halves'
    two gradients go back through the same sums, and the foreach's backward node keeps saved
    state that the first gradient frees."""
    for n in xi:
        yield n, (center[n] + xi[n]).to(center[n].dtype)


def fused_moved_items(center: Mapping[str, Tensor], xi: Mapping[str, Tensor]) -> Any:
    """:func:`moved_items` in one ``_foreach_add`` (one kernel on a GPU, whatever the number of
    tensors) where every pair shares one dtype and device, for passes whose graph is
    differentiated once (the foreach's backward frees what it saved)."""
    names = list(xi)
    ws, xs = [center[n] for n in names], [xi[n] for n in names]
    if not xs or any(w.dtype != xs[0].dtype or x.dtype != xs[0].dtype or w.device != x.device for w, x in zip(ws, xs)):
        return moved_items(center, xi)
    return zip(names, torch._foreach_add(ws, xs))


def paired_losses_and_grads(
    evaluator: Any,
    center: Mapping[str, Tensor],
    offset: Mapping[str, Tensor],
    batch: Any,
    rewind: Callable[[], None],
    center_losses: Optional[Centre] = None,
    center_grads: bool = False,
    split: bool = True,
    centre_stream: Optional[Any] = None,
) -> Paired:
    """Per-sample losses at ``w*`` and ``w* + xi``, and the gradients of the two halves' mean losses.

    When the batch splits (:func:`~online_llc.kernel.halves.split_halves`), each half runs through
    the model on its own (the same FLOPs as one pass over the whole batch), the centre's halves
    too, so that a model whose per-sample losses depend on the batch (BatchNorm in training mode)
    still pairs each sample with itself; the two halves of a point share one substitution of its
    weights. Otherwise one pass over the whole batch is differentiated twice (on shards, where a
    graph cannot be differentiated twice, each half's gradient gets its own pass). The dropout
    masks of the centre's and the sample's passes match (``rewind`` before each sample pass).

    ``center_losses``: the centre's passes from an earlier call on the same batch and centre (the
    last element of the result), reused instead of recomputed: only valid when the model is
    deterministic (:func:`~online_llc.kernel.randomness.deterministic`). ``center_grads``: also
    take the gradients of the centre's halves (the control variate's ``grad L_B(w*)``), one more
    backward pass over the batch. ``split=False``: the plain step, which measures no heat: one
    pass over the whole batch at each point and one gradient, that of the batch's mean loss,
    returned as ``g1`` with ``B2 = 0`` and no ``g2`` (with ``center_grads``, the centre's
    gradient of the whole batch's mean loss, and no second).

    Memory: where the evaluator allows (``grads_inside_passes`` False), the last backward pass
    runs after the substitution ends, when the perturbed weights ``w* + xi`` are referenced only
    by its graph, which frees them tensor by tensor as it produces the gradients: the passes hold
    about two copies of the parameters at their peak.

    ``centre_stream``: for the control-variate gradient, an
    :class:`~online_llc.kernel.anchor.AnchorStream` that, where the evaluator streams gradients
    (``streams_grads``), the centre's passes are not reused and the batch is whole or splits,
    receives the sample's gradients and then the centre's tensor by tensor (the sample's passes
    run first): ``g1`` and ``g2`` are then the control-variate gradients, the centre's are not
    returned (``centre.grads`` None), and the passes hold one copy of the parameters fewer per
    centre gradient. Otherwise it is left unstarted.

    Returns:
        ``(l_center, l_sample, g1, g2, (B1, B2), centre)``; ``B1 + B2`` counts the samples of
        every rank's batch.
    """
    xi = {n: t.detach().requires_grad_(True) for n, t in offset.items()}
    leaves = list(xi.values())
    parts = split_halves(batch)
    if center_losses is not None and center_grads and center_losses.grads is None:
        center_losses = None  # the reused passes took no gradients
    with evaluator.pass_session():
        streamed = centre_stream is not None and center_grads and center_losses is None and evaluator.streams_grads
        if streamed and (not split or parts is not None):
            pieces = [batch] if not split else [parts[0], parts[1]]
            out = _streamed(evaluator, center, xi, leaves, pieces, rewind, centre_stream)
        elif not split:
            out = _plain(evaluator, center, xi, leaves, batch, rewind, center_losses, center_grads)
        elif parts is not None:
            out = _halves(evaluator, center, xi, leaves, [parts[0], parts[1]], rewind, center_losses, center_grads)
        else:
            out = _whole(evaluator, center, xi, leaves, batch, rewind, center_losses, center_grads)
    l_center, l_sample, g1, g2, (b1, b2), center_losses = out
    return l_center, l_sample, g1, g2, (b1 * evaluator.world, b2 * evaluator.world), center_losses


def _centre_with_grads(evaluator, center, xi, program):  # type: ignore[no-untyped-def]
    """``program(loss, zero_leaves)`` at ``w* + 0``: the gradients with respect to a zero offset are
    the gradients at ``w*``. Where the weights have the offsets' dtype (float32, float64) and are
    whole, the weights themselves, detached (no copy), are the leaves: the same gradients without
    a zero tensor and a sum per parameter (on a GPU, two kernels per tensor). A bfloat16 weight
    keeps the float32 zero offset, so that its gradient comes back in float32."""
    if not evaluator.sharded and all(center[n].dtype == t.dtype for n, t in xi.items()):
        own = {n: center[n].detach().requires_grad_(True) for n in xi}
        return evaluator.passes(own.items(), lambda loss: program(loss, list(own.values())))
    zero = {n: torch.zeros_like(t).requires_grad_(True) for n, t in xi.items()}
    return evaluator.passes(moved_items(center, zero), lambda loss: program(loss, list(zero.values())))


def _halves(evaluator, center, xi, leaves, pieces, rewind, center_losses, center_grads):  # type: ignore[no-untyped-def]
    if center_losses is None and center_grads:

        def centre_passes(loss, zero):  # type: ignore[no-untyped-def]
            out = [(c, evaluator.grads(c.mean(), zero)) for c in (loss(p) for p in pieces)]
            return Centre(tuple(c.detach() for c, _ in out), (out[0][1], out[1][1]))

        center_losses = _centre_with_grads(evaluator, center, xi, centre_passes)
    elif center_losses is None:
        with torch.no_grad():
            center_losses = Centre(evaluator.centre_passes(center, lambda loss: tuple(loss(p).detach() for p in pieces)))
    inside = evaluator.grads_inside_passes

    def sample_passes(loss: Callable[[Any], Tensor]) -> List[Tuple[Tensor, Optional[List[Optional[Tensor]]]]]:
        out = []
        for i, (piece, c) in enumerate(zip(pieces, center_losses.losses)):
            s = loss(piece)
            check_same(c, s)
            g = evaluator.grads(s.mean(), leaves) if i == 0 or inside else None
            out.append((s if g is None else s.detach(), g))
        return out

    rewind()
    (s1, g1), (s2, g2) = evaluator.passes(moved_items(center, xi), sample_passes)
    if g2 is None:
        # The second half's backward after the substitution ends (see Memory above).
        g2 = evaluator.grads(s2.mean(), leaves)
        s2 = s2.detach()
    c1, c2 = center_losses.losses
    return torch.cat([c1, c2]), torch.cat([s1, s2]), g1, g2, (c1.numel(), c2.numel()), center_losses


def _plain(evaluator, center, xi, leaves, batch, rewind, center_losses, center_grads=False):  # type: ignore[no-untyped-def]
    """The plain step's passes: the centre's losses (reused when given, in one or two parts; with
    ``center_grads`` also the gradient of their mean, as the first of the centre's two gradients,
    the second all None) and one forward and one backward pass at ``w* + xi`` over the whole batch."""
    if center_losses is None and center_grads:

        def centre_pass(loss, zero):  # type: ignore[no-untyped-def]
            c = loss(batch)
            return Centre((c.detach(),), (evaluator.grads(c.mean(), zero), [None] * len(zero)))

        center_losses = _centre_with_grads(evaluator, center, xi, centre_pass)
    elif center_losses is None:
        with torch.no_grad():
            center_losses = Centre((evaluator.centre_passes(center, lambda loss: loss(batch)).detach(),))
    parts = center_losses.losses
    l_center = parts[0] if len(parts) == 1 else torch.cat(parts)
    inside = evaluator.grads_inside_passes

    def sample_pass(loss: Callable[[Any], Tensor]) -> Tuple[Tensor, Optional[List[Optional[Tensor]]]]:
        s = loss(batch)
        check_same(l_center, s)
        return (s.detach(), evaluator.grads(s.mean(), leaves)) if inside else (s, None)

    rewind()
    l_sample, g = evaluator.passes(fused_moved_items(center, xi), sample_pass)
    if g is None:
        # The backward after the substitution ends, freeing w* + xi tensor by tensor (see Memory).
        g = evaluator.grads(l_sample.mean(), leaves)
        l_sample = l_sample.detach()
    return l_center, l_sample, g, [None] * len(leaves), (l_center.numel(), 0), center_losses


def _streamed(evaluator, center, xi, leaves, pieces, rewind, stream):  # type: ignore[no-untyped-def]
    """The passes of a step whose control-variate gradient is formed as the centre's gradients
    arrive (``stream``, see :func:`paired_losses_and_grads`), on ``pieces``: the batch whole (a
    plain step) or its two halves. The sample's passes run first, as :func:`_plain` and
    :func:`_halves` run them (the last backward after the substitution, freeing ``w* + xi`` as it
    goes); then the centre's, whose gradient tensors are handed to ``stream`` one at a time. Both
    see the same dropout masks (``rewind`` before each)."""
    rewind()
    if len(pieces) == 1:
        s = evaluator.passes(fused_moved_items(center, xi), lambda loss: loss(pieces[0]))
        samples, grads = [s.detach()], [evaluator.grads(s.mean(), leaves)]
    else:

        def sample_passes(loss: Callable[[Any], Tensor]) -> Tuple[Tensor, Any, Tensor]:
            s1 = loss(pieces[0])
            return s1.detach(), evaluator.grads(s1.mean(), leaves), loss(pieces[1])

        s1, g1, s = evaluator.passes(moved_items(center, xi), sample_passes)
        samples, grads = [s1, s.detach()], [g1, evaluator.grads(s.mean(), leaves)]
    del s
    sizes = [t.numel() for t in samples]
    stream.begin(grads, (sizes[0], sizes[1] if len(sizes) == 2 else 0))

    def centre_passes(loss: Callable[[Any], Tensor], own: List[Tensor]) -> List[Tensor]:
        out = []
        for k, (piece, sample) in enumerate(zip(pieces, samples)):
            c = loss(piece)
            check_same(c, sample)
            evaluator.stream_grads(c.mean(), own, partial(stream.take, k))
            out.append(c.detach())
        return out

    rewind()
    try:
        centre = _centre_with_grads(evaluator, center, xi, centre_passes)
    except BaseException:
        stream.abort()  # a fold left half done would tilt every later step
        raise
    stream.end()
    if len(pieces) == 1:
        return centre[0], samples[0], grads[0], [None] * len(leaves), (sizes[0], 0), Centre((centre[0],))
    return torch.cat(centre), torch.cat(samples), grads[0], grads[1], (centre[0].numel(), centre[1].numel()), Centre(tuple(centre))


def _cuts(b: int) -> Tuple[slice, ...]:
    h = b // 2
    return (slice(0, h), slice(h, b)) if b >= 2 else (slice(0, b),)


def _whole(evaluator, center, xi, leaves, batch, rewind, center_losses, center_grads):  # type: ignore[no-untyped-def]
    if center_losses is None and center_grads:

        def centre_passes(loss, zero):  # type: ignore[no-untyped-def]
            c = loss(batch)
            cuts = _cuts(c.numel())
            grads = [evaluator.grads(c[cut].mean(), zero, retain_graph=i < len(cuts) - 1) for i, cut in enumerate(cuts)]
            return Centre((c.detach(),), (grads[0], grads[-1]))

        if evaluator.one_gradient_per_pass:
            raise ValueError("Expected an unsharded model for the control-variate gradient on a batch that does not split.")
        center_losses = _centre_with_grads(evaluator, center, xi, centre_passes)
    elif center_losses is None:
        with torch.no_grad():
            center_losses = Centre((evaluator.centre_passes(center, lambda loss: loss(batch)).detach(),))
    (l_center,) = center_losses.losses
    b = l_center.numel()
    h = b // 2
    cuts = _cuts(b)
    if evaluator.one_gradient_per_pass:

        def per_cut(loss: Callable[[Any], Tensor]) -> Tuple[Tensor, List[List[Optional[Tensor]]]]:
            grads, first = [], None
            for cut in cuts:
                rewind()
                s = loss(batch)
                check_same(l_center, s)
                grads.append(evaluator.grads(s[cut].mean(), leaves))
                first = s.detach() if first is None else first
            return first, grads

        l_sample, grads = evaluator.passes(moved_items(center, xi), per_cut)
    else:
        rewind()
        s = evaluator.losses(moved_items(center, xi), batch)
        check_same(l_center, s)
        grads = [evaluator.grads(s[cut].mean(), leaves, retain_graph=i < len(cuts) - 1) for i, cut in enumerate(cuts)]
        l_sample = s.detach()
    return l_center, l_sample, grads[0], grads[-1], ((h, b - h) if b >= 2 else (b, 0)), center_losses


def step_rows(l_center: Tensor, l_sample: Tensor, offset_sq: Tensor, noise_sq: Tensor) -> Tensor:
    """One rank's row of a step's numbers (float64): the count, mean and centred sum of squares of
    the differences ``l_sample - l_center``, the two losses' sums, ``||xi||^2`` (this rank's part)
    and the halves' squared gradient difference."""
    diff = l_sample.double() - l_center.double()
    mean = diff.mean()
    device = diff.device
    return torch.stack(
        [
            torch.tensor(float(diff.numel()), dtype=torch.float64, device=device),
            mean,
            (diff - mean).square().sum(),
            l_center.double().sum(),
            l_sample.double().sum(),
            offset_sq.to(device, torch.float64),
            noise_sq.to(device, torch.float64),
        ]
    )


def combine_step_stats(table: Tensor, size: int) -> Tensor:
    """The step's numbers from the ranks' rows ``[R, 7]`` (:func:`step_rows`) of ``size`` samples
    in all, combined like one batch (Chan et al.'s pooled variance): the differences' mean and
    unbiased variance (0 for a single sample), the two mean losses, ``||xi||`` and the squared
    gradient difference. No value is read on the host."""
    counts, means = table[:, 0], table[:, 1]
    total = counts.sum()
    grand = (counts * means).sum() / total
    m2 = table[:, 2].sum() + (counts * (means - grand).square()).sum()
    var = m2 / (total - 1) if size > 1 else m2.new_zeros(())
    return torch.stack(
        [grand, var, table[:, 3].sum() / total, table[:, 4].sum() / total, table[:, 5].sum().sqrt(), table[:, 6].sum()]
    )
