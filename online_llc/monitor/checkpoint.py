"""A monitor's checkpoint: what :meth:`online_llc.OnlineLLC.state_dict` saves and
:meth:`~online_llc.OnlineLLC.load_state_dict` restores.

Flow: OnlineLLC -> **monitor_state** (its tracks', schedule's and probe sets' states) -> a
checkpoint -> **load_monitor_state**.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping

from online_llc.monitor.settings import check_saved_settings

__all__ = ["load_monitor_state", "monitor_state", "saved_settings"]


def saved_settings(self: Any) -> Dict[str, Any]:
    """The settings a checkpoint must share with the monitor that restores it, as resolved
    (the sampler's defaults filled in); saved in every state and compared on load."""
    return {
        "sampler": self.config.sampler,
        "nbeta": self.config.nbeta,
        "localization": self.config.localization,
        "step_size": self.config.step_size,
        "every_n_steps": self.every_n_steps,
        "window": self.window,
        "min_warmup": self.cadence.min_warmup,
        "mode": self.settings.mode,
        # Not compared on load (the resolved cadence is): the Lightning callback reads it back
        # so that a resumed "auto" run keeps the schedule it was sized for.
        "total_steps": self.cadence.total_steps,
        "num_chains": self.num_chains,
        "warmup": self.warmup,
        "groups": sorted(self._groups),
        "group_budget": self.group_budget,
    }


def monitor_state(self: Any, shards: bool = False) -> Dict[str, Any]:
    """The state of monitor ``self`` (see :meth:`online_llc.OnlineLLC.state_dict`)."""
    state = {
        "version": 1,
        "settings": saved_settings(self),
        "step": self.step,
        "recorded": self.schedule.recorded,
        "shadow_steps": self.shadow_steps,
        "next_group": self.schedule.next_group,
        "groups": {name: t.state_dict(shards) for name, t in self._groups.items()},
    }
    if self.probes is not None:
        state["probes"] = self.probes.state_dict()
        state["group_probes"] = {name: p.state_dict() for name, p in self.group_probes.items()}
    state.update(self._model.state_dict(shards))
    return state


def load_monitor_state(self: Any, state: Mapping[str, Any]) -> None:
    """Restore ``state`` into monitor ``self`` (see :meth:`online_llc.OnlineLLC.load_state_dict`).

    Raises:
        ValueError: a state of another version, other settings or other probe sets.
    """
    if state.get("version") != 1:
        raise ValueError(f"Expected an OnlineLLC state of version 1, got {state.get('version')!r}.")
    check_saved_settings(state["settings"], saved_settings(self))
    if (self.probes is None) != (state.get("probes") is None):
        raise ValueError(
            "Expected a state " + ("with" if self.probes is not None else "without") + " probe sets, as this monitor "
            + ("has" if self.probes is not None else "has none") + "."
        )
    self._model.load_state_dict(state)
    for name, t in self._groups.items():
        t.load_state_dict(state["groups"][name])
    if self.probes is not None:
        self.probes.load_state_dict(state["probes"])
        saved = state.get("group_probes", {})
        for name, p in self.group_probes.items():
            if name in saved:
                p.load_state_dict(saved[name])
            else:  # a state from before groups carried probe sets
                warnings.warn(f"The state holds no probe statistics for group {name!r}: they start afresh.", UserWarning, stacklevel=3)
    step, shadow_steps = int(state["step"]), int(state["shadow_steps"])
    recorded = bool(state["recorded"])
    self.schedule.restart(step, shadow_steps, recorded, int(state["next_group"]))
    self._checked = recorded
