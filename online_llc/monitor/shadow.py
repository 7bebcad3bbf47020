"""The shadow chain: SGLD offsets that ride along with the training weights (co-moving frame).

Flow: training loop -> **ShadowSampler** -> WindowStats -> LLCFilter -> OnlineLLC records ->
callbacks. A :class:`ShadowSampler` turns each due training step into one draw ``d`` (and its
batch-noise variance ``v``) per chain; :class:`online_llc.monitor.track.Track` passes them on to the
window statistics.

Each chain keeps an offset ``xi`` (one tensor per sampled parameter), never a second copy of the
weights. A shadow step at training step ``t`` runs one kernel step (:func:`online_llc.kernel.step.sgld_step`)
centred at the *current* weights ``w_t``::

    d_t = nbeta * mean_i( l_i(w_t + xi) - l_i(w_t) ),
    xi <- xi - (epsilon / 2) * ( nbeta * grad L_B(w_t + xi) + gamma * xi ) + sqrt(epsilon) * N(0, I).

Because ``xi`` is relative to ``w_t`` the chain stays near equilibrium as training moves slowly, so
there is no burn-in per checkpoint. A chain whose draw is non-finite, or whose offset norm runs
away (above ``max_offset_norm``), is reset to ``xi = 0`` and counted; its draw is never used.

Lean at scale: each chain keeps one float32 copy of the sampled parameters (plus the sampler's
state), updated in place; a measuring step (``step(batch, measure=True)``) also splits the batch
into halves (the heat) and keeps the chain's last update to measure the step's discretization
bias (``measure_discretization``; SGLD and RMSProp-SGLD), a plain step neither. A shadow step of
any number of chains reads its numbers on the host once (one device sync); a deterministic
model's centre loss is computed once per shadow step, not per chain; the weights' movement is
measured from a sketch (:mod:`online_llc.monitor.sketch`), not a copy.

Checkpoints: :meth:`ShadowSampler.state_dict` holds the offsets, the sampler's state, the chains'
generator states (tagged with their device type), the step counter and the weight sketch. Loaded
on the same device type, the chains continue exactly. Generator states do not carry over between
device types (a CUDA generator's state is a Philox seed and offset, a CPU one a Mersenne twister),
so loaded on another device type each chain's generator is reseeded from ``(seed, chain, step
counter)`` with a warning: the chains continue from their offsets with a fresh, reproducible noise
stream (the same distribution, not the same numbers).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from online_llc.calibration.heat import discretization_term
from online_llc.calibration.step import relaxation_steps
from online_llc.config import SGLDConfig
from online_llc.errors import check_bool, check_positive_float
from online_llc.kernel.anchor import ANCHOR_RELAXATIONS, RunningAnchor, StepAnchor
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.noise import flat_views
from online_llc.kernel.randomness import chain_seed, derived_seed, deterministic
from online_llc.kernel.step import SGLDInfo, _info, _kernel_step
from online_llc.kernel.updates import dot_sum, init_aux
from online_llc.monitor.shadow_state import chain_tensors, check_own_shards, keep_update, load_generators, saved_update, to_state
from online_llc.monitor.sketch import SKETCH_VERSION, Sketcher, sketch_shift, sketch_shift_sharded

__all__ = ["ShadowStep", "ShadowSampler"]

# Domain tags of derived_seed: the model's randomness per step, and a generator reseeded on load.
_DROPOUT_SEEDS, _RESEEDS = 1, 2


@dataclass(frozen=True)
class ShadowStep:
    """One shadow step of every chain.

    Attributes:
        infos: the kernel's record per chain (at the offset before the update).
        diverged: per chain, whether it was reset at this step (its draw must not be used).
        center_shift: how far the training weights moved since the previous shadow step, measured
            from a sketch of them (:mod:`online_llc.monitor.sketch`: an unbiased estimate of
            ``||w - w'||`` from random signed folds, and at least the per-tensor norms' lower
            bound); NaN at the first step.
        discretization: per chain, the discretization bias of the chain's previous step,
            ``(p_t - u_{t-1}) / 8 - b_{t-1} / 2`` from this step's ``prev_update_dot_grad``
            ``p_t`` and the previous step's ``update_dot_grad`` and ``heat_bias``
            (:func:`online_llc.calibration.heat.discretization_bias`, one term of its mean); NaN where not
            measured (the first step of a chain and after a reset; SGHMC;
            ``measure_discretization=False``). Empty when no chain measures.
    """

    infos: List[SGLDInfo]
    diverged: List[bool]
    center_shift: float = math.nan
    discretization: List[float] = field(default_factory=list)

    @property
    def draws(self) -> List[float]:
        """``d`` per chain."""
        return [i.draw for i in self.infos]

    @property
    def noise_vars(self) -> List[float]:
        """``v`` per chain."""
        return [i.noise_var for i in self.infos]


class ShadowSampler:
    """``num_chains`` co-moving SGLD chains with private generators.

    Args:
        evaluator: the model and per-sample loss.
        config: ``nbeta``, ``localization``, ``step_size``.
        num_chains: number of chains.
        seed: chain ``c`` draws from a generator seeded with ``seed * 1000003 + c``.
        masks: per parameter, the entries the chains may move (see :func:`~online_llc.kernel.step.sampler_step`).
        max_offset_norm: reset a chain whose ``||xi||`` exceeds this. ``None``: ``20 * sqrt(d / gamma)``,
            twenty times the offset norm of the localization prior alone (``d`` sampled
            parameters), or no limit when ``gamma = 0``.
        share_center_loss: compute the loss at the centre once per shadow step for all chains
            (True), or once per chain with that chain's dropout masks (False). ``None``: share it
            when the model is deterministic as far as its modules tell in the evaluator's mode
            (:func:`~online_llc.kernel.randomness.deterministic`: no dropout module in training mode),
            decided at every step. Sharing with a random model leaves the draws unbiased but
            unpairs the dropout noise of chains after the first.
    """

    def __init__(
        self,
        evaluator: LossEvaluator,
        config: SGLDConfig,
        *,
        num_chains: int,
        seed: int,
        max_offset_norm: Optional[float] = None,
        masks: Optional[Mapping[str, Tensor]] = None,
        share_center_loss: Optional[bool] = None,
        measure_discretization: bool = True,
    ) -> None:
        self.evaluator = evaluator
        self.measure_discretization = check_bool("measure_discretization", measure_discretization)
        center = evaluator.center()
        self.device = next(iter(center.values())).device
        self.masks = evaluator.localize({n: m for n, m in (masks or {}).items() if m is not None})
        self.config = config
        self.num_chains = num_chains
        self.seed = seed
        self.share_center_loss = share_center_loss
        dim = evaluator.num_sampled()  # over all ranks when the parameters are sharded
        if max_offset_norm is None:
            max_offset_norm = 20.0 * math.sqrt(dim / config.localization) if config.localization > 0 else math.inf
        else:
            max_offset_norm = check_positive_float("max_offset_norm", max_offset_norm)
        self.max_offset_norm = max_offset_norm
        self.generators = [
            torch.Generator(device=self.device).manual_seed(chain_seed(seed, c)) for c in range(num_chains)
        ]
        self.offsets: List[Dict[str, Tensor]] = [evaluator.zeros_like_center() for _ in range(num_chains)]
        # The sampler's own chain state (SGHMC momentum, RMSProp moments; empty for SGLD).
        self.aux: List[Dict[str, Tensor]] = [init_aux(config, off) for off in self.offsets]
        # For the discretization measurement: each chain's last update u = xi_new - xi (None
        # until it has one), and that update's own dot product and heat bias (ShadowStep.discretization).
        self._updates: List[Optional[Dict[str, Tensor]]] = [None] * num_chains
        self._last_dot: List[float] = [math.nan] * num_chains
        self._last_heat_bias: List[float] = [math.nan] * num_chains
        self.divergences = 0
        #: Shadow steps run (seeds the model's randomness of each step; see load_state_dict).
        self.steps = 0
        # The sketch of the centre at the previous step (norms and random signed folds per tensor):
        # detects the weights' jumps without a second copy of them.
        self._sketch: Optional[Tensor] = None
        self._sketcher = Sketcher(self.device)
        # gradient="control_variate": the anchor, from the centre's batch gradients (reset by the
        # track when the weights jump).
        self.anchor = RunningAnchor()

    def reset_chain(self, c: int) -> None:
        """Put chain ``c`` back at ``xi = 0`` with a fresh sampler state."""
        self.offsets[c] = self.evaluator.zeros_like_center()
        self.aux[c] = init_aux(self.config, self.offsets[c])
        self._forget_updates(c)

    def _forget_updates(self, c: int) -> None:
        self._updates[c] = None
        self._last_dot[c] = math.nan
        self._last_heat_bias[c] = math.nan

    def _measuring_hook(self, c: int, dots: List[Tensor], into: Dict[str, Tensor]) -> Any:
        """The kernel's ``pre_update`` for chain ``c``: with the batch gradient ``g`` at ``xi``, the
        kept previous update's dot ``u_prev . g`` (appended to ``dots`` when the chain has one); it
        returns ``into`` filled with buffers for this step's update ``xi_new - xi``: fresh ones for
        SGLD, which forms it there (then kept rounded, :func:`~online_llc.monitor.shadow_state.keep_update`),
        the kept one in the chain's dtype for RMSProp-SGLD (it copies the offsets in, then subtracts)."""

        def hook(grads: List[Optional[Tensor]]) -> Dict[str, Tensor]:
            upd = self._updates[c]
            if upd is not None:
                dots.append(self._dot(upd, grads))
            offset = self.offsets[c]
            if self.config.sampler == "sgld":
                into.update(flat_views(offset))  # the noise is drawn into it in place
            else:
                if upd is None or any(upd[n].dtype != t.dtype for n, t in offset.items()):
                    upd = self._updates[c] = {n: torch.zeros_like(t) for n, t in offset.items()}
                into.update(upd)
            return into

        return hook

    def _dot(self, tensors: Dict[str, Tensor], grads: List[Optional[Tensor]]) -> Tensor:
        """``sum_n tensors[n] . grads[n]`` in float64 on the device (:func:`~online_llc.kernel.updates.dot_sum`)."""
        return dot_sum(list(tensors.values()), grads, self.device)

    def _anchor(self, share: bool) -> StepAnchor:
        """The kernel's anchor for one shadow step (:class:`~online_llc.kernel.anchor.StepAnchor`:
        the first chain folds the step's centre gradient in, the others reuse the result; it
        streams unless the chains share the centre's passes). The horizon follows the step."""
        self.anchor.horizon = ANCHOR_RELAXATIONS * relaxation_steps(self.config)
        return StepAnchor(self.anchor, streams=not share)

    def _measures(self) -> bool:
        """Whether a measuring step measures the discretization bias: SGLD and RMSProp-SGLD with
        injected noise (as offline)."""
        cfg = self.config
        return self.measure_discretization and cfg.sampler != "sghmc" and cfg.noise_scale > 0

    def step(self, batch: Any, measure: bool = True) -> ShadowStep:
        """One kernel step of every chain, centred at the model's current weights. ``measure``
        False runs the plain step: one pass over the whole batch at each point, no heat (NaN),
        no discretization (empty) and no last update kept; the chains move as they would have."""
        if not measure:  # a plain step keeps no last update
            for c in range(self.num_chains):
                self._forget_updates(c)
        center = self.evaluator.center()
        new_sketch = self._sketcher(list(center.values()))
        old_sketch, self._sketch = self._sketch, new_sketch
        share = self.share_center_loss
        if share is None and self.num_chains > 1:
            # Judged in the mode the passes run in (eval by default: dropout modules are off).
            with self.evaluator.mode_context():
                share = deterministic(self.evaluator.model)
        pending, shared = [], None
        # The discretization bias is measured in measuring steps, where the sampler has it.
        measure_disc = measure and self._measures()
        # Per measuring chain: [u_prev . g, u . g], the first NaN when the chain has no last update.
        dot_pairs: List[Tensor] = []
        anchor = self._anchor(bool(share)) if self.config.gradient == "control_variate" else None
        for c in range(self.num_chains):
            dots: List[Tensor] = []
            into: Dict[str, Tensor] = {}
            pre_update = self._measuring_hook(c, dots, into) if measure_disc else None
            out = _kernel_step(
                self.evaluator, center, self.offsets[c], self.aux[c], batch, config=self.config,
                generator=self.generators[c], masks=self.masks, center_losses=shared, keep_grads=measure_disc,
                rng_seed=derived_seed(_DROPOUT_SEEDS, self.seed, c, self.steps), pre_update=pre_update, heat=measure,
                anchor=anchor,
            )
            if share:
                shared = out.center_losses
            if measure_disc:
                assert out.grads is not None
                # ``into`` holds this update, u = xi_new - xi (SGLD's kept rounded), dotted as kept.
                if self.config.sampler == "sgld":
                    self._updates[c] = keep_update(into, self._updates[c])
                into.clear()
                upd = self._updates[c]
                assert upd is not None
                prev = dots[0] if dots else torch.full((), math.nan, dtype=torch.float64, device=self.device)
                dot_pairs.append(torch.stack([prev, self._dot(upd, out.grads)]).to(out.stats.device))
                out = out._replace(grads=None)
            pending.append(out)
        if measure_disc:
            pairs = torch.stack(dot_pairs)
            if self.evaluator.sharded:
                # Each rank's dots cover its shards: one collective sums them for every chain.
                pairs = self.evaluator.all_reduce_sum(pairs)
            pending = [p._replace(stats=torch.cat([p.stats, pair])) for p, pair in zip(pending, pairs)]
        self.steps += 1
        # Every number of the step (all chains, the shift) reaches the host in one copy.
        parts = [p.stats for p in pending]
        if self.evaluator.sharded:
            # Every rank sketches its shards; the collective runs on every rank at every step (a
            # rank that has no previous sketch compares the new one with itself: no shift).
            old = old_sketch if old_sketch is not None and old_sketch.shape == new_sketch.shape else None
            shift_t = sketch_shift_sharded(new_sketch, new_sketch if old is None else old, len(center), self.evaluator.all_reduce_sum)
            if old_sketch is not None:
                parts.append(shift_t.to(parts[0].device).view(1))
        elif old_sketch is not None and old_sketch.shape == new_sketch.shape:
            parts.append(sketch_shift(new_sketch, old_sketch, len(center)).to(parts[0].device).view(1))
        values = torch.cat(parts).tolist()
        width = pending[0].stats.numel()
        shift = values[-1] if len(parts) > len(pending) else math.nan
        infos, diverged, disc = [], [], []
        for c, p in enumerate(pending):
            info = _info(values[c * width : (c + 1) * width], p, self.config)
            if measure_disc:
                # This step's p_t pairs with the previous step's own dot and heat bias (NaN where
                # the chain had no last update, or there is no previous step's).
                e = discretization_term(info.prev_update_dot_grad, self._last_dot[c], self._last_heat_bias[c])
                disc.append(e if math.isfinite(e) else math.nan)
                self._last_dot[c], self._last_heat_bias[c] = info.update_dot_grad, info.heat_bias
            # The chain was updated in place whatever its numbers: a non-finite step, or a runaway
            # offset (caught through the norm the kernel reports before its update, one step
            # late), puts it back at zero.
            bad = not info.finite or info.offset_norm > self.max_offset_norm
            if bad:
                self.reset_chain(c)
                self.divergences += 1
            infos.append(info)
            diverged.append(bad)
        self.last = ShadowStep(infos, diverged, shift, disc)  # what beside-the-flow readers pair with (probes)
        return self.last

    def state_dict(self, shards: bool = False) -> Dict[str, Any]:
        """Offsets, sampler state and the sketch (tensors), generator states (uint8 tensors) with
        their device type, the step and divergence counts. For a model sharded by FSDP2 the
        offsets and sampler state are gathered to full tensors on the CPU (a collective: call it
        on every rank) and the sketch is left out; with ``shards`` each rank's state holds its
        own shards instead, with their layout under ``"shards"`` (no collective, 1/R of the
        chain per rank; :func:`online_llc.monitor.shards.merge_shards` makes a full state)."""
        offsets, aux, updates = (chain_tensors(part, self.evaluator, shards) for part in (self.offsets, self.aux, self._updates))
        return {
            "offsets": offsets,
            "aux": aux,
            "generators": [g.get_state() for g in self.generators],
            "generator_device": self.device.type,
            "steps": self.steps,
            "divergences": self.divergences,
            "center_sketch": None if self._sketch is None or self.evaluator.sharded else self._sketch.clone(),
            "sketch_version": SKETCH_VERSION,
            # Calibration moves the step during the run: a resumed chain continues with it.
            "step_size": float(self.config.step_size),
            "gradient": self.config.gradient,
            # The discretization measurement's pairing (each chain's last update, its dot and heat
            # bias), so that a resumed run measures as an uninterrupted one.
            "updates": updates,
            "last_dot": [None if math.isnan(x) else float(x) for x in self._last_dot],
            "last_heat_bias": [None if math.isnan(x) else float(x) for x in self._last_heat_bias],
            # The control variate's anchor (a sharded one is of this rank's shards: left out).
            "anchor": None if self.evaluator.sharded else self.anchor.state_dict(),
            **({"shards": self.evaluator.shard_info()} if self.evaluator.sharded and shards else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same number of chains and parameter names), onto this
        sampler's device; see the module docstring for generator states of another device type."""
        offsets, gens = state["offsets"], state["generators"]
        if len(offsets) != self.num_chains or len(gens) != self.num_chains:
            raise ValueError(f"Expected a state with {self.num_chains} chains, got {len(offsets)}.")
        names = set(self.offsets[0])
        own = check_own_shards(state, self.evaluator)  # a rank's own shards load as they are
        if self.evaluator.sharded and not own:
            offsets = [self.evaluator.take_shards(off) if set(off) == names else off for off in offsets]
            state = {**state, "aux": [self.evaluator.take_shards(a) for a in state["aux"]]}
        for off in offsets:
            if set(off) != names:
                raise ValueError(f"Expected offsets for parameters {sorted(names)}, got {sorted(off)}.")
            wrong = [n for n, t in off.items() if tuple(t.shape) != tuple(self.offsets[0][n].shape)]
            if wrong:
                n = wrong[0]
                raise ValueError(
                    f"Expected the offset of `{n}` to have shape {tuple(self.offsets[0][n].shape)}, got "
                    f"{tuple(off[n].shape)}."
                )
        # Offsets and sampler state in float32 (or float64) on this device, whatever they were saved in.
        like = self.offsets[0]
        self.offsets = [{n: to_state(t, like[n]) for n, t in off.items()} for off in offsets]
        aux = state["aux"]
        if len(aux) != self.num_chains or any(set(a) != set(init_aux(self.config, self.offsets[0])) for a in aux):
            raise ValueError(f"Expected sampler state for {self.config.sampler!r} in every chain, got {[sorted(a) for a in aux]}.")
        self.aux = [{n: to_state(t, like[n]) for n, t in a.items()} for a in aux]
        self.steps = int(state["steps"])
        # The discretization measurement's pairing, where the state has it for these chains
        # (states of other chains or shapes restart it at the next step).
        for c in range(self.num_chains):
            self._updates[c], self._last_dot[c], self._last_heat_bias[c] = saved_update(
                state, c, self.num_chains, like, None if own else self.evaluator)
        self.anchor.load_state_dict(None if self.evaluator.sharded else state.get("anchor"), list(like.values()))
        if not load_generators(self.generators, gens, state["generator_device"], self.device):
            self.reseed()
            warnings.warn(
                f"ShadowSampler: the generator states were saved on {state['generator_device']} and cannot be restored "
                f"on {self.device.type}; chains {list(range(self.num_chains))} continue from their offsets with fresh "
                "noise streams seeded from (seed, chain, step), so the run is reproducible but its noise differs "
                "from an uninterrupted one.",
                stacklevel=2,
            )
        self.divergences = int(state["divergences"])
        self.config = replace(self.config, step_size=float(state["step_size"]), gradient=state.get("gradient", self.config.gradient))
        # A sketch of another version is not comparable: the first step after loading reports no shift.
        sk = state.get("center_sketch") if state.get("sketch_version") == SKETCH_VERSION and not self.evaluator.sharded else None
        self._sketch = None if sk is None else torch.as_tensor(sk).to(self.device)

    def reseed(self) -> None:
        """Give every chain a fresh noise stream seeded from ``(seed, chain, step counter)``: a
        fixed function of them, so reproducible (used for generator states that cannot be
        restored, and by a rank that loaded another rank's chains)."""
        for c in range(len(self.generators)):
            self._reseed(c)

    def _reseed(self, c: int) -> None:
        self.generators[c].manual_seed(derived_seed(_RESEEDS, self.seed, c, self.steps))

