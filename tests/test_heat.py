"""The measured minibatch heat: half-batch gradient noise against the closed form of a regular model,
the batch splitter, and the defaults that keep the heat small at any batch and data size."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch

from online_llc import estimate_llc
from online_llc.kernel.halves import split_halves
from online_llc.models.toy import deep_linear_problem


def _regression_at_optimum(n: int, batch: int, widths=(4, 3), seed: int = 0, input_scale: float = 1.0):
    """Linear regression moved to its least-squares optimum, with the exact quantities of the
    localized, tempered posterior there: the input covariance's eigenvalues ``h`` and the
    per-sample gradient covariance's trace ``tr(C)``. ``input_scale`` multiplies the inputs (every
    curvature by its square)."""
    p = deep_linear_problem(list(widths), r=min(widths), num_samples=n, batch_size=batch, seed=seed)
    x, y = p.dataset.tensors
    x.mul_(input_scale)  # the problem's batches hold the same tensors
    xd, yd = x.double(), y.double()
    w = torch.linalg.solve(xd.T @ xd, xd.T @ yd).T
    with torch.no_grad():
        p.model[0].weight.copy_(w.float())
    resid = yd - xd @ w.T  # [n, out]
    # Per-sample gradient of 0.5 ||y - W x||^2 w.r.t. W is -resid x^T; its covariance's trace is
    # mean_i ||resid_i||^2 ||x_i||^2 (the mean gradient is zero at the optimum).
    tr_c = float(((resid**2).sum(1) * (xd**2).sum(1)).mean())
    h = torch.linalg.eigvalsh(xd.T @ xd / n)
    return p, h, widths[1], tr_c


def test_split_halves_structures() -> None:
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    a, b, size = split_halves((x, y))
    assert size == 5 and torch.equal(a[0], x[:2]) and torch.equal(b[1], y[2:])
    a, b, _ = split_halves({"input_ids": x, "labels": y, "name": "batch"})
    assert torch.equal(a["input_ids"], x[:2]) and b["name"] == "batch"
    Pair = namedtuple("Pair", "x y")
    a, b, _ = split_halves(Pair(x, y))
    assert isinstance(a, Pair) and torch.equal(b.x, x[2:])
    assert split_halves((x, torch.arange(3))) is None  # leading sizes differ
    assert split_halves(torch.tensor(1.0)) is None  # a scalar has no samples
    assert split_halves(x[:1]) is None  # one sample cannot be halved


def _exact_target(h: torch.Tensor, outputs: int, nbeta: float, gamma: float) -> float:
    """``E[nbeta (L(w) - L(w*))]`` of the localized, tempered posterior at the optimum."""
    return float(outputs * 0.5 * torch.sum(nbeta * h / (nbeta * h + gamma)))


@pytest.mark.slow
def test_heat_bias_matches_the_closed_form_and_the_measured_excess() -> None:
    """At the old fixed step (0.15 / nbeta, nbeta = n / log n) a batch of 64 at n = 20000 runs the
    chain about twice too hot. The measured heat bias must equal the closed form
    ``epsilon nbeta^2 tr(C) / (8 B)`` (tr(C) from the data) within 6%: the per-draw measurement has
    a relative spread of about 0.6, so 3000 draws give a 1.1% standard error, and the offset's own
    contribution to the gradient noise adds about 2%. The reported heat must match the measured
    ratio estimate / exact target within 10% (the issue's bar), after the discretization factor
    ``1 / (1 - epsilon a / 4)`` (a = nbeta h + gamma), which the half-batch measurement does not see."""
    n, batch = 20000, 64
    p, h, outputs, tr_c = _regression_at_optimum(n, batch)
    nbeta = n / math.log(n)
    step = 0.15 / nbeta
    res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, nbeta=nbeta, localization=100.0,
                       step_size=step, num_chains=2, num_draws=1500, burn_in=300, seed=3)
    predicted_bias = step * nbeta**2 * tr_c / (8 * batch)
    assert res.heat_bias == pytest.approx(predicted_bias, rel=0.06)
    ratio = res.mean / _exact_target(h, outputs, nbeta, 100.0)
    disc = float(torch.mean(1 / (1 - step * (nbeta * h + 100.0) / 4)))
    assert res.heat > 1.8  # the heat is real: the chain is about twice too hot
    assert res.heat * disc == pytest.approx(ratio, rel=0.10)


def _heat_in_closed_form(p, n: int, batch: int, nbeta: float, gamma: float, step: float) -> float:
    """The exact temperature of SGLD with independent minibatches on linear regression at its
    optimum, by brute force from the data: along each eigendirection ``j`` of the Hessian ``H``
    (stiffness ``a_j = nbeta h_j + gamma``, share ``s_j = nbeta h_j / a_j``) the chain is an AR(1)
    whose stationary variance makes the draw ``s_j (1 + x_j) / (2 (1 - epsilon a_j / 4))`` with
    ``x_j = epsilon nbeta^2 C_jj / (4 B)`` (``C`` the per-sample gradient covariance, in ``H``'s
    eigenbasis); the heat is the sum of those over the sum of ``s_j / 2``."""
    x, y = (t.double() for t in p.dataset.tensors)
    w = p.model[0].weight.detach().double()
    resid = y - x @ w.T
    outputs = y.shape[1]
    grads = -(resid[:, :, None] * x[:, None, :]).reshape(n, -1)  # per-sample d loss / d W, row-major W
    cov = torch.cov(grads.T, correction=0)
    hess = torch.kron(torch.eye(outputs, dtype=torch.float64), x.T @ x / n)
    h, vecs = torch.linalg.eigh(hess)
    c = torch.diagonal(vecs.T @ cov @ vecs)
    a = nbeta * h + gamma
    share, heat_x, disc = nbeta * h / a, step * nbeta**2 * c / (4 * batch), step * a / 4
    return float((share * (1 + heat_x) / (1 - disc)).sum() / share.sum())


@pytest.mark.slow
@pytest.mark.parametrize("n, batch, widths", [(20000, 64, (4, 3)), (20000, 256, (8, 4))])
def test_total_heat_matches_the_discrete_chain_in_closed_form(n: int, batch: int, widths) -> None:
    """At the old fixed step (0.15 / nbeta, nbeta = n / log n, localization 100) the chain runs
    hot: about 2.3x at d = 12, batch 64 and 1.35x at d = 32, batch 256. With independent batches
    the temperature is known exactly (:func:`_heat_in_closed_form`); the reported total heat (the
    minibatch and the discretization bias together) must match it within 10%, the issue's bar
    (measured: 2.45 against 2.27 at d = 12, where the ratio of two noisy figures at heat 2.3 has a
    standard error of about 4%, and 1.37 against 1.35 at d = 32; the measurement also counts every
    direction at its full share, which localization 100 leaves at about 0.95), its two-standard-
    error interval must contain it up to 5% (measured: [2.30, 2.63] at d = 12), and the
    estimate itself must sit at the closed form's heat times the exact target, within three of its
    reported standard errors plus 3% (what the closed form leaves out: the offset's own share of
    the gradient noise)."""
    from online_llc.models.toy import RandomBatches

    p, h, outputs, _ = _regression_at_optimum(n, batch, widths=widths)
    nbeta = n / math.log(n)
    step = 0.15 / nbeta
    expected = _heat_in_closed_form(p, n, batch, nbeta, 100.0, step)
    batches = RandomBatches(*p.dataset.tensors, batch_size=batch, seed=2)
    res = estimate_llc(p.model, p.loss_fn, batches, num_samples=n, nbeta=nbeta, localization=100.0, step_size=step,
                       num_chains=2, num_draws=3000, burn_in=200, seed=1)
    low, high = res.heat_interval
    assert expected > 1.3  # the heat is real
    assert res.total_heat == pytest.approx(expected, rel=0.10)
    assert low / 1.05 <= expected <= high * 1.05, (low, expected, high)
    target = _exact_target(h, outputs, nbeta, 100.0)
    assert abs(res.mean - expected * target) < 3 * res.std + 0.03 * expected * target, (res.mean, expected * target)


@pytest.mark.slow
def test_shuffled_epochs_read_higher_than_the_heat_at_a_hot_step() -> None:
    """Within a shuffled epoch the draw's batch holds no sample the chain has recently fitted, so
    at the old hot step (d = 32, n = 20000, batch 256) the estimate on shuffled epochs reads above
    the one on independent batches by more than three combined standard errors (measured: 1.444
    against 1.345 of the target, standard errors 0.014), while the heat, which sees only the
    gradient noise and the step, is the same on both within 3%. The documented reason
    :class:`online_llc.models.toy.RandomBatches` exists."""
    from online_llc.models.toy import RandomBatches

    n, batch = 20000, 256
    p, _, _, _ = _regression_at_optimum(n, batch, widths=(8, 4))
    nbeta = n / math.log(n)
    kw = dict(num_samples=n, nbeta=nbeta, localization=100.0, step_size=0.15 / nbeta, num_chains=2, num_draws=3000,
              burn_in=200, seed=1)
    shuffled = estimate_llc(p.model, p.loss_fn, p.batches, **kw)
    independent = estimate_llc(p.model, p.loss_fn, RandomBatches(*p.dataset.tensors, batch_size=batch, seed=2), **kw)
    assert shuffled.mean - independent.mean > 3 * math.hypot(shuffled.std, independent.std)
    assert shuffled.total_heat == pytest.approx(independent.total_heat, rel=0.03)


def test_heat_interval_reads_inf_when_the_biases_take_the_whole_estimate() -> None:
    """A report, unlike a calibration input, says ``inf`` when the measured biases exceed a clearly
    positive mean (hotter than measurable), NaN when the mean is not clearly positive, and an
    interval that contains the point and narrows as the draws grow."""
    import numpy as np

    from online_llc.calibration.heat import heat_interval
    from online_llc.stats.draws import heat_ratio

    assert heat_ratio(10.0, 12.0) == math.inf and math.isnan(heat_ratio(-1.0, 0.5))
    assert heat_ratio(10.0, 5.0) == 2.0
    g = np.random.default_rng(0)
    widths = []
    for steps in (400, 40000):
        d = 10 + g.standard_normal((2, steps))
        b = 5 + g.standard_normal((2, steps))
        heat, low, high = heat_interval(d, b)
        assert low < heat < high and heat == pytest.approx(2.0, rel=0.02)
        widths.append(high - low)
    assert widths[1] < widths[0] / 5
    hot = heat_interval(10 + g.standard_normal((2, 400)), 10.5 + g.standard_normal((2, 400)))
    assert hot[0] == math.inf and hot[2] == math.inf and hot[1] > 5
    assert all(math.isnan(v) for v in heat_interval(g.standard_normal((2, 400)), np.zeros((2, 400))))


@pytest.mark.slow
def test_default_step_is_calibrated_to_the_batch() -> None:
    """n = 200000 with batches of 64 ran 3.4x too hot at the old defaults. The calibrated default
    must keep the measured heat under 1.05 and land within 5% (plus three of its standard errors)
    of the exact target of the estimand it reports (nbeta 256, localization 3.2). The regular
    model relaxes within about 100 steps at the calibrated step, so a short burn-in suffices."""
    n, batch = 200000, 64
    p, h, outputs, _ = _regression_at_optimum(n, batch)
    res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, num_chains=2, num_draws=3000, burn_in=600, seed=4)
    assert res.nbeta == 256 and res.localization == pytest.approx(0.2 * 16)
    assert res.calibration, "the step was calibrated"
    assert res.heat < 1.05
    target = _exact_target(h, outputs, res.nbeta, res.localization)
    assert abs(res.mean / target - 1) < 0.05 + 3 * res.std / target


def test_a_given_step_is_used_as_it_is() -> None:
    p, _, _, _ = _regression_at_optimum(5000, 32)
    res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=5000, step_size=1e-4, num_chains=1,
                       num_draws=50, burn_in=10)
    assert res.step_size == 1e-4 and res.calibration == [] and res.batch_size == 32


def test_online_heat_is_reported_and_calibrated() -> None:
    """The monitor reports each window's heat and step. At a hand-set step of 2e-3 with batches of
    16 (nbeta 256) the law predicts a minibatch heat of 1 + 2e-3 * 256^2 / (4 * 16) = 3 at unit
    gradient noise: the health alarm fires and reads above 2. The plain gradient's batch-sized
    step (0.15 * 16 / 256^2, 3.75% heat at unit noise) keeps it under 1.06 with no heat alarm,
    but relaxes slowly. The default (``gradient="auto"``) takes the control variate at this
    batch, whose step is not held by the minibatch heat: it stays at the cap 0.15 / 256, 16x
    larger (the halves read the control variate's own, small, batch noise), with a heat under
    1.1 and no alarm at all: its slowest direction relaxes over 148 shadow steps."""
    from online_llc import OnlineLLC

    p, _, _, _ = _regression_at_optimum(100000, 16)
    hot = OnlineLLC(p.model, p.loss_fn, num_samples=100000, every_n_steps=1, window=40, step_size=2e-3,
                    warmup=50)
    auto = OnlineLLC(p.model, p.loss_fn, num_samples=100000, every_n_steps=1, window=40, warmup=50, gradient="plain")
    cv = OnlineLLC(p.model, p.loss_fn, num_samples=100000, every_n_steps=1, window=40, warmup=50)
    batches = iter(p.batches)
    for t in range(1, 801):
        batch = next(batches)
        hot.update(batch, step=t)
        auto.update(batch, step=t)
        cv.update(batch, step=t)
    assert (hot.chain_config.gradient, auto.chain_config.gradient) == ("plain", "plain")
    assert cv.chain_config.gradient == "control_variate"
    assert cv.history()[-1].step_size == pytest.approx(0.15 / 256)
    cv_health = cv.health()
    assert cv_health.heat < 1.1 and cv_health.alarms == [], cv_health.alarms
    assert cv_health.relaxation_steps == pytest.approx(2 / (0.15 / 256 * 0.09 * 256), rel=1e-9)
    assert all(e.step_size == 2e-3 for e in hot.history())
    assert hot.health().heat > 2.0 and any(a.startswith("chain runs hot") for a in hot.health().alarms)
    assert auto.history()[-1].step_size == pytest.approx(0.15 * 16 / 256**2)
    health = auto.health()
    assert health.heat < 1.06 and not any(a.startswith("chain runs hot") for a in health.alarms)
    # The price of the cool step at batch 16: the slowest direction relaxes over
    # 2 / (epsilon gamma) = 2 / (3.662e-5 * 0.09 * 256) = 2370 shadow steps, 59 windows of 40.
    (lag,) = health.alarms
    assert lag.startswith("chains relax slowly") and "2370 shadow steps (59 windows)" in lag
    assert health.relaxation_steps == pytest.approx(2370.4, abs=0.1)


def test_lag_alarm_fires_only_when_a_small_step_outlasts_ten_windows() -> None:
    """At batch 1024 the step is at its cap 0.15 / nbeta and the slowest direction relaxes over
    2 / (epsilon gamma) = 148 shadow steps: no alarm, even with windows of 10 (15 windows). At
    batch 32 the calibrated step is 8x smaller (1185 shadow steps): the alarm fires with windows
    of 40 (30 windows), not with windows of 200 (6 windows). Both with the plain gradient: the
    default control variate at batch 32 keeps the step at the cap and fires no alarm."""
    from online_llc import OnlineLLC

    cases = ((1024, 40, False, "auto"), (1024, 10, False, "auto"), (32, 40, True, "plain"), (32, 200, False, "plain"),
             (32, 40, False, "auto"))
    for batch, window, fires, gradient in cases:
        p, _, _, _ = _regression_at_optimum(100000, batch)
        monitor = OnlineLLC(p.model, p.loss_fn, num_samples=100000, every_n_steps=1, window=window, warmup=5,
                            gradient=gradient)
        for t, b in zip(range(1, 3), p.batches):
            monitor.update(b, step=t)
        health = monitor.health()
        eps = min(0.15 / 256, 0.15 * batch / 256**2) if monitor.chain_config.gradient == "plain" else 0.15 / 256
        assert health.relaxation_steps == pytest.approx(2 / (eps * 0.09 * 256), rel=1e-9)
        assert any(a.startswith("chains relax slowly") for a in health.alarms) is fires, (batch, window)


@pytest.mark.parametrize("multiple", [1, 4])
def test_discretization_bias_matches_the_discrete_chain_in_closed_form(multiple: int) -> None:
    """Full-batch SGLD on a quadratic loss is an exact linear recursion: along an eigendirection of
    curvature ``a = nbeta h + gamma`` its stationary variance is ``1 / (a (1 - epsilon a / 4))``,
    so the draw's expectation is ``sum nbeta h / (2 a (1 - epsilon a / 4))`` and its excess over the
    continuous target is ``sum epsilon nbeta h / (8 (1 - epsilon a / 4))``, which is also exactly
    what the consecutive-update measurement estimates on a quadratic (heat.py). At 1x and 4x the
    largest default step (excess 2% and 9% of the target) the measured bias must match it within
    5% (measured: 1-2% low, the half-batch heat bias that a full batch does not have is
    subtracted; the measurement's own standard error is under 1%), and the estimate must match
    the discrete chain's expectation within 3.5 of its reported standard errors."""
    n = 10240
    p, h, outputs, _ = _regression_at_optimum(n, batch=n)
    nbeta, gamma = 256.0, 0.2 * 16.0
    eps = multiple * 0.08 / nbeta
    a = nbeta * h.double() + gamma
    excess = float(outputs * torch.sum(eps * nbeta * h / (8 * (1 - eps * a / 4))))
    expected = _exact_target(h, outputs, nbeta, gamma) + excess
    if multiple == 1:
        res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, step_size=eps, seed=3)
    else:  # a given step that runs 9% hot is used as given, and said to be hot
        with pytest.warns(RuntimeWarning, match="ran hot .* Leave step_size to the default calibration"):
            res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, step_size=eps, seed=3)
    assert res.nbeta == nbeta and res.localization == pytest.approx(gamma)
    assert res.discretization_bias == pytest.approx(excess, rel=0.05)
    assert abs(res.mean - expected) < 3.5 * res.std, (res.mean, expected, res.std)


def _full_batch_monitor(n: int, input_scale: float, chains: int, step_size=None):
    """``(monitor, h, outputs)``: the monitor's 1200 shadow steps at every training step on the
    full-batch quadratic of :func:`_regression_at_optimum` (windows of 40, warm-up 50, seed 1)."""
    from online_llc import OnlineLLC

    p, h, outputs, _ = _regression_at_optimum(n, batch=n, input_scale=input_scale)
    kw = {} if step_size is None else {"step_size": step_size}
    mon = OnlineLLC(p.model, p.loss_fn, num_samples=n, every_n_steps=1, window=40, warmup=50, num_chains=chains, seed=1, **kw)
    batch = next(iter(p.batches))
    for t in range(1, 1201):
        mon.update(batch, step=t)
    return mon, h, outputs


def test_online_discretization_bias_matches_the_closed_form_and_cools_a_stiff_model() -> None:
    """The monitor measures the discretization bias from each chain's consecutive updates, as
    offline. Full batch at frozen weights (a quadratic loss, the exact linear recursion of the test
    above, at the monitor's localization 0.09 nbeta): at a given step of 4x the offline cap (9%
    hot) the mean bias of the windows that measure it must match the closed form within 5% (measured: 0.527
    +- 0.005 against 0.530), and the step is kept as given. With inputs scaled by 2 (every
    curvature 4x) the default step, 0.15 / nbeta at a full batch, is grossly hot by its
    discretization alone (18% in closed form), which no minibatch measurement sees: the monitor
    must cool it, with two chains towards a heat of 1.035 (:func:`online_llc.calibration.step.cooling_excess`;
    measured: 5.2x, 5.86e-4 to 1.13e-4), after which the measurement matches the closed form at
    the new step within 5%, the health heat is under 1.065 (measured 1.032; a window's
    measurement is noisy, so the cut lands near its target, not on it) and the windows' mean draw
    is within 3% of the discrete chain's expectation. (With one chain towards 1.05, before the
    target depended on the chains: 3.7x, heat 1.046, the draw -1.3%.)"""
    n, nbeta, gamma = 10240, 256.0, 0.09 * 256
    for scale, step in ((1.0, 4 * 0.08 / 256), (2.0, None)):
        mon, h, outputs = _full_batch_monitor(n, scale, chains=2, step_size=step)
        tracking = [e for e in mon.history() if e.status == "tracking"]
        eps = tracking[-1].step_size
        late = [e for e in tracking if e.step_size == eps]
        assert len(late) >= 20
        a = nbeta * h.double() + gamma
        excess = float(outputs * torch.sum(eps * nbeta * h / (8 * (1 - eps * a / 4))))
        # The windows that measured (one in measure_every once the regime's heat is known).
        measured = [e.discretization_bias for e in late if math.isfinite(e.discretization_bias)]
        assert len(measured) >= 5
        disc = sum(measured) / len(measured)
        assert disc == pytest.approx(excess, rel=0.05), (scale, disc, excess)
        if step is not None:
            assert eps == step
            continue
        assert eps < 0.15 / nbeta / 3 and mon.health().heat < 1.065
        expected = _exact_target(h, outputs, nbeta, gamma) + excess
        assert sum(e.raw_mean for e in late) / len(late) == pytest.approx(expected, rel=0.03)


def test_the_monitor_cools_a_hot_step_further_the_more_chains_its_band_pools() -> None:
    """The stiff full-batch quadratic of the test above (18% hot at the default step by its
    discretization): the band of four chains is half as wide as one chain's, so the heat left in
    the level must be smaller. One chain is cooled towards a heat of 1.05, four towards 1.03
    (:func:`online_llc.calibration.step.cooling_excess`); each must end under 1 + 1.3 times its target's
    excess and above a third of it (cooled towards its target, not past it), and four chains at
    a step at most 0.7 times one chain's (measured: heat 1.042 at 1.58e-4, 1.028 at 9.68e-5)."""
    from online_llc.calibration.step import cooling_excess

    ends = {}
    for chains in (1, 4):
        mon, _, _ = _full_batch_monitor(10240, 2.0, chains)
        excess = cooling_excess(chains)
        heat = mon.health().heat
        assert 1 + excess / 3 < heat < 1 + 1.3 * excess, (chains, heat)
        ends[chains] = mon.history()[-1].step_size
    assert cooling_excess(1) == 0.05 and cooling_excess(4) == 0.03
    assert ends[4] <= 0.7 * ends[1], ends


def test_discretization_bias_is_not_reported_for_sghmc() -> None:
    p, _, _, _ = _regression_at_optimum(2048, batch=256)
    res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=2048, sampler="sghmc", num_draws=50, burn_in=10)
    assert math.isnan(res.discretization_bias)


@pytest.mark.slow
def test_defaults_lower_a_step_whose_discretization_bias_is_gross() -> None:
    """Inputs scaled by 2 make every curvature 4x stiffer: at the largest default step the
    discretization bias is then about 8% of the estimate (measured with 2 chains: 0.54 of 6.68,
    ratio 1.12 to the continuous target), which no minibatch measurement sees at batch 1024. At
    the defaults the step must come down until the heat of the two biases
    together is near its 2% target (the measured discretization bias asserted <= 4%, the 5% bound
    less the minibatch part), and the estimate must land within 5% of the continuous target, up
    to two of its reported standard errors (measured at localization 3.2: step cut 4.8x, first
    calibration round at heat 1.095, then 1.020; +1.8% +- 1.1% with 2 chains)."""
    n = 10240
    p, h, outputs, _ = _regression_at_optimum(n, batch=1024, input_scale=2.0)
    target = _exact_target(h, outputs, 256.0, 0.2 * 16.0)
    res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=n, seed=0)
    assert res.step_size < 0.08 / 256 / 2
    assert res.discretization_bias / res.mean <= 0.04
    assert abs(res.mean - target) < 0.05 * target + 2 * res.std, (res.mean, target, res.std)


def test_calibration_waits_for_a_measurement_that_decides() -> None:
    """A heat whose two-standard-error interval straddles the bounds leaves the step alone; one
    past CUT_EXCESS whose interval is clearly above the target shrinks it, one clearly below the
    target raises it."""
    import numpy as np

    from online_llc.calibration.heat import bias_interval
    from online_llc.calibration.step import CUT_EXCESS, MAX_EXCESS, TARGET_EXCESS, calibrated_step

    step, top = 1e-4, 4e-4
    # Point heat 1.5 but the interval reaches below 1: noise, not heat (was an 8x cut before).
    assert calibrated_step(step, 1.5, top, heat_low=0.9, heat_high=4.0) == step
    assert calibrated_step(step, 1.5, top, heat_low=1.0 + 2 * MAX_EXCESS, heat_high=2.0) == pytest.approx(step / 8)
    # A resolved 5.5% heat (interval 1.035..1.075) is cut to the 2% target: the old rule, which
    # wanted the lower end past MAX_EXCESS, let it stand and the estimate read ~5% high.
    assert calibrated_step(step, 1.055, top, heat_low=1.035, heat_high=1.075) == pytest.approx(step * 0.02 / 0.055)
    # Past CUT_EXCESS but not resolved above the target: left alone; resolved but under CUT_EXCESS: too.
    assert CUT_EXCESS < MAX_EXCESS
    assert calibrated_step(step, 1.0 + CUT_EXCESS + 0.005, top, heat_low=1.0 + TARGET_EXCESS - 0.001, heat_high=1.05) == step
    assert calibrated_step(step, 1.0 + CUT_EXCESS - 0.001, top, heat_low=1.0 + TARGET_EXCESS + 0.001, heat_high=1.04) == step
    assert calibrated_step(step, 1.0 + TARGET_EXCESS / 10, top, heat_low=0.99, heat_high=1.0 + TARGET_EXCESS / 4) == 2 * step
    assert calibrated_step(step, 1.0 + TARGET_EXCESS / 10, top, heat_low=0.99, heat_high=1.2) == step

    # The interval from per-step rows: draws of mean 10 and a bias of mean 1 per step, each with
    # noise; hb alone (no update products) gives heat 10 / 9, and the interval narrows as the
    # stretch grows (standard errors fall like 1 / sqrt(steps)), always containing the point.
    g = np.random.default_rng(0)
    widths = []
    for steps in (400, 40000):
        d = 10 + g.standard_normal(steps)
        hb = 1 + 0.5 * g.standard_normal(steps)
        nan = np.full(steps, np.nan)
        heat, low, high = bias_interval(d, nan, nan, hb)
        assert low < heat < high
        assert heat == pytest.approx(10 / 9, rel=0.02)
        widths.append(high - low)
    assert widths[1] < widths[0] / 5
    assert all(math.isnan(v) for v in bias_interval(np.ones(5), np.ones(5), np.ones(5), np.ones(5)))


@pytest.mark.slow
def test_draws_grow_until_the_standard_error_is_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """The automatic draw count doubles while the multi-chain standard error is above
    ``precision`` times the estimate, stops at the cap, and then says so."""
    import online_llc.offline.estimate as offline

    monkeypatch.setattr(offline, "MAX_AUTO_DRAWS", 2000)  # one doubling at most, to keep it fast
    def problem():  # fresh batches each time (the shuffling generator advances with use)
        return deep_linear_problem([4, 3, 4], 1, num_samples=4096, batch_size=512, seed=0)

    p = problem()
    # Localization 6.4 (0.4 sqrt(nbeta)): one relaxation time, the draws' floor, is then 1042 steps,
    # under the patched cap of 2000, so the count can double once.
    kw = dict(num_samples=p.num_samples, num_chains=2, burn_in=1000, step_size=3e-4, localization=6.4, seed=1)
    loose = estimate_llc(p.model, p.loss_fn, p.batches, precision=0.5, **kw)
    base = loose.num_draws  # the first count (1000 x the step's shortening) already met 50%
    assert base < 2000
    with pytest.warns(RuntimeWarning, match="standard error .* after 2000 draws per chain"):
        p = problem()
        tight = estimate_llc(p.model, p.loss_fn, p.batches, precision=1e-4, **kw)
    assert tight.num_draws == 2000 and tight.draws.shape == (2, 2000)
    # The chains continued where they stopped: the first 1000 kept draws are the loose run's.
    assert tight.draws[:, :base] == pytest.approx(loose.draws)
    # (Its standard error need not be smaller: more draws can reveal slow drift between the
    # chains, which the multi-chain standard error then counts.)
    fixed = estimate_llc(p.model, p.loss_fn, p.batches, precision=1e-4, num_draws=300, **kw)
    assert fixed.num_draws == 300  # a given count is kept
    with pytest.raises(ValueError, match="`precision`"):
        estimate_llc(p.model, p.loss_fn, p.batches, precision=1.5, **kw)
