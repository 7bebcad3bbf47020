"""The shadow chain on a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Flow: training loop -> ShadowSampler (sgld kernel, **sharded evaluator**) -> WindowStats ->
LLCFilter -> OnlineLLC records -> callbacks. :class:`ShardedLossEvaluator` stands in for
:class:`~online_llc.kernel.evaluator.LossEvaluator` when the model is sharded by FSDP2; the kernel and
the sampler are the same.

Why not substitution. FSDP2's forward pre-hook all-gathers each module's own parameter shards and
swaps them in, so weights substituted through ``torch.func.functional_call`` are ignored (checked:
the output is exactly the unperturbed one). The sharded evaluator therefore moves the shards
themselves, for the duration of the passes only::

    saved <- local shard of w*                      (a copy of 1/R of the parameters per rank)
    local shard <- (saved + xi_local).to(dtype)     (FSDP all-gathers w* + xi in its forward)
    forward, backward on each half-batch           (the gradient is reduce-scattered: mean over ranks)
    local shard <- saved                            (bit-exact, also when a pass raises)

The training run's ``.grad`` fields are set aside before the passes and put back after them, and
every FSDP module is resharded after each pass (a module that keeps its unsharded parameters after
the forward, ``reshard_after_forward=False``, would otherwise serve the next pass stale weights).
After each forward the ranks agree that none failed (:mod:`online_llc.kernel.fsdp_guards`), so a
``loss_fn`` that raises on one rank's batch stops the step on every rank instead of leaving the
others waiting.
Gradient synchronisation is switched on for the passes and restored after them, so the chain's
gradient is reduced even inside a user's ``set_requires_gradient_sync(False)`` block; the gradient
FSDP2 accumulates there on the *unsharded* parameters (not ``.grad``) is set aside for the passes
too, or the chain's backward would add it to its own, reduce-scatter the sum and clear it. Both
live in private FSDP2 state; where a torch keeps them elsewhere the monitor warns once.

One chain spans all ranks. Chain ``c`` is one offset ``xi``, sharded like the parameters (each
rank keeps its shard, in float32); its step is the step of the unsharded chain on the union of
the ranks' batches:

* the gradient is FSDP's reduce-scattered mean over ranks of each rank's mean-loss gradient (the
  union's mean gradient when the ranks' batches have equal sizes, which ``DistributedSampler``
  ensures);
* the draw, its variance and the norms are combined over ranks from per-rank counts, means and
  centred sums of squares (one ``all_gather`` of seven numbers per rank and chain);
* the noise is the unsharded chain's stream (chunks of :func:`~online_llc.kernel.noise.noise_chunk`
  entries over the full parameters, from the chain's generator, the same seed on every rank) and
  each rank keeps its shard of each tensor: the chain is the unsharded chain with the same seed,
  to float tolerance (tested on two processes). The cost is one chunk and one tensor's
  full-size noise at a time, not a copy of the model.

Every rank therefore holds the same draws, windows and filter state without a ``gather``; the
chain's memory per rank is ``1/R`` of the unsharded chain's. Checkpoints are per rank (each holds
its shards of the offsets).

Supported: a 1-D mesh with ``Shard(dim)`` placements (``fully_shard`` with its default mesh, or a
``shard_placement_fn``). Refused with a clear error: 2-D meshes (HSDP, tensor parallelism), and
head masks (:mod:`online_llc.models.heads`); parameter groups by name are supported.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from online_llc.kernel.evaluator import LossEvaluator, LossFn, Params, check_differentiable, check_per_sample
from online_llc.kernel.fsdp_guards import _restore_sync_state, _sync_state, agree_on_failure
from online_llc.kernel.updates import state_dtype

__all__ = ["ShardLayout", "ShardedLossEvaluator", "is_fsdp2", "make_evaluator"]


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` is, or contains, a module sharded by FSDP2 (``fully_shard``)."""
    return any(is_fsdp2_module(m) for m in model.modules())


@dataclass(frozen=True)
class ShardLayout:
    """Where a rank's shard sits in a parameter: ``full[... start : start + length ...]`` along
    ``dim`` of the full tensor of shape ``shape`` (``torch.chunk`` over the ``size`` ranks of the
    mesh, FSDP2's rule)."""

    shape: torch.Size
    dim: int
    start: int
    length: int

    def take(self, full: Tensor) -> Tensor:
        """This rank's shard of a full-shape tensor (a view)."""
        return full.narrow(self.dim, self.start, self.length)


def _layout(p: Tensor) -> ShardLayout:
    mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
    if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard():
        raise ValueError(
            "Expected `model` to be sharded by FSDP2 over a 1-D device mesh with Shard placements, got "
            f"placements {tuple(placements)} on a {mesh.ndim}-D mesh: HSDP and tensor parallelism are not "
            "supported by the shadow chain yet."
        )
    dim = placements[0].dim % p.dim()
    size, rank = mesh.size(), mesh.get_local_rank()
    full = p.shape[dim]
    # torch.chunk's rule: ceil(full / size) per rank, the last ranks shorter or empty.
    chunk = -(-full // size) if full else 0
    start = min(rank * chunk, full)
    length = max(0, min(chunk, full - start))
    return ShardLayout(torch.Size(p.shape), dim, start, length)


class ShardedLossEvaluator(LossEvaluator):
    """Per-sample losses and gradients of an FSDP2-sharded model at ``w* + xi`` (see the module
    docstring): the same interface as :class:`~online_llc.kernel.evaluator.LossEvaluator`, on each
    rank's shards.

    Args:
        model: the model, sharded by ``fully_shard`` (its parameters are DTensors).
        loss_fn, param_names, mode: as for :class:`~online_llc.kernel.evaluator.LossEvaluator`.

    Raises:
        ValueError: parameters that are not sharded over a 1-D mesh, or no FSDP2 module.
    """

    sharded = True
    _refuse_sharded = False

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, param_names: Optional[List[str]] = None, mode: str = "eval"
    ) -> None:
        if not is_fsdp2(model):
            raise ValueError("Expected `model` to be sharded by FSDP2 (fully_shard), got an unsharded model.")
        super().__init__(model, loss_fn, param_names, mode)
        params = dict(model.named_parameters())
        bad = [n for n in self.param_names if not hasattr(params[n], "to_local")]
        if bad:
            raise ValueError(
                f"Expected every sampled parameter of `model` to be sharded by FSDP2, got whole parameters {bad[:3]}: "
                "shard the modules that own them with fully_shard (the root module included)."
            )
        self.layouts: Dict[str, ShardLayout] = {n: _layout(params[n]) for n in self.param_names}
        mesh = params[self.param_names[0]].device_mesh
        self.group = mesh.get_group()
        self.world = int(mesh.size())
        self.rank = int(mesh.get_local_rank())
        self._device = params[self.param_names[0]].to_local().device  # the agreement's flag lives there
        self._fsdp_modules = [m for m in model.modules() if is_fsdp2_module(m)]

    # ---- the evaluator's interface on shards -------------------------------------------------------
    def center(self) -> Dict[str, Tensor]:
        """This rank's shards of the current trainable parameters, detached (no copy)."""
        params = dict(self.model.named_parameters())
        return {n: params[n].to_local().detach() for n in self.param_names}

    def num_sampled(self) -> int:
        """The number of sampled entries over all ranks (the chain's dimension)."""
        return sum(int(torch.Size(l.shape).numel()) for l in self.layouts.values())

    def localize(self, masks: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Masks of full parameter shape cut to this rank's shards."""
        if masks:
            raise ValueError(
                "Expected no head masks (`heads`) for a model sharded by FSDP2: masked groups are not supported "
                "on sharded models yet; group whole parameters by name instead."
            )
        return {}

    def shard_info(self) -> Dict[str, Any]:
        """This rank's place in the chain, as a checkpoint of shards records it (plain values):
        ``{"rank", "world", "layouts": {name: [full shape, dim, start, length]}}``."""
        layouts = {n: [list(lay.shape), lay.dim, lay.start, lay.length] for n, lay in self.layouts.items()}
        return {"rank": self.rank, "world": self.world, "layouts": layouts}

    def noise_layouts(self, names: Sequence[str]) -> List[ShardLayout]:
        """The shard layouts of ``names``, in order (the kernel draws each tensor's noise at its
        full shape and keeps this rank's shard)."""
        return [self.layouts[n] for n in names]

    # ---- the primitives of the kernel's pass program (online_llc.kernel.passes) -------------------
    # FSDP2's backward all-gathers the (moved) shards again, and reshards after it.
    grads_inside_passes = True
    one_gradient_per_pass = True
    streams_grads = False

    def passes(self, params: Params, program: Callable[[Callable[[Any], Tensor]], Any]) -> Any:
        """``program(loss)`` with this rank's shards of the sampled parameters set to ``params``
        (this rank's shards; a mapping or name, tensor pairs) for all its passes; the model's own
        shards are restored after them, also when a pass raises (bit-exact)."""
        with self._weights(params.items() if isinstance(params, Mapping) else params):
            return program(self._pass)

    def grads(self, out: Tensor, leaves: List[Tensor], retain_graph: bool = False) -> List[Optional[Tensor]]:
        """The gradient of ``out`` as FSDP reduces it: the mean over ranks of each rank's gradient
        (the union's mean gradient when the ranks' batches have equal sizes), this rank's shards,
        taken from the parameters' ``.grad`` (the offsets ``leaves`` are not in the graph: the
        shards themselves moved)."""
        check_differentiable(out)
        out.backward(retain_graph=retain_graph)
        return self._take_grads()

    def pass_session(self) -> Any:
        """The training run's gradients set aside and FSDP's gradient reduction switched on for
        the passes (:meth:`_passes`)."""
        return self._passes()

    def gather_rows(self, row: Tensor) -> Tensor:
        """Every rank's row of a step's numbers (one ``all_gather``), stacked ``[R, 7]``: the
        draw, its variance and the norms are then combined over the union of the ranks' batches
        and the whole offset."""
        rows = [torch.empty_like(row) for _ in range(self.world)]
        dist.all_gather(rows, row, group=self.group)
        return torch.stack(rows)

    def gather_full(self, tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Full-shape copies, on the CPU, of per-rank shards (offsets or sampler state): a
        collective, every rank must call it; one tensor is gathered at a time."""
        out = {}
        for n, t in tensors.items():
            lay = self.layouts[n]
            chunk = -(-lay.shape[lay.dim] // self.world) if lay.shape[lay.dim] else 0
            pad_shape = list(lay.shape)
            pad_shape[lay.dim] = chunk
            padded = t.new_zeros(pad_shape)
            padded.narrow(lay.dim, 0, lay.length).copy_(t)
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded.contiguous(), group=self.group)
            out[n] = torch.cat(parts, dim=lay.dim).narrow(lay.dim, 0, lay.shape[lay.dim]).cpu()
        return out

    def take_shards(self, tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """This rank's shards of full-shape tensors (copies).

        Raises:
            ValueError: a tensor whose shape is not its parameter's full shape."""
        out = {}
        for n, t in tensors.items():
            lay = self.layouts[n]
            if tuple(t.shape) != tuple(lay.shape):
                raise ValueError(
                    f"Expected the state of `{n}` to have the parameter's full shape {tuple(lay.shape)}, got "
                    f"{tuple(t.shape)}: a sharded monitor's state holds full tensors (OnlineLLC.state_dict gathers them)."
                )
            out[n] = lay.take(t).clone()
        return out

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (a new tensor)."""
        out = t.clone()
        dist.all_reduce(out, group=self.group)
        return out

    # ---- the passes -------------------------------------------------------------------------------
    def _forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)

    def _pass(self, batch: Any, fn: Optional[Callable[..., Tensor]] = None) -> Tensor:
        """One forward of ``loss_fn``, its output checked (one loss per sample), then every FSDP
        module resharded, and the ranks' agreement that every forward succeeded
        (:func:`~online_llc.kernel.fsdp_guards.agree_on_failure`: a rank whose ``loss_fn`` raised
        must not leave the others waiting in the next collective). ``fn``: another loss of the
        model (a probe set's), taken as it returns."""
        # Buffers are put back after the pass (a BatchNorm in training mode would update its
        # running statistics), as the unsharded evaluator's cloned buffers do.
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        failure: Optional[BaseException] = None
        try:
            out = check_per_sample(self._forward(batch)) if fn is None else fn(self.model, batch)
        except Exception as exc:  # noqa: BLE001 - raised after the ranks agree, below
            failure = exc
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            self._reshard()
        agree_on_failure(failure, self.group, self.rank, self._device)
        return out

    def _reshard(self) -> None:
        for m in self._fsdp_modules:
            m.reshard()

    def _take_grads(self) -> List[Optional[Tensor]]:
        """This pass's gradients (this rank's shards, in the chain's dtype), the ``.grad`` fields
        emptied for the next pass."""
        params = dict(self.model.named_parameters())
        out: List[Optional[Tensor]] = []
        for n in self.param_names:
            g = params[n].grad
            out.append(None if g is None else g.to_local().to(state_dtype(g.dtype)))
        for p in params.values():
            p.grad = None
        return out

    @contextmanager
    def _weights(self, values: Iterable[Tuple[str, Tensor]]) -> Iterator[None]:
        """This rank's shards of the sampled parameters set to ``values`` (name, tensor pairs,
        consumed one at a time: a generator keeps one moved tensor alive, not a copy of the
        shards) for the block; the saved shards are copied back after it, also when it raises
        (bit-exact)."""
        params = dict(self.model.named_parameters())
        saved: Dict[str, Tensor] = {}
        try:
            with torch.no_grad():
                for n, v in values:
                    local = params[n].to_local()
                    if v.data_ptr() != local.data_ptr():
                        saved[n] = local.clone()
                        local.copy_(v)
                    del v
            yield
        finally:
            with torch.no_grad():
                for n, s in saved.items():
                    params[n].to_local().copy_(s)
            self._reshard()

    @contextmanager
    def _passes(self) -> Iterator[None]:
        """Set the training run's gradients aside and switch FSDP's gradient reduction on for the
        block; put both back after it. (Resharding is left to :meth:`_pass` and :meth:`_weights`,
        through which every forward and every change of the shards goes.)"""
        params = list(self.model.parameters())
        grads = [p.grad for p in params]
        flags, pending = _sync_state(self._fsdp_modules)
        for p in params:
            p.grad = None
        for m in self._fsdp_modules:
            m.set_requires_gradient_sync(True, recurse=False)
        try:
            yield
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            _restore_sync_state(flags, pending)


def is_fsdp2_module(m: nn.Module) -> bool:
    """Whether ``m`` itself was passed to ``fully_shard`` (its class derives from ``FSDPModule``)."""
    return any(c.__name__ == "FSDPModule" for c in type(m).__mro__)


def make_evaluator(
    model: nn.Module,
    loss_fn: LossFn,
    param_names: Optional[List[str]] = None,
    mode: str = "eval",
    compile: Optional[str] = None,
) -> LossEvaluator:
    """The online monitor's evaluator: :class:`ShardedLossEvaluator` for a model sharded by FSDP2,
    else :class:`~online_llc.kernel.evaluator.LossEvaluator` (which refuses the other sharded models).

    Raises:
        ValueError: ``compile`` for a model sharded by FSDP2 (its passes run FSDP2's hooks, which
            the compiled path does not cover).
    """
    if isinstance(model, nn.Module) and is_fsdp2(model):
        if compile is not None:
            raise ValueError(f"Expected `compile` to be False for a model sharded by FSDP2, got {compile!r}.")
        return ShardedLossEvaluator(model, loss_fn, param_names, mode)
    return LossEvaluator(model, loss_fn, param_names, mode, compile=compile)
