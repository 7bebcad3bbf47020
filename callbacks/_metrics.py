"""What the framework adapters log at a closed window, shared so that every adapter logs the
same keys in the same order. No framework import."""

from __future__ import annotations

from typing import Dict, Mapping

from online_llc.records import STATUSES, LLCEstimate

__all__ = ["LOGGED_KEYS", "estimate_metrics", "group_metrics"]

#: The keys logged at every closed window, in this order. ``llc/status`` is the index of the
#: status in :data:`online_llc.STATUSES` (0 warming_up, 1 tracking, 2 transition,
#: 3 not_at_minimum, 4 diverged); diagnostics may be NaN where undefined (see LLCEstimate).
LOGGED_KEYS = (
    "llc/mean",
    "llc/std",
    "llc/lower",
    "llc/upper",
    "llc/status",
    "llc/var_channel",
    "llc/ratio",
    "llc/dispersion",
    "llc/heat",
    "llc/step_size",
)


def estimate_metrics(est: LLCEstimate) -> Dict[str, float]:
    """The whole model's estimate as ``{key: float}`` over :data:`LOGGED_KEYS`."""
    values = (
        est.mean,
        est.std,
        est.lower,
        est.upper,
        float(STATUSES.index(est.status)),
        est.var_channel,
        est.ratio,
        est.dispersion,
        est.heat,
        est.step_size,
    )
    return dict(zip(LOGGED_KEYS, (float(v) for v in values)))


def group_metrics(estimates: Mapping[str, LLCEstimate]) -> Dict[str, float]:
    """``llc/<group>/mean`` and ``llc/<group>/std`` of every group whose window just closed."""
    out: Dict[str, float] = {}
    for name, g in estimates.items():
        out[f"llc/{name}/mean"], out[f"llc/{name}/std"] = float(g.mean), float(g.std)
    return out
