"""Probe sets for :func:`online_llc.estimate_llc`: fixed samples whose losses are evaluated at
every draw of every chain, for their observable-refined LLC and their Bayesian influence
(:mod:`online_llc.stats.probes` has the statistics).

Flow: estimate_llc -> Chains (each draw: **ProbeSets.observe** at ``w* + xi``, then the step's
draw ``d``) -> ProbeMoments -> ProbeResult.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.probes import ProbeBatches, check_kernel_size, kernel_blocks, probe_results
from online_llc.records import ProbeResult
from online_llc.stats.probes import SEGMENTS, ProbeMoments

__all__ = ["ProbeSets"]


class ProbeSets:
    """Probe sets (:class:`~online_llc.kernel.probes.ProbeBatches`), evaluated at the centre once,
    and the statistics of an estimate's draws.

    Args:
        probes: as for :class:`~online_llc.kernel.probes.ProbeBatches`.
        evaluator: the estimate's evaluator (its ``loss_fn`` gives the per-sample losses).
        center: ``w*``.
        kernel: also keep each set's loss kernel ``Cov(delta_k, delta_j)``.
        num_chains: the estimate's chains (the kernel's memory is checked for them).
        loss_fn: the probes' own loss (per token), as for :class:`~online_llc.kernel.probes.ProbeBatches`.

    Raises:
        ValueError: see :class:`~online_llc.kernel.probes.ProbeBatches`, and kernels that would not
            fit (:func:`~online_llc.kernel.probes.check_kernel_size`).
    """

    def __init__(
        self, probes: Mapping[str, Any], evaluator: LossEvaluator, center: Mapping[str, Tensor], kernel: bool = False,
        num_chains: int = 1, loss_fn: Any = None,
    ) -> None:
        self.sets = ProbeBatches(probes, evaluator, loss_fn)
        #: Whether each set's loss kernel ``Cov(delta_k, delta_j)`` is kept.
        self.kernel = kernel
        if kernel:  # the planned segments, and one more where the draws do not divide evenly
            check_kernel_size(self.sets.sizes, num_chains * (SEGMENTS + 1))
        self.names, self.sizes, self.batches = self.sets.names, self.sets.sizes, self.sets.batches
        self.center = dict(center)
        # The sets were checked at the same weights: their losses then are the centre's.
        self.at_center = self.sets.initial_losses.double().cpu().numpy()
        self.moments: Optional[ProbeMoments] = None
        self.start: Dict[int, int] = {}

    def begin(self, num_chains: int, num_draws: int, start: Mapping[int, int]) -> None:
        """Record from now on: chain ``c``'s draws from its step ``start[c]`` on (after its
        burn-in), in segments of ``num_draws / SEGMENTS`` draws."""
        blocks = kernel_blocks(self.sizes) if self.kernel else []
        self.moments = ProbeMoments(num_chains, len(self.at_center), max(1, num_draws // SEGMENTS), blocks)
        self.start = dict(start)

    def observing(self, chain: int, step: int) -> bool:
        """Whether ``chain``'s step number ``step`` (0-based, counted over the whole run) is a draw."""
        return self.moments is not None and step >= self.start.get(chain, np.iinfo(np.int64).max)

    def differences(self, offset: Mapping[str, Tensor]) -> np.ndarray:
        """``delta_k = l_k(w* + xi) - l_k(w*)`` of every probe sample, at offset ``xi``."""
        params = {n: (self.center[n] + offset[n]).to(self.center[n].dtype) for n in self.center}
        return self.sets.losses(params).double().cpu().numpy() - self.at_center

    def differences_of_rows(self, chains: Any) -> np.ndarray:
        """``delta`` of every chain of batched ``chains`` (:class:`~online_llc.kernel.batched.BatchedChains`)
        ``[C, K]``: one vectorized pass per probe batch for all chains."""
        losses = torch.cat([chains.losses_at_offsets(b, self.sets.loss_fn).reshape(chains.xi.shape[0], -1)
                            for batches in self.batches for b in batches], dim=1)
        return losses.double().cpu().numpy() - self.at_center

    def add(self, chain: int, delta: np.ndarray, draw: float) -> None:
        """Pair the probes' differences at a draw's offset with the draw."""
        assert self.moments is not None
        self.moments.add(chain, delta, draw)

    def results(self, nbeta: float) -> Dict[str, ProbeResult]:
        """Each set's :class:`ProbeResult` from the draws recorded."""
        assert self.moments is not None
        return probe_results(self.moments, self.names, self.sizes, nbeta, self.sets.shapes)
