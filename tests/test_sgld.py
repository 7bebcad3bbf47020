"""The SGLD kernel: degenerate cases, exact formulas, noise scale, and leaving the model alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from online_llc.config import SGLDConfig, default_nbeta
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.step import sgld_step
from online_llc.monitor.shadow import ShadowSampler


def mse_per_sample(model, batch):
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum(-1)


def make_batch(seed=0, n=32, d_in=5, d_out=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def mlp(dropout=False, bn=False):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(0.3))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers)


def random_offset(ev, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(t.shape, generator=g) for n, t in ev.center().items()}


def test_zero_noise_zero_localization_unit_nbeta_is_a_gradient_step():
    """With no noise, no localization and nbeta = 1, one step is plain gradient descent with
    learning rate epsilon / 2 on the minibatch mean loss at w* + xi."""
    model = mlp()
    batch = make_batch()
    ev = LossEvaluator(model, mse_per_sample)
    offset = random_offset(ev)
    cfg = SGLDConfig(nbeta=1.0, localization=0.0, step_size=0.02, noise_scale=0.0)
    new, _ = sgld_step(ev, ev.center(), offset, batch, config=cfg, generator=torch.Generator().manual_seed(0))

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.add_(offset[n])
    mse_per_sample(ref, batch).mean().backward()
    for n, p in ref.named_parameters():
        expected_offset = offset[n] - 0.01 * p.grad
        torch.testing.assert_close(new[n], expected_offset, rtol=1e-6, atol=1e-7)


def test_draw_and_noise_variance_match_brute_force():
    model = mlp()
    batch = make_batch(3)
    ev = LossEvaluator(model, mse_per_sample)
    offset = random_offset(ev, scale=0.2)
    cfg = SGLDConfig(nbeta=37.0, localization=5.0, step_size=1e-3)
    _, info = sgld_step(ev, ev.center(), offset, batch, config=cfg, generator=torch.Generator().manual_seed(0))

    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(offset[n])
        diff = (mse_per_sample(moved, batch) - mse_per_sample(model, batch)).double()
    assert info.draw == pytest.approx(37.0 * diff.mean().item(), rel=1e-5)
    assert info.noise_var == pytest.approx(37.0**2 * diff.var().item() / 32, rel=1e-5)
    assert info.batch_size == 32
    assert info.offset_norm == pytest.approx(math.sqrt(sum(float(t.pow(2).sum()) for t in offset.values())), rel=1e-6)


def test_localization_only_chain_has_exact_ornstein_uhlenbeck_variance():
    """With nbeta * grad = 0 the kernel is x <- (1 - eps*gamma/2) x + sqrt(eps) z, whose stationary
    variance is eps / (1 - (1 - eps*gamma/2)^2) exactly. 20000 steps x 8 coordinates with
    autocorrelation a = 1 - eps*gamma/2 = 0.9 give ~160000 * (1-a^2)/(1+a^2) ≈ 17000 effective
    samples: the variance estimate's relative error is about sqrt(2/17000) ≈ 1.1%; we allow 5%."""
    model = nn.Linear(8, 1, bias=False)

    def flat_loss(m, batch):  # depends on the weights (so they get a gradient), but with zero slope
        return (m.weight * 0.0).sum() + torch.zeros(batch.shape[0])

    ev = LossEvaluator(model, flat_loss)
    eps, gamma = 0.02, 10.0
    cfg = SGLDConfig(nbeta=1.0, localization=gamma, step_size=eps)
    gen = torch.Generator().manual_seed(0)
    off = ev.zeros_like_center()
    center = ev.center()
    xs = []
    batch = torch.zeros(4, 8)
    for _ in range(20000):
        off, _ = sgld_step(ev, center, off, batch, config=cfg, generator=gen)
        xs.append(off["weight"].clone())
    x = torch.stack(xs[1000:])
    a = 1 - eps * gamma / 2
    expected = eps / (1 - a**2)
    assert x.var().item() == pytest.approx(expected, rel=0.05)
    assert x.mean().abs().item() < 0.05 * math.sqrt(expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_feels_the_localization_exactly(dtype):
    """Zero-slope loss, no noise: each step multiplies the offset by a = 1 - eps gamma / 2 = 1 - 9e-4,
    so over 100 steps 0.01 becomes 0.01 a^100 = 0.009139. An offset kept in bfloat16 (spacing 6e-5
    at 0.01, so the 9e-6 decrement rounds away) stayed at 0.01001; in float16 (spacing 7.6e-6) each
    step rounded the decrement by up to 40%. The chain's state is float32: 100 roundings of at most
    6e-8 relative bound the error by 6e-6 relative; we allow 1e-5."""
    model = nn.Linear(8, 1, bias=False).to(dtype)

    def flat_loss(m, batch):
        return (m.weight * 0.0).sum() + torch.zeros(batch.shape[0])

    eps, gamma = 1.8e-5, 100.0
    cfg = SGLDConfig(nbeta=1.0, localization=gamma, step_size=eps, noise_scale=0.0)
    s = ShadowSampler(LossEvaluator(model, flat_loss), cfg, num_chains=1, seed=0)
    s.offsets[0] = {n: torch.full_like(t, 0.01) for n, t in s.offsets[0].items()}
    for _ in range(100):
        out = s.step(torch.zeros(4, 8))
        assert not out.diverged[0]
    expected = 0.01 * (1 - eps * gamma / 2) ** 100
    torch.testing.assert_close(s.offsets[0]["weight"].double(), torch.full((1, 8), expected, dtype=torch.float64),
                               rtol=1e-5, atol=0.0)
    assert s.offsets[0]["weight"].dtype == torch.float32


def test_bfloat16_chain_equals_the_float32_chain_with_the_same_generator():
    """With the same seed, a bfloat16 model's chain and its float32 copy's draw the same float32
    noise and make the same float32 updates: on a zero-slope loss their offsets are identical."""
    offsets = []
    for dtype in (torch.bfloat16, torch.float32):
        model = nn.Linear(8, 1, bias=False).to(dtype)
        model.weight.data.fill_(0.5)

        def flat_loss(m, batch):
            return (m.weight * 0.0).sum() + torch.zeros(batch.shape[0])

        cfg = SGLDConfig(nbeta=1.0, localization=10.0, step_size=0.02)
        s = ShadowSampler(LossEvaluator(model, flat_loss), cfg, num_chains=2, seed=3)
        for _ in range(50):
            s.step(torch.zeros(4, 8))
        offsets.append([off["weight"] for off in s.offsets])
    for a, b in zip(*offsets):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_bfloat16_model_draw_and_heat_are_computed_without_bfloat16_rounding():
    """A bfloat16 model's step reads its per-sample losses and half-batch gradients (bfloat16
    numbers) and accumulates the draw and the heat from them in float32/float64, never rounding a
    difference back to bfloat16 (whose relative spacing is 2^-8): both match a float64 computation
    from a bfloat16 copy of the model moved to ``w* + xi``, to float32 summation rounding (1e-5)."""
    model = mlp().to(torch.bfloat16)
    x, y = make_batch(3)
    batch = (x.bfloat16(), y.bfloat16())
    ev = LossEvaluator(model, mse_per_sample)
    off = random_offset(ev, scale=0.2)
    nbeta, eps = 37.0, 1e-3
    cfg = SGLDConfig(nbeta=nbeta, localization=5.0, step_size=eps)
    _, info = sgld_step(ev, ev.center(), off, batch, config=cfg, generator=torch.Generator().manual_seed(0))

    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.copy_((p.float() + off[n]).bfloat16())
        draw = nbeta * (mse_per_sample(moved, batch).double() - mse_per_sample(model, batch).double()).mean()
    halves = [(batch[0][:16], batch[1][:16]), (batch[0][16:], batch[1][16:])]
    g1, g2 = (torch.autograd.grad(mse_per_sample(moved, h).mean(), list(moved.parameters())) for h in halves)
    noise_sq = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(g1, g2))
    heat_bias = eps * nbeta**2 * noise_sq * (16 * 16 / 32**2) / 8
    assert info.draw == pytest.approx(float(draw), rel=1e-5)
    assert info.heat_bias == pytest.approx(heat_bias, rel=1e-5) and heat_bias > 0


@pytest.mark.parametrize("train_mode", [True, False])
def test_model_buffers_grads_and_global_rng_untouched(train_mode):
    model = mlp(dropout=True, bn=True)
    model.train(train_mode)
    batch = make_batch(4)
    # Give the model existing .grad fields, as it would have mid-training.
    mse_per_sample(model, batch).mean().backward()
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()

    ev = LossEvaluator(model, mse_per_sample)
    cfg = SGLDConfig(nbeta=100.0, localization=10.0, step_size=1e-3)
    gen = torch.Generator().manual_seed(0)
    off = random_offset(ev)
    for _ in range(3):
        off, info = sgld_step(ev, ev.center(), off, batch, config=cfg, generator=gen)
        assert info.finite

    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    assert model.training is train_mode


def test_dropout_masks_are_paired_so_zero_offset_draws_zero():
    """At xi = 0 both passes see the same weights and the same dropout mask: d = 0 exactly."""
    model = mlp(dropout=True)
    model.train()
    ev = LossEvaluator(model, mse_per_sample)
    cfg = SGLDConfig(nbeta=1000.0, localization=0.0, step_size=1e-4)
    _, info = sgld_step(ev, ev.center(), ev.zeros_like_center(), make_batch(), config=cfg,
                        generator=torch.Generator().manual_seed(0))
    assert info.draw == 0.0 and info.noise_var == 0.0


def test_each_point_is_one_substitution_and_halves_stay_paired(monkeypatch):
    """The four half-batch passes of a step run under two substitutions of the weights (the
    centre's, the sample's), not four; with BatchNorm in training mode (per-sample losses that
    depend on the half) each sample is still paired with itself: at xi = 0 the draw is exactly 0,
    and the gradients equal those of separate passes over each half (computed here by hand on a
    copy of the model). Dropout's pairing: test_dropout_masks_are_paired_so_zero_offset_draws_zero."""
    calls = []
    real = torch.func.functional_call

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.func, "functional_call", counting)
    model = mlp(dropout=False, bn=True).train()
    ev = LossEvaluator(model, mse_per_sample, mode="train")
    cfg = SGLDConfig(nbeta=1.0, localization=0.0, step_size=0.02, noise_scale=0.0)
    batch = make_batch(3)
    gen = torch.Generator().manual_seed(0)
    _, info = sgld_step(ev, ev.center(), ev.zeros_like_center(), batch, config=cfg, generator=gen)
    assert len(calls) == 2
    assert info.draw == 0.0 and info.noise_var == 0.0

    offset = random_offset(ev)
    new, _ = sgld_step(ev, ev.center(), offset, batch, config=cfg, generator=gen)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.add_(offset[n])
    x, y = batch
    halves = [(x[:16], y[:16]), (x[16:], y[16:])]
    # The whole batch's gradient is the mean of the halves' (equal halves), each half on its own.
    total = sum(mse_per_sample(ref, h).mean() for h in halves) / 2
    total.backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(new[n], offset[n] - 0.01 * p.grad, rtol=1e-5, atol=1e-6)


def test_same_generator_seed_gives_identical_chains():
    model = mlp(dropout=True)
    ev = LossEvaluator(model, mse_per_sample)
    cfg = SGLDConfig(nbeta=50.0, localization=1.0, step_size=1e-3)

    def chain(seed):
        gen = torch.Generator().manual_seed(seed)
        off = ev.zeros_like_center()
        out = []
        for i in range(5):
            off, info = sgld_step(ev, ev.center(), off, make_batch(i), config=cfg, generator=gen)
            out.append(info.draw)
        return out, off

    a, off_a = chain(7)
    b, off_b = chain(7)
    c, _ = chain(8)
    assert a == b and all(torch.equal(off_a[n], off_b[n]) for n in off_a)
    assert a != c


def test_non_finite_loss_is_reported_and_offset_kept():
    model = mlp()
    ev = LossEvaluator(model, lambda m, b: mse_per_sample(m, b) * float("nan"))
    off = random_offset(ev)
    cfg = SGLDConfig(nbeta=1.0, localization=0.0, step_size=1e-3)
    new, info = sgld_step(ev, ev.center(), off, make_batch(), config=cfg, generator=torch.Generator())
    assert not info.finite
    assert all(torch.equal(new[n], off[n]) for n in off)


def test_param_subset_only_moves_those_parameters():
    model = mlp()
    ev = LossEvaluator(model, mse_per_sample, param_names=["0.weight"])
    assert list(ev.center()) == ["0.weight"]
    cfg = SGLDConfig(nbeta=10.0, localization=1.0, step_size=1e-3)
    new, info = sgld_step(ev, ev.center(), ev.zeros_like_center(), make_batch(), config=cfg,
                          generator=torch.Generator().manual_seed(0))
    assert list(new) == ["0.weight"] and info.finite


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(nbeta=0.0, localization=1.0, step_size=1e-3), r"Expected `nbeta` to be a finite float > 0, got 0.0\."),
        (dict(nbeta=-1, localization=1.0, step_size=1e-3), r"Expected `nbeta` to be a finite float > 0, got -1\."),
        (dict(nbeta=1.0, localization=-1.0, step_size=1e-3), r"Expected `localization` to be a finite float >= 0, got -1.0\."),
        (dict(nbeta=1.0, localization=1.0, step_size=-1e-3), r"Expected `step_size` to be a finite float > 0, got -0.001\."),
        (dict(nbeta=1.0, localization=1.0, step_size=float("nan")), r"Expected `step_size` to be a finite float > 0, got nan\."),
        (dict(nbeta=1.0, localization=1.0, step_size=1e-3, noise_scale=-1), r"Expected `noise_scale` to be a finite float >= 0, got -1\."),
    ],
)
def test_config_validation_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGLDConfig(**kwargs)


def test_model_without_trainable_parameters_is_rejected():
    model = nn.Linear(3, 1)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"Expected `model` to have at least one trainable parameter"):
        LossEvaluator(model, mse_per_sample)


def test_wrong_loss_shape_is_rejected_with_the_shape():
    model = mlp()
    ev = LossEvaluator(model, lambda m, b: mse_per_sample(m, b).mean())
    cfg = SGLDConfig(nbeta=1.0, localization=0.0, step_size=1e-3)
    with pytest.raises(ValueError, match=r"Expected `loss_fn` to return per-sample losses of shape \[B\].*got \(\)"):
        sgld_step(ev, ev.center(), ev.zeros_like_center(), make_batch(), config=cfg, generator=torch.Generator())


def test_bad_model_loss_and_param_names():
    with pytest.raises(TypeError, match=r"Expected `model` to be a torch.nn.Module, got int\."):
        LossEvaluator(3, mse_per_sample)
    with pytest.raises(TypeError, match=r"Expected `loss_fn` to be callable"):
        LossEvaluator(mlp(), "mse")
    with pytest.raises(ValueError, match=r"Expected `param_names` to be a non-empty subset"):
        LossEvaluator(mlp(), mse_per_sample, param_names=["nope"])


def test_default_nbeta():
    assert default_nbeta(10240) == pytest.approx(10240 / math.log(10240))
    with pytest.raises(ValueError, match=r"Expected `num_samples` to be an int >= 2, got 1\."):
        default_nbeta(1)


# ---- the noise stream ------------------------------------------------------------------------------


def test_noise_stream_is_the_same_served_by_chunk_or_by_tensor_or_by_shard(monkeypatch):
    """The update's noise is one stream over the offsets' entries in order, drawn in chunks: the
    chunkwise ``_foreach`` path, the per-tensor path and a sharded tensor's path (its full shape
    drawn, its shard kept) hand out the same numbers, also where a tensor spans chunks (chunks of
    7 entries here), and the stream is a plain ``normal_`` draw of each chunk (the oracle)."""
    import online_llc.kernel.noise as noise_mod
    from online_llc.kernel.fsdp import ShardLayout
    from online_llc.kernel.noise import Noise, noise_chunk

    assert noise_chunk(10) == 1 << 16 and noise_chunk(1 << 22) == 1 << 18 and noise_chunk(1 << 30) == 1 << 24
    monkeypatch.setattr(noise_mod, "MIN_NOISE_CHUNK", 7)
    cfg = SGLDConfig(nbeta=10.0, localization=1.0, step_size=1e-2)
    shapes = [(3, 4), (5,), (2, 6), (1,)]
    total = sum(math.prod(s) for s in shapes)

    fused = [torch.zeros(s) for s in shapes]
    n = Noise(cfg, torch.Generator().manual_seed(3), False, fused)
    assert n.fused(fused)
    n.add_to(fused, 1.0)
    per_tensor = [torch.zeros(s) for s in shapes]
    n = Noise(cfg, torch.Generator().manual_seed(3), False, per_tensor)
    served = [n(t, None) for t in per_tensor]
    g = torch.Generator().manual_seed(3)
    oracle = torch.cat([torch.empty(min(7, total - k)).normal_(generator=g) for k in range(0, total, 7)])
    flat = torch.cat([t.reshape(-1) for t in fused])
    assert torch.equal(flat, oracle) and torch.equal(torch.cat([z.reshape(-1) for z in served]), oracle)
    # copy_to: into separate tensors chunk by chunk, or drawn in place into views of one flat
    # buffer (noise.flat_views), the same numbers.
    from online_llc.kernel.noise import _whole_buffer, flat_views

    for targets in ([torch.empty(s) for s in shapes], list(flat_views({str(i): torch.empty(s) for i, s in enumerate(shapes)}).values())):
        n = Noise(cfg, torch.Generator().manual_seed(3), False, targets)
        n.copy_to(targets)
        assert torch.equal(torch.cat([t.reshape(-1) for t in targets]), oracle)
    views = list(flat_views({str(i): torch.empty(s) for i, s in enumerate(shapes)}).values())
    assert _whole_buffer(views) is not None and _whole_buffer(views[1:]) is None and _whole_buffer(views[::-1]) is None
    # The third tensor sharded in two along dim 1: each shard gets its columns of the full draw.
    for start in (0, 3):
        layouts = [ShardLayout(torch.Size(s), 0, 0, s[0]) for s in shapes]
        layouts[2] = ShardLayout(torch.Size(shapes[2]), 1, start, 3)
        like = [torch.zeros(s) for s in shapes]
        like[2] = torch.zeros(2, 3)
        n = Noise(cfg, torch.Generator().manual_seed(3), False, like, layouts)
        assert not n.fused(like)
        got = [n(t, None) for t in like]
        assert torch.equal(got[2], fused[2][:, start : start + 3]) and torch.equal(got[3], fused[3])
