"""SGHMC and RMSProp-preconditioned SGLD beside SGLD: degenerate cases, a quadratic model with a
known answer, checkpointed chain state, and argument errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from online_llc import OnlineLLC, estimate_llc
from online_llc.config import SGLDConfig
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.step import sampler_step, sgld_step
from online_llc.kernel.updates import init_aux
from online_llc.models.toy import deep_linear_problem


def mse(model, batch):
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum(-1)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=g), torch.randn(32, 2, generator=g)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))


def test_sghmc_with_full_friction_is_sgld_exactly():
    model = mlp()
    ev = LossEvaluator(model, mse)
    sgld = SGLDConfig(nbeta=50.0, localization=3.0, step_size=1e-3)
    sghmc = SGLDConfig(nbeta=50.0, localization=3.0, step_size=1e-3, sampler="sghmc", friction=1.0)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = ev.zeros_like_center()
    b, aux = ev.zeros_like_center(), init_aux(sghmc, ev.zeros_like_center())
    for i in range(5):
        a, ia = sgld_step(ev, ev.center(), a, batch(i), config=sgld, generator=g1)
        b, aux, ib = sampler_step(ev, ev.center(), b, aux, batch(i), config=sghmc, generator=g2)
        # Same maths, different order of float operations: equal to rounding.
        assert ia.draw == pytest.approx(ib.draw, rel=1e-5)
    # Five steps of about four float32 operations each on entries of about sqrt(eps) = 0.03 (an
    # ulp of 1.9e-9), fed back through the gradient: a few tens of ulps apart at most (2.3e-8
    # measured); a wrong formula moves them by 1e-3 and more.
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7)


def test_noiseless_sghmc_is_heavy_ball_sgd():
    """No noise: v <- (1 - alpha) v - (eps/2) grad U, xi <- xi + v is torch's SGD with momentum
    1 - alpha and learning rate eps/2 on U = nbeta L_B + gamma/2 ||xi||^2."""
    model = mlp()
    ev = LossEvaluator(model, mse)
    nbeta, gamma, eps, alpha = 20.0, 2.0, 1e-2, 0.3
    cfg = SGLDConfig(nbeta=nbeta, localization=gamma, step_size=eps, sampler="sghmc", friction=alpha, noise_scale=0.0)
    off, aux = ev.zeros_like_center(), None
    g = torch.Generator().manual_seed(1)
    off = {n: 0.1 * torch.randn(t.shape, generator=g) for n, t in off.items()}
    aux = init_aux(cfg, off)

    ref = copy.deepcopy(model)
    xi = {n: nn.Parameter(off[n].clone()) for n in off}
    opt = torch.optim.SGD(list(xi.values()), lr=eps / 2, momentum=1 - alpha)
    base = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for i in range(4):
        off, aux, _ = sampler_step(ev, ev.center(), off, aux, batch(i), config=cfg, generator=g)
        opt.zero_grad()
        loss = nbeta * torch.func.functional_call(
            ref, {n: base[n] + xi[n] for n in xi}, (batch(i)[0],)
        ).sub(batch(i)[1]).pow(2).sum(-1).mul(0.5).mean()
        loss = loss + gamma / 2 * sum(p.pow(2).sum() for p in xi.values())
        loss.backward()
        opt.step()
    for n in off:
        torch.testing.assert_close(off[n], xi[n].detach(), rtol=1e-5, atol=1e-7)


def test_noiseless_rmsprop_step_matches_hand_computation():
    model = mlp()
    ev = LossEvaluator(model, mse)
    cfg = SGLDConfig(nbeta=30.0, localization=1.0, step_size=1e-2, sampler="rmsprop_sgld", noise_scale=0.0,
                     rmsprop_decay=0.9)
    off = {n: torch.full_like(t, 0.05) for n, t in ev.zeros_like_center().items()}
    aux = init_aux(cfg, off)
    g = torch.Generator().manual_seed(0)
    grads = []
    for i in range(2):
        params = {n: (ev.center()[n] + off[n]).requires_grad_(True) for n in off}
        loss = torch.func.functional_call(model, params, (batch(i)[0],)).sub(batch(i)[1]).pow(2).sum(-1).mul(0.5).mean()
        gl = torch.autograd.grad(loss, list(params.values()))
        grads.append({n: 30.0 * t for n, t in zip(params, gl)})
        expected_v = {n: grads[0][n] ** 2 for n in off} if i == 0 else {
            n: 0.9 * aux[n] + 0.1 * grads[1][n] ** 2 for n in off}
        expected = {n: off[n] - 0.005 / (expected_v[n].sqrt() + 0.1) * (1.0 * off[n] + grads[i][n]) for n in off}
        off, aux, _ = sampler_step(ev, ev.center(), off, aux, batch(i), config=cfg, generator=g)
        for n in off:
            torch.testing.assert_close(aux[n], expected_v[n], rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(off[n], expected[n], rtol=1e-5, atol=1e-8)


class Quadratic(nn.Module):
    """Per-sample loss s/2 ||w - c||^2, the same for every sample: a regular model with
    lambda = d/2 and no minibatch noise, so the only biases are the samplers' own."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.w - 0.0).pow(2).sum().expand(x.shape[0])


@pytest.mark.slow
@pytest.mark.parametrize("sampler, step", [("sgld", 5e-4), ("sghmc", 1e-4), ("rmsprop_sgld", 2e-3)])
def test_each_sampler_recovers_lambda_on_a_quadratic(sampler, step):
    """d = 10, nbeta = 100, no localization, curvature 1: the target is exactly lambda = 5. Step
    sizes are small (epsilon * nbeta * curvature <= 0.05 for SGLD, equivalent for the others), so
    the discretization bias is ~1%; the estimate must lie within 3 of its own reported standard
    errors plus that 2% allowance."""
    model = Quadratic(10)
    data = [torch.zeros(8, 1)]
    res = estimate_llc(model, lambda m, b: m(b), data, num_samples=100, nbeta=100.0, localization=0.0,
                       step_size=step, sampler=sampler, num_chains=4, num_draws=3000, burn_in=500)
    assert abs(res.mean - 5.0) < 3 * res.std + 0.02 * 5.0, (sampler, res.mean, res.std)
    # A regular model at temperature 1: the variance channel says so too (Gamma(5, 1): var = 5).
    assert res.dispersion == pytest.approx(1.0, abs=0.2)


def test_sghmc_momentum_is_checkpointed_and_resumes_exactly():
    p = deep_linear_problem([4, 3, 2], 2, num_samples=1024, batch_size=64, seed=0)
    batches = list(p.batches)
    kw = dict(num_samples=1024, every_n_steps=1, window=10, warmup=5, sampler="sghmc", seed=1)
    full = OnlineLLC(p.model, p.loss_fn, **kw)
    for s in range(120):
        full.update(batches[s % len(batches)])
    first = OnlineLLC(p.model, p.loss_fn, **kw)
    for s in range(57):
        first.update(batches[s % len(batches)])
    state = first.state_dict()
    assert state["sampler"]["aux"][0] and state["settings"]["sampler"] == "sghmc"
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = OnlineLLC(p.model, p.loss_fn, **kw)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for s in range(57, 120):
        resumed.update(batches[s % len(batches)])
    assert [e.mean for e in resumed.history()] == [e.mean for e in full.history()]
    sgld = OnlineLLC(p.model, p.loss_fn, **{**kw, "sampler": "sgld"})
    with pytest.raises(ValueError, match=r"Expected the state's `sampler` to be 'sgld'"):
        sgld.load_state_dict(state)


def test_samplers_give_finite_estimates_on_a_network():
    p = deep_linear_problem([6, 6, 6], 2, num_samples=2048, seed=0)
    for sampler in ("sghmc", "rmsprop_sgld"):
        res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=2048, sampler=sampler,
                           num_chains=2, num_draws=200, burn_in=100)
        assert math.isfinite(res.mean) and res.sampler == sampler and res.mean > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="sgnht"), r"Expected `sampler` to be one of 'sgld', 'rmsprop_sgld', 'sghmc', got 'sgnht'\."),
        (dict(sampler="sghmc", friction=0.0), r"Expected `friction` to be a finite float > 0, got 0\.0\."),
        (dict(sampler="sghmc", friction=1.5), r"Expected `friction` to be a float in \(0, 1\], got 1\.5\."),
    ],
)
def test_invalid_sampler_arguments(kwargs, match):
    p = deep_linear_problem([3, 2], 2, num_samples=256, batch_size=32, seed=0)
    with pytest.raises(ValueError, match=match):
        estimate_llc(p.model, p.loss_fn, p.batches, num_samples=256, **kwargs)
    with pytest.raises(ValueError, match=match):
        OnlineLLC(p.model, p.loss_fn, num_samples=256, **kwargs)
    with pytest.raises(ValueError, match=r"Expected `rmsprop_decay` to be a float in \[0, 1\), got 1\.0\."):
        SGLDConfig(nbeta=1.0, localization=0.0, step_size=1e-3, sampler="rmsprop_sgld", rmsprop_decay=1.0)


def test_sgld_step_refuses_stateful_samplers():
    ev = LossEvaluator(mlp(), mse)
    cfg = SGLDConfig(nbeta=1.0, localization=0.0, step_size=1e-3, sampler="sghmc")
    with pytest.raises(ValueError, match=r"use sampler_step for 'sghmc'"):
        sgld_step(ev, ev.center(), ev.zeros_like_center(), batch(), config=cfg, generator=torch.Generator())
