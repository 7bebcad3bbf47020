"""Error messages not pinned elsewhere: checkpoint mismatches, collectives, toy helpers, plotting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from online_llc import OnlineLLC
from online_llc.config import SGLDConfig
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.step import sgld_step
from online_llc.models.toy import ShuffledBatches, deep_linear_problem
from online_llc.monitor.window import WindowStats
from online_llc.plot import write_csv
from online_llc.stats.filter import LLCFilter

P = deep_linear_problem([3, 2], 2, num_samples=256, batch_size=32, seed=0)


def monitor(**kw):
    return OnlineLLC(P.model, P.loss_fn, num_samples=256, every_n_steps=1, window=4, warmup=0, **kw)


def test_state_version_and_chain_count_mismatches():
    state = monitor().state_dict()
    with pytest.raises(ValueError, match=r"Expected an OnlineLLC state of version 1, got 7\."):
        monitor().load_state_dict({**state, "version": 7})
    two = monitor(num_chains=2)
    with pytest.raises(ValueError, match=r"Expected the state's `num_chains` to be 2 like this monitor's, got 1\."):
        two.load_state_dict(state)
    with pytest.raises(ValueError, match=r"Expected a state with 2 chains, got 1\."):
        two.sampler.load_state_dict(state["sampler"])
    bad = {**state["sampler"], "offsets": [{"nope": torch.zeros(1)}]}
    with pytest.raises(ValueError, match=r"Expected offsets for parameters \['0\.weight'\], got \['nope'\]\."):
        monitor().sampler.load_state_dict(bad)
    sghmc_state = monitor(sampler="sghmc").state_dict()["sampler"]
    with pytest.raises(ValueError, match=r"Expected sampler state for 'sgld' in every chain"):
        monitor().sampler.load_state_dict(sghmc_state)


def test_gather_must_return_every_rank_row_block():
    ws = WindowStats(2, 1, gather=lambda arr: arr[:2])
    ws.update([1.0], [0.1], 0)
    with pytest.raises(ValueError, match=r"Expected `gather` to return an array of shape \[6, chains, 2\], got \(2, 1, 2\)\."):
        ws.update([1.0], [0.1], 1)


def test_measure_discretization_must_be_a_bool():
    """A truthy non-bool (1, "yes") is refused, by the monitor and by the sampler alike, naming the option."""
    from online_llc.monitor.shadow import ShadowSampler

    with pytest.raises(ValueError, match=r"Expected `measure_discretization` to be a bool, got 'yes'\."):
        monitor(measure_discretization="yes")
    ev = LossEvaluator(P.model, P.loss_fn)
    cfg = SGLDConfig(nbeta=10.0, localization=1.0, step_size=1e-3)
    with pytest.raises(ValueError, match=r"Expected `measure_discretization` to be a bool, got 1\."):
        ShadowSampler(ev, cfg, num_chains=1, seed=0, measure_discretization=1)


def test_inference_mode_is_refused_with_a_reason():
    ev = LossEvaluator(P.model, P.loss_fn)
    cfg = SGLDConfig(nbeta=1.0, localization=0.0, step_size=1e-3)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"cannot run inside torch\.inference_mode\(\)"):
            sgld_step(ev, ev.center(), ev.zeros_like_center(), next(iter(P.batches)), config=cfg,
                      generator=torch.Generator())
    # torch.no_grad() is fine: gradients are re-enabled locally.
    with torch.no_grad():
        _, info = sgld_step(ev, ev.center(), ev.zeros_like_center(), next(iter(P.batches)), config=cfg,
                            generator=torch.Generator())
    assert info.finite


def test_filter_max_history_and_toy_and_csv_messages(tmp_path):
    with pytest.raises(ValueError, match=r"Expected `max_history` to be a positive int, got 0\."):
        LLCFilter(max_history=0)
    with pytest.raises(ValueError, match=r"Expected `r` to be min\(widths\)=2 for one layer, got 1\."):
        deep_linear_problem([3, 2], 1)
    with pytest.raises(ValueError, match=r"Expected `tensors` to share their first dimension\."):
        ShuffledBatches(torch.zeros(4, 1), torch.zeros(5, 1), batch_size=2)
    m = monitor()
    batches = list(P.batches)
    for s in range(8):
        m.update(batches[s % len(batches)])
    with pytest.raises(ValueError, match=r"Expected `extra` to have one dict per estimate \(2\), got 1\."):
        write_csv(str(tmp_path / "x.csv"), m.history(), [{}])
    assert np.isfinite(m.estimate.mean)


def test_measure_every_must_be_a_positive_int():
    """``measure_every`` (one window in this many measures the heat) refuses 0, negatives,
    fractions and non-numbers at construction, naming the option; numpy ints are taken as ints."""

    for bad, shown in ((0, "0"), (-2, "-2"), (2.5, "2.5"), ("4", "'4'")):
        with pytest.raises(ValueError, match=rf"Expected `measure_every` to be a positive int, got {shown}\."):
            monitor(measure_every=bad)
    assert monitor(measure_every=np.int64(2))._model.measure_every == 2


def test_a_detached_loss_and_swapped_update_arguments_get_one_line_messages():
    """Two mistakes a new user makes, each answered in one line that names the fix: a loss_fn that
    returns detached losses (autograd's own "element 0 of tensors does not require grad" named
    neither), online and offline; ``update(step, batch)`` with its arguments swapped (the message
    printed the whole batch tensor, about 70 lines). A long value in any validation message is
    described, not printed."""
    from online_llc import estimate_llc
    from online_llc.errors import describe

    def detached(model, batch):
        return P.loss_fn(model, batch).detach()

    batch = next(iter(P.batches))
    fix = r"got a tensor that does not require grad: do not \.detach\(\) them or compute them under torch\.no_grad\(\)"
    m = OnlineLLC(P.model, detached, num_samples=256, every_n_steps=1, window=4, warmup=0)
    with pytest.raises(ValueError, match=r"Expected `loss_fn` to return losses computed from .*" + fix) as online:
        m.update(batch, 1)
    with pytest.raises(ValueError, match=fix) as offline:
        estimate_llc(P.model, detached, [batch], num_samples=256, num_draws=5, burn_in=2, progress=False)
    big = torch.zeros(16, 128, dtype=torch.long)
    with pytest.raises(ValueError, match=r"got a Tensor of shape \[16, 128\] \(torch\.int64\) \(update takes the batch "
                                         r"first: update\(batch, step\)\)\.$") as swapped:
        monitor().update(3, big)
    for exc in (online, offline, swapped):
        assert "\n" not in str(exc.value) and len(str(exc.value)) < 250
    assert describe({"input_ids": big, "labels": big}) == "a dict with keys ['input_ids', 'labels']"
    assert describe(list(range(100))).endswith("...") and len(describe(list(range(100)))) == 80
    assert describe(0.5) == "0.5" and describe("sgld") == "'sgld'"
