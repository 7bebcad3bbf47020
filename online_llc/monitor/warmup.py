"""When may a chain's draws be used? Warm-up after a start or a reset, and after a weight jump.

Flow: training loop -> ShadowSampler -> **warm-up checks** -> WindowStats -> LLCFilter ->
OnlineLLC records -> callbacks. The per-track state machine (:mod:`online_llc.monitor.track`) asks these
detectors, shadow step by shadow step, whether a chain is still warming up
(:class:`EquilibrationDetector`) and whether the training weights jumped under the chains
(:class:`WeightJumpDetector`); warm-up draws are flagged and never reach the filter.

A chain starts at zero offset, where its draw ``d`` is about 0, and relaxes towards the local
posterior over a model-dependent number of steps (tens on a small reduced-rank regression, a few
hundred along the sloppy directions of a deep linear network); after the training weights jump
(a checkpoint reload, weight surgery, a switched teacher) its old offset overshoots or undershoots
the new level for a while. A fixed warm-up count is either wasteful or too short, so the monitor
decides from the draws themselves with MSER-5 (:mod:`online_llc.stats.mser`): once MSER's
truncation point falls inside the first half of the chain's series (its draws and its squared
offset norm), the second half is one stationary stretch and the chain is declared equilibrated. Draws before that point are reported as warming up (they never reach the filter).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping

import numpy as np

from online_llc.errors import check_positive_int
from online_llc.stats.mser import MSER_BATCH, settled

__all__ = ["EquilibrationDetector", "WeightJumpDetector"]

class EquilibrationDetector:
    """Decides, draw by draw, when one chain has equilibrated (see the module docstring).

    Args:
        min_draws: draws before the chain can be declared equilibrated (>= 1).
        max_draws: draws after which it is declared equilibrated regardless (>= ``min_draws``):
            bounds the memory (the draws since the restart are kept) and the time a chain
            that never settles, such as one that keeps following fast training, is blanked.
        tail: draws of stationary tail (after the transient) needed to declare equilibrium
            (a multiple of 5 is natural; >= 5).
    """

    def __init__(self, *, min_draws: int = 30, max_draws: int = 1000, tail: int = 30) -> None:
        self.min_draws = check_positive_int("min_draws", min_draws)
        self.max_draws = check_positive_int("max_draws", max_draws)
        if self.max_draws < self.min_draws:
            raise ValueError(f"Expected `max_draws` to be an int >= min_draws={min_draws}, got {max_draws!r}.")
        self.tail = check_positive_int("tail", tail)
        if self.tail < MSER_BATCH:
            raise ValueError(f"Expected `tail` to be an int >= {MSER_BATCH}, got {tail!r}.")
        self.restart()

    def restart(self, min_draws: int | None = None) -> None:
        """The chain starts over (at start, after a reset or after a jump of the weights);
        ``min_draws`` replaces the constructor's floor for this warm-up only."""
        self._min = self.min_draws if min_draws is None else check_positive_int("min_draws", min_draws)
        self.draws: List[List[float]] = []
        # (whole batches, verdict) of the last _settled: the verdict depends only on the whole
        # batches, so it is recomputed once per MSER_BATCH draws, not at every draw.
        self._verdict: tuple[int, bool] = (-1, False)
        self.equilibrated = False
        #: Draws the last warm-up took (``None`` while warming up).
        self.warmup_length: int | None = None

    def add(self, *stats: float) -> bool:
        """Record one step's statistics (the draw, and any slow variable of the chain such as its
        squared offset norm); return whether it is still a warm-up step. Equilibrium needs every
        statistic to have settled."""
        if self.equilibrated:
            return False
        self.draws.append([float(v) for v in stats])
        k = len(self.draws)
        if k >= self.max_draws or (k >= self._min and self._settled()):
            self.equilibrated, self.warmup_length, self.draws = True, k, []
        return True

    def _settled(self) -> bool:
        n_batches = len(self.draws) // MSER_BATCH
        if n_batches < 2 * max(self.tail // MSER_BATCH, 1):
            return False
        if self._verdict[0] == n_batches:
            return self._verdict[1]
        verdict = settled(np.asarray(self.draws[: n_batches * MSER_BATCH]))
        self._verdict = (n_batches, verdict)
        return verdict

    def state_dict(self) -> Dict[str, Any]:
        """Plain Python values."""
        return {
            "draws": list(self.draws),
            "equilibrated": self.equilibrated,
            "warmup_length": self.warmup_length,
            "min_draws": self._min,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.draws = [[float(v) for v in row] for row in state["draws"]]
        self._verdict = (-1, False)
        self._min = int(state.get("min_draws", self.min_draws))
        self.equilibrated = bool(state["equilibrated"])
        w = state.get("warmup_length")
        self.warmup_length = None if w is None else int(w)


class WeightJumpDetector:
    """Decides, shadow step by shadow step, whether the training weights jumped under the chains.

    A jump is a move of the centre (at least) farther than the chains' own spread and
    ``JUMP_FACTOR`` times farther than the centre usually moves per shadow step. Steady fast
    training raises the usual movement and does not count; a reloaded checkpoint, weight
    surgery or a switched task does. The usual movement is a running mean over the last
    ``SHIFT_MEMORY`` shadow steps (an exact mean before that; a jump does not enter it). The
    chains' spread is the mean offset norm of the last closed window (:meth:`set_spread`),
    over every rank's chains under DDP: the movement is measured on the weights, identical on
    every rank, so every rank decides the same (no jump is declared before the first window
    closed).

    The movement is the sampler's ``center_shift``, measured since version 2 of this state from
    random signed folds of the weights as well as their norms (:mod:`online_llc.monitor.sketch`), so
    norm-preserving jumps (a rotated or permuted weight matrix) count too. A state of version 1
    (norms only, a lower bound of the movement, often far below it) does not describe the new
    measure: loading one forgets the usual movement, which is learnt again over ``min_history``
    shadow steps. Before version 3 the spread was a running mean of the rank's own chains' norms,
    which differs between ranks: a state of version 1 or 2 loads without it (no jump until the
    next window closes).

    Args:
        min_history: shadow steps of centre movement seen before a jump can be declared (>= 1).
    """

    #: Version of the measures the state describes (see above).
    VERSION = 3

    #: How many times the usual movement per shadow step a jump must exceed.
    JUMP_FACTOR = 10.0
    #: Shadow steps the usual movement is averaged over, once that many were seen.
    SHIFT_MEMORY = 50

    def __init__(self, *, min_history: int = 10) -> None:
        self.min_history = check_positive_int("min_history", min_history)
        self.restart()

    def restart(self) -> None:
        """Forget the usual movement and spread (at start, or when the monitor starts over)."""
        #: Running mean of the centre's movement per shadow step (NaN before the first).
        self.shift_mean = math.nan
        #: The chains' spread: their mean offset norm over the last closed window (NaN before).
        self.offset_mean = math.nan
        #: Shadow steps whose movement entered ``shift_mean``.
        self.count = 0

    def add(self, shift: float) -> bool:
        """Record one shadow step: the centre moved by ``shift`` since the previous one (NaN at the
        first); return whether the weights jumped."""
        if not math.isfinite(shift):
            return False
        jump = (
            self.count >= self.min_history
            and math.isfinite(self.offset_mean)
            and shift > self.offset_mean
            and shift > self.JUMP_FACTOR * self.shift_mean
        )
        if not jump:  # a jump must not raise the usual movement
            a = 1.0 / min(self.count + 1, self.SHIFT_MEMORY)
            self.shift_mean = shift if self.count == 0 else (1 - a) * self.shift_mean + a * shift
            self.count += 1
        return jump

    def set_spread(self, offset_norm: float) -> None:
        """The chains' spread from here on: the mean offset norm of the window that just closed
        (``WindowSummary.offset_norm``, the same on every rank); NaN keeps the current one."""
        if math.isfinite(offset_norm):
            self.offset_mean = float(offset_norm)

    def state_dict(self) -> Dict[str, Any]:
        """Plain Python values."""
        return {"shift_mean": self.shift_mean, "offset_mean": self.offset_mean, "count": self.count, "version": self.VERSION}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (see the class docstring for older versions)."""
        version = int(state.get("version", 1))
        self.offset_mean = float(state["offset_mean"]) if version >= 3 else math.nan
        if version < 2:
            self.shift_mean, self.count = math.nan, 0
            return
        self.shift_mean = float(state["shift_mean"])
        self.count = int(state["count"])
