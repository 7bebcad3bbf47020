"""Batched chains (online_llc.kernel.batched) against the one-chain kernel (sampler_step), step by
step, and estimate_llc's choice between them.

Without injected noise a step is a deterministic function of the offset and the batch, so the
batched step must reproduce ``sampler_step``'s numbers and new offsets chain by chain (float32
arithmetic in another order: 1e-5 relative). With noise, the update dots are checked against the
gradient that the noise-free step reveals."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from online_llc import estimate_llc
from online_llc.config import SGLDConfig
from online_llc.kernel.anchor import full_gradient
from online_llc.kernel.batched import BatchedChains, batched_support
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.step import sampler_step
from online_llc.models.toy import deep_linear_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)]
    if dropout:
        layers.insert(2, nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _loss(model: nn.Module, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1)


def _batch(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, generator=g), torch.randn(b, 2, generator=g)


def _random_offsets(chains: BatchedChains, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    chains.xi.copy_(0.05 * torch.randn(chains.xi.shape, generator=g))


CONFIG = SGLDConfig(nbeta=200.0, localization=2.0, step_size=1e-4, noise_scale=0.0)


@pytest.mark.parametrize("sizes", [(16, 16, 16), (15, 15, 15), (16, 9, 16)], ids=["even", "odd", "ragged"])
@pytest.mark.parametrize("gradient", ["plain", "control_variate"])
def test_a_batched_step_is_the_one_chain_step_of_every_chain(sizes, gradient):
    """Three chains at random offsets, each on its own batch: even batches (halves as rows), odd
    batches (whole, one backward pass per half) and a ragged step (a shorter batch: chain by
    chain); the plain and the control-variate gradient and draw."""
    model = _mlp()
    evaluator = LossEvaluator(model, _loss)
    center = {n: t.clone() for n, t in evaluator.center().items()}
    data = [_batch(64, 100 + k) for k in range(4)]
    anchor = full_gradient(evaluator, center, data, generator=torch.Generator()) if gradient != "plain" else None
    config = replace(CONFIG, gradient=gradient, draw=gradient)
    batches = [_batch(b, k) for k, b in enumerate(sizes)]
    chains = BatchedChains(evaluator, center, config, 3, torch.Generator().manual_seed(0), anchor=anchor)
    _random_offsets(chains, 1)
    before = [{n: t.clone() for n, t in chains.offsets(c).items()} for c in range(3)]
    infos = chains.step(batches)
    for c in range(3):
        new, _, want = sampler_step(
            evaluator, center, before[c], {}, batches[c], config=config, generator=torch.Generator(), anchor=anchor
        )
        got = infos[c]
        for field in ("draw", "noise_var", "heat_bias", "loss_center", "loss_sample", "offset_norm"):
            # The control-variate draw's noise is a squared difference of the halves' corrected
            # means, which cancel to about 1e-2 of their size: float32 rounding of another
            # summation order shows there at 1e-4.
            rel = 1e-3 if field == "noise_var" and gradient == "control_variate" else 1e-5
            # The draw is nbeta times a difference of two float32 mean losses, each summed in
            # another order by the two paths (within ~4 ulps of the loss each): up to
            # nbeta * 8 * eps * loss apart (measured 9e-6 of 0.75 on one CPU, 1.2e-5 relative).
            floor = config.nbeta * 8 * torch.finfo(torch.float32).eps * abs(want.loss_center) if field == "draw" else 1e-9
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=rel, abs=floor), field
        assert got.batch_size == want.batch_size
        for n, t in chains.offsets(c).items():
            torch.testing.assert_close(t, new[n], rtol=1e-5, atol=1e-8)
    # The model itself is untouched.
    for n, t in evaluator.center().items():
        assert torch.equal(t, center[n])


def test_a_later_batch_that_does_not_stack_is_named():
    """The first batch decides batching; a later one that is not tensors gets a clear error that
    names the way out, not a failure deep in the passes."""
    evaluator = LossEvaluator(_mlp(), _loss)
    center = {n: t.clone() for n, t in evaluator.center().items()}
    chains = BatchedChains(evaluator, center, CONFIG, 2, torch.Generator().manual_seed(0))
    x, y = _batch(8, 0)
    with pytest.raises(ValueError, match=r"Expected every batch to hold tensors only.*chain 1.*batched=False"):
        chains.step([(x, y), (x, y.tolist())])


def test_the_update_dots_pair_each_update_with_the_next_gradient():
    """With noise: ``update_dot_grad = nbeta u_t . g_t`` and the next step's
    ``prev_update_dot_grad = nbeta u_t . g_{t+1}``, where ``u_t`` is the step's actual update and
    ``g`` the batch gradient, read off the noise-free step from the same offset and batch
    (``xi' = xi - (eps / 2)(nbeta g + gamma xi)``). The first step of a run measures nothing."""
    model = _mlp(1)
    evaluator = LossEvaluator(model, _loss)
    center = {n: t.clone() for n, t in evaluator.center().items()}
    config = replace(CONFIG, noise_scale=1.0)
    chains = BatchedChains(evaluator, center, config, 2, torch.Generator().manual_seed(3))
    _random_offsets(chains, 2)

    def gradient(offset, batch):
        new, _, _ = sampler_step(evaluator, center, offset, {}, batch, config=CONFIG, generator=torch.Generator())
        eps = CONFIG.step_size
        return {n: ((offset[n] - new[n]) * 2 / eps - CONFIG.localization * offset[n]) / CONFIG.nbeta for n in offset}

    def dot(a, b):
        return sum(float((a[n].double() * b[n].double()).sum()) for n in a)

    steps = [[_batch(32, 10 * s + c) for c in range(2)] for s in range(3)]
    offsets = [[{n: t.clone() for n, t in chains.offsets(c).items()} for c in range(2)]]
    infos = []
    for batches in steps:
        infos.append(chains.step(batches))
        offsets.append([{n: t.clone() for n, t in chains.offsets(c).items()} for c in range(2)])
    assert all(math.isnan(i.update_dot_grad) and math.isnan(i.prev_update_dot_grad) for i in infos[0])
    for s in (1, 2):
        for c in range(2):
            g = gradient(offsets[s][c], steps[s][c])
            u = {n: offsets[s + 1][c][n] - offsets[s][c][n] for n in g}
            u_prev = {n: offsets[s][c][n] - offsets[s - 1][c][n] for n in g}
            scale = CONFIG.nbeta * math.sqrt(dot(u, u) * dot(g, g))
            assert infos[s][c].update_dot_grad == pytest.approx(CONFIG.nbeta * dot(u, g), abs=1e-4 * scale)
            assert infos[s][c].prev_update_dot_grad == pytest.approx(CONFIG.nbeta * dot(u_prev, g), abs=1e-4 * scale)
    chains.reset_measurement()
    assert all(math.isnan(i.update_dot_grad) for i in chains.step(steps[0]))


def _aten_calls(chains: BatchedChains, batches) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        chains.step(batches)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def test_the_operations_of_a_step_do_not_grow_with_the_number_of_chains():
    """One vectorized pass: the profiler counts the same aten calls for 2 chains as for 8."""
    model = _mlp(2)
    evaluator = LossEvaluator(model, _loss)
    center = {n: t.clone() for n, t in evaluator.center().items()}
    counts = []
    for c in (2, 8):
        chains = BatchedChains(evaluator, center, replace(CONFIG, noise_scale=1.0), c, torch.Generator().manual_seed(0))
        batches = [_batch(32, k) for k in range(c)]
        chains.step(batches)  # the first step allocates and measures nothing
        chains.step(batches)
        counts.append(_aten_calls(chains, batches))
    assert counts[0] == counts[1], counts


def test_what_cannot_be_batched_says_why():
    config = SGLDConfig(nbeta=100.0, localization=1.0, step_size=1e-4)
    batch = _batch(8, 0)
    plain = LossEvaluator(_mlp(), _loss)
    assert batched_support(plain, config, batch, 4) is None
    assert batched_support(plain, config, batch, 1) == "one chain"
    assert "sampler='sghmc'" in batched_support(plain, replace(config, sampler="sghmc"), batch, 4)
    assert "dropout" in batched_support(LossEvaluator(_mlp(dropout=0.5), _loss, mode="train"), config, batch, 4)
    assert batched_support(LossEvaluator(_mlp(dropout=0.5), _loss), config, batch, 4) is None  # eval mode
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert "BatchNorm" in batched_support(LossEvaluator(bn, _loss, mode="train"), config, batch, 4)
    assert "leading size" in batched_support(plain, config, (batch[0][:1], batch[1][:1]), 4)


def _problem():
    return deep_linear_problem([3, 2], r=2, seed=0)


def test_estimate_llc_batches_by_default_and_falls_back_with_one_line():
    """The plan says when the chains are batched; a model the vectorized pass cannot run (a
    forward that reads a value on the host) runs one chain at a time with a one-line warning;
    ``batched=True`` then refuses, naming the argument; a non-bool is refused."""
    p = _problem()
    kw = dict(num_samples=p.num_samples, step_size=1e-4, num_draws=20, burn_in=10, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_llc(p.model, p.loss_fn, p.batches, **kw)

    class HostRead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * (2.0 if float(x.sum()) > 0 else 1.0)

    model = HostRead()
    with pytest.warns(UserWarning, match=r"^estimate_llc: the chains run one at a time \(the vectorized pass failed"):
        res = estimate_llc(model, _loss, [_batch(16, 0)], **kw)
    assert np.isfinite(res.mean)
    with pytest.raises(ValueError, match=r"Expected `batched` to be None or False here: .*vectorized pass failed"):
        estimate_llc(model, _loss, [_batch(16, 0)], batched=True, **kw)
    with pytest.raises(ValueError, match=r"`batched`"):
        estimate_llc(p.model, p.loss_fn, p.batches, batched="yes", **kw)


def test_estimate_llc_plan_names_batched_chains(capsys):
    p = _problem()
    estimate_llc(p.model, p.loss_fn, p.batches, num_samples=p.num_samples, step_size=1e-4, num_draws=20, burn_in=10)
    assert "4 chains (batched) x (10 burn-in + 20 draws)" in capsys.readouterr().err


@pytest.mark.slow
def test_batched_and_sequential_chains_read_the_same_estimate():
    """At the same fixed settings the batched and the one-at-a-time chains estimate the same
    quantity (a regular DLN, lambda = 4 at n = 10240): their difference is within 3 combined
    standard errors (each estimate's own multi-chain standard error), and each is within 10% +
    3 standard errors of the theoretical lambda (the same tolerance as the offline tests)."""
    p = deep_linear_problem([4, 2], r=2, seed=0)
    kw = dict(num_samples=p.num_samples, step_size=1.2e-4, burn_in=600, num_draws=1500, progress=False, seed=5)
    a = estimate_llc(p.model, p.loss_fn, p.batches, batched=True, **kw)
    b = estimate_llc(p.model, p.loss_fn, p.batches, batched=False, **kw)
    assert abs(a.mean - b.mean) < 3 * math.hypot(a.std, b.std), (a.mean, a.std, b.mean, b.std)
    for r in (a, b):
        assert abs(r.mean - p.lam) < 0.1 * p.lam + 3 * r.std, (r.mean, r.std)


@pytest.mark.parametrize("sampler, gradient", [("sgld", "plain"), ("rmsprop_sgld", "plain"), ("sgld", "control_variate")])
def test_chains_one_at_a_time_step_in_place_as_sampler_step(sampler, gradient, monkeypatch):
    """``estimate_llc``'s chains run one at a time update their offsets in place, forming the
    update in the chain's last-update buffer; they take the steps of ``sampler_step`` with the
    same generators, dropout seeds and batches (float32 in another order: 1e-5 relative), and
    report the same update dots, plus the first step's own dot, which ``sampler_step`` (without a
    previous offset) leaves NaN. With injected noise: the same noise stream. With the control
    variate (gradient and draw) the centre's gradients are streamed (kernel.anchor.FixedAnchor,
    allowed here at any size): the same steps and draws."""
    from online_llc.kernel import anchor as anchor_module
    from online_llc.kernel.randomness import chain_seed, derived_seed
    from online_llc.kernel.updates import init_aux
    from online_llc.offline.chains import Chains

    monkeypatch.setattr(anchor_module, "STREAM_MIN_ENTRIES", 1)
    monkeypatch.setattr(anchor_module, "STREAM_MEAN_ENTRIES", 1)
    model = _mlp(seed=2)
    evaluator = LossEvaluator(model, _loss)
    center = evaluator.center()
    config = replace(CONFIG, noise_scale=1.0, sampler=sampler, step_size=1e-3 if sampler == "sgld" else 1e-4,
                     gradient=gradient, draw=gradient)
    batches = [_batch(16, s) for s in range(6)]
    anchor = full_gradient(evaluator, center, batches, generator=torch.Generator().manual_seed(0)) if gradient != "plain" else None
    stream = iter(batches)
    chains = Chains(evaluator, center, config, num_chains=1, seed=7, next_batch=lambda: next(stream), first=batches[0],
                    batches=batches, batched=False, anchor=anchor)
    rows = chains.run([0], 6)[0]
    offset = evaluator.zeros_like_center()
    aux = init_aux(config, offset)
    generator = torch.Generator().manual_seed(chain_seed(7, 0))
    previous = None
    for s, batch in enumerate(batches):
        before = offset
        offset, aux, info = sampler_step(evaluator, center, offset, aux, batch, config=config, generator=generator,
                                         previous_offset=previous, rng_seed=derived_seed(7, 0, s), anchor=anchor)
        previous = before
        want = [info.draw, info.noise_var, info.heat_bias, info.prev_update_dot_grad, info.update_dot_grad, info.offset_norm**2]
        got = rows[:, s]
        if s == 0:
            assert math.isnan(want[4]) and math.isfinite(got[4])
            want[4] = got[4]
        # The control-variate draw's variance is the square of its halves' difference of corrected
        # means, nearly equal numbers: the offsets' float32 rounding shows there at ~4e-5.
        rtol = np.array([1e-5, 1e-3 if gradient != "plain" else 1e-5, 1e-5, 1e-5, 1e-5, 1e-5])
        assert np.all((np.abs(got - want) <= rtol * np.abs(want) + 1e-9) | (np.isnan(got) & np.isnan(want))), (got, want)
    for n, t in chains.states[0][0].items():
        torch.testing.assert_close(t, offset[n], rtol=1e-5, atol=1e-8)
