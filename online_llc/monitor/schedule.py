"""The monitor's clock: which tracks draw at which training step, and which still owe their draw.

Flow: training loop -> **schedule** -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC
records -> callbacks. :class:`online_llc.OnlineLLC` records every training step here; every
``every_n_steps`` steps a shadow step is due, at which the whole model's track draws, then a fixed
budget of groups, round-robin (the cost does not grow with the number of groups; each group is
observed every ``len(groups) / group_budget`` shadow steps and its band widens in between).

Under DDP every track must add exactly one draw (its chains' or flagged placeholders) at every due
step on every rank, or its windows close, and gather, at different steps on different ranks,
pairing unrelated windows or waiting forever. So the account is kept per track: the tracks due at
a step are chosen once, each is struck off when its draw reaches its window, and those an update
that raised left owing get placeholders from ``OnlineLLC.skip_step``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from online_llc.monitor.cadence import next_step
from online_llc.monitor.track import Track
from online_llc.records import LLCEstimate

__all__ = ["Schedule"]

#: ``draw(track, shadow_steps)``: one track's draw at a due step, with the shadow step count to
#: record; the estimate when its window closed.
Draw = Callable[[Track, int], Optional[LLCEstimate]]


class Schedule:
    """The training and shadow step counters, the groups' round-robin and the draws still owed.

    Args:
        every_n_steps: training steps per shadow step.
        groups: the groups' names, in round-robin order.
        group_budget: groups that draw at each shadow step.
    """

    def __init__(self, every_n_steps: int, groups: Sequence[str], group_budget: int) -> None:
        self.every_n_steps, self.groups, self.group_budget = every_n_steps, list(groups), group_budget
        self.restart()

    def restart(self, step: int = 0, shadow_steps: int = 0, recorded: bool = False, next_group: int = 0) -> None:
        """Set the counters (a fresh monitor's by default; a checkpoint's on load); nothing is owed."""
        #: The last training step recorded, and whether one was (``step`` may start at 0).
        self.step, self.recorded = step, recorded
        #: Shadow steps so far: counted when the whole model's draw (or placeholder) is added.
        self.shadow_steps = shadow_steps
        self.next_group = next_group
        # The due step and the tracks (None: the whole model, else a group's name) owing its draw.
        self.owed_step: Optional[int] = None
        self.owed: List[Optional[str]] = []

    def advance(self, step: Optional[int]) -> Optional[int]:
        """Record the training step (``None``: the next one); return it when a shadow step is due,
        else ``None``. The tracks that draw at it are chosen now, once: the whole model, then the
        next ``group_budget`` groups."""
        step = next_step(step, self.step if self.recorded else None)
        self.step, self.recorded = step, True
        due = step % self.every_n_steps == 0
        self.owed_step = step if due else None
        self.owed = [None, *self._due_groups()] if due else []
        return self.owed_step

    def is_owed(self, step: Optional[int]) -> bool:
        """Whether ``step`` is the due step some of whose draws are still to be added."""
        return bool(self.owed) and step is not None and step == self.owed_step

    def _due_groups(self) -> List[str]:
        due = []
        for _ in range(min(self.group_budget, len(self.groups))):
            due.append(self.groups[self.next_group % len(self.groups)])
            self.next_group += 1
        return due

    def draw(
        self, step: int, tracks: Mapping[Optional[str], Track], draw: Draw
    ) -> Tuple[Optional[LLCEstimate], Dict[str, LLCEstimate]]:
        """``draw`` for every track that owes its draw of ``step`` (the whole model first); the
        whole model's estimate and the groups' estimates of this step. An exception leaves the
        tracks that did not add their draw owing it."""
        est, groups = None, {}
        for name in list(self.owed):
            track = tracks[name]
            try:
                out = draw(track, self.shadow_steps + (name is None))
            finally:
                # Struck off once the draw reached the window (one whose gather raised counts: its
                # draws were dropped, see WindowStats.update). Steps strictly increase and a track
                # draws once per step, so its window's last step tells.
                if track.stats.last_step == step:
                    self.owed.remove(name)
                    self.shadow_steps += name is None
            if name is None:
                est = out
            elif out is not None:
                groups[name] = out
        return est, groups
