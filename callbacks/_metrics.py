"""What the framework adapters log at a closed window, shared so that every adapter logs the
same keys in the same order. No framework import."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional

from online_llc.records import STATUSES, ChainHealth, LLCEstimate

__all__ = ["LOGGED_KEYS", "ESTIMATE_KEYS", "GROUP_KEYS", "PROBE_KEYS", "band_layout", "estimate_metrics", "group_metrics"]

#: The keys logged at a closed window, in this order. ``llc/status`` is the index of the
#: status in :data:`online_llc.STATUSES` (0 warming_up, 1 tracking, 2 transition,
#: 3 not_at_minimum, 4 diverged); diagnostics may be NaN where undefined (see LLCEstimate).
#: The estimate's keys (:data:`ESTIMATE_KEYS`) are logged only for windows the filter absorbed
#: (:data:`online_llc.records.FILTERED_STATUSES`): a warm-up or diverged window logs its status,
#: its raw window mean (``llc/raw_mean``) and its diagnostics, never an ``llc/mean``. The last
#: two come from the chains' health at that window (:class:`online_llc.ChainHealth`):
#: ``llc/relaxation_steps``, the shadow steps over which the slowest direction relaxes, and
#: ``llc/short_run``, 1 while the run (of known length) is shorter than three relaxation times, so
#: that a moving LLC's band is mostly the chain's lag, else 0.
LOGGED_KEYS = (
    "llc/mean",
    "llc/std",
    "llc/lower",
    "llc/upper",
    "llc/status",
    "llc/raw_mean",
    "llc/var_channel",
    "llc/ratio",
    "llc/dispersion",
    "llc/heat",
    "llc/step_size",
    "llc/relaxation_steps",
    "llc/short_run",
)
#: The filtered estimate and its band: logged only for windows the filter absorbed.
ESTIMATE_KEYS = LOGGED_KEYS[:4]


#: The keys logged per probe set ``<p>`` at the whole model's window (``llc/probe/<p>/<key>``): its
#: observable-refined LLC's band (only for windows the filter absorbed), status and raw window
#: mean, and the set's susceptibility with its standard error once the influence's statistics
#: have two segments per chain (:mod:`online_llc.monitor.probes`).
PROBE_KEYS = ("mean", "std", "lower", "upper", "status", "raw_mean", "susceptibility", "susceptibility_std")


def estimate_metrics(est: LLCEstimate, health: Optional[ChainHealth] = None, probes: Any = None) -> Dict[str, float]:
    """The whole model's window as ``{key: float}`` over :data:`LOGGED_KEYS`, without
    :data:`ESTIMATE_KEYS` when the window is no filtered estimate (warm-up, diverged); the health
    keys are NaN without ``health``; with the monitor's ``probes``, each set's keys
    (:data:`PROBE_KEYS`)."""
    values = (
        est.mean,
        est.std,
        est.lower,
        est.upper,
        float(STATUSES.index(est.status)),
        est.raw_mean,
        est.var_channel,
        est.ratio,
        est.dispersion,
        est.heat,
        est.step_size,
        health.relaxation_steps if health is not None else math.nan,
        float(health.short_run) if health is not None else math.nan,
    )
    out = {k: float(v) for k, v in zip(LOGGED_KEYS, values) if est.filtered or k not in ESTIMATE_KEYS}
    if probes is not None:
        influence = probes.influence()
        for name, p in probes.last.items():
            out.update(_window_metrics(f"llc/probe/{name}", p))
            if name in influence:
                out[f"llc/probe/{name}/susceptibility"] = influence[name].susceptibility
                out[f"llc/probe/{name}/susceptibility_std"] = influence[name].susceptibility_std
    return out


#: The keys logged per group ``<g>`` at its closed window (``llc/<g>/<key>``): the first four
#: (the estimate and its band) only for windows its filter absorbed, as for the whole model.
GROUP_KEYS = ("mean", "std", "lower", "upper", "status", "raw_mean")


def group_metrics(estimates: Mapping[str, LLCEstimate], group_probes: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
    """``llc/<group>/<key>`` over :data:`GROUP_KEYS` for every group whose window just closed:
    its status and raw window mean always (so a dashboard tells a warm-up value from an
    estimate), its estimate and band only when the filter absorbed the window; with the monitor's
    ``group_probes``, the group's susceptibility to each probe set and its standard error
    (``llc/<group>/probe/<set>/susceptibility`` and ``susceptibility_std``) once they are read."""
    out: Dict[str, float] = {}
    for name, g in estimates.items():
        out.update(_window_metrics(f"llc/{name}", g))
        probes = (group_probes or {}).get(name)
        for probe_set, r in (probes.influence() if probes is not None else {}).items():
            out[f"llc/{name}/probe/{probe_set}/susceptibility"] = r.susceptibility
            out[f"llc/{name}/probe/{probe_set}/susceptibility_std"] = r.susceptibility_std
    return out


def _window_metrics(prefix: str, est: LLCEstimate) -> Dict[str, float]:
    """``<prefix>/<key>`` over :data:`GROUP_KEYS` for one window of a group or a probe set: the
    estimate and band only when its filter absorbed the window."""
    values = (est.mean, est.std, est.lower, est.upper, float(STATUSES.index(est.status)), est.raw_mean)
    return {f"{prefix}/{key}": float(v) for key, v in zip(GROUP_KEYS, values)
            if est.filtered or key not in ("mean", "std", "lower", "upper")}


def band_layout(groups: Iterable[str], prefix: str = "") -> Dict[str, Dict[str, List[Any]]]:
    """TensorBoard's custom-scalars layout (``SummaryWriter.add_custom_scalars``) that draws each
    band where people look: one Margin chart of ``llc/mean`` between ``llc/lower`` and
    ``llc/upper`` for the whole model, and one per group. ``prefix``: what the framework puts
    before the keys (the Hugging Face integration's ``"train/"``)."""

    def margin(base: str) -> List[Any]:
        return ["Margin", [f"{prefix}{base}/mean", f"{prefix}{base}/lower", f"{prefix}{base}/upper"]]

    return {"online-llc": {"LLC, whole model": margin("llc"), **{f"LLC, {g}": margin(f"llc/{g}") for g in groups}}}
