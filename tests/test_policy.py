"""The monitor's policy as pure functions (online_llc.monitor.policy), against hand-built histories."""

from __future__ import annotations

import math

import pytest

from online_llc.calibration.step import calibrated_step, cooling_excess
from online_llc.monitor.policy import (
    HEAT_WINDOWS,
    MIN_HEAT_WINDOWS,
    measuring,
    cooled_step,
    transition_runs,
    transitions,
    window_status,
)
from online_llc.records import LLCEstimate


def _window(step: int, status: str = "tracking", raw_mean: float = 10.0, heat_bias: float = 0.0) -> LLCEstimate:
    return LLCEstimate(
        step=step, mean=raw_mean, std=1.0, lower=raw_mean - 1.645, upper=raw_mean + 1.645, status=status,
        raw_mean=raw_mean, raw_se=1.0, slope=0.0, var_channel=math.nan, ratio=math.nan, dispersion=math.nan,
        ess=40.0, nis=1.0, window_start=step - 9, shadow_steps=step, divergences=0, heat_bias=heat_bias,
    )


def test_window_status_follows_the_documented_order() -> None:
    """Diverged beats warming up beats a jump beats a band below zero."""
    assert window_status(True, True, True, True, -1.0) == "diverged"
    assert window_status(False, True, True, True, -1.0) == "warming_up"
    assert window_status(False, False, True, False, -1.0) == "transition"
    assert window_status(False, False, False, True, 5.0) == "transition"
    assert window_status(False, False, False, False, -0.1) == "not_at_minimum"
    assert window_status(False, False, False, False, 0.0) == "tracking"


def test_cooled_step_acts_on_gross_pooled_heat_only() -> None:
    """The pooled heat of the last tracking windows (sum of means over sum of corrected means)
    decides: too few windows, or heat within twice the band's excess, leave the step alone; a
    gross heat gives calibrated_step's cut towards the band's excess (the oracle is the formula
    applied by hand)."""
    step, top = 1e-3, 1e-3
    # heat = 10 / (10 - 2) = 1.25 for one chain: past 1 + 2 * 0.05.
    hot = [_window(10 * i, heat_bias=2.0) for i in range(1, MIN_HEAT_WINDOWS + 1)]
    assert cooled_step(hot[:-1], 1, step, top) is None  # too few windows
    want = calibrated_step(step, 1.25, top, target=cooling_excess(1))
    assert cooled_step(hot, 1, step, top) == pytest.approx(want) and want < step
    # 6% heat is reported, not chased: one chain cools past 1 + 2 * 0.05.
    mild = [_window(10 * i, heat_bias=10.0 - 10.0 / 1.06) for i in range(1, 6)]
    assert cooled_step(mild, 1, step, top) is None
    # Non-tracking windows do not count, and only the last HEAT_WINDOWS do.
    mixed = [_window(5, status="warming_up", heat_bias=9.0)] + [_window(10 * i) for i in range(1, HEAT_WINDOWS + 1)]
    assert cooled_step(mixed, 1, step, top) is None
    late = [_window(10 * i, heat_bias=5.0) for i in range(1, 4)] + [_window(100 + i) for i in range(HEAT_WINDOWS)]
    assert cooled_step(late, 1, step, top) is None


def test_transitions_merge_runs_one_quiet_window_apart() -> None:
    """Runs of transition windows with at most one quiet window between them are one boundary;
    the levels before and after are the smoothed means of the nearest quiet windows."""
    statuses = ["tracking", "transition", "tracking", "transition", "tracking", "tracking", "tracking", "transition"]
    hist = [_window(10 * (i + 1), status=st, raw_mean=float(i)) for i, st in enumerate(statuses)]
    assert transition_runs(hist) == [[1, 3], [7, 7]]
    smooth = {e.step: 100.0 + e.step for e in hist}
    first, last = transitions(hist, smooth)
    assert (first.start, first.end, first.level_before, first.level_after) == (11, 40, 110.0, 150.0)
    assert (last.start, last.end) == (71, 80) and last.level_before == 170.0 and last.level_after == 180.0
    assert math.isnan(transitions([_window(10, status="transition")], {})[0].level_before)


def test_measuring_schedule_knows_each_regime_then_samples_it() -> None:
    """The first window, and one after a warm-up window, never measure; a regime (after the step
    last changed, or after a warm-up or diverged window) measures its first MIN_HEAT_WINDOWS
    windows, then one window in ``every``; ``every = 1`` measures every window after the
    warm-up."""
    nan = math.nan
    warm = [_window(10, status="warming_up", heat_bias=nan)]
    assert not measuring([], 0, every=4) and not measuring([], 0, every=1)
    assert not measuring(warm, 0, every=4) and not measuring(warm, 0, every=1)
    assert measuring(warm + [_window(20, heat_bias=nan)], 0, every=4)
    known = warm + [_window(10 * i) for i in range(2, MIN_HEAT_WINDOWS + 2)]
    assert not measuring(known, 0, every=4)
    assert measuring(known, 0, every=1)
    # After a measured window, every - 1 plain ones, then a measuring one: one in four.
    history = list(known)
    opened = []
    for i in range(8):
        m = measuring(history, 0, every=4)
        opened.append(m)
        history.append(_window(100 + 10 * i, heat_bias=0.0 if m else nan))
    assert opened == [False, False, False, True, False, False, False, True]
    # A changed step starts a regime: measured again until its heat is known.
    assert measuring(history, len(history), every=4)
    # So does a divergence (the chains were reset), but not a jump of the level.
    assert measuring(history + [_window(500, status="diverged", heat_bias=nan)], 0, every=4)
    assert not measuring(history + [_window(500, status="transition", heat_bias=nan)], 0, every=4)
    # Unmeasured windows (heat NaN) do not count towards the cooling decision.
    hot = [_window(10 * i, heat_bias=2.0) for i in range(1, MIN_HEAT_WINDOWS + 1)]
    plain = [_window(100 + i, heat_bias=nan) for i in range(5)]
    assert cooled_step(hot + plain, 1, 1e-3, 1e-3) == cooled_step(hot, 1, 1e-3, 1e-3) is not None
    assert cooled_step(hot[:-1] + plain, 1, 1e-3, 1e-3) is None


def test_an_infinite_heat_gets_the_strongest_cut() -> None:
    """Windows whose measured bias takes the whole of their positive mean read heat ``inf``
    (hotter than the heat can measure): the step must be cut by the most one decision allows, 8x,
    as a gross finite heat is (heat 5 here); before, ``inf`` left it alone. A NaN heat (no
    positive mean) still leaves it."""
    step, top = 1e-3, 1e-3
    assert calibrated_step(step, math.inf, top) == pytest.approx(step / 8)
    assert calibrated_step(step, math.inf, top, target=cooling_excess(1)) == pytest.approx(step / 8)
    assert calibrated_step(step, math.nan, top) == step
    burning = [_window(10 * i, raw_mean=10.0, heat_bias=12.0) for i in range(1, MIN_HEAT_WINDOWS + 1)]
    hot = [_window(10 * i, raw_mean=10.0, heat_bias=8.0) for i in range(1, MIN_HEAT_WINDOWS + 1)]
    assert cooled_step(burning, 1, step, top) == pytest.approx(step / 8)
    assert cooled_step(hot, 1, step, top) == pytest.approx(step / 8)
