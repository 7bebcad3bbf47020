"""The monitor's policy as pure functions of a track's history: what the state machine
(:class:`online_llc.monitor.track.Track`) decides, written so that it can be read and tested alone."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

from online_llc.calibration.heat import pooled_heat
from online_llc.calibration.step import calibrated_step, control_variate_pays, cooling_excess, default_step_size
from online_llc.config import SGLDConfig
from online_llc.records import LLCEstimate, Transition

__all__ = [
    "NO_BATCH",
    "GRADIENT_OPTIONS",
    "sized_config",
    "HEAT_WINDOWS",
    "MIN_HEAT_WINDOWS",
    "MEASURE_EVERY",
    "measuring",
    "measured_windows",
    "LAG_FRACTION",
    "lag_std",
    "window_status",
    "cooled_step",
    "transition_runs",
    "transitions",
]

#: Tracking windows whose pooled heat can lower the step, and the fewest that may.
HEAT_WINDOWS = 10
MIN_HEAT_WINDOWS = 3

#: Once a regime's heat is known (:data:`MIN_HEAT_WINDOWS` measured windows), one window in
#: this many measures it (the default of the monitor's ``measure_every``). Chosen with
#: ``benchmarks/measure_every.py``: on the problems the calibration tests use, every
#: ``measure_every`` from 1 to 8 cools to the same step (the cuts come in a regime's first
#: windows) and reads the same health heat within its spread; 4 keeps a measurement every 160
#: shadow steps at the default window, well inside the chains' relaxation time.
MEASURE_EVERY = 4

#: The lag of a co-moving chain's reading, as a fraction of the slowest direction's relaxation
#: time (its stiffer directions, which carry most of the LLC, relax faster). See :func:`lag_std`.
LAG_FRACTION: float = 0.5


def lag_std(slope: float, relaxation: float, stride: float) -> float:
    """How far a co-moving chain's reading can trail a moving LLC: ``|slope| * lag`` with the lag
    ``LAG_FRACTION * relaxation * stride`` training steps (``relaxation`` in shadow steps,
    :func:`~online_llc.calibration.step.relaxation_steps`; ``stride`` training steps per shadow step; ``slope`` the filter's
    LLC per training step). The monitor adds it to the band's variance. On a stagewise deep
    linear network trained with SGD (``benchmarks/online_vs_offline.py --part moving``), the
    live 90% band covered the offline estimate at 7 of 10 checkpoints without it (normalized
    errors of rms 1.5) and 10 of 10 with it (rms 0.9); at frozen weights the slope is about zero
    and the band is unchanged."""
    if not (math.isfinite(slope) and math.isfinite(relaxation) and math.isfinite(stride)):
        return 0.0
    return abs(slope) * LAG_FRACTION * relaxation * stride


def window_status(diverged: bool, warming: bool, jump: bool, after_jump: bool, upper: float) -> str:
    """A closed window's status (the statuses are documented in :mod:`online_llc.monitor.track`).

    Args:
        diverged: a chain diverged during the window (its draws were replaced by placeholders).
        warming: the window holds warm-up draws.
        jump: the filter read the window as a jump of the level.
        after_jump: the previous window was one.
        upper: the upper end of the window's band (below zero: the band lies entirely below it).
    """
    if diverged:
        return "diverged"
    if warming:
        return "warming_up"
    if jump or after_jump:
        return "transition"
    return "not_at_minimum" if upper < 0 else "tracking"


def measuring(history: Sequence[LLCEstimate], since: int, every: int) -> bool:
    """Whether the window about to open measures the heat (half-batch passes, the update dots
    and each chain's last update: about a third more work per shadow step, and half a copy of the
    parameters more per SGLD chain, one per RMSProp-SGLD chain) or runs plain steps.

    The heat is read from equilibrated chains only (:func:`cooled_step`, the health alarms), so
    the first window and a window after a warm-up window (whose chains may still warm up) do not
    measure. Otherwise a window measures while the current regime has fewer than
    :data:`MIN_HEAT_WINDOWS` measured windows, the fewest the step may be cooled on: a regime
    starts where the step last changed (``since``, an index into ``history``) and after the last
    window whose chains warmed up or were reset (the start, a jump of the weights, a divergence),
    so its first measured windows follow one another. A jump of the level (a ``transition``
    window) starts none: the step's heat depends on the batch, the step and the loss's
    curvature and gradient noise near the weights, which a moving LLC does not reset (during
    fast training most windows are transitions). Then one window in ``every`` measures (every
    window for ``every = 1``). Decided from the gathered history alone, so every rank decides
    the same.
    """
    if not history or history[-1].status == "warming_up":
        return False
    if every <= 1:
        return True
    run = list(itertools.takewhile(lambda e: e.status not in ("warming_up", "diverged"), reversed(history[since:])))
    if sum(math.isfinite(e.heat_bias) for e in run) < MIN_HEAT_WINDOWS:
        return True
    gap = sum(1 for _ in itertools.takewhile(lambda e: not math.isfinite(e.heat_bias), reversed(history)))
    return gap >= every - 1


def measured_windows(history: Sequence[LLCEstimate], limit: int) -> List[LLCEstimate]:
    """The last ``limit`` tracking windows of ``history`` that measured the heat (finite
    ``heat_bias``; :func:`measuring`), newest first: the windows the heat is pooled over
    (:func:`cooled_step`, the health alarm). Scanned from the end, as the history grows
    without bound."""
    fed = (e for e in reversed(history) if e.status == "tracking" and math.isfinite(e.heat_bias))
    return list(itertools.islice(fed, limit))


def cooled_step(history: Sequence[LLCEstimate], chains: int, step: float, max_step: float) -> Optional[float]:
    """The lowered step when the heat pooled over the last measured tracking windows of
    ``history`` (the windows since the step last changed; :func:`measuring`) is gross, else None.

    Gross is an excess above twice :func:`~online_llc.calibration.step.cooling_excess` of the
    band's ``chains`` (10% for one chain: training reached a regime of larger gradient noise, or
    the model is stiff enough for the step's discretization to show; both biases count, as
    offline); the step is then lowered towards that excess (5% for one chain, 3% for four), not
    to the offline target: one chain's level is then within 5%, and it relaxes 2.5x faster than at
    the target (a 13% heat, cut to 2%, cost 6x). One window's heat is too noisy to act on, and
    milder heat is reported, not chased: each change of the step moves the level a little and
    slows the chain's relaxation, which a co-moving chain cannot afford. Every rank sees the same
    gathered windows, so every rank takes the same step.
    """
    recent = measured_windows(history, HEAT_WINDOWS)
    if len(recent) < MIN_HEAT_WINDOWS:
        return None
    heat = pooled_heat([e.raw_mean for e in recent], [e.total_bias for e in recent])
    excess = cooling_excess(chains)
    if not heat - 1 > 2 * excess:
        return None
    new = calibrated_step(step, heat, max_step, target=excess)
    return None if new == step else new


def transition_runs(history: Sequence[LLCEstimate]) -> List[List[int]]:
    """Runs of consecutive ``transition`` windows, as ``[first, last]`` indices into ``history``;
    two runs one quiet window apart are one boundary (a ramp shows as jumps with a pause)."""
    runs: List[List[int]] = []
    for i, e in enumerate(history):
        if e.status != "transition":
            continue
        if runs and i - runs[-1][1] <= 2:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def transitions(history: Sequence[LLCEstimate], smooth: Dict[int, float]) -> List[Transition]:
    """The transitions of ``history`` (:func:`transition_runs`), with the smoothed level
    (``smooth``: step -> smoothed mean) before and after each."""
    out: List[Transition] = []
    for first, last in transition_runs(history):
        before = [e for e in history[:first] if e.step in smooth and e.status != "transition"]
        after = [e for e in history[last + 1 :] if e.step in smooth and e.status != "transition"]
        out.append(
            Transition(
                start=history[first].window_start,
                end=history[last].step,
                level_before=smooth[before[-1].step] if before else math.nan,
                level_after=smooth[after[0].step] if after else smooth.get(history[last].step, history[last].mean),
            )
        )
    return out


#: The monitor's ``gradient`` option: ``"auto"`` decides at the first shadow step (:func:`sized_config`).
GRADIENT_OPTIONS = ("auto", "plain", "control_variate")


#: What a rank that runs no chains (its monitor failed) brings to the ranks' agreement on the
#: batch size that sizes their step (``WindowStats.smallest``, at the first shadow step).
NO_BATCH = 2**62


def sized_config(config: SGLDConfig, batch_size: int, gradient: str, sharded: bool = False) -> SGLDConfig:
    """The chains' hyperparameters once the first batch's size ``B`` is known (calibrated steps only).

    ``gradient="auto"`` takes the control-variate gradient where it pays, as offline
    (:func:`~online_llc.calibration.step.control_variate_pays`: ``B < nbeta / 2``), for SGLD and
    SGHMC on whole parameters (RMSProp-SGLD's step is not sized to the batch; a sharded chain
    keeps the plain gradient); its anchor is the running mean of the centre's batch gradients
    (:class:`~online_llc.kernel.anchor.RunningAnchor`). The step then starts at the
    discretization bound ``0.15 / nbeta`` instead of ``0.15 B / nbeta^2``: at ``B = 16`` and
    ``nbeta = 256``, 16x larger, and the chain relaxes 16x faster. The plain gradient starts at
    :func:`~online_llc.calibration.step.default_step_size`'s batch-sized step. Either way the
    measured heat lowers it later (:func:`cooled_step`).
    """
    if gradient == "auto":
        cv = config.sampler != "rmsprop_sgld" and not sharded and control_variate_pays(config.nbeta, batch_size)
        config = replace(config, gradient="control_variate" if cv else "plain")
    b = None if config.gradient == "control_variate" else batch_size
    start = default_step_size(config.nbeta, b, config.sampler, config.friction, online=True)
    return replace(config, step_size=min(config.step_size, start))
