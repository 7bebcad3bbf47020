"""The chains of one offline estimate and how they are stepped: together in one vectorized pass
(:class:`online_llc.kernel.batched.BatchedChains`) where the model allows, one after another
(the kernel's step in place, :func:`online_llc.kernel.step.sampler_step`'s maths) otherwise.

:class:`Chains` records, per chain and step, the rows of :mod:`online_llc.offline.rows`; the
estimator (:func:`online_llc.estimate_llc`) decides the plan (calibration, burn-in, draws) from
them, whichever way the chains are stepped.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from online_llc.config import SGLDConfig
from online_llc.errors import NonFiniteDrawError
from online_llc.kernel.anchor import FixedAnchor
from online_llc.kernel.batched import BatchedChains, batched_support, pays
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.randomness import chain_seed, derived_seed
from online_llc.kernel.step import SGLDInfo, _info, _kernel_step
from online_llc.kernel.updates import dot_sum, init_aux
from online_llc.offline.batches import batches_forever, is_one_shot
from online_llc.offline.rows import ROWS

__all__ = ["Chains"]


def _row(info: SGLDInfo) -> tuple:
    return (
        info.draw, info.noise_var, info.heat_bias, info.prev_update_dot_grad, info.update_dot_grad,
        info.offset_norm**2,
    )


class Chains:
    """``num_chains`` chains around ``center``, batched when ``batched`` allows and the model
    supports it (:func:`~online_llc.kernel.batched.batched_support`, and a first batched step that
    runs).

    Args:
        evaluator, center, config, anchor: as for :func:`~online_llc.kernel.step.sampler_step`.
        num_chains: ``C``.
        seed: chain ``c``'s generator is seeded with ``chain_seed(seed, c)``; batched chains share
            the generator of chain 0's seed.
        next_batch: the next batch of the stream (chain 0's, when batched).
        first: the stream's next batch (not taken from it), to decide whether to batch.
        batches: the re-iterable the stream cycles (a one-shot iterator is one stream, which
            every chain reads on from): batched chains 1, 2, ... each cycle their own
            pass over it (a DataLoader reshuffles for each), so that every chain sees consecutive
            batches of its own epochs, as one chain run alone does. (Interleaving one stream
            among the chains changes what a shuffled epoch does to the draws: within an epoch a
            draw's batch holds none of the samples that moved its chain, and at a deliberately hot
            step, 0.15 / nbeta on a regression, every other batch read 3.6% higher than
            consecutive ones.)
        batched: True (batched, or a ValueError saying why not), False (one at a time) or None
            (batched where it pays, :func:`~online_llc.kernel.batched.pays`, and is supported;
            one at a time with a one-line warning where it would pay but the model is not
            supported; silently for a single chain or a sampler other than SGLD).
        on_step: called with the number of chain steps after each step (progress).
    """

    def __init__(
        self,
        evaluator: LossEvaluator,
        center: Mapping[str, Tensor],
        config: SGLDConfig,
        *,
        num_chains: int,
        seed: int,
        next_batch: Callable[[], Any],
        first: Any,
        batches: Iterable[Any],
        batched: Optional[bool],
        anchor: Optional[Mapping[str, Tensor]] = None,
        on_step: Callable[[int], None] = lambda k: None,
    ) -> None:
        self.evaluator, self.center, self._config, self.anchor = evaluator, center, config, anchor
        self.num_chains, self.seed, self.next_batch, self.on_step = num_chains, seed, next_batch, on_step
        self.center_loss_sum, self.center_loss_count = 0.0, 0
        #: Probe sets evaluated at each draw (:mod:`online_llc.offline.probes`), set by the estimator.
        self.probes: Optional[Any] = None
        self.batched_steps = 0
        device = next(iter(center.values())).device
        self.batched: Optional[BatchedChains] = None
        self._deal: Optional[torch.Generator] = None
        if is_one_shot(batches):
            # One stream to share. Batched chains take a step's batches from it in a random order:
            # dealt in turn, a stream that repeats with a period divisible by C (itertools.cycle
            # over an epoch) would show each chain only its own share of the data, whose mean
            # gradient is not the control variate's full-data anchor (measured: -8.4 against 2.4).
            self._streams = [next_batch] * num_chains
            self._deal = torch.Generator().manual_seed(chain_seed(seed, num_chains))
        else:
            self._streams = [next_batch] + [batches_forever(batches).__next__ for _ in range(num_chains - 1)]
        # Left to choose, a larger model runs its chains one at a time without a word: that is
        # faster there (batched_support's failures are worth a warning, this is not one).
        if batched or (batched is None and pays(evaluator)):
            reason = batched_support(evaluator, config, first, num_chains)
            if reason is None:
                # The loss's own errors (a wrong shape) are raised here, not taken for the
                # vectorized pass's failure.
                with torch.no_grad():
                    evaluator.losses(center, first)
                reason = self._probe(device)
            if reason is not None and batched:
                raise ValueError(
                    f"Expected `batched` to be None or False here: the chains cannot be batched ({reason})."
                )
            # Only a model batching would suit but cannot run is worth a word: other samplers run
            # one chain at a time by design.
            if reason is not None and num_chains > 1 and (batched or config.sampler == "sgld"):
                warnings.warn(f"estimate_llc: the chains run one at a time ({reason}).", stacklevel=4)
        if self.batched is None:
            self.gens = [torch.Generator(device=device).manual_seed(chain_seed(seed, c)) for c in range(num_chains)]
            self.states: List[Any] = []
            for _ in range(num_chains):
                offset = evaluator.zeros_like_center()
                self.states.append((offset, init_aux(config, offset)))
            self.steps_run = [0] * num_chains

    def _step_batches(self) -> List[Any]:
        """One batch per chain for a batched step."""
        batches = [stream() for stream in self._streams]
        if self._deal is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self._deal).tolist()]
        return batches

    def steps_taken(self, chain: int) -> int:
        """Steps ``chain`` has taken so far (batched chains: every chain's)."""
        return self.batched_steps if self.batched is not None else self.steps_run[chain]

    def _probe(self, device: torch.device) -> Optional[str]:
        """Take one batched step (then start the chains afresh); the error's first line if it fails."""
        gen = torch.Generator(device=device).manual_seed(chain_seed(self.seed, 0))
        chains = BatchedChains(self.evaluator, self.center, self._config, self.num_chains, gen, self.anchor)
        batches = self._step_batches()  # the stream's own errors are not the pass's
        try:
            chains.step(batches)
        except Exception as exc:  # a model vmap cannot run (in-place ops, data-dependent control flow)
            if isinstance(exc, ValueError) and "`loss_fn`" in str(exc):
                raise  # the loss's own error (detached losses), which one-at-a-time chains meet too
            return f"the vectorized pass failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        chains.xi.zero_()
        chains.reset_measurement()
        gen.manual_seed(chain_seed(self.seed, 0))
        self.batched = chains
        return None

    @property
    def config(self) -> SGLDConfig:
        """The sampler's settings (replaced by calibration between runs)."""
        return self._config

    @config.setter
    def config(self, config: SGLDConfig) -> None:
        self._config = config
        if self.batched is not None:
            self.batched.config = config

    def _record(self, info: SGLDInfo, chain: int, step: int) -> tuple:
        if not info.finite:
            raise NonFiniteDrawError(chain, step, f"draw={info.draw}, loss at w*+xi={info.loss_sample}")
        self.center_loss_sum += info.loss_center
        self.center_loss_count += 1
        return _row(info)

    def run(self, chains: Sequence[int], steps: int) -> np.ndarray:
        """``steps`` more steps of each chain in ``chains`` (all of them when batched); their rows
        ``[len(chains), ROWS, steps]``. The discretization measurement starts afresh at each run."""
        out = np.empty((len(chains), ROWS, steps))
        if self.batched is not None:
            if list(chains) != list(range(self.num_chains)):
                raise ValueError(f"Expected every chain of a batched run, got {list(chains)}.")
            self.batched.reset_measurement()
            for s in range(steps):
                # A draw is paired with the probes' losses at the offset it was drawn at (before the update).
                observe = self.probes is not None and self.probes.observing(0, self.batched_steps)
                deltas = self.probes.differences_of_rows(self.batched) if observe else None
                infos = self.batched.step(self._step_batches())
                self.batched_steps += 1
                for c, info in enumerate(infos):
                    out[c, :, s] = self._record(info, c, s)
                    if deltas is not None:
                        self.probes.add(c, deltas[c], info.draw)
                self.on_step(len(chains))
            return out
        cfg = self._config
        measures = cfg.sampler != "sghmc" and cfg.noise_scale > 0
        for i, c in enumerate(chains):
            offset, aux = self.states[c]
            # This run's last update (None before its first step): the discretization measurement.
            last: List[Optional[Mapping[str, Tensor]]] = [None]
            for s in range(steps):
                observe = self.probes is not None and self.probes.observing(c, self.steps_run[c])
                delta = self.probes.differences(offset) if observe else None
                # The model's randomness (dropout) is seeded from (seed, chain, step) on the host,
                # so a step reads its numbers once (one device sync).
                info = self._step_in_place(c, offset, aux, last if measures else None)
                self.steps_run[c] += 1
                out[i, :, s] = self._record(info, c, s)
                if delta is not None:
                    self.probes.add(c, delta, info.draw)
                self.on_step(1)
        return out

    def _step_in_place(self, c: int, offset: Any, aux: Any, last: Optional[List[Any]]) -> SGLDInfo:
        """One step of chain ``c``, updating its offset and sampler state in place, with the
        discretization measurement's dots where ``last`` (a one-item list: the last update, or
        None) is given: the previous update against this step's gradient, taken before the
        update, then this update against it. The update is formed in the last one's buffer (one
        copy of the parameters per chain, reused), not as the difference of two copies of the
        offset (about a quarter of a mid-size model's step went into those copies and their
        float64 products)."""
        device = next(iter(offset.values())).device
        dots: List[Tensor] = []

        def pre_update(grads: List[Optional[Tensor]]) -> Mapping[str, Tensor]:
            assert last is not None
            if last[0] is None:
                last[0] = {n: torch.zeros_like(t) for n, t in offset.items()}
            else:
                dots.append(dot_sum(list(last[0].values()), grads, device))
            return last[0]

        # A fixed anchor streams the centre's gradients (kernel.anchor.FixedAnchor): never held whole.
        anchor = None if self.anchor is None else FixedAnchor(self.anchor)
        pending = _kernel_step(
            self.evaluator, self.center, offset, aux, self.next_batch(), config=self._config, generator=self.gens[c],
            rng_seed=derived_seed(self.seed, c, self.steps_run[c]), anchor=anchor, keep_grads=last is not None,
            pre_update=pre_update if last is not None else None,
        )
        stats = pending.stats
        if last is not None:
            assert pending.grads is not None and last[0] is not None
            prev = dots[0] if dots else torch.full((), float("nan"), dtype=torch.float64, device=device)
            own = dot_sum(list(last[0].values()), pending.grads, device)
            stats = torch.cat([stats, torch.stack([prev, own]).to(stats.device)])
        return _info(stats.tolist(), pending, self._config)
