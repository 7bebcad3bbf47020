"""The offline estimator's automatic budget: caps counted in samples, not steps."""

from __future__ import annotations

import math
import warnings

import pytest

import numpy as np
import torch
from torch import nn

from online_llc import estimate_llc
from online_llc.calibration.budget import BURN_IN_RELAXATIONS, next_burn_in, resolve_burn_in, resolve_num_draws, scaled_cap
from online_llc.calibration.step import relaxation_steps, resolve_hyperparameters
from online_llc.models.toy import ShuffledBatches
from online_llc.offline.estimate import CAP_BATCH, MAX_AUTO_BURN_IN, MAX_AUTO_DRAWS


def _config(batch_size: int, shrink: float = 4.0):
    """The default estimand at n = 1e5 (nbeta 256, gamma 3.2) and the batch-sized starting step
    divided by ``shrink``, as heat calibration leaves it on a noisy model."""
    cfg = resolve_hyperparameters(num_samples=100000, nbeta=None, localization=None, step_size=None,
                                  batch_size=batch_size)
    return cfg.__class__(**{**cfg.__dict__, "step_size": cfg.step_size / shrink})


def test_caps_count_samples_so_small_batches_get_proportionally_more_steps():
    assert scaled_cap(20000, 32, 256) == 160000
    assert scaled_cap(20000, 256, 256) == scaled_cap(20000, 1024, 256) == 20000
    # The relaxation time 2 / (epsilon gamma) grows as 1 / B at a fixed heat, so in samples it is
    # the same at every batch below the one where the step reaches its cap 0.08 / nbeta.
    r32, r64 = relaxation_steps(_config(32)), relaxation_steps(_config(64))
    assert r32 == pytest.approx(2 * r64)
    # The burn-in, two relaxation times, is 128,000 steps: a cap in steps would cut it short.
    assert BURN_IN_RELAXATIONS * r32 > MAX_AUTO_BURN_IN
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the batch-scaled cap: no warning
        burn = resolve_burn_in(None, _config(32), scaled_cap(MAX_AUTO_BURN_IN, 32, CAP_BATCH))
    assert burn == pytest.approx(BURN_IN_RELAXATIONS * r32, abs=1)
    draws = resolve_num_draws(None, _config(32), scaled_cap(MAX_AUTO_DRAWS, 32, CAP_BATCH))
    # 1000 draws times the step's shrink (32000), or one relaxation time (64000) when longer.
    assert 1000 * 256 / 32 * 4 < r32
    assert draws > MAX_AUTO_DRAWS and draws == pytest.approx(r32, abs=1)


def test_a_relaxation_beyond_the_cap_is_cut_with_a_warning_naming_it():
    cfg = _config(32, shrink=40.0)
    cap = scaled_cap(MAX_AUTO_BURN_IN, 32, CAP_BATCH)
    relax = relaxation_steps(cfg)
    match = rf"relax over {relax:.0f} steps .* needs {2 * relax:.0f} \(2 relaxation times\); it stops at {cap}"
    with pytest.warns(RuntimeWarning, match=match):
        assert resolve_burn_in(None, cfg, cap) == cap
    assert resolve_burn_in(123, cfg, cap) == 123  # a given burn-in is used as it is
    assert resolve_num_draws(77, cfg, 10) == 77


def _burn_in_on_a_quadratic(k: np.ndarray, eps: float, cfg, seed: int) -> int:
    """Run the kernel's SGLD update ``x <- x - (eps / 2) k x + sqrt(eps) z`` (NumPy) on the Gaussian
    ``U = sum_j k_j x_j^2 / 2`` from ``x = 0``, asking :func:`next_burn_in` when to stop."""
    rng = np.random.default_rng(seed)
    x = np.zeros_like(k)
    offset_sq: list = []
    target, _ = next_burn_in(offset_sq, cfg, 10**7)
    while target is not None:
        while len(offset_sq) < target:
            offset_sq.append(float(x @ x))
            x = x - 0.5 * eps * k * x + np.sqrt(eps) * rng.standard_normal(k.shape)
        target, _ = next_burn_in(offset_sq, cfg, 10**7)
    return len(offset_sq)


@pytest.mark.parametrize("case", ["regular", "one soft direction", "one flat direction", "many soft directions"])
def test_the_measured_burn_in_leaves_the_draws_relaxed_and_a_regular_model_pays_little(case):
    """On a Gaussian target the expected draw after ``t`` steps from ``xi = 0`` is known in closed
    form: ``E d_t = sum_j (nbeta h_j / 2) v_j(t)``, ``v_j(t) = eps (1 - a_j^(2t)) / (1 - a_j^2)``,
    ``a_j = 1 - eps k_j / 2``, ``k_j = nbeta h_j + gamma``. The burn-in chosen from one chain's own
    spread must leave ``E d_t`` within 2% of its stationary value (what the localization's bound of
    two relaxation times promises: 1.8%; 5 seeds each, so a noisy chain that stops early fails
    it), and a regular model (every curvature far above the localization) must stop within a
    quarter of that bound (4000 steps here). A direction the loss does not see (``h = 0``) moves
    no draw, so the burn-in need not wait for it."""
    cfg = resolve_hyperparameters(num_samples=100000, nbeta=None, localization=None, step_size=0.08 / 256)
    eps, gamma, nbeta = cfg.step_size, cfg.localization, cfg.nbeta
    stiff = np.random.default_rng(0).uniform(0.5, 2.0, 12)
    h = {
        "regular": stiff,
        "one soft direction": np.concatenate([stiff, [gamma / nbeta]]),  # nbeta h = gamma: a quarter of the LLC
        "one flat direction": np.concatenate([stiff, [0.0]]),
        "many soft directions": np.full(200, 3.0 / nbeta),  # nbeta h = 3, about the localization
    }[case]
    k = nbeta * h + gamma
    a = 1 - eps * k / 2

    def expected_draw(t: float) -> float:
        return float(np.sum(nbeta * h / 2 * eps * (1 - a ** (2 * t)) / (1 - a**2)))

    longest = resolve_burn_in(None, cfg, 10**7)
    assert longest == 4000
    for seed in range(5):
        t = _burn_in_on_a_quadratic(k, eps, cfg, seed)
        assert expected_draw(t) > 0.98 * expected_draw(math.inf), (case, seed, t)
        if case == "regular":
            assert t <= longest / 4, t


def test_a_default_estimate_of_a_regular_model_burns_in_briefly_and_reads_the_exact_target():
    """End to end at the default step, gradient and burn-in (batch 64, below ``nbeta / 2``: the control-variate gradient):
    a d = 4 linear regression at its least-squares optimum relaxes in tens of steps, so the
    measured burn-in stops at most at a quarter of the localization's bound, and the estimate
    still reads the exact localized target ``1/2 sum_j nbeta h_j / (nbeta h_j + gamma)`` within 5%
    plus two of its reported standard errors (the same criterion as the control variate's test)."""
    n, d = 20000, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.7, 1.3, d)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x.double(), y.double()[:, None]).solution[:, 0].float()[None])

    def loss(m, batch):
        xb, yb = batch
        return 0.5 * (m(xb)[:, 0] - yb) ** 2

    # The draws are fixed (two chains of 1000) to keep the test short: the burn-in is what it checks.
    res = estimate_llc(
        model, loss, ShuffledBatches(x, y, batch_size=64, seed=0), num_samples=n, num_chains=2, num_draws=1000,
        progress=False,
    )
    h = np.linalg.eigvalsh(x.double().numpy().T @ x.double().numpy() / n)
    exact = 0.5 * float(np.sum(res.nbeta * h / (res.nbeta * h + res.localization)))
    cfg = resolve_hyperparameters(num_samples=n, nbeta=res.nbeta, localization=res.localization, step_size=res.step_size)
    assert res.gradient == "control_variate"
    assert res.burn_in <= resolve_burn_in(None, cfg, 10**7) / 4, res.burn_in
    assert abs(res.mean - exact) < 0.05 * exact + 2 * res.std, (res.mean, exact, res.std)


def test_without_localization_the_burn_in_is_finite_and_the_estimate_reads_the_exact_target():
    """``localization=0`` (devinterp's default) is a legitimate, unlocalized estimand: the
    localization's relaxation bound ``2 / (epsilon gamma)`` is infinite, so the default burn-in is
    the measured one, at most the cap (a warning says why when the cap binds), and the draws at
    least the default. It crashed with ``OverflowError`` before. On a regular d = 4 regression at
    its least-squares optimum the unlocalized target is exactly ``d / 2 = 2``
    (``benchmarks/heat_grid.py``'s ``target`` at ``gamma = 0``); the estimate must hold it within
    three of its reported standard errors (measured 2.018 +- 0.092). The monitor takes it too."""
    from online_llc import OnlineLLC
    from online_llc.models.toy import deep_linear_problem

    cfg = resolve_hyperparameters(num_samples=2000, nbeta=None, localization=0.0, step_size=None, batch_size=64)
    assert relaxation_steps(cfg) == math.inf
    with pytest.warns(RuntimeWarning, match=r"without localization \(localization=0\) no bound .*; it stops at 5000"):
        assert resolve_burn_in(None, cfg, 5000) == 5000
    assert resolve_burn_in(None, cfg, 5000, relax=100.0, warn=False) == max(500, BURN_IN_RELAXATIONS * 100)
    assert resolve_num_draws(None, cfg, 10**6) < 10**6
    p = deep_linear_problem([2, 2], r=2, num_samples=2000, batch_size=64, seed=0)
    x, y = (t.double() for t in p.dataset.tensors)
    with torch.no_grad():
        p.model[0].weight.copy_(torch.linalg.solve(x.T @ x, x.T @ y).T.float())
    res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=2000, localization=0.0, progress=False, seed=0)
    assert res.localization == 0.0 and math.isfinite(res.mean)
    assert abs(res.mean - 2.0) < 3 * res.std, (res.mean, res.std)
    monitor = OnlineLLC(p.model, p.loss_fn, num_samples=2000, localization=0.0, every_n_steps=1, window=10)
    for t, b in enumerate(p.batches, start=1):
        monitor.update(b, step=t)
    assert math.isfinite(monitor.history()[-1].mean)
