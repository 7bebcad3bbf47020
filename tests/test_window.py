"""Tests for online_llc.monitor.window: windowed statistics of the shadow chain's draws.

Statistical tests are seeded; every tolerance states the Monte-Carlo spread it is set against.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from online_llc.monitor.window import WindowStats
from online_llc.stats.draws import WindowSummary, summarize
from online_llc.stats.mcse import effective_sample_size, mean_standard_error, multichain_standard_error

# Float tolerance for comparisons against brute-force re-computations of the same formulas:
# only the summation order differs, so agreement is to a few ulps of the values involved.
EXACT = 1e-12


def ar1(rng: np.random.Generator, m: int, c: int, w: int, phi: float) -> np.ndarray:
    """``m`` independent windows of ``c`` stationary AR(1) chains of length ``w``.

    x_t = phi * x_{t-1} + e_t with e_t ~ N(0, 1), started from the stationary N(0, 1/(1-phi^2)).
    """
    x = np.empty((m, c, w))
    x[..., 0] = rng.standard_normal((m, c)) / math.sqrt(1.0 - phi**2)
    noise = rng.standard_normal((m, c, w))
    for t in range(1, w):
        x[..., t] = phi * x[..., t - 1] + noise[..., t]
    return x


def exact_var_of_mean(phi: float, w: int, c: int) -> float:
    """Exact Var of the grand mean of ``c`` independent stationary AR(1) chains of length ``w``."""
    k = np.arange(1, w)
    marginal = 1.0 / (1.0 - phi**2)
    return marginal / w * (1.0 + 2.0 * float(np.sum((1.0 - k / w) * phi**k))) / c


# --------------------------------------------------------------------------------------------------
# summarize vs brute force
# --------------------------------------------------------------------------------------------------


def brute_force(d: np.ndarray, v: np.ndarray) -> dict[str, float]:
    """The documented formulas, written out with plain loops / NumPy reductions."""
    c, w = d.shape
    se2_c = [mean_standard_error(d[i]) ** 2 for i in range(c)]  # single-chain Var(mean)
    # var_draw: per chain, the 1/n variance plus the estimated Var(mean), averaged over chains.
    var_draw = float(np.mean([np.var(d[i], ddof=0) + se2_c[i] for i in range(c)]))
    num = 0.0
    den = 0.0
    for i in range(c):
        mu = d[i].mean()
        for t in range(w):
            den += (d[i, t] - mu) ** 2
            if t + 1 < w:
                num += (d[i, t] - mu) * (d[i, t + 1] - mu)
    mean = float(d.mean())
    var_channel = var_draw - float(v.mean())
    return {
        "mean": mean,
        "se": math.sqrt(sum(se2_c)) / c,
        "ess": float(sum(effective_sample_size(d[i]) for i in range(c))),
        "lag1": num / den,
        "var_draw": var_draw,
        "mean_noise_var": float(v.mean()),
        "var_channel": var_channel,
        "ratio": mean**2 / var_channel,
        "dispersion": var_channel / mean,
    }


def test_summarize_matches_brute_force_on_slices() -> None:
    rng = np.random.default_rng(0)
    num_chains, width, num_windows = 3, 60, 4
    # Positive, autocorrelated draws with a visible spread: AR(1) around 10.
    d_all = 10.0 + ar1(rng, 1, num_chains, width * num_windows, 0.6)[0]
    v_all = rng.uniform(0.05, 0.2, size=d_all.shape)
    for k in range(num_windows):
        sl = slice(k * width, (k + 1) * width)
        d, v = d_all[:, sl], v_all[:, sl]
        s = summarize(d, v, start_step=100 + k * width)
        expected = brute_force(d, v)
        for name, value in expected.items():
            assert getattr(s, name) == pytest.approx(value, rel=EXACT), name
        assert s.n_draws == num_chains * width
        assert s.start_step == 100 + k * width
        assert s.end_step == 100 + k * width + width - 1  # default: one draw per step
        # Sanity of the pieces themselves: ESS is within [C, C*W], se is not the naive one.
        assert num_chains <= s.ess <= num_chains * width
        assert s.se > np.std(d, ddof=1) / math.sqrt(d.size)


def test_var_draw_is_ddof1_variance_for_short_independent_chains() -> None:
    # Below 8 draws per chain the draws are treated as independent: s2 = ddof=1 variance.
    rng = np.random.default_rng(1)
    d = rng.normal(size=(2, 5))
    s = summarize(d, np.zeros_like(d))
    assert s.var_draw == pytest.approx(np.mean(np.var(d, axis=1, ddof=1)), rel=EXACT)
    assert s.ess == pytest.approx(10.0, rel=EXACT)
    assert s.se == pytest.approx(math.sqrt(np.sum(np.var(d, axis=1, ddof=1) / 5)) / 2, rel=EXACT)


def test_summarize_nan_only_in_diagnostics() -> None:
    rng = np.random.default_rng(2)
    d = rng.normal(-1.0, 0.1, size=(2, 50))  # negative LLC observation (not at a minimum)
    v = np.full_like(d, 1.0)  # batch noise far larger than the spread of d
    s = summarize(d, v)
    assert math.isfinite(s.mean) and math.isfinite(s.se)
    assert s.var_channel < 0.0
    assert math.isnan(s.ratio)  # var_channel <= 0
    assert math.isnan(s.dispersion)  # mean <= 0
    # Positive mean, var_channel <= 0: dispersion is defined (and negative), ratio is not.
    s2 = summarize(d + 2.0, v)
    assert math.isnan(s2.ratio) and s2.dispersion < 0.0


def test_summarize_constant_and_one_draw_windows() -> None:
    s = summarize(np.full((2, 20), 3.0), np.zeros((2, 20)))
    assert s.mean == 3.0 and s.se == 0.0 and s.ess == 40.0
    assert s.var_draw == 0.0 and math.isnan(s.lag1) and math.isnan(s.ratio)
    # W == 1: chains are independent, so their spread gives se and var_draw.
    d = np.array([[1.0], [2.0], [4.0]])
    s = summarize(d, np.zeros_like(d))
    assert s.se == pytest.approx(np.std(d, ddof=1) / math.sqrt(3), rel=EXACT)
    assert s.var_draw == pytest.approx(np.var(d, ddof=1), rel=EXACT)
    assert s.ess == 3.0 and math.isnan(s.lag1)
    # A single draw: se is infinite (a filter ignores it), never NaN.
    s = summarize(np.array([[5.0]]), np.array([[0.0]]))
    assert s.mean == 5.0 and s.se == math.inf and math.isnan(s.var_draw)


def test_to_dict_plain_types() -> None:
    rng = np.random.default_rng(3)
    d = rng.normal(5.0, 1.0, size=(2, 30))
    s = summarize(d, np.full_like(d, 0.1), start_step=7, end_step=99)
    out = s.to_dict()
    assert set(out) == {f for f in WindowSummary.__dataclass_fields__}
    ints = {"start_step", "end_step", "n_draws", "diverged_draws", "warmup_draws"}
    for key in ints:
        assert type(out[key]) is int
    for key in set(out) - ints:
        assert type(out[key]) is float
    assert out["start_step"] == 7 and out["end_step"] == 99
    with pytest.raises(AttributeError):
        s.mean = 0.0  # type: ignore[misc]  # frozen


def test_summarize_validation_messages() -> None:
    good = np.ones((2, 10))
    with pytest.raises(ValueError, match=r"Expected `draws` to be finite, got 1 non-finite"):
        summarize(np.array([[1.0, np.nan]]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"Expected `noise_vars` to be finite"):
        summarize(good, np.full((2, 10), np.inf))
    with pytest.raises(ValueError, match=r"Expected `noise_vars` to have the shape of `draws` \(2, 10\), got \(2, 9\)\."):
        summarize(good, np.zeros((2, 9)))
    with pytest.raises(ValueError, match=r"Expected `noise_vars` to be >= 0, got minimum -1\.0\."):
        summarize(good, -np.ones((2, 10)))
    with pytest.raises(ValueError, match=r"Expected `draws` to be a non-empty array of shape \[chains, draws\], got shape \(1, 0\)\."):
        summarize(np.array([]), np.array([]))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 3\)"):
        summarize(np.ones((1, 2, 3)), np.ones((1, 2, 3)))
    with pytest.raises(ValueError, match=r"Expected `draws` to be a numeric array"):
        summarize([["a"]], [[0.0]])
    with pytest.raises(ValueError, match=r"Expected `start_step` to be a non-negative int, got -1\."):
        summarize(good, good, start_step=-1)
    with pytest.raises(ValueError, match=r"Expected `end_step` to be >= start_step \(5\), got 4\."):
        summarize(good, good, start_step=5, end_step=4)


# --------------------------------------------------------------------------------------------------
# ESS and SE
# --------------------------------------------------------------------------------------------------


def test_effective_sample_size_edge_cases() -> None:
    assert effective_sample_size(np.full(50, 2.5)) == 50.0  # constant input
    assert effective_sample_size([1.0]) == 1.0
    assert effective_sample_size([1.0, 2.0, 0.5]) == 3.0  # short input: independent fallback
    # Perfectly antithetic series: the raw estimate would exceed n; it is clipped to n.
    assert effective_sample_size(np.tile([1.0, -1.0], 50)) == 100.0
    # A trend (a chain that never decorrelates) has ESS near 1, never below.
    ess = effective_sample_size(np.arange(200.0))
    assert 1.0 <= ess < 5.0
    with pytest.raises(ValueError, match=r"Expected `x` to be a 1-D array \(one chain\), got shape \(2, 3\)\."):
        effective_sample_size(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"Expected `x` to be finite"):
        effective_sample_size([1.0, math.inf])


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_effective_sample_size_recovers_ar1_tau(phi: float) -> None:
    # tau = (1 + phi) / (1 - phi) for AR(1). At n = 20000, 40 seeds gave a relative spread of
    # the estimated tau of 1.9% / 3.0% / 7.4% (phi = 0 / 0.5 / 0.9) with means within 1.5% of
    # the truth, so 25% is > 3 standard deviations at the worst case.
    n = 20_000
    x = ar1(np.random.default_rng(10), 1, 1, n, phi)[0, 0]
    tau_hat = n / effective_sample_size(x)
    assert tau_hat == pytest.approx((1 + phi) / (1 - phi), rel=0.25)


@pytest.mark.parametrize("num_chains", [1, 2])
@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_standard_error_calibration_ar1(phi: float, num_chains: int) -> None:
    """Mean reported se^2 over M windows vs the variance of the window mean.

    Reference: the exact Var of the grand mean (closed form for AR(1)), which carries no
    Monte-Carlo noise; the empirical variance of the M window means is checked against it
    separately (it has relative s.d. sqrt(2/(M-1)) = 4.5% at M = 1000, so comparing se^2 to it
    directly at 15-20% would be a coin toss rather than a test).

    Tolerance 20% on mean(se^2) / exact: the estimator's own bias, measured over 4 seeds x
    M = 1000 at W = 200, is +14..+15% for phi = 0 (Geyer's positive sequence keeps positive
    noise pairs, and ESS <= n clips up), +5..+9% for phi = 0.5 and -9..-4% for phi = 0.9
    (W is only ~10 correlation times); the Monte-Carlo s.d. of mean(se^2) is cv/sqrt(M) with
    cv <= 1.0, i.e. <= 3.2%. 20% leaves >= 1.5 s.d. above the worst bias (phi = 0, where the s.d.
    is ~1%, so that is > 4 of its s.d.) and > 3 s.d. at phi = 0.9.
    """
    m, w = 1000, 200
    rng = np.random.default_rng(1234 + int(10 * phi) + 100 * num_chains)
    x = ar1(rng, m, num_chains, w, phi)
    se2 = np.array([mean_standard_error(window) ** 2 for window in x])
    naive2 = np.array([np.var(window, ddof=1) / window.size for window in x])
    empirical = float(np.var(x.mean(axis=(1, 2)), ddof=1))
    exact = exact_var_of_mean(phi, w, num_chains)

    # The simulation itself is right: 3.5 s.d. of the empirical variance (4.5% each).
    assert empirical == pytest.approx(exact, rel=3.5 * math.sqrt(2 / (m - 1)))
    assert float(se2.mean()) == pytest.approx(exact, rel=0.20)
    if phi == 0.9:
        # The naive std/sqrt(n) is off by > 2x (the truth is ~sqrt(18) ~ 4.3x larger) ...
        assert math.sqrt(empirical / float(naive2.mean())) > 2.0
        # ... and ours is not the naive one.
        assert math.sqrt(float(se2.mean()) / float(naive2.mean())) > 2.0


@pytest.mark.parametrize("phi", [0.5, 0.9])
def test_var_draw_unbiased_under_autocorrelation(phi: float) -> None:
    # E[1/n sum (x - xbar)^2] = Var(x) - Var(xbar) exactly, so adding the estimated Var(xbar)
    # back removes the tau/W bias that a plain ddof=1 variance keeps (about -9% at phi = 0.9,
    # W = 200). Per-window relative s.d. of var_draw is about sqrt(2 tau / W) <= 0.44, so over
    # M = 500 windows the mean has s.d. <= 2%; 6% is 3 s.d.
    m, w = 500, 200
    x = ar1(np.random.default_rng(77), m, 1, w, phi)
    marginal = 1.0 / (1.0 - phi**2)
    var_draw = np.array([summarize(win, np.zeros_like(win)).var_draw for win in x])
    assert float(var_draw.mean()) == pytest.approx(marginal, rel=0.06)
    if phi == 0.9:
        plain = np.array([np.var(win, ddof=1) for win in x])
        assert float(plain.mean()) < 0.95 * marginal  # the bias the correction removes


def test_gamma_channel_recovers_lambda_and_temperature() -> None:
    # d = Gamma(shape=lambda, scale=T) + N(0, v_i), v_i ~ U(2, 6) known: mean lambda*T = 10,
    # var lambda*T^2 = 20, noise variance 4. With n = 20000 draws the delta method gives a
    # relative s.d. of ~1.5% for var_channel and <= 2.1% for ratio (mean: 0.35%); 200 seeds
    # gave 1.3% for both ratio and dispersion, with means within 0.1%. 6% is > 4 s.d.
    lam, temp = 5.0, 2.0
    rng = np.random.default_rng(2024)
    shape = (4, 5000)
    v = rng.uniform(2.0, 6.0, size=shape)
    d = rng.gamma(lam, temp, size=shape) + rng.standard_normal(shape) * np.sqrt(v)
    s = summarize(d, v)
    assert s.mean_noise_var == pytest.approx(4.0, rel=0.01)  # s.d. 1.15/sqrt(20000)/4 = 0.2%
    assert s.ratio == pytest.approx(lam, rel=0.06)
    assert s.dispersion == pytest.approx(temp, rel=0.06)
    # Without removing the batch noise the channel would be off by the 4/20 = 20% noise share.
    assert s.var_draw / s.mean == pytest.approx((20.0 + 4.0) / 10.0, rel=0.06)


# --------------------------------------------------------------------------------------------------
# WindowStats
# --------------------------------------------------------------------------------------------------


def feed(stats: WindowStats, d: np.ndarray, v: np.ndarray, steps: list[int]) -> list[WindowSummary]:
    out = []
    for t, step in enumerate(steps):
        s = stats.update(d[:, t], v[:, t], step)
        if s is not None:
            out.append(s)
    return out


def test_windowstats_emits_every_window_and_matches_summarize() -> None:
    rng = np.random.default_rng(5)
    w, c = 20, 3
    d = rng.normal(4.0, 1.0, size=(c, 3 * w))
    v = rng.uniform(0.0, 0.5, size=(c, 3 * w))
    steps = [10 * i + 3 for i in range(3 * w)]
    stats = WindowStats(window=w, num_chains=c)
    for t in range(w - 1):
        assert stats.update(d[:, t], v[:, t], steps[t]) is None
        assert stats.num_pending == t + 1
    s = stats.update(d[:, w - 1], v[:, w - 1], steps[w - 1])
    assert s is not None and stats.num_pending == 0
    assert s == summarize(d[:, :w], v[:, :w], start_step=3, end_step=steps[w - 1])
    assert (s.start_step, s.end_step) == (3, 10 * (w - 1) + 3)
    rest = feed(stats, d[:, w:], v[:, w:], steps[w:])
    assert [x.start_step for x in rest] == [steps[w], steps[2 * w]]
    assert rest[1] == summarize(d[:, 2 * w :], v[:, 2 * w :], start_step=steps[2 * w], end_step=steps[-1])
    # numpy scalars and plain lists are accepted; a single chain accepts a bare float.
    one = WindowStats(window=2)
    assert one.update(np.float32(1.0), [0.1], np.int64(0)) is None
    assert isinstance(one.update([2.0], np.array([0.1]), 1), WindowSummary)


def test_windowstats_reset() -> None:
    stats = WindowStats(window=3, num_chains=1)
    stats.update([1.0], [0.0], 5)
    stats.update([2.0], [0.0], 6)
    stats.reset()
    assert stats.num_pending == 0
    assert stats.update([1.0], [0.0], 0) is None  # the step ordering is forgotten as well
    assert stats.state_dict()["start_step"] == 0


def test_windowstats_state_dict_round_trip_mid_window() -> None:
    rng = np.random.default_rng(6)
    w, c, n = 25, 2, 110
    d = rng.normal(3.0, 1.0, size=(c, n)) * rng.uniform(0.5, 2.0)
    v = rng.uniform(0.0, 1.0, size=(c, n))
    steps = list(range(0, 2 * n, 2))
    cut = 37  # mid-window: 12 draws into the second window
    reference = WindowStats(w, c)
    expected = feed(reference, d, v, steps)
    first = WindowStats(w, c)
    before = feed(first, d[:, :cut], v[:, :cut], steps[:cut])
    state = first.state_dict()
    assert state["count"] == cut % w
    resumed = WindowStats(w, c)
    resumed.load_state_dict(state)
    assert resumed.num_pending == cut % w
    assert resumed.state_dict() == state
    after = feed(resumed, d[:, cut:], v[:, cut:], steps[cut:])
    # Identical, not approximately equal: the draws survive the round trip bit for bit.
    assert before + after == expected
    assert len(expected) == n // w


def assert_plain(obj: Any, path: str = "state") -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert type(key) is str, path
            assert_plain(value, f"{path}[{key!r}]")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            assert_plain(value, f"{path}[{i}]")
    else:
        assert obj is None or type(obj) in (int, float, str, bool), f"{path}: {type(obj)}"


def test_windowstats_state_dict_has_only_plain_types() -> None:
    stats = WindowStats(5, 2)
    assert_plain(stats.state_dict())
    stats.update(np.array([1.0, 2.0], dtype=np.float32), np.array([0.0, 0.5]), np.int64(4))
    stats.update([1.5, 2.5], [0.1, 0.2], 9)
    state = stats.state_dict()
    assert_plain(state)
    assert state["d"] == [[1.0, 1.5], [2.0, 2.5]] and state["last_step"] == 9


def test_windowstats_constant_memory() -> None:
    w = 64
    stats = WindowStats(w, num_chains=2)
    rng = np.random.default_rng(8)
    d = rng.normal(size=(2, 10_000))
    emitted = 0
    for t in range(10_000):
        if stats.update(d[:, t], [0.1, 0.1], t) is not None:
            emitted += 1
        assert stats._d.shape[1] <= w and stats._v.shape[1] <= w
        assert stats.num_pending < w
    assert emitted == 10_000 // w
    assert len(stats.state_dict()["d"][0]) == 10_000 % w


def test_windowstats_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"^Expected `window` to be a positive int, got 0\.$"):
        WindowStats(0)
    with pytest.raises(ValueError, match=r"^Expected `window` to be a positive int, got 2\.5\.$"):
        WindowStats(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^Expected `num_chains` to be a positive int, got -1\.$"):
        WindowStats(10, num_chains=-1)
    with pytest.raises(ValueError, match=r"^Expected `num_chains` to be a positive int, got True\.$"):
        WindowStats(10, num_chains=True)

    stats = WindowStats(4, num_chains=2)
    with pytest.raises(ValueError, match=r"Expected `d` to be a sequence of 2 finite floats \(one per chain\), got shape \(3,\)\."):
        stats.update([1.0, 2.0, 3.0], [0.0, 0.0], 0)
    with pytest.raises(ValueError, match=r"Expected `v` to be a sequence of 2 finite floats \(one per chain\), got shape \(1,\)\."):
        stats.update([1.0, 2.0], [0.0], 0)
    with pytest.raises(ValueError, match=r"Expected `d` to be a sequence of 2 finite floats \(one per chain\), got \['a', 'b'\]\."):
        stats.update(["a", "b"], [0.0, 0.0], 0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"Expected `d` to be finite, got \[nan, 1\.0\]\. .*caller must filter it out"):
        stats.update([math.nan, 1.0], [0.0, 0.0], 0)
    with pytest.raises(ValueError, match=r"Expected `v` to be finite, got \[0\.0, inf\]\. .*caller must filter it out"):
        stats.update([1.0, 1.0], [0.0, math.inf], 0)
    with pytest.raises(ValueError, match=r"Expected `v` to be >= 0 \(a variance\), got \[-0\.1, 0\.0\]\."):
        stats.update([1.0, 1.0], [-0.1, 0.0], 0)
    with pytest.raises(ValueError, match=r"Expected `step` to be a non-negative int, got -3\."):
        stats.update([1.0, 1.0], [0.0, 0.0], -3)
    with pytest.raises(ValueError, match=r"Expected `step` to be a non-negative int, got 1\.0\."):
        stats.update([1.0, 1.0], [0.0, 0.0], 1.0)  # type: ignore[arg-type]
    assert stats.num_pending == 0  # failed updates change nothing
    stats.update([1.0, 1.0], [0.0, 0.0], 10)
    with pytest.raises(ValueError, match=r"Expected `step` to be >= the previous step \(10\), got 9\."):
        stats.update([1.0, 1.0], [0.0, 0.0], 9)
    assert stats.num_pending == 1


def test_windowstats_load_state_dict_validation() -> None:
    source = WindowStats(4, num_chains=2)
    source.update([1.0, 2.0], [0.0, 0.0], 0)
    state = source.state_dict()

    target = WindowStats(4, num_chains=2)
    missing = {k: val for k, val in state.items() if k != "count"}
    with pytest.raises(KeyError, match=r"missing keys \['count'\], unexpected keys \[\]"):
        target.load_state_dict(missing)
    with pytest.raises(KeyError, match=r"missing keys \[\], unexpected keys \['extra'\]"):
        target.load_state_dict({**state, "extra": 1})
    with pytest.raises(ValueError, match=r"Expected `state\['window'\]` to be 5 \(this WindowStats' window\), got 4\."):
        WindowStats(5, num_chains=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"Expected `state\['num_chains'\]` to be 3 \(this WindowStats' num_chains\), got 2\."):
        WindowStats(4, num_chains=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"Expected `state\['version'\]` to be 4, got 1\."):
        target.load_state_dict({**state, "version": 1})
    with pytest.raises(ValueError, match=r"Expected `state\['count'\]` to be an int in \[0, 3\], got 4\."):
        target.load_state_dict({**state, "count": 4})
    with pytest.raises(ValueError, match=r"Expected `state\['d'\]` to be 2 lists of 1 floats \(one per chain\), got shape \(2, 2\)\."):
        target.load_state_dict({**state, "d": [[1.0, 1.0], [2.0, 2.0]]})
    with pytest.raises(ValueError, match=r"Expected `state\['v'\]` to be finite\."):
        target.load_state_dict({**state, "v": [[math.nan], [0.0]]})
    with pytest.raises(ValueError, match=r"Expected `state\['last_step'\]` to be a non-negative int, got -1\."):
        target.load_state_dict({**state, "last_step": -1})
    with pytest.raises(ValueError, match=r"Expected `state\['last_step'\]` to be >= start_step \(0\), got None\."):
        target.load_state_dict({**state, "last_step": None})
    with pytest.raises(ValueError, match=r"Expected `state\['start_step'\]` to be set exactly when `count` > 0"):
        target.load_state_dict({**state, "start_step": None})
    # Nothing was changed by the failed loads; a good one still works.
    assert target.num_pending == 0
    target.load_state_dict(state)
    assert target.state_dict() == state


# ---- horizon: correlation slower than a window -----------------------------------------------------


def _ar1(n: int, phi: float, rng: np.random.Generator) -> np.ndarray:
    x = np.empty(n)
    x[0] = rng.normal() / math.sqrt(1 - phi * phi)
    eps = rng.normal(size=n)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + eps[i]
    return x


def test_horizon_one_reports_window_se_only():
    rng = np.random.default_rng(0)
    ws = WindowStats(20, 1, horizon=1)
    out = [ws.update([x], [0.0], i) for i, x in enumerate(_ar1(200, 0.5, rng))]
    summaries = [s for s in out if s is not None]
    assert len(summaries) == 10 and all(s.se == s.se_window for s in summaries)


def test_horizon_captures_slow_correlation():
    """An AR(1) chain with phi = 0.99 (integrated autocorrelation time 199) seen through windows
    of 40 draws: inside one window the slow component looks like a constant, so the window's own
    se is far too small. With a horizon of 4 windows the reported se must be closer to the true
    sd of a window mean (exact AR(1) formula) and at least 1.5x the window-only se on average;
    the true sd is ~6x the window-only se here, so both assertions have wide margins."""
    phi, W = 0.99, 40
    rng = np.random.default_rng(1)
    x = _ar1(40 * 400, phi, rng)
    ws = WindowStats(W, 1, horizon=4)
    summaries = [s for i, v in enumerate(x) if (s := ws.update([v], [0.0], i)) is not None][4:]
    k = np.arange(1, W)
    var_x = 1 / (1 - phi**2)
    true_var_mean = var_x / W * (1 + 2 * np.sum((1 - k / W) * phi**k))
    se = np.sqrt(np.mean([s.se**2 for s in summaries]))
    se_window = np.sqrt(np.mean([s.se_window**2 for s in summaries]))
    assert se > 1.5 * se_window
    assert abs(math.log(se**2 / true_var_mean)) < abs(math.log(se_window**2 / true_var_mean))


def test_horizon_state_round_trip_and_clear_history():
    rng = np.random.default_rng(2)
    data = _ar1(300, 0.9, rng)
    a = WindowStats(10, 1, horizon=3)
    for i, v in enumerate(data[:155]):
        a.update([v], [0.1], i)
    state = a.state_dict()
    assert len(state["past"]) == 2 and isinstance(state["past"][0][0][0], float)
    b = WindowStats(10, 1, horizon=3)
    b.load_state_dict(state)
    rest_a = [a.update([v], [0.1], 155 + i) for i, v in enumerate(data[155:])]
    rest_b = [b.update([v], [0.1], 155 + i) for i, v in enumerate(data[155:])]
    assert [s.to_dict() if s else None for s in rest_a] == [s.to_dict() if s else None for s in rest_b]
    a.clear_history()
    assert a.state_dict()["past"] == []
    with pytest.raises(ValueError, match=r"Expected `state\['horizon'\]` to be 4"):
        WindowStats(10, 1, horizon=4).load_state_dict(state)


def test_flags_are_counted_and_gathered():
    """Flags mark placeholder draws of reset chains (1) and warm-up draws (2); the summary counts
    them, and with a gather every rank sees every rank's flags."""
    ws = WindowStats(4, 2)
    for i, fl in enumerate([[0, 0], [1, 0], [0, 2], [0, 0]]):
        out = ws.update([1.0 + i, 2.0], [0.1, 0.1], i, flags=fl)
    assert (out.diverged_draws, out.warmup_draws) == (1, 1)

    def fake_gather(arr):  # two "ranks": this one and a copy whose chain 0 diverged twice
        other = arr.copy()
        other[2, 0, :2] = 1
        return np.concatenate([arr, other], axis=1)

    ws = WindowStats(3, 1, gather=fake_gather)
    for i in range(3):
        out = ws.update([1.0 + i], [0.1], i)
    assert out.n_draws == 6 and out.diverged_draws == 2
    with pytest.raises(ValueError, match=r"Expected `flags` to be 1 values in \{0, 1, 2\}, got \[3\]\."):
        WindowStats(3, 1).update([1.0], [0.1], 0, flags=[3])


def test_a_gather_that_raises_drops_the_window_and_leaves_the_buffer_usable():
    """A gather that raises propagates its exception with the window's draws dropped (the draw of
    that call counts as added): the next draws start a new window and never overflow the buffer."""
    calls = {"n": 0}

    def flaky_gather(arr):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("collective failed")
        return arr

    ws = WindowStats(3, 1, gather=flaky_gather)
    ws.update([1.0], [0.1], 0)
    ws.update([2.0], [0.1], 1)
    with pytest.raises(RuntimeError, match="collective failed"):
        ws.update([3.0], [0.1], 2)
    assert ws.num_pending == 0 and ws.last_step == 2
    outs = [ws.update([4.0 + i], [0.1], 3 + i, flags=[1]) for i in range(3)]
    assert outs[:2] == [None, None]
    assert (outs[2].start_step, outs[2].end_step, outs[2].diverged_draws) == (3, 5, 3)


def test_offset_norms_are_gathered_and_averaged_without_placeholders():
    """The chains' offset norms travel in the gathered array (row 4): every rank's summary has the
    same ``offset_norm``, the mean over all ranks' draws with reset placeholders left out. A state
    of version 2 (no norms, before 0.2.0) is refused by name."""

    def fake_gather(arr):  # two "ranks": this one and one whose chains sit three times farther out
        assert arr.shape == (6, 1, 3)
        other = arr.copy()
        other[4] *= 3.0
        return np.concatenate([arr, other], axis=1)

    ws = WindowStats(3, 1, gather=fake_gather)
    ws.update([1.0], [0.1], 0, offset_norms=[1.0])
    ws.update([1.0], [0.1], 1, flags=[1], offset_norms=[0.0])  # a placeholder: not averaged
    out = ws.update([1.0], [0.1], 2, offset_norms=[2.0])
    assert out.offset_norm == pytest.approx((1.0 + 2.0 + 3.0 + 6.0) / 4)
    assert math.isnan(WindowStats(1, 1).update([1.0], [0.1], 0).offset_norm)  # none given
    with pytest.raises(ValueError, match=r"Expected `offset_norms` to be >= 0, got \[-1.0\]\."):
        ws.update([1.0], [0.1], 3, offset_norms=[-1.0])

    source = WindowStats(3, 1)
    source.update([1.0], [0.1], 0, offset_norms=[1.0])
    old = {k: v for k, v in source.state_dict().items() if k not in ("o", "e")}
    with pytest.raises(ValueError, match=r"Expected `state\['version'\]` to be 4, got 2\."):
        WindowStats(3, 1).load_state_dict({**old, "version": 2})


def test_discretization_biases_are_gathered_and_averaged_over_measured_draws():
    """The chains' measured discretization biases travel in the gathered array (row 5): every
    rank's summary has the mean over all ranks' measured draws, reset placeholders and unmeasured
    (NaN) draws left out, negative measurements included (one draw's measurement is noisy). The
    pending NaNs survive a state round trip (stored as None); a version-3 state (no biases, before
    0.2.0) is refused by name."""

    def fake_gather(arr):  # two "ranks": the other measured twice as much
        assert arr.shape == (6, 1, 3)
        other = arr.copy()
        other[5] *= 2.0
        return np.concatenate([arr, other], axis=1)

    ws = WindowStats(3, 1, gather=fake_gather)
    ws.update([1.0], [0.1], 0, discretization=[math.nan])  # a chain's first step: unmeasured
    ws.update([1.0], [0.1], 1, flags=[1], discretization=[5.0])  # a placeholder: not averaged
    out = ws.update([1.0], [0.1], 2, discretization=[-0.3])
    assert out.discretization_bias == pytest.approx((-0.3 - 0.6) / 2)
    assert math.isnan(WindowStats(1, 1).update([1.0], [0.1], 0).discretization_bias)  # none given
    with pytest.raises(ValueError, match=r"Expected `discretization` to be 1 finite values or NaN"):
        ws.update([1.0], [0.1], 3, discretization=[math.inf])

    source = WindowStats(3, 1)
    source.update([1.0], [0.1], 0, discretization=[math.nan])
    source.update([1.0], [0.1], 1, discretization=[0.5])
    state = source.state_dict()
    assert state["e"] == [[None, 0.5]]
    target = WindowStats(3, 1)
    target.load_state_dict(state)
    assert target.state_dict() == state
    assert target.update([1.0], [0.1], 2, discretization=[0.7]).discretization_bias == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"Expected `state\['version'\]` to be 4, got 3\."):
        WindowStats(3, 1).load_state_dict({**{k: v for k, v in state.items() if k != "e"}, "version": 3})


def test_window_with_an_equilibrated_tail_is_summarised_on_it() -> None:
    """Warm-up that ends inside a window: when every chain's trailing healthy run covers at least
    half the window (and no draw is a reset placeholder), the summary is that of the trailing
    block alone (checked against summarize() on the sliced arrays); otherwise the window keeps
    its flags and is reported whole."""
    rng = np.random.default_rng(3)
    d = rng.normal(5.0, 1.0, size=(2, 10))
    v = rng.uniform(0.0, 0.5, size=(2, 10))

    def feed(flags: np.ndarray):
        ws = WindowStats(10, num_chains=2)
        out = None
        for k in range(10):
            out = ws.update(d[:, k], v[:, k], step=k, flags=flags[:, k].tolist())
        return out

    flags = np.zeros((2, 10), dtype=int)
    flags[0, :3] = 2
    flags[1, :4] = 2  # trailing healthy runs 7 and 6: the last 6 draws of both chains are used
    got = feed(flags)
    want = summarize(d[:, -6:], v[:, -6:], start_step=0, end_step=9)
    assert (got.mean, got.se, got.ess, got.var_channel) == (want.mean, want.se, want.ess, want.var_channel)
    assert (got.warmup_draws, got.diverged_draws, got.dropped_draws, got.n_draws) == (0, 0, 8, 12)

    flags[1, :6] = 2  # only 4 healthy draws in chain 1: less than half, the window stays warm
    got = feed(flags)
    assert got.warmup_draws == 9 and got.dropped_draws == 0 and got.mean == summarize(d, v).mean

    flags[1, :6] = 0
    flags[1, 0] = 1  # a reset placeholder: the window is reported whole (diverged)
    got = feed(flags)
    assert got.diverged_draws == 1 and got.warmup_draws == 3 and got.dropped_draws == 0


def test_multichain_standard_error_sees_a_component_slower_than_the_run() -> None:
    """Chains of a fast AR(1) (phi = 0.5) plus a slow one (phi = 0.999, correlation time ~2000)
    over runs of 1000 draws: each chain alone cannot see the slow component (its within-chain se
    reads the slow part as a drifting mean), so :func:`mean_standard_error` reports a small
    fraction of the true sd of the grand mean; the multi-chain se measures the autocorrelation
    against the pooled variance including the chain means' spread and recovers it.

    Reference: the exact sd of the grand mean (closed form, both components independent).
    Tolerances, from 4 seeds x 300 runs: the within-chain rms se is 0.30-0.31 of the truth
    (asserted < 0.5); the multi-chain one 1.34-1.36 (asserted in [0.9, 1.7]; it is conservative
    because 4 chain means give a noisy, and on average inflated, autocorrelation at long lags). Well-mixed
    chains (the fast part alone) get the within-chain value back within 10% on average.
    """
    m, c, w = 300, 4, 1000
    rng = np.random.default_rng(77)
    fast = ar1(rng, m, c, w, 0.5) * math.sqrt(1 - 0.5**2)  # unit marginal variance
    slow = ar1(rng, m, c, w, 0.999) * math.sqrt(1 - 0.999**2)
    x = fast + slow
    exact = math.sqrt(
        exact_var_of_mean(0.5, w, c) * (1 - 0.5**2) + exact_var_of_mean(0.999, w, c) * (1 - 0.999**2)
    )
    within = math.sqrt(np.mean([mean_standard_error(r) ** 2 for r in x]))
    multi = math.sqrt(np.mean([multichain_standard_error(r) ** 2 for r in x]))
    assert within / exact < 0.5, (within, exact)
    assert 0.9 < multi / exact < 1.7, (multi, exact)
    ratio = np.mean([multichain_standard_error(r) / mean_standard_error(r) for r in fast])
    assert 1.0 <= ratio < 1.1
    # One chain: nothing to compare with, so it is the within-chain se exactly.
    assert multichain_standard_error(x[0, :1]) == mean_standard_error(x[0, :1])


def test_window_heat_reads_inf_when_the_bias_takes_a_positive_mean() -> None:
    """The window's heat follows :func:`online_llc.stats.draws.heat_ratio`: ``mean / (mean - bias)``
    while the bias leaves part of a positive mean, ``inf`` once it takes all of it (hotter than
    the window can measure: the alarm must fire, not fall silent on a NaN), NaN when there is no
    positive mean to compare with."""
    from online_llc.stats.draws import heat_ratio

    d = np.array([[1.0, 3.0, 2.0, 2.0]])  # mean 2
    v = np.zeros_like(d)
    for bias, want in ((0.5, 2.0 / 1.5), (2.0, math.inf), (3.0, math.inf)):
        s = summarize(d, v, heat_biases=np.full_like(d, bias))
        assert s.heat == pytest.approx(want) and s.heat == heat_ratio(s.mean, s.heat_bias)
    s = summarize(-d, v, heat_biases=np.full_like(d, 0.5))
    assert math.isnan(s.heat) and math.isnan(heat_ratio(s.mean, s.heat_bias))
