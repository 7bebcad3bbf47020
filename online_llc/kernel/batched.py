"""Batched chains: the C chains of an offline estimate stepped together, one vectorized pass for all.

:func:`online_llc.kernel.step.sampler_step` steps one chain; on a small model its cost is the
bookkeeping of a thousand small operations, not arithmetic, so C chains run one after another
cost C times that. :class:`BatchedChains` holds the chains' offsets as one flat ``[C, P]`` buffer
(``P`` sampled entries) and takes every chain's step at once:

* the passes: ``torch.func.vmap`` over rows of the model's per-sample losses at ``w* + xi``, each
  half batch a row of its own (its chain's offset repeated), then one ordinary backward pass of
  the sum of the rows' mean losses, which gives every row its own half-batch gradient (the rows
  are independent); the centre's losses in a second vectorized pass without gradients. An odd
  batch runs whole, with one backward pass per half. The control-variate gradient's centre
  gradients are the same passes at ``xi = 0``, as ``C`` more rows of the same call;
* the step's numbers and the update, as :func:`~online_llc.kernel.step.sampler_step` computes
  them (the same formulas, :func:`~online_llc.kernel.step._info` turns them into an
  :class:`~online_llc.kernel.step.SGLDInfo`), on ``[C, P]`` tensors: a fixed number of operations
  per step, whatever the number of chains or of parameter tensors.

Each chain draws its own batch (stacked along a new leading dimension), so the chains stay
independent: a batch shared by all chains would push them with one common gradient noise and
correlate their draws. A step whose batches do not stack (a shorter last batch) runs its chains
one at a time through the same function. The noise of all chains comes from one generator, so the
chains have other noise than the one-at-a-time path's with the same seed: the same distribution,
not the same numbers.

What is batched: SGLD (the plain or the control-variate gradient and draw) on whole parameters of
one dtype, a model whose passes draw no random numbers (no dropout in the evaluator's mode) and
whose per-sample losses do not depend on the rest of the batch (no BatchNorm in training mode), on
batches of tensors with a common leading size of at least 2. :func:`batched_support` says why
not, otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping as _Mapping
from typing import Any, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from online_llc.config import SGLDConfig
from online_llc.kernel.evaluator import LossEvaluator, check_differentiable
from online_llc.kernel.halves import _map_tensors, split_halves
from online_llc.kernel.randomness import deterministic
from online_llc.kernel.step import SGLDInfo, _info, _Pending
from online_llc.kernel.updates import state_dtype

__all__ = ["BatchedChains", "batched_support", "pays", "MAX_BATCHED_ENTRIES", "MAX_BATCHED_PARAMS"]

#: The most sampled parameters per chain at which ``batched=None`` batches the chains. Batching
#: saves the per-operation overhead, which is all of a small model's step; a large model's step
#: is arithmetic, which a batched matrix product does no faster (on a CPU, slower). With 4 chains,
#: one thread, ``benchmarks/batched_chains.py`` measured 3.0-3.8x faster on deep linear networks
#: of 8 and 72 parameters and a d = 12 regression, 2.6x on a 9.6k-parameter MLP at batch 128,
#: 1.3x at 51k, and 0.89x (slower) at 134k.
MAX_BATCHED_PARAMS = 1 << 16

#: The most chain entries ``C * P`` (``2 C P`` with the control variate's centre rows) stacked in
#: one pass: 2^24 float32 entries are 64 MiB per copy, and a step holds about six copies (the
#: offsets, the two half gradients, the update, the noise, the last update). Larger models run
#: their chains one at a time.
MAX_BATCHED_ENTRIES = 1 << 24


def _only_tensors(batch: Any) -> bool:
    if isinstance(batch, Tensor):
        return True
    if isinstance(batch, _Mapping):
        return type(batch) is dict and all(_only_tensors(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return all(_only_tensors(v) for v in batch)
    return False


def _stack(batches: Sequence[Any]) -> Any:
    """The batches stacked along a new leading dimension, leaf by leaf (they share a structure)."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.stack(list(batches))
    if isinstance(first, _Mapping):
        return {k: _stack([b[k] for b in batches]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_stack([b[i] for b in batches]) for i in range(len(first))))
    return type(first)(_stack([b[i] for b in batches]) for i in range(len(first)))


def _leading(stacked: Any) -> int:
    """The per-chain batch size of a stacked batch (its tensors' second dimension)."""
    if isinstance(stacked, Tensor):
        return int(stacked.shape[1])
    values = stacked.values() if isinstance(stacked, dict) else stacked
    return _leading(next(iter(values)))


def pays(evaluator: LossEvaluator) -> bool:
    """Whether batching is expected to be faster here: at most :data:`MAX_BATCHED_PARAMS` sampled
    parameters."""
    return evaluator.num_sampled() <= MAX_BATCHED_PARAMS


def batched_support(evaluator: LossEvaluator, config: SGLDConfig, batch: Any, num_chains: int) -> Optional[str]:
    """Why the chains cannot be batched (one line), or None when they can."""
    if num_chains < 2:
        return "one chain"
    if config.sampler != "sgld":
        return f"sampler={config.sampler!r} runs one chain at a time"
    if evaluator.sharded:
        return "sharded parameters run one chain at a time"
    center = evaluator.center()
    if len({state_dtype(t.dtype) for t in center.values()}) != 1:
        return "the sampled parameters have several dtypes"
    entries = num_chains * sum(t.numel() for t in center.values()) * (2 if config.gradient == "control_variate" else 1)
    if entries > MAX_BATCHED_ENTRIES:
        return f"{entries} chain entries exceed the batched pass's {MAX_BATCHED_ENTRIES}"
    with evaluator.mode_context():
        if not deterministic(evaluator.model):
            return "the model draws random numbers (dropout) in the passes' mode"
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in evaluator.model.modules()):
            return "BatchNorm in training mode makes a sample's loss depend on its batch"
    if not _only_tensors(batch) or split_halves(batch) is None:
        return "the batch is not tensors with a common leading size of at least 2"
    return None


class BatchedChains:
    """``num_chains`` SGLD chains around ``center``, stepped together (see the module docstring).

    Args:
        evaluator: the model and per-sample loss (:func:`batched_support` must accept them).
        center: the centre weights ``w*`` by parameter name (the evaluator's sampled parameters).
        config: the sampler's settings; :attr:`config` may be replaced between steps (calibration).
        num_chains: ``C``.
        generator: the noise of every chain.
        anchor: the full-data gradient at the centre by parameter name (the control variate).
    """

    def __init__(
        self,
        evaluator: LossEvaluator,
        center: Mapping[str, Tensor],
        config: SGLDConfig,
        num_chains: int,
        generator: torch.Generator,
        anchor: Optional[Mapping[str, Tensor]] = None,
    ) -> None:
        self.evaluator, self.config, self.num_chains, self.generator = evaluator, config, num_chains, generator
        self.names = list(center)
        self.center = dict(center)
        self.shapes = [center[n].shape for n in self.names]
        self.sizes = [center[n].numel() for n in self.names]
        first = center[self.names[0]]
        self.dtype = state_dtype(first.dtype)
        #: The chains' offsets, one flat row per chain.
        self.xi = torch.zeros(num_chains, sum(self.sizes), dtype=self.dtype, device=first.device)
        # The last update of each chain (the discretization measurement), None at a run's start.
        self._last: Optional[Tensor] = None
        self.anchor = None if anchor is None else torch.cat([anchor[n].reshape(-1).to(self.dtype) for n in self.names])
        if config.gradient == "control_variate" and self.anchor is None:
            raise ValueError("Expected `anchor` (the full-data gradient at the centre) for gradient='control_variate'.")

    def _params(self, xi: Tensor) -> List[Any]:
        """``(name, w* + xi)`` per parameter from one chain's flat offset, in the parameters' dtype."""
        views = torch.split(xi, self.sizes)
        return [
            (n, (self.center[n] + v.view(s)).to(self.center[n].dtype))
            for n, v, s in zip(self.names, views, self.shapes)
        ]

    def _losses(self, xi: Tensor, batch: Any) -> Tensor:
        """One row's per-sample losses at ``w* + xi`` on ``batch`` (vectorized over rows)."""
        return self.evaluator.passes(self._params(xi), lambda loss: loss(batch))

    def _centre_losses(self, batch: Any) -> Tensor:
        return self.evaluator.passes(self.center.items(), lambda loss: loss(batch))

    def reset_measurement(self) -> None:
        """Start a new run: the next step has no last update to pair with (as
        :func:`~online_llc.kernel.step.sampler_step` without ``previous_offset``)."""
        self._last = None

    def _passes(self, rows: Tensor, batches: Sequence[Any], centre: bool) -> Any:
        """``(g1, g2 [R, P], losses at w* + rows [R, B], at w* [R, B] or None)``: the halves' mean
        loss gradients of every row ``rows[r]`` on its batch ``batches[r]``, or None when the
        batches do not stack.

        The halves are rows of their own where they stack (an even batch): one forward pass and
        one backward pass for all of them. An odd batch runs whole, with one backward pass per
        half. The rows are independent, so the gradient of the sum of their means is every row's
        own gradient."""
        r = rows.shape[0]
        try:
            stacked = _stack(list(batches))
        except (RuntimeError, TypeError, IndexError, KeyError):
            return None
        size = _leading(stacked)
        split = size % 2 == 0
        if split:
            # Each batch's halves as rows of their own: [R, B, ...] -> [2R, B / 2, ...] (a view).
            stacked = _map_tensors(stacked, lambda t: t.reshape(2 * r, size // 2, *t.shape[2:]))
        leaf = (rows.repeat_interleave(2, 0) if split else rows).detach().requires_grad_(True)
        losses = torch.func.vmap(self._losses)(leaf, stacked)
        b = losses.shape[1] * (2 if split else 1)
        h = b // 2
        check_differentiable(losses)
        if split:
            (g,) = torch.autograd.grad(losses.mean(1).sum(), leaf)
            g = g.view(r, 2, -1)
            g1, g2 = g[:, 0], g[:, 1]
        else:
            g1 = torch.autograd.grad(losses[:, :h].mean(1).sum(), leaf, retain_graph=True)[0]
            g2 = torch.autograd.grad(losses[:, h:].mean(1).sum(), leaf)[0]
        at_centre = None
        if centre:
            with torch.no_grad():
                at_centre = torch.func.vmap(self._centre_losses)(stacked).reshape(r, b)
        return g1, g2, losses.detach().reshape(r, b), at_centre

    def step(self, batches: Sequence[Any]) -> List[SGLDInfo]:
        """One step of every chain, chain ``c`` on ``batches[c]``; returns each chain's
        :class:`SGLDInfo` (at the offset before the update). The offsets are updated whatever the
        numbers: the caller stops on a non-finite step."""
        cv = self.config.gradient == "control_variate"
        rows = torch.cat([self.xi, torch.zeros_like(self.xi)]) if cv else self.xi
        with self.evaluator.mode_context(), torch.enable_grad():
            out = self._passes(rows, list(batches) * 2 if cv else list(batches), centre=not cv)
            if out is not None:
                return self._finish(*out, cv)[0]
            # Batches that do not stack (a shorter one): chain by chain, through the same passes.
            c = self.num_chains
            infos: List[SGLDInfo] = []
            updates = []
            for k in range(c):
                picks = [k, c + k] if cv else [k]
                part = self._passes(rows[picks], [batches[k]] * len(picks), centre=not cv)
                if part is None:
                    raise ValueError(
                        "Expected every batch to hold tensors only, as the first did (batched chains stack "
                        f"them); got {type(batches[k]).__name__} for chain {k}. Pass batched=False to run the "
                        "chains one at a time."
                    )
                info, u = self._finish(*part, cv, chains=slice(k, k + 1), apply=False)
                infos += info
                updates.append(u)
        self._apply(torch.cat(updates))
        return infos

    def _finish(
        self, g1: Tensor, g2: Tensor, sample: Tensor, centre: Optional[Tensor], cv: bool,
        chains: slice = slice(None), apply: bool = True,
    ) -> Any:
        """The numbers and update of ``chains`` from their passes (with the control variate, the
        centre's rows follow the chains' rows)."""
        cfg = self.config
        xi = self.xi[chains]
        c = xi.shape[0]
        with torch.no_grad():
            if cv:
                c1, c2 = g1[c:], g2[c:]
            g1, g2 = g1[:c], g2[:c]
            b = sample.shape[-1]
            b1, b2 = b // 2, b - b // 2
            # With the control variate the centre's losses are its zero-offset rows.
            centre_losses = sample[c:] if cv else centre
            assert centre_losses is not None
            sample = sample[:c]
            diff = sample.double() - centre_losses.double()
            kappa = None
            if cv:
                assert self.anchor is not None
                # g_k <- g_k - c_k + gbar; the control-variate draw's corrections (c_k - gbar) . xi.
                g1, g2 = g1 - c1 + self.anchor, g2 - c2 + self.anchor
                if cfg.draw == "control_variate":
                    xd = xi.double()
                    kappa = torch.stack([((ck - self.anchor).double() * xd).sum(1) for ck in (c1, c2)], 1)
            d = g1 - g2
            noise_sq = torch.linalg.vector_norm(d, dim=1).double().square()
            g = g2.add_(d, alpha=b1 / b)
            if kappa is None:
                mean, var = diff.mean(1), diff.var(1)
            else:
                m1 = diff[:, :b1].mean(1) - kappa[:, 0]
                m2 = diff[:, b1:].mean(1) - kappa[:, 1]
                mean, var = (b1 * m1 + b2 * m2) / b, (m1 - m2).square() * (b1 * b2 / b)
            u = self._update(xi, g)
            measured = self._last is not None and cfg.noise_scale > 0
            nan = torch.full((c,), math.nan, dtype=torch.float64, device=xi.device)
            prev_dot = (self._last[chains].double() * g.double()).sum(1) if measured else nan  # type: ignore[index]
            own_dot = (u.double() * g.double()).sum(1) if measured else nan
            table = torch.stack(
                [mean, var, centre_losses.double().mean(1), sample.double().mean(1),
                 torch.linalg.vector_norm(xi, dim=1).double(), noise_sq, prev_dot, own_dot], 1,
            ).tolist()
        pending = _Pending(table, b, (b1, b2), None, None)  # type: ignore[arg-type]
        infos = [_info(v if measured else v[:6], pending, cfg) for v in table]
        if apply:
            self._apply(u)
        return infos, u

    def _update(self, xi: Tensor, g: Tensor) -> Tensor:
        """SGLD's update ``u = sqrt(eps) z - (eps nbeta / 2) g - (eps gamma / 2) xi`` (a new tensor)."""
        cfg = self.config
        eps = cfg.step_size
        std = math.sqrt(eps) * cfg.noise_scale
        if std > 0:
            u = torch.empty_like(xi).normal_(generator=self.generator).mul_(std)
        else:
            u = torch.zeros_like(xi)
        u.add_(g.to(xi.dtype), alpha=-eps * cfg.nbeta / 2)
        if cfg.localization > 0:
            u.add_(xi, alpha=-eps * cfg.localization / 2)
        return u

    def _apply(self, u: Tensor) -> None:
        self.xi.add_(u)
        self._last = u

    def losses_at_offsets(self, batch: Any, fn: Any = None) -> Tensor:
        """Every chain's per-sample losses on one shared ``batch`` at ``w* + xi`` ``[C, B]`` (with
        ``fn``, a probe set's own loss ``fn(model, batch)``, ``[C, ...]``), in one vectorized pass
        without gradients (probe sets, :mod:`online_llc.offline.probes`)."""

        def losses(xi: Tensor) -> Tensor:
            return self.evaluator.passes(self._params(xi), lambda loss: loss(batch, fn))

        with torch.no_grad():
            return torch.func.vmap(losses)(self.xi)

    def offsets(self, chain: int) -> dict:
        """Chain ``chain``'s offset by parameter name (views of the flat buffer)."""
        return {n: v.view(s) for n, v, s in zip(self.names, torch.split(self.xi[chain], self.sizes), self.shapes)}
