"""Probe sets for :func:`online_llc.estimate_llc`: fixed samples whose losses are evaluated at
every draw of every chain, for their observable-refined LLC and their Bayesian influence
(:mod:`online_llc.stats.probes` has the statistics).

Flow: estimate_llc -> Chains (each draw: **ProbeSets.observe** at ``w* + xi``, then the step's
draw ``d``) -> ProbeMoments -> ProbeResult.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from online_llc.errors import describe
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.records import ProbeResult
from online_llc.stats.probes import SEGMENTS, ProbeMoments

__all__ = ["ProbeSets", "MAX_PROBES"]

#: The most probe samples over all sets: each is one loss per draw and chain, and its statistics
#: O(segments) numbers.
MAX_PROBES = 1 << 16


class ProbeSets:
    """Probe sets, checked and evaluated at the centre once.

    Args:
        probes: ``{name: batch}`` or ``{name: iterable of batches}`` (what ``loss_fn`` takes;
            a tensor, or a tuple, list or dict of tensors, is one batch; a DataLoader is read
            once, in its order).
        evaluator: the estimate's evaluator (its ``loss_fn`` gives the per-sample losses).
        center: ``w*``.

    Raises:
        ValueError: not a mapping of names to batches, an empty set, a ``loss_fn`` that does not
            give one loss per probe sample, or more than :data:`MAX_PROBES` samples.
    """

    def __init__(self, probes: Mapping[str, Any], evaluator: LossEvaluator, center: Mapping[str, Tensor]) -> None:
        if not isinstance(probes, Mapping) or not probes:
            raise ValueError(f"Expected `probes` to be a non-empty mapping of names to batches, got {describe(probes)}.")
        self.evaluator, self.center = evaluator, dict(center)
        self.names: List[str] = []
        self.batches: List[List[Any]] = []
        centre: List[Tensor] = []
        for name, value in probes.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Expected the names of `probes` to be non-empty strings, got {name!r}.")
            batches = [value] if _is_batch(value) else list(value)
            if not batches:
                raise ValueError(f"Expected the probe set {name!r} to hold at least one sample, got none.")
            with torch.no_grad():
                losses = [self._losses(self.center, b) for b in batches]
            self.names.append(name)
            self.batches.append(batches)
            centre.append(torch.cat(losses))
        self.sizes = [len(c) for c in centre]
        if sum(self.sizes) > MAX_PROBES:
            raise ValueError(f"Expected at most {MAX_PROBES} probe samples over all sets, got {sum(self.sizes)}.")
        self.at_center = torch.cat(centre).double().cpu().numpy()
        self.moments: Optional[ProbeMoments] = None
        self.start: Dict[int, int] = {}

    def _losses(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        losses = self.evaluator.losses(params, batch)
        return losses.detach().reshape(-1)

    def begin(self, num_chains: int, num_draws: int, start: Mapping[int, int]) -> None:
        """Record from now on: chain ``c``'s draws from its step ``start[c]`` on (after its
        burn-in), in segments of ``num_draws / SEGMENTS`` draws."""
        self.moments = ProbeMoments(num_chains, len(self.at_center), max(1, num_draws // SEGMENTS))
        self.start = dict(start)

    def observing(self, chain: int, step: int) -> bool:
        """Whether ``chain``'s step number ``step`` (0-based, counted over the whole run) is a draw."""
        return self.moments is not None and step >= self.start.get(chain, np.iinfo(np.int64).max)

    def differences(self, offset: Mapping[str, Tensor]) -> np.ndarray:
        """``delta_k = l_k(w* + xi) - l_k(w*)`` of every probe sample, at offset ``xi``."""
        params = {n: (self.center[n] + offset[n]).to(self.center[n].dtype) for n in self.center}
        with torch.no_grad():
            losses = torch.cat([self._losses(params, b) for batches in self.batches for b in batches])
        return losses.double().cpu().numpy() - self.at_center

    def differences_of_rows(self, chains: Any) -> np.ndarray:
        """``delta`` of every chain of batched ``chains`` (:class:`~online_llc.kernel.batched.BatchedChains`)
        ``[C, K]``: one vectorized pass per probe batch for all chains."""
        losses = torch.cat([chains.losses_at_offsets(b).reshape(chains.xi.shape[0], -1)
                            for batches in self.batches for b in batches], dim=1)
        return losses.double().cpu().numpy() - self.at_center

    def add(self, chain: int, delta: np.ndarray, draw: float) -> None:
        """Pair the probes' differences at a draw's offset with the draw."""
        assert self.moments is not None
        self.moments.add(chain, delta, draw)

    def results(self, nbeta: float) -> Dict[str, ProbeResult]:
        """Each set's :class:`ProbeResult` from the draws recorded."""
        assert self.moments is not None
        out: Dict[str, ProbeResult] = {}
        lo = 0
        for name, size in zip(self.names, self.sizes):
            s = self.moments.select(lo, lo + size).summary(nbeta)
            out[name] = ProbeResult(
                name=name, llc=s["llc"], llc_std=s["llc_std"], influence=s["influence"], influence_std=s["influence_std"],
                correlation=s["correlation"], correlation_std=s["correlation_std"], num_probes=size, count=s["count"],
                susceptibility=s["susceptibility"], susceptibility_std=s["susceptibility_std"],
            )
            lo += size
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
