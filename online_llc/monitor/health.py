"""The chains' health: what :meth:`online_llc.OnlineLLC.health` reports, and its alarms.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC records ->
callbacks. Beside the flow: :func:`chain_health` reads one :class:`~online_llc.monitor.track.Track`
(its history, chains and warm-ups) and says whether something needs the user: a chain that runs
hot (its minibatch and discretization heat, :mod:`online_llc.calibration.heat`), keeps diverging, or relaxes too slowly to
follow the training weights.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from online_llc.calibration.heat import pooled_heat
from online_llc.calibration.step import relaxation_steps
from online_llc.errors import check_positive_float
from online_llc.monitor.policy import measured_windows
from online_llc.monitor.track import Track
from online_llc.records import ChainHealth

__all__ = ["HEALTH_WINDOWS", "SHORT_RUN_RELAXATIONS", "SLOW_RELAXATION_FACTOR", "SLOW_RELAXATION_WINDOWS", "chain_health"]

#: Measured tracking windows whose heat :func:`chain_health` pools.
HEALTH_WINDOWS = 10
#: The lag alarm fires when the slowest direction relaxes over more windows than this, and over
#: :data:`SLOW_RELAXATION_FACTOR` times as many shadow steps as at the largest step. At the online
#: defaults and a large enough batch it relaxes over about 150 shadow steps (4 windows of 40)
#: whatever nbeta; the heat-calibrated step shrinks with the batch (``~ B / nbeta^2``) and the
#: relaxation grows as the step shrinks: 1200 shadow steps (30 windows) at batch 32, nbeta 256.
SLOW_RELAXATION_WINDOWS = 10
#: Only a step cut this much below its cap counts as slow (short windows alone do not).
SLOW_RELAXATION_FACTOR = 4.0
#: The short-run alarm fires for a run shorter than this many relaxation times (in training steps).
SHORT_RUN_RELAXATIONS = 3.0


def chain_health(track: Track, max_heat: float, total_steps: Optional[int] = None, every_n_steps: int = 1) -> ChainHealth:
    """The health of ``track``'s chains, with an alarm when something needs the user.

    The heat alarm fires when the heat (minibatch and discretization together) measured over the
    last :data:`HEALTH_WINDOWS` measured tracking windows at the current step, when their pooled
    mean is clearly positive, exceeds ``max_heat``: the gradient noise and the step's finite size
    then raise the estimate by more than ``max_heat - 1``. The divergence alarm fires when, after
    four windows, the chains were reset more often than there were windows. The lag alarm fires once the step is sized to the
    batch when the slowest direction relaxes over more than :data:`SLOW_RELAXATION_WINDOWS`
    windows and :data:`SLOW_RELAXATION_FACTOR` times its relaxation at the largest step: the
    co-moving chain then trails moving weights by about that many shadow steps. The short-run
    alarm fires, for a run of known length (``total_steps`` training steps, a shadow step every
    ``every_n_steps``), when the run is shorter than :data:`SHORT_RUN_RELAXATIONS` relaxation
    times: while the LLC moves, the live band is then mostly the chain's lag.

    Raises:
        ValueError: ``max_heat`` is not a finite float > 1.
    """
    max_heat = check_positive_float("max_heat", max_heat)
    if max_heat <= 1:
        raise ValueError(f"Expected `max_heat` to be a float > 1, got {max_heat!r}.")
    # The heat reads as a temperature only where the LLC is clearly positive (at a minimum):
    # near zero or below (saddles, plateaus) the ratio is meaningless. Pooled over the measured
    # tracking windows (policy.measuring: one in measure_every) at the current step, the last
    # HEALTH_WINDOWS of them (sum of means over sum of corrected means, so one noisy window cannot
    # dominate), when their pooled mean is clearly positive (z standard errors above zero, z the
    # band's); with none yet at this step, those before it. Newest first: the callback asks at
    # every window, and the history grows without bound.
    recent = measured_windows(track.history[track.step_changed_at :], HEALTH_WINDOWS) or measured_windows(
        track.history, HEALTH_WINDOWS
    )
    mean = sum(e.raw_mean for e in recent)
    se = math.sqrt(sum(e.raw_se**2 for e in recent))
    clear = bool(recent) and mean > track._z * se
    # inf when the heat bias takes the whole of a clearly positive estimate: hotter than measurable,
    # which must alarm too (a NaN would have stayed silent at gross heat).
    heat = pooled_heat([e.raw_mean for e in recent], [e.total_bias for e in recent]) if clear else math.nan
    config = track.sampler.config
    alarms = []
    if heat > max_heat:  # NaN is False, inf True
        alarms.append(
            f"chain runs hot: the heat (minibatch and discretization) is {heat:.3f} > {max_heat:g} ("
            + (f"the estimate is about {100 * (heat - 1):.0f}% too high" if math.isfinite(heat)
               else "the gradient noise accounts for the whole estimate")
            + f") at step_size {config.step_size:.3g}; "
            "lower step_size (or leave it to the default calibration) or use larger batches"
        )
    windows, divergences = len(track.history), track.sampler.divergences
    if windows >= 4 and divergences > windows:
        alarms.append(
            f"chains keep diverging: {divergences} resets in {windows} windows, lower step_size or raise "
            "localization"
        )
    relax, window = relaxation_steps(config), track.stats.window
    fastest = relaxation_steps(replace(config, step_size=track.max_step))
    if track.sized and relax > SLOW_RELAXATION_WINDOWS * window and relax > SLOW_RELAXATION_FACTOR * fastest:
        # The heat keeps the estimate right at frozen weights; what suffers is the lag.
        alarms.append(
            f"chains relax slowly: the localization-bound directions relax over {relax:.0f} shadow steps "
            f"({relax / window:.0f} windows) at step_size {config.step_size:.3g}, so the live estimate trails "
            "changes of the weights by about that much; "
            + (
                f"the step was lowered to keep the measured heat down (the minibatch noise of a batch small for "
                f"nbeta {config.nbeta:.4g}, or the discretization of a stiff model). Larger batches, or a smaller "
                "nbeta with its localization, shorten it"
                if track.calibrate
                else "a larger step_size or localization shortens it"
            )
        )
    relax_steps = relax * every_n_steps
    short_run = bool(track.sized and total_steps is not None and total_steps < SHORT_RUN_RELAXATIONS * relax_steps)
    if short_run:
        alarms.append(
            f"a short run for these chains: {total_steps} training steps against a relaxation time of "
            f"{relax_steps:.0f} ({relax:.0f} shadow steps of {every_n_steps}), so while the LLC moves the live band is "
            "mostly the chain's lag behind it, not uncertainty about the level; for the end point, run "
            "estimate_llc(..., **monitor.chain_config.estimate_kwargs()) on the final weights"
        )
    return ChainHealth(
        divergences=divergences,
        weight_jumps=track.weight_jumps,
        warmup_lengths=list(track.warmup_lengths),
        heat=heat,
        alarms=alarms,
        relaxation_steps=relax,
        short_run=short_run,
    )
