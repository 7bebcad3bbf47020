"""The opt-in compiled path (``compile=True``): the compiled monitor is the eager monitor.

The compiled graphs (forward, and the backward AOTAutograd derives) compute the same float32
numbers in another order, so the chains agree to rounding, not bit for bit: a relative 1e-4 on the
window means after 80 shadow steps leaves room for about 1e-6 per step of reordered float32 sums
(measured: below 2e-7 relative) while a wrong mask, a wrong weight or a missed pass moves a
window mean by whole percents.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from online_llc import OnlineLLC
from online_llc.kernel.compiled import COMPILE_MODES, check_compile


def _loss(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y) ** 2


def _run(compile, steps=80, monitor=True):
    """A dropout MLP trained by SGD for ``steps`` steps, watched by a monitor (dropout on in the
    shadow passes, every window measuring the heat, two chains, a group): the windows and the
    trained weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 4, generator=g)
    y = x[:, 0] - x[:, 1] + 0.3 * torch.randn(2000, generator=g)
    mon = None
    if monitor:
        mon = OnlineLLC(model, _loss, num_samples=2000, every_n_steps=1, window=10, compile=compile, mode="train",
                        num_chains=2, measure_every=1, warmup=0, groups={"first": ["0.weight", "0.bias"]}, group_budget=1)
    for step in range(1, steps + 1):
        i = torch.randint(0, 2000, (32,), generator=g)
        batch = (x[i], y[i])
        opt.zero_grad()
        _loss(model, batch).mean().backward()
        opt.step()
        if mon is not None:
            mon.update(batch, step)
    return mon, [p.detach().clone() for p in model.parameters()]


def test_compile_accepts_bools_and_torch_modes_only():
    assert check_compile(False) is None and check_compile(None) is None
    assert check_compile(True) == "default"
    for mode in COMPILE_MODES:
        assert check_compile(mode) == mode
    model = nn.Linear(2, 1)
    for bad in ("fast", 1, 0):
        with pytest.raises(ValueError, match=r"`compile` to be a bool or one of 'default'"):
            OnlineLLC(model, _loss, num_samples=100, compile=bad)


def test_the_compiled_monitor_is_the_eager_monitor_and_leaves_training_alone(capsys):
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    eager, _ = _run(False)
    compiled, weights = _run(True)
    # The compiled path ran (graphs were made), and said so once per evaluator.
    assert counters["stats"]["unique_graphs"] > graphs
    assert "compiling loss_fn with torch.compile (mode 'default')" in capsys.readouterr().err
    _, alone = _run(False, monitor=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, alone)), "the compiled monitor changed the training"
    for track in (lambda m: m.history(), lambda m: m.group_history("first")):
        a, b = track(eager), track(compiled)
        assert len(a) == len(b) >= 5
        for u, v in zip(a, b):
            assert u.step == v.step
            assert v.raw_mean == pytest.approx(u.raw_mean, rel=1e-4)
            assert v.heat_bias == pytest.approx(u.heat_bias, rel=1e-3, abs=1e-9, nan_ok=True)
        # Windows past the warm-up measured the heat: the half-batch passes ran compiled too.
        assert sum(math.isfinite(v.heat_bias) for v in b) >= 2


def test_compile_is_refused_for_a_model_sharded_by_fsdp2():
    """FSDP2's passes run its own hooks, which the compiled path does not cover: the monitor's
    evaluator refuses ``compile`` for such a model at construction, naming it. FSDP2 is recognised
    by its class name (``FSDPModule`` in the model's classes, without importing the distributed
    package), so a module of that name stands in for a sharded one here; without ``compile`` the
    check passes on to the sharded evaluator."""
    from online_llc.kernel.fsdp import make_evaluator

    class FSDPModule(nn.Module):
        pass

    class Sharded(nn.Linear, FSDPModule):
        pass

    with pytest.raises(ValueError, match=r"^Expected `compile` to be False for a model sharded by FSDP2, got 'default'\.$"):
        make_evaluator(Sharded(3, 1), _loss, compile="default")
