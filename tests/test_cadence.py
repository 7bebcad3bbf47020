"""The schedule sized to the run (`online_llc.monitor.cadence`): the pure rule, pinned on its goals, and its
wiring into OnlineLLC (total_steps, shortened warm-ups, the one warning)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from online_llc import OnlineLLC
from online_llc.models.toy import deep_linear_problem
from online_llc.monitor.cadence import (
    MIN_WINDOW,
    OVERHEAD_BUDGET_STEPS,
    SHADOW_STEP_COST,
    TARGET_WINDOWS,
    WARMUP_FRACTION,
    Cadence,
    auto_cadence,
    next_step,
)

LENGTHS = [30, 100, 220, 500, 999, 1000, 2500, 10_000, 19_999, 20_000, 29_999, 30_000, 34_999, 35_000, 10**6]


def test_unknown_length_means_the_defaults():
    assert auto_cadence(None) == Cadence(every_n_steps=35, window=40, min_warmup=100, max_warmup=400, min_rewarmup=60)
    assert auto_cadence(None).message is None
    c = auto_cadence(None, every_n_steps=3, window=7)
    assert (c.every_n_steps, c.window, c.min_warmup, c.total_steps) == (3, 7, 100, None)


@pytest.mark.parametrize("t", LENGTHS)
def test_the_goals_hold_at_every_length(t):
    c = auto_cadence(t)
    shadow = t // c.every_n_steps
    # Warm-up floor within the first 10% of the run, but never below 20 shadow steps.
    assert c.min_warmup == max(20, min(100, int(WARMUP_FRACTION * shadow)))
    assert c.min_warmup * c.every_n_steps <= max(WARMUP_FRACTION * t, 20)
    # At least 20 windows after it, at least 10 draws each (the shortest runs fall short: a
    # 100-step run cannot hold 20 windows of 10 draws after its warm-up).
    assert MIN_WINDOW <= c.window <= 40
    assert c.expected_windows == (shadow - c.min_warmup) // c.window
    if t >= 220:
        assert c.expected_windows >= TARGET_WINDOWS - 1
    # Within the overhead budget exactly when the run is long enough.
    assert (c.every_n_steps >= OVERHEAD_BUDGET_STEPS) == (t >= 30_000)
    assert c.overhead == pytest.approx(SHADOW_STEP_COST / c.every_n_steps)
    # The warm-up's other bounds shrink in proportion.
    assert c.max_warmup == 4 * c.min_warmup and 5 <= c.warmup_tail <= 30 and c.warmup_tail % 5 == 0
    # One line exactly when the run is too short for the defaults.
    assert (c.message is None) == (t >= 30_000)
    if c.message is not None:
        assert "\n" not in c.message and f"a {t}-step run" in c.message and f"{100 * c.overhead:.0f}%" in c.message


def test_long_runs_get_the_defaults_and_short_ones_a_denser_cadence():
    assert [auto_cadence(t).every_n_steps for t in (1000, 2000, 5000, 10_000, 20_000, 30_000, 35_000, 10**7)] == [
        1, 2, 5, 10, 20, 30, 35, 35
    ]
    long = auto_cadence(10**6)
    assert (long.every_n_steps, long.window, long.min_warmup, long.max_warmup, long.min_rewarmup) == (35, 40, 100, 400, 60)
    short = auto_cadence(220)
    assert (short.every_n_steps, short.window, short.min_warmup, short.expected_windows) == (1, 10, 22, 19)
    assert short.message == (
        "OnlineLLC: a 220-step run is too short for the 10% overhead budget (every_n_steps >= 30): "
        "every_n_steps=1 costs about 300% of training compute per chain; windows of 10 draws, warm-up from "
        "22 shadow steps; about 19 estimates after warm-up. Pass every_n_steps= and window= to choose otherwise."
    )


def test_explicit_values_rule():
    c = auto_cadence(1000, every_n_steps=25)
    assert (c.every_n_steps, c.window, c.min_warmup) == (25, 10, 20)
    assert c.message is not None and "is short for the monitor's defaults: every_n_steps=25 costs about 12%" in c.message
    c = auto_cadence(100_000, window=200)
    assert (c.every_n_steps, c.window) == (22, 200)  # 20 windows of 200 draws need 4000 shadow steps
    both = auto_cadence(1000, every_n_steps=5, window=20)
    assert (both.every_n_steps, both.window, both.message) == (5, 20, None)
    # A fixed warm-up replaces the floor in the plan.
    fixed = auto_cadence(20, every_n_steps=1, window=5, warmup=5)
    assert (fixed.warmup, fixed.expected_windows, fixed.message) == (5, 3, None)


def test_a_run_too_short_for_any_estimate_is_warned_about():
    c = auto_cadence(29)
    assert c.expected_windows == 0
    assert c.message == (
        "OnlineLLC: a 29-step run is too short for any LLC estimate at every_n_steps=1 with windows of 10 draws, "
        "warm-up from 20 shadow steps: the first estimate needs at least 30 training steps. Pass a smaller "
        "every_n_steps or window, or train longer."
    )
    assert auto_cadence(30).expected_windows == 1
    # Even with both values given.
    assert "too short for any LLC estimate" in auto_cadence(100, every_n_steps=10, window=40).message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(total_steps=0), r"Expected `total_steps` to be a positive int, got 0\."),
        (dict(total_steps=10.5), r"Expected `total_steps` to be a positive int, got 10\.5\."),
        (dict(total_steps=10, every_n_steps="often"), r"Expected `every_n_steps` to be a positive int or 'auto', got 'often'\."),
        (dict(total_steps=10, window=1), r"Expected `window` to be an int >= 2 or 'auto', got 1\."),
        (dict(total_steps=10, warmup=-1), r"Expected `warmup` to be a non-negative int, got -1\."),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        auto_cadence(kwargs.pop("total_steps"), **kwargs)


def test_numpy_and_tensor_integers_are_accepted():
    ref = auto_cadence(5000, every_n_steps=5, window=20)
    assert auto_cadence(np.int64(5000), every_n_steps=np.int32(5), window=torch.tensor(20)) == ref


def test_next_step_policy():
    assert next_step(None, None) == 1 and next_step(None, 7) == 8
    assert next_step(0, None) == 0 and next_step(np.int64(9), 8) == 9 and next_step(torch.tensor(10), 9) == 10
    with pytest.raises(ValueError, match=r"Expected `step` to be an int > the previous step 9 \(one call per optimizer step\), got 9\."):
        next_step(9, 9)
    for bad in (True, 2.0, torch.tensor([3]), torch.tensor(3.0), "3", -1):
        with pytest.raises(ValueError, match="Expected `step` to be a non-negative int"):
            next_step(bad, None)


def test_online_llc_uses_the_cadence_and_warns_once():
    p = deep_linear_problem([3, 2], 2, num_samples=512, batch_size=32, seed=0)
    with pytest.warns(UserWarning, match=r"^OnlineLLC: a 300-step run is too short for the 10% overhead budget"):
        monitor = OnlineLLC(p.model, p.loss_fn, num_samples=512, total_steps=300)
    assert monitor.cadence == auto_cadence(300)
    assert (monitor.every_n_steps, monitor.window) == (1, 13)
    # The shortened warm-up reaches the chains' equilibrium test.
    det = monitor._model.detectors[0]
    assert (det.min_draws, det.max_draws, det.tail) == (30, 120, 15)
    assert monitor._model.min_rewarmup == 18
    batches = list(p.batches)
    for s in range(300):
        monitor.update(batches[s % len(batches)])
    history = monitor.history()
    assert len(history) == 300 // 13
    assert sum(e.filtered for e in history) >= TARGET_WINDOWS - 3
    # Unknown length, long run: no warning, today's defaults.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = OnlineLLC(p.model, p.loss_fn, num_samples=512)
        assert (quiet.every_n_steps, quiet.window, quiet._model.detectors[0].min_draws) == (35, 40, 100)
        assert OnlineLLC(p.model, p.loss_fn, num_samples=512, total_steps=50_000).every_n_steps == 35


def test_the_auto_group_budget_estimates_every_group_within_the_first_half_or_warns():
    """``group_budget="auto"``: the fewest group steps per shadow step that give every group its
    longest warm-up and a window, ``ceil(G (max_warmup + window) / S)`` with ``S`` the shadow steps in
    the run's first half, capped at ``G``; a warning when even ``G`` falls short, and budget 1 with
    a warning when the length is unknown. An int is kept; 0 and strings other than "auto" are
    refused naming the option."""
    import math
    import warnings

    from online_llc.monitor.cadence import AUTO, auto_cadence, group_budget
    from online_llc.monitor.settings import MonitorSettings

    c = auto_cadence(600)  # every step, windows of 27, warm-up at most 240: 267 draws per group
    assert (c.every_n_steps, c.window, c.max_warmup) == (1, 27, 240)
    with pytest.warns(UserWarning, match=r"group_budget=4 for 4 groups in a 600-step run: .* about 5x the monitor's cost"):
        assert group_budget(AUTO, 4, c) == 4 == math.ceil(4 * 267 / 300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # budget 1, met: nothing to say
        assert group_budget(AUTO, 1, c) == 1
        assert group_budget(AUTO, 0, c) == 1
        assert group_budget(3, 40, c) == 3
        c100k = auto_cadence(100000)  # every 35 steps, windows of 40, warm-up at most 400
        assert group_budget(AUTO, 3, c100k) == 1  # 3 x 440 draws fit in 1428 shadow steps
    s = 100000 // (2 * c100k.every_n_steps)
    with pytest.warns(UserWarning, match=r"group_budget=3 for 8 groups in a 100000-step run: .* about 4x"):
        assert group_budget(AUTO, 8, c100k) == math.ceil(8 * (c100k.max_warmup + c100k.window) / s) == 3
    with pytest.warns(UserWarning, match=r"group_budget=2 for 4 groups"):
        assert group_budget(AUTO, 4, c, warmup=100) == math.ceil(4 * (100 + 27) / 300) == 2
    # A fixed warm-up of 400 draws: a group needs 427 draws, more than the 300 shadow steps of the
    # first half even at every shadow step.
    with pytest.warns(UserWarning, match=r"too short to estimate every one of 12 groups within its first half"):
        assert group_budget(AUTO, 12, c, warmup=400) == 12
    with pytest.warns(UserWarning, match=r"12 groups with an unknown run length: group_budget=1"):
        assert group_budget(AUTO, 12, auto_cadence(None)) == 1
    for bad in (0, "some", 1.5):
        with pytest.raises(ValueError, match=r"Expected `group_budget` to be a positive int or 'auto'"):
            MonitorSettings(num_samples=100, group_budget=bad)
