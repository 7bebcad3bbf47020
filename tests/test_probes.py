"""Probe sets offline: observable-refined LLCs and the Bayesian influence of probe samples against
closed forms.

The oracle: linear regression with unit Gaussian noise at its least-squares optimum. With the
full data as the batch the chain is linear with Gaussian noise, so its stationary law is exactly
``xi ~ N(0, S)`` with ``S = (A - epsilon A^2 / 4)^(-1)``, ``A = nbeta H + gamma I``,
``H = X^T X / n`` (the discrete chain's covariance; ``A^(-1)`` as the step goes to 0). With
residuals ``r_k = x_k^T w* - y_k``, ``delta_k = r_k x_k^T xi + (x_k^T xi)^2 / 2`` and the draw
``d = (nbeta / 2) xi^T H xi`` (the gradient at ``w*`` vanishes), so by Isserlis::

    E[delta_k]         = x_k^T S x_k / 2
    Cov(delta_k, d)    = (nbeta / 2) x_k^T S H S x_k
    Var(delta_k)       = r_k^2 x_k^T S x_k + (x_k^T S x_k)^2 / 2
    Var(d)             = (nbeta^2 / 2) tr((H S)^2)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from online_llc import estimate_llc
from online_llc.stats.probes import ProbeMoments

pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_moments_recover_a_known_covariance_with_calibrated_standard_errors():
    """Independent draws with ``delta_k = c_k d + noise`` (so ``Cov(delta_k, d) = c_k``): over 20
    repetitions of 4 chains x 1000 draws and 30 probes, the z-scores of the influence against
    ``-c_k`` have mean within 0.15 of 0 and standard deviation within 0.85-1.15 (600 z-scores, so
    either is off by more than 3.5 of its own standard errors only if the SE is miscalibrated), and
    the correlation reads ``c_k / sqrt(c_k^2 + 1)``."""
    rng = np.random.default_rng(0)
    c = np.linspace(-0.6, 0.6, 30)
    zs, corr = [], []
    for _ in range(20):
        m = ProbeMoments(4, 30, segment=125)
        d = rng.normal(size=(4, 1000))
        noise = rng.normal(size=(4, 1000, 30))
        for chain in range(4):
            for t in range(1000):
                m.add(chain, c * d[chain, t] + noise[chain, t], d[chain, t])
        s = m.summary(nbeta=1.0)
        assert s["count"] == 4000
        zs.append((s["influence"] + c) / s["influence_std"])
        corr.append(s["correlation"])
    z = np.concatenate(zs)
    assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.15
    assert np.mean(corr, axis=0) == pytest.approx(c / np.sqrt(c**2 + 1), abs=0.01)


def test_probe_moments_loss_kernel_recovers_a_known_covariance_with_calibrated_standard_errors():
    """Independent draws ``delta = M u`` (``u ~ N(0, I)``, so ``Cov(delta_k, delta_j) = (M M^T)_kj``)
    in two sets of 4 and 3 probes, the kernel kept for the first only: over 20 repetitions of 4
    chains x 1000 draws the z-scores of its 10 distinct entries against ``M M^T`` have mean within
    0.25 of 0 and standard deviation within 0.85-1.2 (200 z-scores, but the 10 entries of a
    repetition share its draws, so their mean's standard error is near 0.1; over rng seeds 0-3
    the means read -0.18..0.02 and the deviations 1.00-1.11); a selection that is not a kept block
    has no kernel, and kernel sums of the wrong count are refused."""
    rng = np.random.default_rng(0)
    m_ = rng.normal(size=(7, 7)) / 2
    cov = m_ @ m_.T
    zs = []
    for _ in range(20):
        m = ProbeMoments(4, 7, segment=125, blocks=[(0, 4)])
        u = rng.normal(size=(4, 1000, 7))
        for chain in range(4):
            for t in range(1000):
                m.add(chain, m_ @ u[chain, t], float(u[chain, t, 0]))
        s = m.select(0, 4).summary(nbeta=1.0)
        iu = np.triu_indices(4)
        zs.append(((s["kernel"] - cov[:4, :4]) / s["kernel_std"])[iu])
        assert np.allclose(s["kernel"], s["kernel"].T)
        assert m.select(4, 7).summary(nbeta=1.0)["kernel"] is None
        assert m.summary(nbeta=1.0)["kernel"] is None  # the whole selection is not one block
    z = np.concatenate(zs)
    assert abs(z.mean()) < 0.25 and 0.85 < z.std() < 1.2
    with pytest.raises(ValueError, match="Expected 1 kernel sums"):
        m.add_segment(0, np.zeros(3), np.zeros((3, 7)))


def test_the_probe_kernel_is_asked_for_with_probes_and_refused_past_its_memory():
    model, x, y, fresh = _regression()
    with pytest.raises(ValueError, match="Expected `probes` with probe_kernel or probe_loss_fn"):
        estimate_llc(model, _mse, [(x, y)], num_samples=len(x), probe_kernel=True, progress=False)
    with pytest.raises(ValueError, match="`probe_kernel`"):
        estimate_llc(model, _mse, [(x, y)], num_samples=len(x), probes={"f": fresh}, probe_kernel="yes", progress=False)
    big = (x.repeat(2, 1)[:3000], y.repeat(2, 1)[:3000])
    # 3000^2 float64 sums x 4 chains x 9 segments = 2.4 GiB.
    with pytest.raises(ValueError, match=r"fit in 1 GiB, got 2\.4 GiB .*sizes \[3000\]"):
        estimate_llc(model, _mse, [(x, y)], num_samples=len(x), probes={"big": big}, probe_kernel=True, progress=False)


def _regression(d: int = 4, n: int = 2000):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    w0 = torch.randn(d, 1, generator=g)
    y = x @ w0 + torch.randn(n, 1, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    fresh_x = torch.randn(20, d, generator=g)
    fresh_y = fresh_x @ w0 + torch.randn(20, 1, generator=g)
    return model, x, y, (fresh_x, fresh_y)


def _mse(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(1)


@pytest.mark.slow
def test_offline_probes_match_the_gaussian_posterior_in_closed_form():
    """A d = 4 regression at its optimum (n = 2000, the whole data as the batch, nbeta 100,
    localization 10, step 1e-3: 4 chains x 3000 draws, about 18 steps per relaxation), 20 probes
    from the training set and 20 fresh ones. Each set's observable-refined LLC is within 3 of its
    standard errors of ``nbeta mean_k x_k^T S x_k / 2``; the influences' z-scores against
    ``-(nbeta / 2) x_k^T S H S x_k`` have mean within 1 and root mean square within 0.5-1.6 over
    the 40 probes, none past 4 (they share the draws, so their mean moves together: over seeds
    0-4 the means read 0.07-0.59 and the rms 0.81-1.24); every influence resolved to 4 standard
    errors has the closed form's sign; the correlations (devinterp's convention) are within 4
    standard errors of ``Cov / sqrt(Var(delta_k) Var(d))``. The loss kernel's 420 distinct entries
    against ``Cov(delta_k, delta_j) = r_k r_j x_k^T S x_j + (x_k^T S x_j)^2 / 2`` (Isserlis): z mean
    within 1, rms within 0.5-1.6 and under 2% past 3 (products of four Gaussians over 32 segments
    are heavy-tailed: over seeds 0-4 the means read -0.14..0.03, the rms 0.79-1.20, the largest
    |z| 2.6-6.0)."""
    model, x, y, fresh = _regression()
    nbeta, gamma, eps, n = 100.0, 10.0, 1e-3, len(x)
    probes = {"train": (x[:20], y[:20]), "fresh": fresh}
    res = estimate_llc(model, _mse, [(x, y)], num_samples=n, nbeta=nbeta, localization=gamma, step_size=eps,
                       num_chains=4, burn_in=500, num_draws=3000, progress=False, probes=probes, seed=0,
                       probe_kernel=True)
    assert sorted(res.probes) == ["fresh", "train"]
    h = (x.T @ x / n).double()
    a = nbeta * h + gamma * torch.eye(4, dtype=torch.float64)
    s = torch.linalg.inv(a - eps * a @ a / 4)
    w = model.weight.detach().double().T
    var_d = float(nbeta**2 / 2 * torch.trace(h @ s @ h @ s))
    z_infl, z_corr, z_kernel = [], [], []
    for name, (px, py) in probes.items():
        px, py = px.double(), py.double()
        quad = ((px @ s) * px).sum(1)
        cov = (nbeta / 2 * ((px @ (s @ h @ s)) * px).sum(1)).numpy()
        r = (px @ w - py)[:, 0]
        corr = cov / np.sqrt((r**2 * quad + quad**2 / 2).numpy() * var_d)
        p = res.probes[name]
        assert p.num_probes == 20 and p.count == 4 * 3000
        assert abs(p.llc - float(nbeta * quad.mean() / 2)) < 3 * p.llc_std
        z_infl.append((p.influence + cov) / p.influence_std)
        z_corr.append((p.correlation - corr) / p.correlation_std)
        assert p.susceptibility == pytest.approx(p.influence.mean(), rel=1e-9)
        assert abs(p.susceptibility + cov.mean()) < 3 * p.susceptibility_std
        resolved = np.abs(p.influence) > 4 * p.influence_std
        assert np.all(np.sign(p.influence[resolved]) == np.sign(-cov[resolved]))
        q = px @ s @ px.T
        kernel = (r[:, None] * r[None, :] * q + q**2 / 2).numpy()
        z_kernel.append(((p.kernel - kernel) / p.kernel_std)[np.triu_indices(20)])
    z = np.concatenate(z_infl)
    assert abs(z.mean()) < 1.0 and 0.5 < np.sqrt((z**2).mean()) < 1.6 and np.abs(z).max() < 4
    assert np.abs(np.concatenate(z_corr)).max() < 4
    z = np.concatenate(z_kernel)
    assert abs(z.mean()) < 1.0 and 0.5 < np.sqrt((z**2).mean()) < 1.6 and np.mean(np.abs(z) > 3) < 0.02


def test_probes_are_checked_when_the_estimate_starts():
    model, x, y, fresh = _regression()
    run = lambda probes, **kw: estimate_llc(model, _mse, [(x[:64], y[:64])], num_samples=2000,  # noqa: E731
                                            **{"num_draws": 2, "burn_in": 0, "step_size": 1e-4, "progress": False,
                                               "probes": probes, **kw})
    with pytest.raises(ValueError, match=r"Expected `probes` to be a non-empty mapping of names to batches"):
        run([(x[:4], y[:4])])
    with pytest.raises(ValueError, match=r"Expected the probe set 'none' to hold at least one sample"):
        run({"none": []})
    with pytest.raises(ValueError, match=r"Expected the names of `probes` to be non-empty strings"):
        run({"": fresh})
    with pytest.raises(ValueError, match=r"Expected `probe_loss_fn` to be callable as probe_loss_fn\(model, batch\), got "):
        run({"fresh": fresh}, probe_loss_fn="per_token")
    with pytest.raises(ValueError, match=r"Expected at most 65536 probe samples over all sets, got 65537\."):
        run({"a": (torch.randn(65000, 4), torch.randn(65000, 1)), "b": (torch.randn(537, 4), torch.randn(537, 1))})
    # Several batches make one set; its results come in the order of the samples.
    res = run({"two": [(fresh[0][:5], fresh[1][:5]), (fresh[0][5:], fresh[1][5:])]})
    assert res.probes["two"].num_probes == 20 and res.probes["two"].influence.shape == (20,)
    assert isinstance(res.to_dict()["probes"]["two"]["influence"], list)
    # Like with like: each convention's numbers, and an unknown one named.
    p = res.probes["two"]
    assert p.bif()[0] is p.influence and p.bif("devinterp") == (p.correlation, p.correlation_std)
    with pytest.raises(ValueError, match=r"Expected `convention` to be one of 'online_llc', 'devinterp', got 'pearson'"):
        p.bif("pearson")
    # Only draws count, batched or one chain after another (the later chains after their burn-in),
    # and the probes only read the chains: the draws are those of a run without them.
    for batched in (True, False):
        res = run({"fresh": fresh}, num_chains=3, burn_in=5, num_draws=7, batched=batched)
        assert res.probes["fresh"].count == 3 * 7
        plain = run(None, num_chains=3, burn_in=5, num_draws=7, batched=batched)
        assert np.array_equal(plain.draws, res.draws) and plain.probes == {}


@pytest.mark.slow
def test_a_weight_groups_susceptibility_is_its_restricted_posteriors():
    """The chains move the bias alone (``params=["bias"]``) of a regression with an intercept at its
    optimum: ``xi`` is one number of variance ``s = 1 / (a - epsilon a^2 / 4)``, ``a = nbeta +
    gamma``, the residuals average to zero, so ``delta_k = r_k xi + xi^2 / 2`` and ``d = nbeta xi^2
    / 2``, and every probe's ``Cov(delta_k, d) = nbeta s^2 / 2``: the bias's susceptibility to any
    probe set is ``-nbeta s^2 / 2``, read within 3 standard errors, and its observable-refined LLC
    ``nbeta s / 2`` too."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 3, generator=g)
    y = x @ torch.randn(3, 1, generator=g) + 0.5 + torch.randn(2000, 1, generator=g)
    model = nn.Linear(3, 1)
    sol = torch.linalg.lstsq(torch.cat([x, torch.ones(2000, 1)], 1), y).solution
    with torch.no_grad():
        model.weight.copy_(sol[:3].T)
        model.bias.copy_(sol[3])
    nbeta, gamma, eps = 100.0, 10.0, 1e-3
    res = estimate_llc(model, _mse, [(x, y)], num_samples=2000, nbeta=nbeta, localization=gamma, step_size=eps,
                       params=["bias"], num_chains=4, burn_in=300, num_draws=2000, progress=False, seed=0,
                       probes={"some": (x[:30], y[:30])})
    a = nbeta + gamma
    s = 1.0 / (a - eps * a * a / 4)
    p = res.probes["some"]
    assert abs(p.susceptibility + nbeta * s * s / 2) < 3 * p.susceptibility_std
    assert abs(p.llc - nbeta * s / 2) < 3 * p.llc_std


def _two_token_regression(n: int = 2000):
    """Two outputs ("tokens") of a d = 3 linear model at its least-squares optimum."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.randn(3, 2, generator=g) + torch.randn(n, 2, generator=g)
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    return model, x, y


def _per_token(model, batch):
    x, y = batch
    return 0.5 * (model(x) - y) ** 2  # [B, T]


@pytest.mark.slow
def test_per_token_probes_match_the_closed_form_and_sum_to_the_per_sample_probes():
    """A probe loss per token (``probe_loss_fn`` returning ``[B, T]``): each output row ``t`` of a
    linear model moves on its own, ``xi_t ~ N(0, S)``, so ``delta_kt = r_kt x_k^T xi_t + (x_k^T
    xi_t)^2 / 2`` and every token's ``Cov(delta_kt, d) = (nbeta / 2) x_k^T S H S x_k``: the 20 x 2
    per-token influences' z-scores have mean within 1, root mean square within 0.5-1.6 and none
    past 4 (as the per-sample test above), and the result keeps the shape ``(20, 2)``. The
    per-sample loss is the tokens' sum, so with the same seed the per-sample probes' influence
    and observable-refined LLC are the per-token ones summed over tokens (to float rounding:
    the draws are the same, the statistics linear). A probe loss that is no tensor is refused."""
    model, x, y = _two_token_regression()
    nbeta, gamma, eps, n = 100.0, 10.0, 1e-3, len(x)
    probes = {"train": (x[:20], y[:20])}
    kw = dict(num_samples=n, nbeta=nbeta, localization=gamma, step_size=eps, num_chains=4, progress=False, seed=0,
              probes=probes)
    res = estimate_llc(model, _mse, [(x, y)], burn_in=500, num_draws=3000, probe_loss_fn=_per_token, **kw)
    p = res.probes["train"]
    assert p.shape == (20, 2) and p.num_probes == 40
    h = (x.T @ x / n).double()
    a = nbeta * h + gamma * torch.eye(3, dtype=torch.float64)
    s = torch.linalg.inv(a - eps * a @ a / 4)
    px = x[:20].double()
    cov = (nbeta / 2 * ((px @ (s @ h @ s)) * px).sum(1)).numpy()
    z = ((p.influence.reshape(p.shape) + cov[:, None]) / p.influence_std.reshape(p.shape)).ravel()
    assert abs(z.mean()) < 1.0 and 0.5 < np.sqrt((z**2).mean()) < 1.6 and np.abs(z).max() < 4
    short = dict(burn_in=50, num_draws=400)
    tokens = estimate_llc(model, _mse, [(x, y)], probe_loss_fn=_per_token, **short, **kw).probes["train"]
    samples = estimate_llc(model, _mse, [(x, y)], **short, **kw).probes["train"]
    assert samples.shape == (20,)
    summed = tokens.influence.reshape(20, 2).sum(1)
    assert np.allclose(samples.influence, summed, rtol=1e-6, atol=1e-6 * np.abs(summed).max())
    assert samples.llc == pytest.approx(2 * tokens.llc, rel=1e-6)  # a mean over 2 tokens per sample
    with pytest.raises(ValueError, match=r"Expected `probe_loss_fn` to return the probes' losses as a tensor"):
        estimate_llc(model, _mse, [(x, y)], probe_loss_fn=lambda m, b: 1.0, **short, **kw)
