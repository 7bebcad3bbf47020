"""Tests for online_llc.monitor.warmup: MSER truncation against a brute-force oracle, the equilibration
detector on synthetic transients with known relaxation, and the monitor's use of it (data-driven
warm-up at the start, restart after a jump of the training weights, checkpointing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from online_llc import OnlineLLC
from online_llc.models.toy import deep_linear_problem
from online_llc.monitor.warmup import EquilibrationDetector, WeightJumpDetector
from online_llc.stats.mser import MSER_BATCH, mser_truncation


def brute_mser(x: np.ndarray, batch: int, max_cut: int) -> int:
    """MSER by its definition, one candidate at a time."""
    b = np.array([x[i * batch : (i + 1) * batch].mean() for i in range(len(x) // batch)])
    scores = [np.sum((b[d:] - b[d:].mean()) ** 2) / (len(b) - d) ** 2 for d in range(max_cut + 1)]
    return batch * int(np.argmin(scores))


@pytest.mark.parametrize("seed", range(5))
def test_mser_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 400))
    x = rng.standard_normal(n) + 5 * np.exp(-np.arange(n) / rng.uniform(1, 60))
    nb = n // MSER_BATCH
    assert mser_truncation(x) == brute_mser(x, MSER_BATCH, nb // 2)
    assert mser_truncation(x, max_cut=nb - 1) == brute_mser(x, MSER_BATCH, nb - 1)
    assert mser_truncation(x, batch=1) == brute_mser(x, 1, n // 2)


def test_mser_finds_a_clear_step() -> None:
    x = np.r_[np.full(50, 10.0), np.zeros(150)] + 0.01 * np.random.default_rng(0).standard_normal(200)
    assert mser_truncation(x) == 50
    assert mser_truncation(x[:7]) == 0  # one batch: nothing to compare


def ar1(rng: np.random.Generator, n: int, rho: float, sd: float) -> np.ndarray:
    e = np.empty(n)
    x = 0.0
    for i in range(n):
        x = rho * x + math.sqrt(1 - rho * rho) * rng.standard_normal()
        e[i] = x
    return sd * e


def declared_at(det: EquilibrationDetector, *series: np.ndarray) -> int:
    for i in range(len(series[0])):
        det.add(*(s[i] for s in series))
        if det.equilibrated:
            return i + 1
    raise AssertionError("never declared")


def test_detector_waits_for_a_slow_transient_and_not_for_a_fast_one() -> None:
    """A chain variable relaxing as ``1 - exp(-t / tau)`` with AR(1) noise (the draw) and a smooth
    slow variable (the squared offset norm, which is what shows slow relaxation): the declared
    warm-up grows with ``tau``, and the transient left at that point is small."""
    rng = np.random.default_rng(0)
    n = 1000
    t = np.arange(n)
    for tau, min_len in [(2.0, 60), (40.0, 100), (100.0, 250)]:
        lengths, left = [], []
        for _ in range(20):
            draw = 10 * (1 - np.exp(-t / min(tau, 10.0))) + ar1(rng, n, 0.8, 3.0)
            slow = 50 * (1 - np.exp(-t / tau)) + ar1(rng, n, 0.95, 1.0)
            k = declared_at(EquilibrationDetector(), draw, slow)
            lengths.append(k)
            left.append(math.exp(-k / tau))
        # Floor: two 30-draw tails (60). A transient of tau needs ~ 2.5 tau to shrink to 8%; the
        # median must wait at least that long and never leave more than a quarter of the rise.
        assert np.median(lengths) >= min_len, (tau, lengths)
        assert max(left) < 0.25, (tau, lengths)
    fast = [declared_at(EquilibrationDetector(), rng.standard_normal(n), rng.standard_normal(n)) for _ in range(20)]
    assert max(fast) <= 100, fast  # stationary from the start: declared within a few batches of 60


def test_detector_bounds_and_restart() -> None:
    det = EquilibrationDetector(min_draws=30, max_draws=80)
    trend = np.arange(200, dtype=float)  # never settles
    assert declared_at(det, trend) == 80 and det.warmup_length == 80
    assert det.add(1.0) is False  # equilibrated: draws are no longer warm-up
    det.restart()
    assert not det.equilibrated and det.add(1.0) is True
    state = det.state_dict()
    other = EquilibrationDetector(min_draws=30, max_draws=80)
    other.load_state_dict(state)
    assert other.state_dict() == state


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(min_draws=0), r"Expected `min_draws` to be a positive int, got 0\."),
        (dict(min_draws=50, max_draws=10), r"Expected `max_draws` to be an int >= min_draws=50, got 10\."),
        (dict(tail=2), r"Expected `tail` to be an int >= 5, got 2\."),
    ],
)
def test_detector_validation(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EquilibrationDetector(**kw)


def run(monitor: OnlineLLC, batches: list, start: int, steps: int) -> None:
    for s in range(start, start + steps):
        monitor.update(batches[s % len(batches)], step=s + 1)


def test_monitor_warms_up_from_data_and_rewarms_after_a_weight_jump() -> None:
    a = deep_linear_problem([10, 3, 5], 1, num_samples=4096, seed=0)
    b = deep_linear_problem([10, 3, 5], 3, num_samples=4096, seed=0)
    # The jump rule compares the move with the chains' own spread (their mean offset norm); a
    # localization of 100 keeps the spread at half the online default's (0.09 nbeta = 23 here).
    # The norm-only sketch of earlier versions missed this jump at the default, where its lower
    # bound (the per-tensor norm change) fell below the spread.
    monitor = OnlineLLC(a.model, a.loss_fn, num_samples=4096, every_n_steps=1, window=20, seed=0, localization=100.0)
    assert monitor.warmup == "auto"
    batches = list(a.batches)
    run(monitor, batches, 0, 400)
    h = monitor.history()
    # Warm-up lasted as long as the detector said (>= 60 shadow steps), then windows are filtered.
    (length,) = monitor.warmup_lengths
    assert 60 <= length <= 400
    warm = [e for e in h if e.status == "warming_up"]
    # The window in which warm-up ended is used when at least half of it came after the end.
    last = math.ceil(length / 20)
    expected = last - (1 if 2 * (20 * last - length) >= 20 else 0)
    assert len(warm) == expected and all(e.status != "warming_up" for e in h[len(warm):])
    assert monitor.weight_jumps == 0
    # The weights jump to another optimum (and the data with them): the chain re-equilibrates.
    with torch.no_grad():
        for pa, pb in zip(a.model.parameters(), b.model.parameters()):
            pa.copy_(pb)
    run(monitor, list(b.batches), 400, 400)
    assert monitor.weight_jumps == 1 and len(monitor.warmup_lengths) == 2
    after = monitor.history()[len(h):]
    assert after[0].status == "warming_up" and after[-1].status != "warming_up"


def test_slow_steady_training_is_not_a_weight_jump() -> None:
    """Weights that drift steadily (here: a tiny SGD step each time) never count as a jump."""
    p = deep_linear_problem([6, 6, 6], 2, num_samples=2048, seed=0)
    monitor = OnlineLLC(p.model, p.loss_fn, num_samples=2048, every_n_steps=1, window=20, seed=0)
    opt = torch.optim.SGD(p.model.parameters(), lr=1e-3)
    batches = list(p.batches)
    for s in range(300):
        opt.zero_grad()
        p.loss_fn(p.model, batches[s % len(batches)]).mean().backward()
        opt.step()
        monitor.update(batches[s % len(batches)], step=s + 1)
    assert monitor.weight_jumps == 0


def test_norm_preserving_weight_jump_is_seen() -> None:
    """Rotating a weight matrix by a random orthogonal matrix keeps every tensor's norm (a norm-only
    sketch sees no move at all) while the loss almost triples; the random signed folds of the
    weight sketch measure the move in full and it counts as one jump. The steady training around
    it (a tiny SGD step each time) is not flagged."""
    p = deep_linear_problem([6, 6, 6], 2, num_samples=2048, seed=0)
    monitor = OnlineLLC(p.model, p.loss_fn, num_samples=2048, every_n_steps=1, window=20, seed=0)
    opt = torch.optim.SGD(p.model.parameters(), lr=1e-3)
    batches = list(p.batches)

    def train(start: int, stop: int) -> None:
        for s in range(start, stop):
            opt.zero_grad()
            p.loss_fn(p.model, batches[s % len(batches)]).mean().backward()
            opt.step()
            monitor.update(batches[s % len(batches)], step=s + 1)

    train(0, 150)
    assert monitor.weight_jumps == 0
    weight = dict(p.model.named_parameters())["0.weight"]
    with torch.no_grad():
        before, norm = float(p.loss_fn(p.model, batches[0]).mean()), float(weight.norm())
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
        weight.copy_(q @ weight)
        assert float(weight.norm()) == pytest.approx(norm, rel=1e-6)
        assert float(p.loss_fn(p.model, batches[0]).mean()) > 2 * before
    train(150, 250)
    assert monitor.weight_jumps == 1


def test_weight_sketch_estimates_the_distance_moved() -> None:
    """The sketch's shift estimates ||w - w'||: over random moves of a 40x60, a 60, a 300x250 and a
    250 weight (two fold groups: the small tensors joined, the large one alone, so cross-group
    independence is exercised) its mean is within 2% of the true distance (each group folds into
    1021 buckets: the squared distance's estimate has a relative spread ~ sqrt(2 / 1021) = 4.4%,
    the distance's half that, 0.16% for the mean of 200 moves; the square root biases it low by
    ~0.03%). The same moves' norms alone (the bound) see a fraction of it."""
    from online_llc.monitor.sketch import fold_groups, sketch, sketch_shift

    g = torch.Generator().manual_seed(0)
    w = [torch.randn(40, 60, generator=g), torch.randn(60, generator=g), torch.randn(300, 250, generator=g),
         torch.randn(250, generator=g)]
    assert fold_groups([t.numel() for t in w]) == [(0, 2), (2, 3), (3, 4)]
    gen = torch.Generator()
    base = sketch(w, gen)
    assert base.numel() == 4 + 1021 + 1021 + 250
    ratios, bounds = [], []
    for _ in range(200):
        delta = [0.01 * torch.randn(t.shape, generator=g) for t in w]
        moved = sketch([t + d for t, d in zip(w, delta)], gen)
        true = math.sqrt(sum(float(d.pow(2).sum()) for d in delta))
        ratios.append(float(sketch_shift(moved, base, 4)) / true)
        bounds.append(float((moved[:4] - base[:4]).norm()) / true)
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.02)
    assert np.std(ratios) < 0.05
    assert np.mean(bounds) < 0.2


def test_weight_sketch_sees_swapped_tensors_and_costs_the_same_for_any_number_of_tensors() -> None:
    """Two same-shaped weights swapped keep every norm: the fold measures the move (its squared
    distance within 3 relative spreads, sqrt(2 / 1021) each, of the true one). And the sketch's
    operations do not grow with the number of tensors: the same 4096 entries as 8 or as 64
    tensors take the same count of top-level aten operations (the profiler), where folding tensor
    by tensor took about ten per tensor."""
    from torch.profiler import ProfilerActivity, profile

    from online_llc.monitor.sketch import Sketcher, sketch, sketch_shift

    g = torch.Generator().manual_seed(3)
    w = [torch.randn(30, 40, generator=g) for _ in range(3)]
    gen = torch.Generator()
    swapped = [w[1], w[0], w[2]]
    true_sq = float((w[0] - w[1]).pow(2).sum() * 2)
    est = float(sketch_shift(sketch(swapped, gen), sketch(w, gen), 3)) ** 2
    assert est == pytest.approx(true_sq, rel=3 * math.sqrt(2 / 1021))

    def top_level_ops(k: int) -> int:
        tensors = [torch.randn(4096 // k, generator=g) for _ in range(k)]
        sketcher = Sketcher(torch.device("cpu"))
        sketcher(tensors)  # the signs drawn and kept
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sketcher(tensors)
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)

    assert top_level_ops(8) == top_level_ops(64)


def test_sketcher_keeps_the_signs_within_its_budget_and_sketches_as_the_function_does() -> None:
    """The shadow sampler's :class:`Sketcher` keeps each fold group's random signs between steps,
    up to its budget: its sketches equal :func:`sketch`'s exactly (same signs, same sums), call
    after call and as the weights move, for groups inside the budget (kept) and past it
    (redrawn)."""
    from online_llc.monitor.sketch import BUCKETS, Sketcher, fold_groups, sign_count, sketch

    g = torch.Generator().manual_seed(1)
    w = [torch.randn(20, 30, generator=g), torch.randn(30, generator=g), torch.randn(7, 200, generator=g)]
    # Groups of at most 1000 entries: the first two tensors (630 entries), then the third.
    assert fold_groups([t.numel() for t in w], 1000) == [(0, 2), (2, 3)]
    signs = [sign_count(630), sign_count(1400)]
    assert signs == [630 // 630 + 1, 1400 // BUCKETS + 1]
    # Room for the first group's signs only: the second's are redrawn at every call.
    sketcher = Sketcher(torch.device("cpu"), max_cached=signs[0] + 1, group_entries=1000)
    for k in range(3):
        moved = [t + 0.1 * k * torch.randn(t.shape, generator=g) for t in w]
        assert torch.equal(sketcher(moved), sketch(moved, torch.Generator(), group_entries=1000))
    assert sketcher._kept == signs[0]
    assert sorted(sketcher._signs) == [(0, 630)]
    for bad in (-1, 2.5, "many"):
        with pytest.raises(ValueError, match=r"^Expected `max_cached` to be a non-negative int, got "):
            Sketcher(torch.device("cpu"), max_cached=bad)
    with pytest.raises(ValueError, match=r"^Expected `group_entries` to be a positive int, got 0"):
        Sketcher(torch.device("cpu"), group_entries=0)


def test_jump_detector_state_of_the_norm_only_version_relearns_the_usual_move() -> None:
    """A detector state saved before the sketch had projections (no version) describes a smaller
    measure of the movement: loading it learns the usual move again. Its spread was rank-local (as
    was version 2's): it is dropped, and no jump is declared until the next window sets it."""
    det = WeightJumpDetector(min_history=3)
    for _ in range(5):
        assert not det.add(1.0)
    det.set_spread(2.0)
    state = det.state_dict()
    assert state["version"] == WeightJumpDetector.VERSION == 3
    fresh = WeightJumpDetector(min_history=3)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.add(30.0)  # 30 > 2 (the spread) and > 10 x 1 (the usual move)
    old = {k: v for k, v in state.items() if k != "version"}
    fresh.load_state_dict(old)
    assert fresh.count == 0 and math.isnan(fresh.shift_mean) and math.isnan(fresh.offset_mean)
    fresh.load_state_dict({**state, "version": 2})  # the usual move is kept, the spread is not
    assert fresh.count == 5 and fresh.shift_mean == 1.0 and math.isnan(fresh.offset_mean)
    assert not fresh.add(30.0)  # no spread yet: no jump (the move enters the usual one: 35 / 6)
    fresh.set_spread(2.0)
    fresh.set_spread(math.nan)  # a window without norms keeps the spread
    assert fresh.offset_mean == 2.0 and fresh.add(100.0)


def test_fixed_warmup_still_counts_shadow_steps() -> None:
    p = deep_linear_problem([6, 6, 6], 2, num_samples=2048, seed=0)
    monitor = OnlineLLC(p.model, p.loss_fn, num_samples=2048, every_n_steps=1, window=10, warmup=25)
    run(monitor, list(p.batches), 0, 60)
    # Draws 1-25 warm up: windows 1-2 are warm-up; window 3 (draws 21-30) is summarised on its
    # last 5 draws, half the window.
    assert [e.status == "warming_up" for e in monitor.history()] == [True, True, False, False, False, False]
    assert monitor.history()[2].ess <= 5
    assert monitor.warmup_lengths == []
    with pytest.raises(ValueError, match=r"Expected `warmup` to be 'auto' or a non-negative int, got 'fast'\."):
        OnlineLLC(p.model, p.loss_fn, num_samples=2048, warmup="fast")
