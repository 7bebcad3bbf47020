"""The online control-variate gradient: its running anchor against NumPy, the kernel's update
with a running anchor against the closed form on linear regression, and the monitor's choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from online_llc import OnlineLLC
from online_llc.config import SGLDConfig
from online_llc.kernel import anchor as anchor_module
from online_llc.kernel.anchor import RunningAnchor, StepAnchor
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.step import _kernel_step
from online_llc.monitor.policy import sized_config


def test_running_anchor_is_the_mean_then_an_exponential_mean_of_the_batch_gradients():
    """Folded batch gradients (each the size-weighted mean of its halves' gradients) give their
    plain mean for the first ``H`` batches and then ``A <- A + (c - A) / H`` (NumPy, float64); a
    gradient the loss does not reach counts as 0; reset forgets; the state restores exactly."""
    rng = np.random.default_rng(0)
    like = [torch.zeros(3), torch.zeros(2, 2)]
    a = RunningAnchor(horizon=4)
    want = [np.zeros(3), np.zeros((2, 2))]
    for t in range(1, 10):
        c1 = [rng.normal(size=3), rng.normal(size=(2, 2))]
        c2 = [rng.normal(size=3), None]
        b1, b2 = 5, 3
        batch = [(b1 * c1[0] + b2 * c2[0]) / 8, b1 * c1[1] / 8]
        w = 1.0 / min(t, 4)
        want = [m + w * (g - m) for m, g in zip(want, batch)]
        got = a.fold(([torch.tensor(g, dtype=torch.float32) for g in c1],
                      [torch.tensor(c2[0], dtype=torch.float32), None]), (b1, b2), like)
        for g, m in zip(got, want):
            np.testing.assert_allclose(g.numpy(), m, rtol=1e-5, atol=1e-6)
    assert a.count == 9
    b = RunningAnchor(horizon=4)
    b.load_state_dict(a.state_dict(), like)
    assert b.count == 9 and all(torch.equal(x, y) for x, y in zip(a.mean, b.mean))
    b.load_state_dict({"mean": [torch.zeros(4)], "count": 3}, like)  # another shape: afresh
    assert b.mean is None and b.count == 0
    a.reset()
    assert a.mean is None and a.count == 0
    # A whole batch (no second half): its gradient as it is.
    only = a.fold(([torch.ones(3), None], [None, None]), (7, 0), like)
    np.testing.assert_array_equal(only[0].numpy(), np.ones(3))
    np.testing.assert_array_equal(only[1].numpy(), np.zeros((2, 2)))


def _regression(d: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x.double(), y.double()[:, None]).solution[:, 0].float()[None])
        model.weight.add_(0.2)  # away from the optimum: the anchor's drift matters
    return model, x, y


def _loss(model: nn.Module, batch):
    x, y = batch
    return 0.5 * (model(x)[:, 0] - y) ** 2


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("measure", [True, False])
def test_a_running_anchor_step_is_the_closed_form_control_variate_update(measure: bool, streamed: bool, monkeypatch):
    """Without injected noise the update is ``xi <- xi - (eps / 2) (nbeta g + gamma xi)`` with
    ``g = grad L_B(w* + xi) - grad L_B(w*) + A`` and ``A`` the anchor after folding this batch's
    centre gradient ``X_B^T (X_B w* - y_B) / B`` into the earlier ones: for this loss
    ``g = X_B^T X_B xi / B + A`` (NumPy, float64), in the measuring step (halves) and the plain one.
    An odd batch: the halves are unequal. ``streamed``: the monitor's anchor
    (:class:`StepAnchor`), whose plain step takes the centre's gradient tensor by tensor (allowed
    here at any size)."""
    monkeypatch.setattr(anchor_module, "STREAM_MIN_ENTRIES", 1)
    monkeypatch.setattr(anchor_module, "STREAM_MEAN_ENTRIES", 1)
    model, x, y = _regression(3, 200)
    ev = LossEvaluator(model, _loss)
    center = ev.center()
    cfg = SGLDConfig(nbeta=50.0, localization=2.0, step_size=1e-3, noise_scale=0.0, gradient="control_variate")
    xi = {"weight": torch.tensor([[0.1, -0.2, 0.05]])}
    w = center["weight"].double().numpy()[0]
    anchor = RunningAnchor()
    mean = np.zeros(3)
    for t, (lo, hi) in enumerate(((0, 17), (17, 40), (40, 61)), start=1):
        xb, yb = x[lo:hi].double().numpy(), y[lo:hi].double().numpy()
        c = xb.T @ (xb @ w - yb) / len(yb)
        mean = mean + (c - mean) / t
        v = xi["weight"].double().numpy()[0]
        g = xb.T @ (xb @ v) / len(yb) + mean
        want = v - 0.5 * cfg.step_size * (cfg.nbeta * g + cfg.localization * v)
        step_anchor = StepAnchor(anchor) if streamed else (lambda grads, halves, like: anchor.fold(grads, halves, like))
        _kernel_step(ev, center, xi, {}, (x[lo:hi], y[lo:hi]), config=cfg, generator=torch.Generator().manual_seed(0),
                     rng_seed=0, heat=measure, anchor=step_anchor)
        np.testing.assert_allclose(xi["weight"].double().numpy()[0], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(anchor.mean[0].double().numpy()[0], mean, rtol=1e-5, atol=1e-7)
    assert model.weight.grad is None


class _Routed(nn.Module):
    """Dropout, and a parameter the loss never reaches (its gradient is None)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.drop = nn.Dropout(0.3)
        self.b = nn.Linear(8, 2)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.drop(self.a(x))))


@pytest.mark.parametrize("chains", [1, 2])
def test_a_streamed_control_variate_step_is_the_whole_gradients_step(chains: int, monkeypatch):
    """A plain step that takes the centre's gradient tensor by tensor (folding each into the
    anchor and subtracting it as it comes) moves the chains, folds the anchor and reports the
    numbers exactly as the step that holds the centre's gradient whole: bit for bit, over plain and
    measuring steps at moving weights, with dropout (two chains that do not share the centre's
    passes: the second reuses the first's fold) and a parameter the loss does not reach."""
    from online_llc.monitor.shadow import ShadowSampler

    def run(stream: bool):
        monkeypatch.setattr(anchor_module, "STREAM_MIN_ENTRIES", 1 if stream else 1 << 60)
        monkeypatch.setattr(anchor_module, "STREAM_MEAN_ENTRIES", 1)
        torch.manual_seed(0)
        model = _Routed()
        ev = LossEvaluator(model, lambda m, b: 0.5 * (m(b[0]) - b[1]).square().sum(-1), mode="train")
        cfg = SGLDConfig(nbeta=100.0, localization=10.0, step_size=1e-3, gradient="control_variate")
        sampler = ShadowSampler(ev, cfg, num_chains=chains, seed=3)
        g = torch.Generator().manual_seed(1)
        numbers = []
        for k in range(12):
            batch = (torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g))
            step = sampler.step(batch, measure=k % 4 == 0)
            numbers.append([(i.draw, i.noise_var, i.offset_norm) for i in step.infos])
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3 * torch.randn(p.shape, generator=g))
        return numbers, sampler.offsets, sampler.anchor.mean, sampler.anchor.count

    whole, streamed = run(False), run(True)
    assert streamed[0] == whole[0]
    for a, b in zip(streamed[1], whole[1]):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(a, b) for a, b in zip(streamed[2], whole[2])) and streamed[3] == whole[3] == 12
    # The unreached parameter's anchor is 0 (folded as 0 each step).
    assert torch.equal(streamed[2][list(streamed[1][0]).index("unused")], torch.zeros(3))


def test_auto_takes_the_control_variate_below_half_nbeta_and_keeps_the_plain_step_otherwise():
    """``sized_config``: at ``B < nbeta / 2`` the control variate and the cap ``0.15 / nbeta``;
    at larger batches, with RMSProp-SGLD or a sharded chain, the plain gradient and its
    batch-sized step; a forced choice is kept. The monitor refuses an unknown choice, naming it."""
    base = SGLDConfig(nbeta=256.0, localization=23.04, step_size=0.15 / 256)
    cv = sized_config(base, 16, "auto")
    assert cv.gradient == "control_variate" and cv.step_size == pytest.approx(0.15 / 256)
    plain = sized_config(base, 128, "auto")
    assert plain.gradient == "plain" and plain.step_size == pytest.approx(0.15 * 128 / 256**2)
    assert sized_config(base, 16, "auto", sharded=True).gradient == "plain"
    assert sized_config(base, 16, "plain").step_size == pytest.approx(0.15 * 16 / 256**2)
    forced = sized_config(SGLDConfig(nbeta=256.0, localization=23.04, step_size=0.15 / 256, gradient="control_variate"),
                          512, "control_variate")
    assert forced.gradient == "control_variate" and forced.step_size == pytest.approx(0.15 / 256)
    rms = sized_config(SGLDConfig(nbeta=256.0, localization=23.04, step_size=5e-3, sampler="rmsprop_sgld"), 16, "auto")
    assert rms.gradient == "plain"
    model, x, y = _regression(3, 200)
    with pytest.raises(ValueError, match=r"Expected `gradient` to be one of 'auto', 'plain', 'control_variate', got 'cv'"):
        OnlineLLC(model, _loss, num_samples=200, gradient="cv")


def test_the_anchor_is_checkpointed_and_reset_when_the_weights_jump():
    """A monitor on the control variate saves its anchor (a resumed monitor continues with the
    same anchor and batch count) and forgets it when the training weights jump."""
    model, x, y = _regression(3, 4000)
    kw = dict(num_samples=4000, every_n_steps=1, window=10, warmup=5, seed=1)
    mon = OnlineLLC(model, _loss, **kw)
    for t in range(1, 31):
        mon.update((x[16 * t: 16 * t + 16], y[16 * t: 16 * t + 16]), step=t)
    assert mon.chain_config.gradient == "control_variate"
    anchor = mon._model.sampler.anchor
    assert anchor.count == 29  # the first shadow step, which sizes the step, ran plain
    again = OnlineLLC(model, _loss, **kw)
    again.load_state_dict(mon.state_dict())
    other = again._model.sampler.anchor
    assert again.chain_config.gradient == "control_variate" and other.count == 29
    assert torch.equal(other.mean[0], anchor.mean[0])
    with torch.no_grad():  # a jump of the weights, far beyond their recent movement
        model.weight.add_(5.0)
    for t in range(31, 34):
        mon.update((x[16 * t: 16 * t + 16], y[16 * t: 16 * t + 16]), step=t)
    assert mon._model.weight_jumps == 1 and anchor.count < 29
    assert math.isfinite(mon.history()[-1].raw_mean)


def test_the_chains_settings_run_estimate_llc_at_the_live_chains_step_and_estimand():
    """``monitor.chain_config.estimate_kwargs()`` is what a user passes to ``estimate_llc`` to
    estimate what the live chain samples: the step as calibrated (the starting step
    ``monitor.config`` holds is not it), the estimand (nbeta, localization), the sampler and
    the gradient; the offline result reports exactly those."""
    from online_llc import estimate_llc

    model, x, y = _regression(3, 4000)
    mon = OnlineLLC(model, _loss, num_samples=4000, every_n_steps=1, window=10, warmup=5, seed=1)
    for t in range(1, 31):
        mon.update((x[16 * t: 16 * t + 16], y[16 * t: 16 * t + 16]), step=t)
    live = mon.chain_config
    assert mon.config.gradient == "plain"  # the trap: the construction settings are not the live chain's
    kw = live.estimate_kwargs()
    assert set(kw) == {"nbeta", "localization", "step_size", "sampler", "friction", "gradient"}
    batches = [(x[i: i + 16], y[i: i + 16]) for i in range(0, 4000, 16)]
    res = estimate_llc(model, _loss, batches, num_samples=4000, num_chains=1, num_draws=20, burn_in=5, progress=False,
                       **kw)
    assert (res.step_size, res.nbeta, res.localization, res.gradient) == (
        live.step_size, live.nbeta, live.localization, "control_variate")


def test_a_run_shorter_than_three_relaxation_times_says_its_band_is_mostly_lag():
    """For a run of known length, the monitor's health says once, in plain words, when the run is
    shorter than three relaxation times of its chains (here 148 shadow steps at the control
    variate's step, one per training step): 300 steps get the alarm and the way to the end point,
    3000 steps and a run of unknown length do not."""
    model, x, y = _regression(3, 4000)

    def alarms(**kw):
        mon = OnlineLLC(model, _loss, num_samples=4000, every_n_steps=1, window=10, warmup=5, seed=1, **kw)
        for t in range(1, 21):
            mon.update((x[16 * t: 16 * t + 16], y[16 * t: 16 * t + 16]), step=t)
        health = mon.health()
        found = [a for a in health.alarms if a.startswith("a short run")]
        assert health.short_run == bool(found)  # the flag the callbacks log as llc/short_run
        return found

    (short,) = alarms(total_steps=300)
    assert "300 training steps against a relaxation time of 148" in short
    assert "estimate_llc(..., **monitor.chain_config.estimate_kwargs())" in short
    assert alarms(total_steps=3000) == [] and alarms() == []


@pytest.mark.slow
def test_the_online_control_variate_at_rest_reads_the_discrete_chains_exact_level():
    """A linear regression at its least-squares optimum (d = 12, n = 1e5) watched at batch 16 by the
    default monitor (4 chains, a shadow step per training step, 3000 of them): it takes the
    control variate, and the level (the window means past warm-up over the last half) is the
    exact one of the discrete chain at the step it ended on, ``sum_j s_j / (2 (1 - eps a_j / 4))``
    (``a_j = nbeta h_j + gamma``, ``s_j = nbeta h_j / a_j``), within three standard errors (from
    blocks of 4 windows, longer than the chain's relaxation time) plus 3%: what the closed form
    leaves out, the running anchor's tilt, predicted at about ``nbeta / (B H)`` = 1-3% for a horizon
    ``H`` of four relaxation times. Measured over chain seeds 0-5: 0.99, 1.06, 0.98, 1.02, 1.11 and
    1.01 of it, each +- 0.04-0.05. The plain gradient at this batch has not relaxed in 3000 shadow
    steps (its step is 16x smaller; ``benchmarks/online_cv.py``)."""
    import statistics
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_heat import _exact_target, _regression_at_optimum

    n, batch = 100000, 16
    p, h, outputs, _ = _regression_at_optimum(n, batch)
    mon = OnlineLLC(p.model, p.loss_fn, num_samples=n, every_n_steps=1, window=40, num_chains=4, seed=0)
    t = 0
    while t < 3000:
        for b in p.batches:
            t += 1
            mon.update(b, step=t)
            if t == 3000:
                break
    cfg = mon.chain_config
    assert cfg.gradient == "control_variate"
    a = cfg.nbeta * h + cfg.localization
    share = cfg.nbeta * h / a
    exact = float(outputs * 0.5 * torch.sum(share / (1 - cfg.step_size * a / 4)))
    assert exact > _exact_target(h, outputs, cfg.nbeta, cfg.localization)
    xs = [e.raw_mean for e in mon.history() if e.step > 1500 and e.status != "warming_up"]
    blocks = [statistics.fmean(xs[i : i + 4]) for i in range(0, len(xs) - 3, 4)]
    level, se = statistics.fmean(xs), statistics.stdev(blocks) / math.sqrt(len(blocks))
    assert len(xs) >= 30
    assert abs(level - exact) < 3 * se + 0.03 * exact, (level, se, exact)
    assert mon.health().heat < 1.1


def test_a_loss_that_fails_in_the_centres_passes_leaves_no_half_folded_anchor(monkeypatch):
    """Where the centre's passes raise midway through a streamed step, the running anchor is
    forgotten (it restarts from the next batch) rather than left scaled down with part of a batch
    folded in; the error reaches the caller."""
    from online_llc.monitor.shadow import ShadowSampler

    monkeypatch.setattr(anchor_module, "STREAM_MIN_ENTRIES", 1)
    monkeypatch.setattr(anchor_module, "STREAM_MEAN_ENTRIES", 1)
    model, x, y = _regression(3, 200)
    calls = []

    def loss(m, b):
        calls.append(1)
        if len(calls) == 4:  # the second step's centre pass (each step: the sample's, then the centre's)
            raise RuntimeError("boom")
        return _loss(m, b)

    cfg = SGLDConfig(nbeta=50.0, localization=2.0, step_size=1e-3, gradient="control_variate")
    sampler = ShadowSampler(LossEvaluator(model, loss), cfg, num_chains=1, seed=0)
    sampler.step((x[:16], y[:16]), measure=False)
    assert sampler.anchor.count == 1
    with pytest.raises(RuntimeError, match="boom"):
        sampler.step((x[16:32], y[16:32]), measure=False)
    assert sampler.anchor.mean is None and sampler.anchor.count == 0
    sampler.step((x[32:48], y[32:48]), measure=False)
    assert sampler.anchor.count == 1
