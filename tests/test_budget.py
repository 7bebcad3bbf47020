"""The offline estimator's automatic budget: caps counted in samples, not steps."""

from __future__ import annotations

import warnings

import pytest

from online_llc.calibration.budget import BURN_IN_RELAXATIONS, resolve_burn_in, resolve_num_draws, scaled_cap
from online_llc.calibration.step import relaxation_steps, resolve_hyperparameters
from online_llc.offline.estimate import CAP_BATCH, MAX_AUTO_BURN_IN, MAX_AUTO_DRAWS


def _config(batch_size: int, shrink: float = 4.0):
    """The default estimand at n = 1e5 (nbeta 256, gamma 3.2) and the batch-sized starting step
    divided by ``shrink``, as heat calibration leaves it on a noisy model."""
    cfg = resolve_hyperparameters(num_samples=100000, nbeta=None, localization=None, step_size=None,
                                  batch_size=batch_size)
    return cfg.__class__(**{**cfg.__dict__, "step_size": cfg.step_size / shrink})


def test_caps_count_samples_so_small_batches_get_proportionally_more_steps():
    assert scaled_cap(20000, 32, 256) == 160000
    assert scaled_cap(20000, 256, 256) == scaled_cap(20000, 1024, 256) == 20000
    # The relaxation time 2 / (epsilon gamma) grows as 1 / B at a fixed heat, so in samples it is
    # the same at every batch below the one where the step reaches its cap 0.08 / nbeta.
    r32, r64 = relaxation_steps(_config(32)), relaxation_steps(_config(64))
    assert r32 == pytest.approx(2 * r64)
    # The burn-in, two relaxation times, is 128,000 steps: a cap in steps would cut it short.
    assert BURN_IN_RELAXATIONS * r32 > MAX_AUTO_BURN_IN
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the batch-scaled cap: no warning
        burn = resolve_burn_in(None, _config(32), scaled_cap(MAX_AUTO_BURN_IN, 32, CAP_BATCH))
    assert burn == pytest.approx(BURN_IN_RELAXATIONS * r32, abs=1)
    draws = resolve_num_draws(None, _config(32), scaled_cap(MAX_AUTO_DRAWS, 32, CAP_BATCH))
    # 1000 draws times the step's shrink (32000), or one relaxation time (64000) when longer.
    assert 1000 * 256 / 32 * 4 < r32
    assert draws > MAX_AUTO_DRAWS and draws == pytest.approx(r32, abs=1)


def test_a_relaxation_beyond_the_cap_is_cut_with_a_warning_naming_it():
    cfg = _config(32, shrink=40.0)
    cap = scaled_cap(MAX_AUTO_BURN_IN, 32, CAP_BATCH)
    relax = relaxation_steps(cfg)
    match = rf"relax over {relax:.0f} steps .* needs {2 * relax:.0f} \(2 relaxation times\); it stops at {cap}"
    with pytest.warns(RuntimeWarning, match=match):
        assert resolve_burn_in(None, cfg, cap) == cap
    assert resolve_burn_in(123, cfg, cap) == 123  # a given burn-in is used as it is
    assert resolve_num_draws(77, cfg, 10) == 77
