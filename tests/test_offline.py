"""The offline reference estimator against theory, and its honesty about its own uncertainty."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from online_llc import NonFiniteDrawError, estimate_llc
from online_llc.models.toy import deep_linear_problem

# The models of the accuracy check: a regular model, two reduced-rank regressions and one deep
# linear network from the shared reference JSON (their lambdas come from online_llc.models.theory,
# which tests/test_theory.py checks against that JSON).
# dln[16, 8, 16, 8] r=4 left this check when the default budget grew (two relaxation times of
# burn-in at localization 3.2: its 4 chains took 759 s of a suite run on two busy cores); the deep
# networks at the defaults are measured by benchmarks/known_lambda.py.
ACCURACY_MODELS = [([10, 1], 1, 4), ([6, 6, 6], 2, 4), ([10, 3, 5], 1, 4)]


def run(problem, **kw):
    return estimate_llc(problem.model, problem.loss_fn, problem.batches, num_samples=problem.num_samples, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("widths, r, chains", ACCURACY_MODELS, ids=lambda v: str(v))
def test_defaults_recover_theory_within_15_percent(widths, r, chains):
    """At its defaults the estimator lands within 15% of the learning coefficient. Published SGLD
    results are within about 20% on small networks; measured errors here are 1-9% with a
    reported std of 1-3% of lambda, so 15% leaves > 3 sigma of statistical room beyond the bias
    (negative bias from localization, positive from step-size heat)."""
    p = deep_linear_problem(widths, r, seed=0)
    res = run(p) if chains == 4 else run(p, num_chains=chains)
    assert abs(res.mean / p.lam - 1) < 0.15, (p.name, res.mean, p.lam)
    # The diagnostics are defined and sensible at the defaults: the calibrated step keeps the
    # measured minibatch heat near its 2% target (1.1 leaves room for one window's noise).
    assert 1.0 <= res.heat < 1.1
    assert math.isfinite(res.ratio) and res.ratio > 0
    assert res.burn_in >= 500 and res.num_draws >= 1000
    assert res.draws.shape == (chains, res.num_draws) and res.burn_in_draws.shape == (chains, res.burn_in)


@pytest.mark.slow
def test_ordinality_lower_rank_gives_lower_estimate():
    """Reduced-rank regression 10-3-5: rank 1 has lambda = 11, rank 2 has lambda = 14.5. The gap
    (3.5) is > 10 reported standard errors, so the ordering must hold with 3-sigma room."""
    # Localization 6.4 (0.4 sqrt(nbeta)) keeps the burn-in short; the ordering holds at any pull.
    low = run(deep_linear_problem([10, 3, 5], 1, seed=0), num_chains=2, localization=6.4)
    high = run(deep_linear_problem([10, 3, 5], 2, seed=0), num_chains=2, localization=6.4)
    assert low.mean + 3 * math.hypot(low.std, high.std) < high.mean


@pytest.mark.slow
def test_estimate_converges_as_draws_grow():
    """The field's offline tool keeps rising with more draws (it averages burn-in in and has no
    stopping point). Ours at 1x, 4x and 16x 1000 draws must agree within two standard
    errors of their difference; the runs share their first draws, which only makes this easier
    to pass for a drifting estimator by at most a factor sqrt(16/15), and the reported std must
    shrink roughly as 1/sqrt(draws) (ratio 4 at 16x; allowed 2.5-6)."""
    p = deep_linear_problem([6, 6, 6], 2, seed=0)
    # One fixed step (the default's largest) for the three runs, so they share one estimand (the
    # calibrated step differs a little from run to run), and the burn-in at its default, the
    # relaxation time: a shorter one leaves the flat directions still spreading, and the estimate
    # then drifts with the draws.
    # Localization 6.4 (0.4 sqrt(nbeta), the earlier default) halves the burn-in of the default 3.2.
    results = {k: run(p, num_draws=1000 * k, seed=0, step_size=0.08 / 256, localization=6.4) for k in (1, 4, 16)}
    base = results[1]
    for k in (4, 16):
        diff = abs(results[k].mean - base.mean)
        assert diff < 2 * math.hypot(base.std, results[k].std), (k, results[k].mean, base.mean)
    assert 2.5 < base.std / results[16].std < 6.0
    # And the long run is still near theory (same 15% criterion as above).
    assert abs(results[16].mean / p.lam - 1) < 0.15


@pytest.mark.slow
def test_reported_std_matches_seed_to_seed_spread():
    """Over 20 seeds (the chains' seeds, 2 chains each; data fixed) the observed sd of the estimate and the rms of
    the reported std agree within a factor 1.5. With 20 seeds the sample sd itself has a relative
    spread of about 1/sqrt(38) = 16%, so 1.5 is > 2.5 of its sd away from a calibrated
    estimator (measured: 1.15 here; 10 seeds are too few: seeds 100-109 read 1.55, a 2-sigma
    draw), while the 2-4x understatement of the field's tool fails it.

    The step is fixed at the default's largest value (where this model's calibration leaves it
    for most seeds): the std describes the draws at one step, and a seed whose calibration
    lowers the step moves the estimate with the step's bias, a separate, known spread (the
    heat target bounds its minibatch part)."""
    p = deep_linear_problem([6, 6, 6], 2, seed=0)
    # Localization 6.4 (0.4 sqrt(nbeta), the earlier default) halves the burn-in of the default 3.2.
    results = [run(p, seed=200 + s, num_draws=1000, step_size=0.08 / 256, num_chains=2, localization=6.4) for s in range(20)]
    observed = np.std([r.mean for r in results], ddof=1)
    reported = math.sqrt(np.mean([r.std**2 for r in results]))
    assert 1 / 1.5 < observed / reported < 1.5, (observed, reported)


@pytest.mark.slow
def test_heat_rises_linearly_with_step_size():
    """The minibatch heat's excess ``T - 1 = epsilon nbeta^2 q / (4 B)`` is proportional to the
    step. On linear regression (lambda = 5, batch 256) at 2x, 4x and 8x the largest default step
    the measured excess must double with each doubling (within 25%: the excess is measured to
    about 5% per run, the discretization heat, which it excludes, changes the mean it is divided
    by by about 3% per doubling), and the estimate must rise with it."""
    p = deep_linear_problem([10, 1], 1, seed=0)
    base_step = 0.08 / 256
    res = [run(p, step_size=m * base_step, seed=1, num_chains=2) for m in (2, 4, 8)]
    excess = [r.heat - 1 for r in res]
    means = [r.mean for r in res]
    assert means[0] < means[1] < means[2]
    assert excess[1] / excess[0] == pytest.approx(2.0, rel=0.25)
    assert excess[2] / excess[1] == pytest.approx(2.0, rel=0.25)


def test_leaves_model_gradients_buffers_and_global_rng_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # shuffles with the global RNG

    def loss_fn(m, batch):
        return 0.5 * (m(batch[0]) - batch[1]).pow(2).sum(-1)

    loss_fn(model, (x, y)).mean().backward()
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    res = estimate_llc(model, loss_fn, loader, num_samples=64, num_chains=2, num_draws=20, burn_in=5)
    assert math.isfinite(res.mean)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_same_seed_same_result_and_record_contents():
    p = deep_linear_problem([3, 2], 2, num_samples=512, batch_size=64, seed=0)
    a = estimate_llc(p.model, p.loss_fn, p.dataset.tensors and [p.dataset.tensors], num_samples=512,
                     num_chains=2, num_draws=30, burn_in=10, seed=3)
    b = estimate_llc(p.model, p.loss_fn, [p.dataset.tensors], num_samples=512,
                     num_chains=2, num_draws=30, burn_in=10, seed=3)
    assert np.array_equal(a.draws, b.draws)
    assert a.mean == pytest.approx(a.draws.mean())
    np.testing.assert_allclose(a.per_chain, a.draws.mean(axis=1))
    assert a.nbeta == pytest.approx(512 / math.log(512))  # below the cap of 256
    assert a.localization == pytest.approx(0.2 * math.sqrt(a.nbeta))
    # The step was calibrated from the batch-sized start, never above 0.08 / nbeta.
    assert a.batch_size == 512  # one batch of the whole data set
    assert a.calibration and a.calibration[0][0] == pytest.approx(min(0.08 / a.nbeta, 0.08 * 512 / a.nbeta**2))
    assert a.step_size <= 0.08 / a.nbeta
    d = a.to_dict()
    assert isinstance(d["draws"], list) and d["num_chains"] == 2


def test_nbeta_and_step_size_are_passed_through():
    p = deep_linear_problem([3, 2], 2, num_samples=512, batch_size=64, seed=0)
    res = run(p, nbeta=20.0, step_size=1e-3, localization=3.0, num_chains=1, num_draws=5, burn_in=0)
    assert (res.nbeta, res.step_size, res.localization) == (20.0, 1e-3, 3.0)


# ---- errors -------------------------------------------------------------------------------------

SMALL = deep_linear_problem([3, 2], 2, num_samples=256, batch_size=32, seed=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_samples=0), ValueError, r"Expected `num_samples` to be a positive int, got 0\."),
        (dict(num_samples=1), ValueError, r"Expected `num_samples` to be an int >= 2, got 1\."),
        (dict(num_samples=2.5), ValueError, r"Expected `num_samples` to be a positive int, got 2\.5\."),
        (dict(nbeta=0.0), ValueError, r"Expected `nbeta` to be a finite float > 0, got 0\.0\."),
        (dict(nbeta=-3), ValueError, r"Expected `nbeta` to be a finite float > 0, got -3\."),
        (dict(localization=-1.0), ValueError, r"Expected `localization` to be a finite float >= 0, got -1\.0\."),
        (dict(step_size=-1e-4), ValueError, r"Expected `step_size` to be a finite float > 0, got -0\.0001\."),
        (dict(step_size=0), ValueError, r"Expected `step_size` to be a finite float > 0, got 0\."),
        (dict(num_chains=0), ValueError, r"Expected `num_chains` to be a positive int, got 0\."),
        (dict(num_draws=-5), ValueError, r"Expected `num_draws` to be a positive int, got -5\."),
        (dict(burn_in=-1), ValueError, r"Expected `burn_in` to be a non-negative int, got -1\."),
        (dict(seed="a"), ValueError, r"Expected `seed` to be an int, got 'a'\."),
        (dict(num_chain=2), TypeError, r"estimate_llc\(\) got unexpected keyword argument\(s\): `num_chain`\."),
    ],
)
def test_invalid_arguments_are_named(kwargs, error, match):
    args = dict(num_samples=256, num_chains=1, num_draws=5, burn_in=0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        estimate_llc(SMALL.model, SMALL.loss_fn, SMALL.batches, **args)


def test_wrong_loss_shape_and_empty_batches_and_frozen_model():
    with pytest.raises(ValueError, match=r"Expected `loss_fn` to return per-sample losses of shape \[B\]"):
        estimate_llc(SMALL.model, lambda m, b: SMALL.loss_fn(m, b).sum(), SMALL.batches, num_samples=256)
    with pytest.raises(ValueError, match=r"Expected `batches` to yield at least one batch"):
        estimate_llc(SMALL.model, SMALL.loss_fn, [], num_samples=256)
    frozen = nn.Linear(3, 2)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match=r"Expected `model` to have at least one trainable parameter"):
        estimate_llc(frozen, SMALL.loss_fn, SMALL.batches, num_samples=256)


def test_diverging_chain_raises_naming_chain_and_draw():
    """A step size far past stability (epsilon * nbeta * curvature >> 4) explodes within a few
    dozen steps; the error says which chain and step, and how to fix it."""
    with pytest.raises(NonFiniteDrawError, match=r"Chain 0 produced a non-finite draw at step \d+.*lower `step_size`") as info:
        estimate_llc(SMALL.model, SMALL.loss_fn, SMALL.batches, num_samples=256, step_size=5.0,
                     num_chains=2, num_draws=2000, burn_in=0)
    assert info.value.chain == 0 and info.value.draw > 0


def test_one_shot_and_endless_iterators_as_batches():
    """A generator that runs out cannot be cycled: ``estimate_llc`` says so, with how many batches
    it gave and the fix (before, it reported "an empty iterable"), and ``recommend_step_size``
    puts back the batch it peeks at (its stream also runs out after all 16 batches, not 15).

    An endless iterator is read as the stream it is, also where the control variate needs the
    full-data gradient, which is taken from an epoch's worth of the stream (before, that pass
    never ended): a regular regression (d = 4, n = 2048, batch 32, ``itertools.cycle`` over one
    epoch in order) reads the exact localized target ``1/2 sum_j nbeta h_j / (nbeta h_j + gamma)``
    within 5% plus two reported standard errors, the tolerance of the re-iterable's test
    (``test_control_variate.py``); measured 2.146 +- 0.091 against 1.974. (Batched chains draw a
    step's batches from the one stream in a random order: dealt in turn, a 4-3-2 network's
    chains each saw every other batch of a cycled epoch and read -8.4 against 2.4.)"""
    import itertools

    from online_llc.offline.recommend import recommend_step_size
    from test_control_variate import _loss, _regression

    p = deep_linear_problem([4, 3, 2], 1, num_samples=512, batch_size=32, seed=0)
    epoch = list(p.batches)
    assert len(epoch) == 16
    message = r"one-shot iterator \(a generator\?\) that ran out after 16 batches.*list\(batches\)"
    with pytest.raises(ValueError, match=message):
        estimate_llc(p.model, p.loss_fn, (b for b in epoch), num_samples=512, num_draws=400, progress=False)
    with pytest.raises(ValueError, match=message):
        recommend_step_size(p.model, p.loss_fn, (b for b in epoch), num_samples=512, num_draws=30, burn_in=10)

    n = 2048
    model, x, y = _regression(4, n, seed=1, spread=0.1)
    stream = itertools.cycle([(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)])
    res = estimate_llc(model, _loss, stream, num_samples=n, num_draws=1500, seed=1, progress=False)
    h = np.linalg.eigvalsh(x.double().numpy().T @ x.double().numpy() / n)
    exact = 0.5 * float(np.sum(res.nbeta * h / (res.nbeta * h + res.localization)))
    assert res.gradient == "control_variate"
    assert abs(res.mean - exact) < 0.05 * exact + 2 * res.std, (res.mean, exact, res.std)
