"""The control-variate gradient (online_llc.kernel.anchor) against closed forms on linear
regression: the per-sample gradients of ``l_i = (x_i . w - y_i)^2 / 2`` are ``x_i (x_i . w - y_i)``,
so every covariance the kernel measures is a NumPy sum."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from online_llc import estimate_llc
from online_llc.config import SGLDConfig
from online_llc.kernel.anchor import full_gradient
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.step import sampler_step
from online_llc.models.toy import ShuffledBatches


def _regression(d: int, n: int, seed: int = 0, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).float() * torch.linspace(1 - spread, 1 + spread, d)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    w_ls = torch.linalg.lstsq(x.double(), y.double()[:, None]).solution[:, 0]
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_ls.float()[None])
    return model, x, y


def _loss(model: nn.Module, batch):
    x, y = batch
    return 0.5 * (model(x)[:, 0] - y) ** 2


def test_full_gradient_is_the_mean_gradient_over_one_pass():
    """Away from the optimum the anchor is ``X^T (X w - y) / n`` (NumPy, float64), over one
    pass of batches of unequal sizes (the last one short)."""
    model, x, y = _regression(3, 1000)
    with torch.no_grad():
        model.weight.add_(0.3)
    evaluator = LossEvaluator(model, _loss)
    center = evaluator.center()
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1000, 64)]
    got = full_gradient(evaluator, center, batches, generator=torch.Generator().manual_seed(0))["weight"]
    xn, yn, w = x.double().numpy(), y.double().numpy(), model.weight.detach().double().numpy()[0]
    want = xn.T @ (xn @ w - yn) / 1000
    np.testing.assert_allclose(got.numpy()[0], want, rtol=1e-5, atol=1e-7)
    assert model.weight.grad is None
    with pytest.raises(ValueError, match=r"Expected `batches` to yield at least one batch"):
        full_gradient(evaluator, center, [], generator=torch.Generator())


class _FixedOffset:
    """A d = 4 regression (n = 4096) at its least-squares optimum ``w*`` and one fixed offset
    ``xi``, with NumPy copies for the closed forms: ``xn``, ``yn``, ``w`` (``w*``) and ``v`` (``xi``).
    :meth:`steps` runs the kernel at that offset on independent batches of 64 drawn with
    replacement (so every covariance is the population's)."""

    n, b, nbeta, eps = 4096, 64, 256.0, 1e-4

    def __init__(self) -> None:
        self.model, self.x, self.y = _regression(4, self.n)
        self.evaluator = LossEvaluator(self.model, _loss)
        self.center = self.evaluator.center()
        self.xi = {"weight": 0.05 * torch.randn(1, 4, generator=torch.Generator().manual_seed(3))}
        self.xn, self.yn = self.x.double().numpy(), self.y.double().numpy()
        self.w = self.center["weight"].double().numpy()[0]
        self.v = self.xi["weight"].double().numpy()[0]
        self.anchor = full_gradient(
            self.evaluator, self.center, [(self.x, self.y)], generator=torch.Generator().manual_seed(0)
        )
        self.gen = torch.Generator().manual_seed(1)

    def steps(self, config: SGLDConfig, count: int) -> list:
        """The :class:`SGLDInfo` of ``count`` steps from ``xi`` (the offset is not carried on)."""
        pick = torch.Generator().manual_seed(2)
        out = []
        for _ in range(count):
            idx = torch.randint(self.n, (self.b,), generator=pick)
            _, _, info = sampler_step(
                self.evaluator, self.center, self.xi, {}, (self.x[idx], self.y[idx]), config=config,
                generator=self.gen, anchor=self.anchor, rng_seed=0,
            )
            out.append(info)
        return out


def test_the_kernel_reads_each_gradients_batch_noise_against_the_closed_form():
    """At a fixed offset ``xi`` the halves' difference measures ``tr(C) / B``, ``C`` the
    per-sample covariance of the gradient the step takes: for the plain gradient
    ``x_i (x_i . (w* + xi) - y_i)``, for the control variate ``x_i x_i . xi`` (its anchor is 0 at
    the least-squares optimum). The kernel's heat bias ``epsilon nbeta^2 tr(C) / (8 B)``, averaged
    over 400 independent batches, must match each within 15% (each batch's reading is a
    chi-square of 4 degrees of freedom: 3.5% relative standard error of the mean, so 15% is four
    of them), and the control variate's must be far smaller."""
    f = _FixedOffset()
    xn, yn, w, v, nbeta, eps, b = f.xn, f.yn, f.w, f.v, f.nbeta, f.eps, f.b
    per_sample = {"plain": xn * (xn @ (w + v) - yn)[:, None], "control_variate": xn * (xn @ v)[:, None]}
    read = {}
    for gradient, g in per_sample.items():
        want = eps * nbeta**2 * np.trace(np.cov(g.T, bias=True)) / (8 * b)
        config = SGLDConfig(nbeta=nbeta, localization=1.0, step_size=eps, gradient=gradient)
        read[gradient] = float(np.mean([info.heat_bias for info in f.steps(config, 400)]))
        assert read[gradient] == pytest.approx(want, rel=0.15), (gradient, read[gradient], want)
    assert read["control_variate"] < read["plain"] / 10


def test_the_control_variate_draw_keeps_the_mean_and_reads_its_own_smaller_noise():
    """At a fixed offset ``xi`` the plain draw ``d = nbeta mean_B(l_i(w* + xi) - l_i(w*))`` and the
    control-variate draw ``d' = d - nbeta (grad L_B(w*) - gbar) . xi`` have the same expectation
    over batches, ``nbeta (L_n(w* + xi) - L_n(w*))`` (a NumPy sum), and ``d'``'s batch variance is
    ``nbeta^2 var_i(delta_i - (x_i (x_i . w* - y_i)) . xi) / B``. Over 1000 independent batches
    (with replacement) both draws' means must be within 4 standard errors of the exact mean, and
    the noise channel ``v`` each step reports (``d'``'s from the halves: one degree of freedom per
    step, so 1000 steps read it to about 4.5%) must match its own closed form within 15% (plain:
    the per-sample variance, 5%); ``d'`` must be several times less noisy."""
    f = _FixedOffset()
    xn, yn, w, v, nbeta, eps, b = f.xn, f.yn, f.w, f.v, f.nbeta, f.eps, f.b
    delta = 0.5 * (xn @ (w + v) - yn) ** 2 - 0.5 * (xn @ w - yn) ** 2
    linear = (xn * (xn @ w - yn)[:, None]) @ v  # grad l_i(w*) . xi
    exact_mean = nbeta * delta.mean()
    per_sample = {"plain": delta, "control_variate": delta - linear}
    noise = {}
    for draw, values in per_sample.items():
        want_v = nbeta**2 * values.var() / b
        config = SGLDConfig(nbeta=nbeta, localization=1.0, step_size=eps, gradient="control_variate", draw=draw)
        infos = f.steps(config, 1000)
        draws, vs = [i.draw for i in infos], [i.noise_var for i in infos]
        assert abs(np.mean(draws) - exact_mean) < 4 * np.sqrt(want_v / 1000), (draw, np.mean(draws), exact_mean)
        assert np.mean(vs) == pytest.approx(want_v, rel=0.15 if draw == "control_variate" else 0.05), (draw, np.mean(vs), want_v)
        assert np.var(draws) == pytest.approx(want_v, rel=0.15), (draw, np.var(draws), want_v)
        noise[draw] = want_v
    assert noise["control_variate"] < noise["plain"] / 4


def test_the_control_variate_draw_needs_the_control_variate_gradient():
    model, x, y = _regression(2, 64)
    with pytest.raises(ValueError, match=r"Expected gradient='control_variate' with draw='control_variate'"):
        SGLDConfig(nbeta=10.0, localization=1.0, step_size=1e-3, draw="control_variate")
    with pytest.raises(ValueError, match=r"Expected `draw` to be one of 'plain', 'control_variate'"):
        SGLDConfig(nbeta=10.0, localization=1.0, step_size=1e-3, draw="cv")
    with pytest.raises(ValueError, match=r"Expected gradient='control_variate' or 'auto' with draw='control_variate'"):
        estimate_llc(model, _loss, [(x, y)], num_samples=64, gradient="plain", draw="control_variate")
    # auto takes the plain gradient at a batch not below nbeta / 2 (here nbeta = 64 / log 64 = 15.4):
    # the draw cannot follow
    with pytest.raises(ValueError, match=r"Expected draw='plain' or 'auto' where gradient='auto' takes the plain"):
        estimate_llc(model, _loss, [(x, y)], num_samples=64, draw="control_variate", progress=False)


def test_the_control_variate_needs_its_anchor_and_a_known_gradient_name():
    model, x, y = _regression(2, 64)
    evaluator = LossEvaluator(model, _loss)
    config = SGLDConfig(nbeta=10.0, localization=1.0, step_size=1e-3, gradient="control_variate")
    with pytest.raises(ValueError, match=r"Expected `anchor` \(the full-data gradient at the centre"):
        sampler_step(evaluator, evaluator.center(), evaluator.zeros_like_center(), {}, (x, y), config=config,
                     generator=torch.Generator())
    with pytest.raises(ValueError, match=r"Expected `gradient` to be one of 'plain', 'control_variate'"):
        SGLDConfig(nbeta=10.0, localization=1.0, step_size=1e-3, gradient="cv")
    with pytest.raises(ValueError, match=r"Expected `gradient` to be one of 'plain', 'control_variate', 'auto'"):
        estimate_llc(model, _loss, [(x, y)], num_samples=64, gradient="exact")
    with pytest.raises(ValueError, match=r"Expected `progress` to be a bool, got 'yes'"):
        estimate_llc(model, _loss, [(x, y)], num_samples=64, progress="yes")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 40 steps of a tiny chain may read hot
def test_estimate_llc_prints_its_plan_unless_told_not_to(capsys):
    model, x, y = _regression(2, 512)
    batches = ShuffledBatches(x, y, batch_size=64, seed=0)
    estimate_llc(model, _loss, batches, num_samples=512, num_chains=2, burn_in=20, num_draws=20)
    err = capsys.readouterr().err
    assert "estimate_llc: 2 chains (batched) x (20 burn-in + 20 draws) at step_size" in err
    assert "plain gradient and plain draw (batch 64)" in err  # 64 is not below nbeta / 2 = 41
    estimate_llc(model, _loss, batches, num_samples=512, num_chains=2, burn_in=20, num_draws=20, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_auto_picks_the_control_variate_at_a_small_batch_and_reads_the_exact_target():
    """At batch 16, ``gradient="auto"`` takes the control-variate gradient,
    whose step is sized by its discretization alone, and the estimate reads the exact localized
    target ``1/2 sum_j nbeta h_j / (nbeta h_j + gamma)`` (``h_j`` the eigenvalues of ``X^T X / n``)
    at n = 1e5 within 5% plus two of its reported standard errors; the measured heat is small
    (below 1.05, the bound the estimator warns at). Measured: 1.991 against 1.975, std 0.09."""
    n = 100_000
    model, x, y = _regression(4, n, seed=1, spread=0.1)
    res = estimate_llc(
        model, _loss, ShuffledBatches(x, y, batch_size=16, seed=0), num_samples=n, gradient="auto", progress=False
    )
    h = np.linalg.eigvalsh(x.double().numpy().T @ x.double().numpy() / n)
    exact = 0.5 * float(np.sum(res.nbeta * h / (res.nbeta * h + res.localization)))
    assert res.gradient == "control_variate"
    assert abs(res.mean - exact) < 0.05 * exact + 2 * res.std, (res.mean, exact, res.std)
    assert res.total_heat < 1.05
