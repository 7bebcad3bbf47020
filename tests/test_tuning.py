"""Tests for step-size guidance: the MALA acceptance against a NumPy oracle, the pilot's ladder
verdicts on known models, and the monitor's health alarm."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from online_llc import OnlineLLC, recommend_step_size
from online_llc.calibration.step import resolve_hyperparameters
from online_llc.kernel.diagnostics import mala_acceptance
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.models.toy import deep_linear_problem


def linear_setup(n: int = 64, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        bx, by = batch
        return 0.5 * (m(bx).squeeze(-1) - by) ** 2

    return model, loss_fn, (x, y)


def numpy_mala(w0, xi, z, x, y, nbeta, gamma, eps) -> float:
    """MALA acceptance of the SGLD proposal, written out in NumPy from the definition."""

    def U(v):
        r = x @ (w0 + v) - y
        return nbeta * np.mean(0.5 * r**2) + 0.5 * gamma * v @ v

    def gradU(v):
        r = x @ (w0 + v) - y
        return nbeta * x.T @ r / len(y) + gamma * v

    prop = xi - eps / 2 * gradU(xi) + math.sqrt(eps) * z
    log_q_fwd = -np.sum((prop - xi + eps / 2 * gradU(xi)) ** 2) / (2 * eps)
    log_q_bwd = -np.sum((xi - prop + eps / 2 * gradU(prop)) ** 2) / (2 * eps)
    return min(1.0, math.exp(U(xi) - U(prop) + log_q_bwd - log_q_fwd))


@pytest.mark.parametrize("eps", [1e-4, 3e-3, 3e-2])
def test_mala_acceptance_matches_numpy_oracle(eps: float) -> None:
    model, loss_fn, (x, y) = linear_setup()
    ev = LossEvaluator(model, loss_fn)
    cfg = dataclasses.replace(
        resolve_hyperparameters(num_samples=64, nbeta=None, localization=10.0, step_size=None), step_size=eps
    )
    xi = {"weight": torch.tensor([[0.05, -0.02, 0.1]], dtype=torch.float64)}
    gen = torch.Generator().manual_seed(7)
    probe = torch.Generator().manual_seed(7)
    torch.randint(0, 2**62, (1,), generator=probe)  # the dropout reseed draws first
    z = torch.randn((1, 3), generator=probe, dtype=torch.float64).numpy().ravel()
    got = mala_acceptance(ev, ev.center(), xi, (x, y), config=cfg, generator=gen)
    want = numpy_mala(
        model.weight.detach().numpy().ravel(), xi["weight"].numpy().ravel(), z, x.numpy(), y.numpy(),
        cfg.nbeta, cfg.localization, eps,
    )
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    # The model is untouched.
    assert model.weight.grad is None


def test_mala_acceptance_falls_with_the_step() -> None:
    model, loss_fn, batch = linear_setup()
    ev = LossEvaluator(model, loss_fn)
    base = resolve_hyperparameters(num_samples=64, nbeta=None, localization=10.0, step_size=None)
    xi = {"weight": torch.zeros(1, 3, dtype=torch.float64)}

    def mean_acc(eps: float) -> float:
        cfg = dataclasses.replace(base, step_size=eps)
        gen = torch.Generator().manual_seed(0)
        return float(np.mean([mala_acceptance(ev, ev.center(), xi, batch, config=cfg, generator=gen) for _ in range(50)]))

    # Curvature nbeta * var(x) ~ 15: eps 1e-4 is exact to ~1e-3; eps 0.5 overshoots the well.
    assert mean_acc(1e-4) > 0.99
    assert mean_acc(0.5) < 0.5


def test_pilot_flags_hot_and_biased_steps_on_a_known_model() -> None:
    """Reduced-rank regression 10-3-5 (lambda 11): 8x and 4x the default step over-estimate by
    about 150% and 75% (benchmarks/step_size.py); the pilot must reject both and recommend a
    step whose estimate lies within 25% of lambda (the default's error is -8%, half its step's
    -20%, twice its step's +17%: 25% leaves room for the pilot's 2 x 400 draws, se ~ 0.4)."""
    p = deep_linear_problem([10, 3, 5], 1, seed=0)
    rec = recommend_step_size(p.model, p.loss_fn, p.batches, num_samples=p.num_samples,
                              multipliers=(8, 4, 2, 1, 0.5), seed=0)
    by_mult = {r.multiplier: r for r in rec.runs}
    assert by_mult[8].verdict in ("hot", "biased", "diverged")
    assert by_mult[4].verdict in ("hot", "biased")
    assert rec.ok and rec.step_size <= 2 * rec.default_step_size
    chosen = next(r for r in rec.runs if r.step_size == rec.step_size)
    assert abs(chosen.mean / p.lam - 1) < 0.25, str(rec)
    assert "recommended step_size" in str(rec)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(multipliers=(1.0,)), r"Expected `multipliers` to hold at least two distinct values > 0"),
        (dict(multipliers=(1.0, -2.0)), r"Expected `multipliers\[i\]` to be a finite float > 0, got -2\.0\."),
        (dict(tolerance=0.0), r"Expected `tolerance` to be a finite float > 0, got 0\.0\."),
        (dict(bogus=1), r"bogus"),
    ],
)
def test_pilot_validation(kw: dict, message: str) -> None:
    p = deep_linear_problem([6, 6, 6], 2, num_samples=512, seed=0)
    with pytest.raises((ValueError, TypeError), match=message):
        recommend_step_size(p.model, p.loss_fn, p.batches, num_samples=512, **kw)


def test_health_alarm_fires_on_a_hot_chain_and_not_on_a_good_one() -> None:
    """[4, 12, 12, 12, 4] at 3x the default step reads dispersion ~30 and over-estimates 4-fold;
    10-3-5 at the default reads ~1 and is within 10% of lambda."""
    hot = deep_linear_problem([4, 12, 12, 12, 4], 2, seed=0)
    good = deep_linear_problem([10, 3, 5], 1, seed=0)
    for p, mult, expect in [(hot, 3.0, True), (good, 1.0, False)]:
        base = resolve_hyperparameters(num_samples=p.num_samples, nbeta=None, localization=100.0, step_size=None)
        mon = OnlineLLC(p.model, p.loss_fn, num_samples=p.num_samples, every_n_steps=1, window=40,
                        step_size=mult * base.step_size, seed=0)
        batches = list(p.batches)
        for s in range(1200):
            mon.update(batches[s % len(batches)])
        h = mon.health()
        assert (h.alarm is not None and "chain runs hot" in h.alarm) == expect, (p.name, h)
        assert h.divergences == 0 and h.weight_jumps == 0 and len(h.warmup_lengths) == 1
