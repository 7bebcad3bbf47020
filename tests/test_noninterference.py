"""Non-interference: training with an :class:`OnlineLLC` attached is bit-identical to training
without it.

The monitor must leave alone everything training depends on: the weights, the buffers (BatchNorm
running statistics and ``num_batches_tracked``), the ``.grad`` fields, the optimizer state, the
module's train/eval mode, autograd's grad mode and the global RNG streams (which a
``DataLoader(shuffle=True)`` without its own generator and ``nn.Dropout`` both draw from).

Every comparison here is exact (``torch.equal`` / equality of RNG state bytes), never ``allclose``:
any leak, however small, must fail. The device is a parameter so that a CUDA variant runs where a
GPU is present (it is skipped otherwise).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from online_llc import OnlineLLC

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_SAMPLES = 512
NUM_FEATURES = 8
NUM_CLASSES = 3
HIDDEN = 16
BATCH_SIZE = 32
EPOCHS = 8  # 16 batches per epoch: 128 optimizer steps

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
    ),
]

OPTIMIZERS = {
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
}


# ---- helpers ---------------------------------------------------------------------------------------


def synthetic_data(device: str) -> Tuple[Tensor, Tensor]:
    """A fixed, seeded 3-class problem (private generator: does not touch the global RNG)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=g)
    w = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=g)
    logits = x @ w + 0.5 * torch.randn(NUM_SAMPLES, NUM_CLASSES, generator=g)
    y = logits.argmax(-1)
    return x.to(device), y.to(device)


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(NUM_FEATURES, HIDDEN),
        nn.BatchNorm1d(HIDDEN),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(HIDDEN, NUM_CLASSES),
    )


class GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) noise from the *global* RNG in every forward, train or eval."""

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x + self.sigma * torch.randn_like(x)


def make_noisy_mlp() -> nn.Module:
    """Draws from the global RNG in both modes (dropout in train mode, GaussianNoise always)."""
    return nn.Sequential(
        nn.Linear(NUM_FEATURES, HIDDEN),
        GaussianNoise(0.1),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(HIDDEN, NUM_CLASSES),
    )


def ce_per_sample(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def rng_state(device: str) -> Tuple[Tensor, Optional[Tensor]]:
    cuda = torch.cuda.get_rng_state() if device == "cuda" else None
    return torch.get_rng_state(), cuda


def assert_rng_equal(a: Tuple[Tensor, Optional[Tensor]], b: Tuple[Tensor, Optional[Tensor]], where: str) -> None:
    assert torch.equal(a[0], b[0]), f"global CPU RNG state differs ({where})"
    if a[1] is not None or b[1] is not None:
        assert torch.equal(a[1], b[1]), f"global CUDA RNG state differs ({where})"


def assert_tree_equal(a: Any, b: Any, path: str = "") -> None:
    """Exact equality of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, f"{path}: metadata differs"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "n/a"
            raise AssertionError(f"{path}: tensors differ (max abs diff {diff})")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys differ: {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def snapshot_state_dict(module: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def grads(model: nn.Module) -> Dict[str, Optional[Tensor]]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def versions(model: nn.Module) -> Dict[str, int]:
    """In-place write counters of every parameter, buffer and ``.grad``: a write that happens to
    leave the values equal still shows here."""
    out = {f"param:{n}": p._version for n, p in model.named_parameters()}
    out.update({f"grad:{n}": p.grad._version for n, p in model.named_parameters() if p.grad is not None})
    out.update({f"buffer:{n}": b._version for n, b in model.named_buffers()})
    return out


def train(
    opt_name: str, device: str, monitor_kwargs: Optional[Dict[str, Any]]
) -> Tuple[nn.Module, torch.optim.Optimizer, List[Tensor], Tuple[Tensor, Optional[Tensor]], Optional[OnlineLLC]]:
    """One training run from `torch.manual_seed(0)`; with an OnlineLLC when monitor_kwargs is given.

    The DataLoader shuffles from the global RNG (no generator of its own) and dropout draws from
    it too, so any global-RNG draw by the monitor changes the batches and masks that follow.
    """
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.manual_seed_all(0)
    x, y = synthetic_data(device)
    model = make_mlp().to(device)
    opt = OPTIMIZERS[opt_name](model.parameters())
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True)
    monitor = None
    if monitor_kwargs is not None:
        with warnings.catch_warnings():  # the auto cadence's line about a short run
            warnings.simplefilter("ignore", UserWarning)
            monitor = OnlineLLC(model, ce_per_sample, num_samples=NUM_SAMPLES, **monitor_kwargs)
    model.train()
    losses: List[Tensor] = []
    for _ in range(EPOCHS):
        for batch in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
            if monitor is not None:
                monitor.update(batch)
    return model, opt, losses, rng_state(device), monitor


# ---- 1. training with and without the monitor is bit-identical -------------------------------------

MONITOR_SETTINGS = {
    "every1": dict(every_n_steps=1, window=10, num_chains=2, warmup=5, seed=3),
    "every3": dict(every_n_steps=3, window=10, num_chains=2, warmup=5, seed=3),
    # The shadow passes run in eval mode by default; in train mode they draw dropout masks.
    "every3_train_mode": dict(every_n_steps=3, window=10, num_chains=2, warmup=5, seed=3, mode="train"),
    "auto_cadence": dict(total_steps=EPOCHS * (NUM_SAMPLES // BATCH_SIZE), num_chains=2, seed=3),
}

_BASELINES: Dict[Tuple[str, str], Any] = {}


def baseline(opt_name: str, device: str):
    """Run A (no monitor), computed once per optimizer and device."""
    key = (opt_name, device)
    if key not in _BASELINES:
        _BASELINES[key] = train(opt_name, device, None)
    return _BASELINES[key]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("settings", sorted(MONITOR_SETTINGS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_training_is_bit_identical_with_monitor(opt_name: str, settings: str, device: str) -> None:
    model_a, opt_a, losses_a, rng_a, _ = baseline(opt_name, device)
    model_b, opt_b, losses_b, rng_b, monitor = train(opt_name, device, MONITOR_SETTINGS[settings])

    # The monitor really ran: shadow steps at the right cadence and windows closed.
    steps = len(losses_b)
    assert monitor.step == steps
    assert monitor.shadow_steps == steps // monitor.every_n_steps
    history = monitor.history()
    assert len(history) >= 2, "the monitor produced fewer than two estimates: the test would be vacuous"
    assert any(e.status != "warming_up" for e in history), "no estimate past warm-up"

    # Per-step training losses.
    assert len(losses_a) == len(losses_b) == EPOCHS * (NUM_SAMPLES // BATCH_SIZE)
    for i, (la, lb) in enumerate(zip(losses_a, losses_b)):
        assert torch.equal(la, lb), f"training loss differs first at step {i + 1}: {la.item()!r} vs {lb.item()!r}"

    # Weights, BatchNorm running stats and num_batches_tracked.
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert "1.running_mean" in sd_a and "1.num_batches_tracked" in sd_a
    assert_tree_equal(sd_a, sd_b, "model.state_dict()")

    # Optimizer state (momentum buffers / exp_avg, exp_avg_sq, step) and param groups.
    st_a, st_b = opt_a.state_dict(), opt_b.state_dict()
    assert len(st_a["state"]) == len(list(model_a.parameters()))
    assert_tree_equal(st_a, st_b, "optimizer.state_dict()")

    # The global RNG after training.
    assert_rng_equal(rng_a, rng_b, "end of training")


# ---- 2. update leaves .grad, mode, grad mode, params and buffers alone ------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shadow_mode", ["eval", "train", "as_is"])
def test_update_leaves_grads_mode_and_buffers_alone(shadow_mode: str, mode: str, device: str) -> None:
    torch.manual_seed(0)
    x, y = synthetic_data(device)
    model = make_mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = OnlineLLC(
        model, ce_per_sample, num_samples=NUM_SAMPLES, every_n_steps=1, window=3, num_chains=2, warmup=1, mode=shadow_mode
    )
    getattr(model, mode)()
    batch = (x[:BATCH_SIZE], y[:BATCH_SIZE])

    for step in range(1, 7):
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
        # Grads left in place after the step, as in a loop that zeroes them at the top.
        before_grads, before_state = grads(model), snapshot_state_dict(model)
        before_versions, before_rng = versions(model), rng_state(device)
        before_requires = {n: p.requires_grad for n, p in model.named_parameters()}
        monitor.update(batch)
        assert model.training == (mode == "train"), f"update changed model.training at step {step}"
        assert all(m.training == (mode == "train") for m in model.modules()), "a submodule's mode changed"
        assert torch.is_grad_enabled(), "update left grad mode disabled"
        assert_tree_equal(before_grads, grads(model), f".grad after update (step {step})")
        assert_tree_equal(before_state, snapshot_state_dict(model), f"state_dict after update (step {step})")
        assert versions(model) == before_versions, f"an in-place write to a param/grad/buffer at step {step}"
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before_requires
        assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())
        assert_rng_equal(before_rng, rng_state(device), f"update at step {step}")
    assert monitor.shadow_steps == 6 and len(monitor.history()) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_update_leaves_absent_grads_absent(device: str) -> None:
    """After ``zero_grad(set_to_none=True)`` the monitor must not create ``.grad`` fields."""
    torch.manual_seed(0)
    x, y = synthetic_data(device)
    model = make_mlp().to(device).train()
    monitor = OnlineLLC(model, ce_per_sample, num_samples=NUM_SAMPLES, every_n_steps=1, window=2, warmup=0)
    for _ in range(4):
        monitor.update((x[:BATCH_SIZE], y[:BATCH_SIZE]))
    assert all(p.grad is None for p in model.parameters())
    assert monitor.shadow_steps == 4


# ---- 3. construction leaves the model and the RNG alone ---------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_construction_leaves_model_and_rng_alone(mode: str, device: str) -> None:
    torch.manual_seed(0)
    model = getattr(make_mlp().to(device), mode)()
    before_state, before_versions = snapshot_state_dict(model), versions(model)
    before_rng = rng_state(device)
    monitor = OnlineLLC(model, ce_per_sample, num_samples=NUM_SAMPLES, every_n_steps=2, window=5, num_chains=3)
    assert_rng_equal(before_rng, rng_state(device), "OnlineLLC construction")
    assert_tree_equal(before_state, snapshot_state_dict(model), "state_dict after construction")
    assert versions(model) == before_versions
    assert model.training == (mode == "train")
    assert all(p.grad is None for p in model.parameters())
    # The monitor registers nothing on the model: no hooks, no new submodules/params/buffers.
    assert set(dict(model.named_modules())) == set(dict(make_mlp().named_modules()))
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters())  # None or empty
    assert monitor.shadow_steps == 0


# ---- 4. global-RNG-drawing forwards, in train and eval mode -----------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make_model", [make_mlp, make_noisy_mlp], ids=["dropout_bn", "dropout_gaussian_noise"])
def test_update_leaves_global_rng_alone(make_model, mode: str, device: str) -> None:
    torch.manual_seed(0)
    x, y = synthetic_data(device)
    model = getattr(make_model().to(device), mode)()
    monitor = OnlineLLC(
        model, ce_per_sample, num_samples=NUM_SAMPLES, every_n_steps=1, window=4, num_chains=2, warmup=0
    )
    # Advance the global RNG to an arbitrary state first, so "unchanged" is not "freshly seeded".
    torch.rand(17, device=device)
    before_state = snapshot_state_dict(model)
    for i in range(8):
        batch = (x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16])
        before = rng_state(device)
        monitor.update(batch)
        assert_rng_equal(before, rng_state(device), f"{mode} update {i + 1}")
    assert_tree_equal(before_state, snapshot_state_dict(model), "state_dict after updates")
    assert monitor.shadow_steps == 8 and len(monitor.history()) == 2

    # The randomness the model drew inside the monitor came from the monitor's seed, not from the
    # caller's global stream: a second monitor with the same seed, from a different global state,
    # reports the same draws.
    torch.manual_seed(987)
    twin = OnlineLLC(
        model, ce_per_sample, num_samples=NUM_SAMPLES, every_n_steps=1, window=4, num_chains=2, warmup=0
    )
    for i in range(8):
        twin.update((x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]))
    assert [e.raw_mean for e in twin.history()] == [e.raw_mean for e in monitor.history()]


@pytest.mark.parametrize("device", DEVICES)
def test_rng_draws_in_model_are_reproduced_identically_after_update(device: str) -> None:
    """The global stream continues after an update exactly as if the update had not happened:
    the next dropout mask / noise sample drawn by training is the same."""
    torch.manual_seed(0)
    x, y = synthetic_data(device)
    model = make_noisy_mlp().to(device).train()
    monitor = OnlineLLC(model, ce_per_sample, num_samples=NUM_SAMPLES, every_n_steps=1, window=2, warmup=0)
    batch = (x[:BATCH_SIZE], y[:BATCH_SIZE])

    torch.manual_seed(5)
    expected = model(batch[0]).detach()
    torch.manual_seed(5)
    monitor.update(batch)
    got = model(batch[0]).detach()
    assert torch.equal(expected, got)
