"""What the core does for a distributed (DDP) run: every rank its own chains, one shared filter.

Flow: training loop -> ShadowSampler -> WindowStats (**gathered over the ranks**) -> LLCFilter ->
OnlineLLC records -> callbacks. Under DDP every rank runs :class:`online_llc.OnlineLLC` on its
own batches; each window's draws are all-gathered (the ``gather`` collective), so every rank
summarises every rank's chains and holds the same filter state. That pooling is only right when
the ranks' chains are independent, which this module sees to:

* :func:`rank_seed`: a monitor given a ``gather`` in an initialized process group seeds its
  chains from ``(seed, rank)``, so users who pass the same seed on every rank (the natural thing
  in a plain loop) still get independent chains.
* :func:`rejoin`: after every rank loaded the same rank's checkpoint, each track's chains get
  their own noise again, and the chains of ranks other than the checkpoint's, which start as
  copies of its chains, warm up again before their draws are used.

No framework import: ``torch.distributed`` only.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch.distributed as dist

from online_llc.errors import check_nonneg_int
from online_llc.monitor.track import Track

__all__ = ["RANK_SEED_STRIDE", "rank_seed", "rejoin"]

#: Rank ``r`` seeds its chains from ``seed + RANK_SEED_STRIDE * r`` (what the adapters always did):
#: two user seeds less than this apart never share a rank's seed.
RANK_SEED_STRIDE = 104729


def process_rank() -> Optional[int]:
    """This process's rank in the default process group, or ``None`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return None


def rank_seed(seed: int, gather: Optional[Callable[..., Any]]) -> int:
    """The chains' seed of this process: ``seed`` itself without a ``gather`` or outside an
    initialized process group (and on rank 0), else ``seed + RANK_SEED_STRIDE * rank``."""
    rank = process_rank() if gather is not None else None
    return seed if rank is None else seed + RANK_SEED_STRIDE * rank


def rejoin(tracks: Iterable[Track], rank: int) -> None:
    """Make the chains of ``tracks`` this rank's own again after every rank loaded one rank's state.

    Every track (the whole model and each group) reseeds its chains' generators from its own
    (rank-dependent) seed and the step count, and drops its pending window, which holds the other
    rank's draws (on every rank, so that the windows keep closing together). On ``rank > 0`` every
    chain also restarts its warm-up with its offsets kept, as after a jump of the weights: the
    offsets are the checkpointed rank's, so its draws are correlated with that rank's until the
    chain has moved on, and they are flagged (and kept from the filter) until then.
    """
    rank = check_nonneg_int("rank", rank)
    for track in tracks:
        track.sampler.reseed()
        track.stats.drop_pending()
        if rank > 0:
            track.restart_warmups(from_zero=False)
