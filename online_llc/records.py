"""The monitor's public records: what :class:`online_llc.OnlineLLC` hands back.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> **records** -> callbacks.
Each closed window becomes an :class:`LLCEstimate`; the retrospective curve is a list of
:class:`SmoothedPoint`, stage boundaries are :class:`Transition` records and the chains' health
is a :class:`ChainHealth`. Records are frozen values: string keys appear only at the logging edge
(:meth:`LLCEstimate.to_dict`).
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

__all__ = ["ChainHealth", "LLCEstimate", "STATUSES", "SmoothedPoint", "Transition"]

#: Every status an estimate can have, in the order of their numeric codes (used by loggers).
STATUSES = ("warming_up", "tracking", "transition", "not_at_minimum", "diverged")


@dataclass(frozen=True)
class LLCEstimate:
    """The running LLC estimate after a window closed.

    Attributes:
        step: training step of the window's last draw.
        mean: filtered LLC (the raw window mean while ``warming_up`` or ``diverged``).
        std: its standard deviation.
        lower: lower end of the band (``confidence`` level, default 90%).
        upper: upper end of the band.
        status: one of :data:`STATUSES`.
        raw_mean: the window's mean draw.
        raw_se: its autocorrelation-aware standard error.
        slope: filtered change of the LLC per training step.
        var_channel: ``var(d) - mean(v)`` of the window (batch noise removed).
        ratio: ``raw_mean^2 / var_channel``, a temperature-free LLC estimate (NaN if undefined).
        dispersion: ``var_channel / raw_mean``, the draws' variance over their mean (a secondary
            diagnostic; its healthy baseline depends on the model).
        heat: the window's minibatch temperature ``raw_mean / (raw_mean - heat_bias)``
            (:mod:`online_llc.heat`; NaN when ``raw_mean <= heat_bias``): 1 when the chain's
            gradient noise adds nothing, 1.2 when it raises the estimate by 20%.
        heat_bias: how much the gradient noise raised ``raw_mean``, measured from half-batch
            gradients.
        step_size: the sampler's step during this window (calibrated on the heat unless given).
        ess: effective sample size of the window.
        nis: normalized innovation squared of the filter update (NaN when not fed).
        window_start: training step of the window's first draw.
        shadow_steps: shadow steps run so far.
        divergences: chain resets so far.
    """

    step: int
    mean: float
    std: float
    lower: float
    upper: float
    status: str
    raw_mean: float
    raw_se: float
    slope: float
    var_channel: float
    ratio: float
    dispersion: float
    ess: float
    nis: float
    window_start: int
    shadow_steps: int
    divergences: int
    heat: float = math.nan
    heat_bias: float = math.nan
    step_size: float = math.nan

    @property
    def status_code(self) -> int:
        """``STATUSES.index(status)``: a number for loggers that only take floats."""
        return STATUSES.index(self.status)

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python values."""
        return asdict(self)


@dataclass(frozen=True)
class SmoothedPoint:
    """One point of the retrospective (RTS-smoothed) LLC curve: uses all windows, later ones too.

    Attributes:
        step: training step of the window.
        mean, std: smoothed LLC and its standard deviation.
        lower, upper: the band at the monitor's ``confidence``.
        slope: smoothed change of the LLC per training step.
    """

    step: int
    mean: float
    std: float
    lower: float
    upper: float
    slope: float


@dataclass(frozen=True)
class ChainHealth:
    """The shadow chains' health (see :meth:`OnlineLLC.health`).

    Attributes:
        divergences: chain resets (non-finite draw or runaway offset) so far.
        weight_jumps: jumps of the training weights detected so far (each restarts the warm-up).
        warmup_lengths: shadow steps each completed data-driven warm-up took.
        heat: the minibatch temperature over the last ``HEALTH_WINDOWS`` tracking windows whose
            band lies above zero, ``sum(raw_mean) / sum(raw_mean - heat_bias)`` (NaN if none).
        relaxation_steps: shadow steps over which the slowest, localization-bound direction
            relaxes at the current step size, ``2 / (step_size * localization)``.
        alarms: what is wrong and what to do, one line per problem (``"<kind>: <details>"``);
            empty when healthy.
    """

    divergences: int
    weight_jumps: int
    warmup_lengths: List[int]
    heat: float
    alarms: List[str]
    relaxation_steps: float = math.nan

    @property
    def alarm(self) -> Optional[str]:
        """The alarms in one line, or ``None`` when healthy."""
        return "; ".join(self.alarms) if self.alarms else None


@dataclass(frozen=True)
class Transition:
    """A detected stage boundary: a run of consecutive ``transition`` windows.

    Attributes:
        start: first training step of the run's first window.
        end: last training step of the run's last window.
        level_before: smoothed LLC at the last filtered window before the run (NaN if none).
        level_after: smoothed LLC at the first filtered window after the run (the run's last
            window when none follows yet).
    """

    start: int
    end: int
    level_before: float
    level_after: float
