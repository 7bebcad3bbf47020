"""Model plumbing for the kernel: per-sample losses at substituted weights.

Flow: training loop -> ShadowSampler (sgld kernel) -> WindowStats -> LLCFilter -> OnlineLLC
records -> callbacks. This module sits under the sgld kernel (:mod:`online_llc.kernel.step`), and under
the MALA diagnostic (:func:`online_llc.kernel.diagnostics.mala_acceptance`): it is how they call the user's
model without changing anything the training run can see.

* :class:`LossEvaluator` computes per-sample losses through ``torch.func.functional_call`` on
  substituted parameters and cloned buffers, so the model object, its ``.grad`` fields and its
  buffers are never modified; :meth:`LossEvaluator.mode_context` puts the model in the
  evaluator's ``mode`` (:data:`MODES`) for a pass and restores every submodule's flag after it.
* :meth:`LossEvaluator.paired` runs the kernel's passes (:mod:`online_llc.kernel.passes`, one
  program for whole and sharded parameters): per-sample losses at ``w*`` and ``w* + xi`` and the
  gradients of the batch's two halves.
* :func:`split_halves` (:mod:`online_llc.kernel.halves`, re-exported here) cuts a batch into its two halves along the sample dimension, so the kernel
  can take the gradient of each half (their difference measures the gradient noise).
* The passes run under :func:`online_llc.kernel.randomness.private_rng`, so the model's own random
  draws (dropout) are the monitor's and the training run's random streams are untouched.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from online_llc.kernel.compiled import check_compile, compiled_loss
from online_llc.kernel.halves import _leading_sizes
from online_llc.kernel.passes import Centre, Paired, combine_step_stats, moved_items, paired_losses_and_grads, step_rows
from online_llc.kernel.randomness import private_rng
from online_llc.kernel.sharding import check_unsharded
from online_llc.kernel.updates import _norm, state_dtype

__all__ = ["LossFn", "LossEvaluator", "MODES", "Params", "check_first_batch", "check_per_sample", "model_mode", "moved_weights"]

#: The model's mode during the sampler's passes: ``"eval"`` (``model.eval()``: dropout off,
#: BatchNorm on its running statistics), ``"train"`` (``model.train()``) or ``"as_is"`` (the mode
#: the model is in).
MODES = ("eval", "train", "as_is")

#: Substituted weights: a mapping from parameter name to tensor, or (name, tensor) pairs.
Params = Union[Mapping[str, Tensor], Iterable[Tuple[str, Tensor]]]


@contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put ``model`` in ``mode`` (one of :data:`MODES`) for the block; afterwards, also when the
    block raises, every submodule's ``training`` flag is exactly what it was before (a model in
    train mode with a frozen, eval-mode submodule gets both back)."""
    if mode == "as_is":
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode == "train")
        yield
    finally:
        # Flags are set directly: calling .train() again would push one flag down to every child.
        for m, flag in flags:
            m.training = flag


class LossFn(Protocol):
    """A per-sample loss: ``loss_fn(model, batch)`` returns a tensor of shape ``[B]``.

    The model passed in is the user's model (its parameters temporarily substituted by the
    sampler), so ``loss_fn`` must compute the loss by calling the model, not from captured
    tensors. For the LLC to match theory the loss should be the per-sample negative log
    likelihood (e.g. ``0.5 * ((y - model(x)) ** 2).sum(-1) / sigma**2`` for Gaussian noise,
    ``F.cross_entropy(..., reduction="none")`` for classification).
    """

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:  # pragma: no cover - protocol
        ...


class _LossModule(nn.Module):
    """Runs a program of passes through ``loss_fn(model, batch)`` as a module forward, so
    ``functional_call`` can substitute the model's parameters and buffers by name
    (``model.<name>``) once for all of them without touching the model
    (:meth:`LossEvaluator.passes`)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        # Stored in __dict__ to keep it out of nn.Module's registries.
        object.__setattr__(self, "_loss_fn", loss_fn)

    def forward(self, program: Callable[[Callable[..., Tensor]], Any]) -> Any:  # noqa: D102
        def loss(batch: Any, fn: Optional[Callable[[nn.Module, Any], Tensor]] = None) -> Tensor:
            # ``fn``: another loss of the model (a probe set's per-token loss), taken as it returns.
            return check_per_sample(self._loss_fn(self.model, batch)) if fn is None else fn(self.model, batch)

        return program(loss)


class LossEvaluator:
    """Evaluates per-sample losses of ``model`` at substituted weights, leaving ``model`` alone.

    Holds the names of the trainable parameters (the ones the chain moves) and checks the loss
    shape on every call.

    Args:
        model: the user's model.
        loss_fn: per-sample loss, see :class:`LossFn`.
        param_names: restrict the chain to these trainable parameters (default: all trainable).
        mode: the model's mode during the sampler's passes, one of :data:`MODES` (see
            :meth:`mode_context`).
        compile: ``None`` (eager), or a ``torch.compile`` mode (:data:`~online_llc.kernel.compiled.COMPILE_MODES`)
            in which ``loss_fn`` runs (:mod:`online_llc.kernel.compiled`).

    Raises:
        ValueError: a model sharded by FSDP, FSDP2 or DeepSpeed, whose forward would ignore the
            substituted weights (:mod:`online_llc.kernel.sharding`).
    """

    #: Whether the parameters are sharded over ranks (:class:`online_llc.kernel.fsdp.ShardedLossEvaluator`).
    sharded = False
    _refuse_sharded = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        param_names: List[str] | None = None,
        mode: str = "eval",
        compile: Optional[str] = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"Expected `mode` to be one of {', '.join(map(repr, MODES))}, got {mode!r}.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
        if self._refuse_sharded:
            check_unsharded(model)
        if not callable(loss_fn):
            raise TypeError(f"Expected `loss_fn` to be callable as loss_fn(model, batch), got {loss_fn!r}.")
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                "Expected `model` to have at least one trainable parameter (requires_grad=True), got none."
            )
        if param_names is None:
            param_names = trainable
        else:
            unknown = [n for n in param_names if n not in trainable]
            if unknown or not param_names:
                raise ValueError(
                    f"Expected `param_names` to be a non-empty subset of the trainable parameters, got {param_names!r}."
                )
        self.model = model
        self.loss_fn = loss_fn
        self.param_names: List[str] = list(param_names)
        self.mode = mode
        self.compile = check_compile(compile)
        self._module = _LossModule(model, loss_fn if self.compile is None else compiled_loss(loss_fn, self.compile))

    def mode_context(self) -> Any:
        """A context manager that puts the model in this evaluator's ``mode`` for a pass
        (:func:`model_mode`)."""
        return model_mode(self.model, self.mode)

    def center(self) -> Dict[str, Tensor]:
        """The model's current trainable parameters, detached (no copy), as an :class:`OwnCenter`:
        the centre's passes (:meth:`centre_passes`) then run on the model's own weights."""
        params = dict(self.model.named_parameters())
        return OwnCenter({n: params[n].detach() for n in self.param_names})

    def zeros_like_center(self) -> Dict[str, Tensor]:
        """A zero offset for every sampled parameter, in float32, or float64 for a float64 parameter
        (never in bfloat16 or float16: see :mod:`online_llc.kernel.updates`)."""
        return {n: torch.zeros_like(t, dtype=state_dtype(t.dtype)) for n, t in self.center().items()}

    def num_sampled(self) -> int:
        """The number of entries the chain moves (its dimension)."""
        return sum(t.numel() for t in self.center().values())

    def localize(self, masks: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Per-parameter masks on the parameters' device (the entries the chain may move)."""
        device = next(iter(self.center().values())).device
        return {n: m.to(device) for n, m in masks.items()}

    def noise_layouts(self, names: List[str]) -> Optional[List[Any]]:
        """Where each offset sits in its full parameter when the parameters are sharded (``None``:
        whole parameters, the noise is drawn at the offsets' own shape)."""
        return None

    # ---- the primitives of the kernel's pass program (online_llc.kernel.passes) -------------------
    #: A backward needs the moved weights in place (False: it may run after the substitution).
    grads_inside_passes = False
    #: A pass's graph cannot be differentiated twice (False: one pass serves both halves).
    one_gradient_per_pass = False
    #: Ranks whose batches together form the step's batch.
    world = 1
    #: Whether :meth:`stream_grads` can hand gradients over one tensor at a time.
    streams_grads = True

    def paired(
        self,
        center: Mapping[str, Tensor],
        offset: Mapping[str, Tensor],
        batch: Any,
        rewind: Callable[[], None],
        center_losses: Optional[Centre] = None,
        center_grads: bool = False,
        split: bool = True,
        centre_stream: Optional[Any] = None,
    ) -> Paired:
        """The kernel's passes: :func:`~online_llc.kernel.passes.paired_losses_and_grads` with this
        evaluator."""
        return paired_losses_and_grads(self, center, offset, batch, rewind, center_losses, center_grads, split, centre_stream)

    def step_stats(
        self, l_center: Tensor, l_sample: Tensor, offsets: Sequence[Tensor], noise_sq: Tensor
    ) -> Tuple[Tensor, int]:
        """The kernel's numbers of one step (float64, on the losses' device) over every rank's
        batch (:func:`~online_llc.kernel.passes.combine_step_stats`), and the number of samples."""
        if self.world == 1 and not self.sharded:
            return _own_step_stats(l_center, l_sample, offsets, noise_sq), l_center.numel()
        row = step_rows(l_center, l_sample, _norm(list(offsets)).square(), noise_sq)
        size = l_center.numel() * self.world
        return combine_step_stats(self.gather_rows(row), size), size

    def gather_rows(self, row: Tensor) -> Tensor:
        """Every rank's row of a step's numbers, stacked ``[R, 7]``: this rank's alone here."""
        return row[None]

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks that share the chain: ``t`` itself for whole parameters."""
        return t

    def pass_session(self) -> Any:
        """What holds around all the passes of one step: nothing for whole parameters."""
        return nullcontext()

    def grads(self, out: Tensor, leaves: List[Tensor], retain_graph: bool = False) -> List[Optional[Tensor]]:
        """The gradient of the scalar ``out`` with respect to the offsets ``leaves`` (None for an
        offset the loss does not reach)."""
        check_differentiable(out)
        return list(torch.autograd.grad(out, leaves, allow_unused=True, retain_graph=retain_graph))

    def stream_grads(self, out: Tensor, leaves: List[Tensor], take: Callable[[int, Tensor], None]) -> None:
        """The gradient of the scalar ``out`` with respect to ``leaves``, handed to ``take(j, grad)``
        one tensor at a time as the backward pass produces it and dropped after, so that the
        gradients are never all held at once (a leaf the loss does not reach is not handed over).
        Each arrives in its leaf's ``.grad`` (the leaves are the step's own tensors, never the
        model's parameters) and is taken from there by a post-accumulate hook."""
        check_differentiable(out)

        def hand(j: int) -> Callable[[Tensor], None]:
            def hook(leaf: Tensor) -> None:
                grad, leaf.grad = leaf.grad, None
                if grad is not None:
                    take(j, grad)

            return hook

        handles = [leaf.register_post_accumulate_grad_hook(hand(j)) for j, leaf in enumerate(leaves)]
        try:
            torch.autograd.backward(out, inputs=leaves)
        finally:
            for h in handles:
                h.remove()
            for leaf in leaves:
                leaf.grad = None

    def losses(self, params: Params, batch: Any) -> Tensor:
        """Per-sample losses with ``params`` (a mapping, or name, tensor pairs) substituted for the
        named parameters.

        Buffers are cloned so that, e.g., BatchNorm in training mode updates the clones and not
        the model's running statistics.
        """
        return self.passes(params, lambda loss: loss(batch))

    def centre_passes(self, center: Mapping[str, Tensor], program: Callable[[Callable[[Any], Tensor]], Any]) -> Any:
        """:meth:`passes` at ``center``, for passes without gradients. A centre taken by
        :meth:`center` is the model's own weights, so they are not substituted (only the buffers'
        clones are): the substitution's bookkeeping costs about 5 us per tensor, 40% of a forward
        pass on a 36-tensor MLP. A compiled ``loss_fn`` keeps the substitution (it was traced with
        the weights as inputs; the model's own parameters would make another graph)."""
        own = isinstance(center, OwnCenter) and self.compile is None
        return self.passes(() if own else center.items(), program)

    def passes(self, params: Params, program: Callable[[Callable[[Any], Tensor]], Any]) -> Any:
        """``program(loss)`` with ``params`` (a mapping, or name, tensor pairs) substituted once for
        all the passes it makes, where ``loss(batch)`` gives the per-sample losses of ``batch``
        (checked by :func:`check_per_sample`); returns what ``program`` returns.

        One substitution (and one set of buffer clones) instead of one per pass: on a small model
        the substitution's bookkeeping costs about a third of a forward pass. The passes share
        the cloned buffers, so a pass sees what an earlier one wrote to them (BatchNorm's running
        statistics in training mode, which that mode does not read).
        """
        items = params.items() if isinstance(params, Mapping) else params
        subst = {"model." + n: t for n, t in items}
        for n, b in self.model.named_buffers():
            subst["model." + n] = b.detach().clone()
        return torch.func.functional_call(self._module, subst, (program,), strict=False)


class OwnCenter(Dict[str, Tensor]):
    """The model's own current weights by name (:meth:`LossEvaluator.center`), detached: a mapping
    whose type tells the centre's passes that nothing needs substituting. Taken at each step; a
    centre kept after the model's parameters were replaced by new tensors would not be them."""


def _own_step_stats(l_center: Tensor, l_sample: Tensor, offsets: Sequence[Tensor], noise_sq: Tensor) -> Tensor:
    """:func:`~online_llc.kernel.passes.combine_step_stats` of one rank's batch, in a third of its
    operations (about 10 instead of 30; on a small MLP 0.20 ms instead of 0.37, of a 6.3 ms plain
    shadow step): the differences' mean and unbiased variance (0 for one sample), the two mean
    losses, ``||xi||`` and the squared gradient difference, float64."""
    diff = l_sample.double() - l_center.double()
    if diff.numel() > 1:
        var, mean = torch.var_mean(diff)
    else:
        mean, var = diff.mean(), diff.new_zeros(())
    norm = _norm(list(offsets)).to(diff.device)
    noise = noise_sq.to(diff.device, torch.float64)
    return torch.stack([mean, var, l_center.double().mean(), l_sample.double().mean(), norm, noise])


def check_per_sample(out: Any) -> Tensor:
    """``out`` itself when it is a non-empty 1-D tensor (one loss per sample).

    Raises:
        ValueError: naming ``loss_fn``, for any other output."""
    if not isinstance(out, Tensor) or out.dim() != 1 or out.numel() == 0:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            "Expected `loss_fn` to return per-sample losses of shape [B] (one value per sample, "
            f"reduction='none'), got {shape}."
        )
    return out


def check_differentiable(out: Tensor) -> None:
    """Raise a one-line ``ValueError`` naming ``loss_fn`` where ``out`` carries no gradient (autograd's
    own error, "element 0 of tensors does not require grad", names neither the cause nor the fix)."""
    if not out.requires_grad:
        raise ValueError(
            "Expected `loss_fn` to return losses computed from the model's parameters, with gradients; got a tensor "
            "that does not require grad: do not .detach() them or compute them under torch.no_grad() in loss_fn."
        )


def moved_weights(center: Mapping[str, Tensor], xi: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """``w* + xi`` of every parameter (:func:`moved_items`)."""
    return dict(moved_items(center, xi))


def check_first_batch(evaluator: LossEvaluator, batch: Any, num_samples: int, generator: torch.Generator) -> int:
    """Check ``loss_fn``'s output and ``num_samples`` on the first batch; return its size ``B``.

    One forward pass at the current weights (no gradient, cloned buffers, the evaluator's mode,
    randomness from ``generator``): the per-sample losses must form a 1-D tensor with one value
    per sample (``B``, the leading size of the batch's tensors, when they share one) and ``B``
    may not exceed ``num_samples``, the training set's size.

    Raises:
        ValueError: naming ``loss_fn`` or ``num_samples``.
    """
    center = evaluator.center()
    with torch.no_grad(), evaluator.mode_context(), private_rng(center, generator):
        out = evaluator.losses(center, batch)
    sizes: set = set()
    expected = sizes.pop() if _leading_sizes(batch, sizes) and len(sizes) == 1 else None
    if expected is not None and tuple(out.shape) != (expected,):
        raise ValueError(
            f"Expected `loss_fn` to return per-sample losses of shape [B] = [{expected}] (one value per sample of "
            f"the batch, reduction='none'), got {tuple(out.shape)}."
        )
    size = int(out.numel())
    if size > num_samples:
        raise ValueError(
            f"Expected `num_samples` (n, the size of the training set) to be at least the batch size {size}, "
            f"got {num_samples}."
        )
    return size
