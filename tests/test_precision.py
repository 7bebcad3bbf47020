"""Low-precision training through Lightning: a ``bf16-true`` model (every parameter in bfloat16)
keeps its chain in float32 and trains exactly as it would without the callback."""

from __future__ import annotations

import math

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from test_lightning import FAST, loader, make_module, make_trainer, per_sample_loss  # noqa: E402

from online_llc.callbacks import OnlineLLCCallback  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread")]


def _fit(with_callback: bool):
    cbs = [OnlineLLCCallback(per_sample_loss, **FAST)] if with_callback else []
    module = make_module()
    trainer = make_trainer(cbs, max_steps=40, precision="bf16-true")
    trainer.fit(module, loader())
    return module, cbs


def test_bf16_true_model_keeps_a_float32_chain_and_trains_identically():
    """Lightning's ``bf16-true`` casts the module to bfloat16. The monitor's offsets stay float32
    (a bfloat16 offset would lose the localization's contraction ``1 - step * gamma / 2`` to
    rounding: ``tests/test_sgld.py`` checks the contraction itself), its estimates are finite, and
    the trained weights equal, bit for bit, those of the same run without the callback."""
    ref, _ = _fit(False)
    module, (cb,) = _fit(True)
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    for offsets in cb.monitor.sampler.offsets:
        assert all(t.dtype == torch.float32 for t in offsets.values())
        assert any(bool(t.abs().sum() > 0) for t in offsets.values())
    filtered = [e for e in cb.monitor.history() if e.filtered]
    assert len(cb.monitor.history()) == 8 and filtered
    assert all(math.isfinite(e.mean) and math.isfinite(e.std) for e in filtered)
    ref_state, state = ref.state_dict(), module.state_dict()
    for k in state:
        assert torch.equal(ref_state[k], state[k]), k
