"""Probe sets in the online monitor: the live influence and observable-refined LLC against the
Gaussian posterior in closed form and against the offline estimator at the same settings, and the
monitor's bookkeeping (windows, checkpoints, refusals). The closed forms are those of
``tests/test_probes.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from online_llc import OnlineLLC, estimate_llc
from online_llc.callbacks._metrics import group_metrics
from online_llc.models import ParamSlice

sys.path.insert(0, str(Path(__file__).parent))
from test_probes import _mse, _regression  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NBETA, GAMMA, EPS = 100.0, 10.0, 1e-3


def _closed_forms(model, x, probes, eps):
    """Per set: the influences' covariances ``Cov(delta_k, d)``, the observable-refined LLC and the
    loss kernel ``Cov(delta_k, delta_j)``."""
    n = len(x)
    h = (x.T @ x / n).double()
    a = NBETA * h + GAMMA * torch.eye(x.shape[1], dtype=torch.float64)
    s = torch.linalg.inv(a - eps * a @ a / 4)
    w = model.weight.detach().double().T
    out = {}
    for name, (px, py) in probes.items():
        px, py = px.double(), py.double()
        q, r = px @ s @ px.T, (px @ w - py)[:, 0]
        out[name] = ((NBETA / 2 * ((px @ (s @ h @ s)) * px).sum(1)).numpy(), float(NBETA * ((px @ s) * px).sum(1).mean() / 2),
                     (r[:, None] * r[None, :] * q + q**2 / 2).numpy())
    return out


def _monitor(model, probes, **kw):
    opts = dict(num_samples=2000, nbeta=NBETA, localization=GAMMA, step_size=EPS, every_n_steps=1, window=40,
                num_chains=4, seed=0, probes=probes)
    opts.update(kw)
    return OnlineLLC(model, _mse, **opts)


@pytest.mark.slow
def test_live_influence_at_frozen_weights_matches_the_closed_form_and_the_offline_estimate():
    """The monitor at frozen weights (a d = 4 regression at its optimum, the whole data as the
    batch, 4 chains, a shadow step per training step, 3000 of them, the step given): over its
    segments (10 windows per chain each, two relaxation times) the influences' z-scores
    against the closed form have mean within 1, root mean square within 0.5-1.6 and none past 4,
    as offline (tests/test_probes.py); each set's susceptibility and pooled observable-refined LLC
    are within 3 standard errors of theirs. Against ``estimate_llc`` at the same settings (4
    chains x 3000 draws) the two influences differ by their combined standard errors: root mean
    square within 0.5-1.6, none past 4; the filtered observable-refined LLC's band covers the
    closed form. A weight group (the first two weights, ``ParamSlice``) carries the probe sets on its
    own chains: its restricted posterior is ``N(0, S_g)``, ``S_g = (A_g - epsilon A_g^2 / 4)^(-1)``,
    ``A_g = nbeta H_gg + gamma I``, so its susceptibility to a set is
    ``-mean_k (nbeta / 2) x_kg^T S_g H_gg S_g x_kg``, read within 3 standard errors (a covariance of
    fourth-order terms over 7 segments per chain is heavy-tailed: an exact AR(1) chain with these
    segments puts 3% of the z-scores past 3). The live loss kernel (``probe_kernel=True``) against its closed form: z mean within
    1, rms within 0.5-1.6 and under 3% past 3 (28 segments make the standard errors noisy and the
    entries are products of four Gaussians; over seeds 0-2 the rms read 0.98-1.23 and 0-2.1% were
    past 3, the largest |z| 2.9-4.0)."""
    model, x, y, fresh = _regression()
    probes = {"train": (x[:20], y[:20]), "fresh": fresh}
    mask = torch.tensor([[True, True, False, False]])
    mon = _monitor(model, probes, probe_kernel=True, groups={"w01": ParamSlice("weight", mask)}, group_budget=1)
    for step in range(1, 3001):
        mon.update((x, y), step)
    assert mon.chain_config.step_size == EPS
    live = mon.probes.influence()
    offline = estimate_llc(model, _mse, [(x, y)], num_samples=2000, nbeta=NBETA, localization=GAMMA, step_size=EPS,
                           num_chains=4, burn_in=500, num_draws=3000, progress=False, probes=probes, seed=1).probes
    z_exact, z_pair, z_kernel = [], [], []
    for name, (cov, llc, kernel) in _closed_forms(model, x, probes, EPS).items():
        p, q = live[name], offline[name]
        # Whole segments of 10 windows of 40 draws per chain (two relaxation times, 2 / (eps gamma)
        # = 200 steps, each), at least 4 of the 7 the run's 75 windows hold after the warm-up.
        assert p.count % (4 * 400) == 0 and p.count >= 4 * 4 * 400
        z_exact.append((p.influence + cov) / p.influence_std)
        z_pair.append((p.influence - q.influence) / np.hypot(p.influence_std, q.influence_std))
        z_kernel.append(((p.kernel - kernel) / p.kernel_std)[np.triu_indices(20)])
        assert q.kernel is None  # not asked for offline
        assert abs(p.susceptibility + cov.mean()) < 3 * p.susceptibility_std
        assert abs(p.llc - llc) < 3 * p.llc_std
        last = mon.probes.history(name)[-1]
        assert last.status == "tracking" and last.lower < llc < last.upper
    h = (x.T @ x / len(x)).double()[:2, :2]
    a = NBETA * h + GAMMA * torch.eye(2, dtype=torch.float64)
    s_g = torch.linalg.inv(a - EPS * a @ a / 4)
    chi = mon.susceptibilities()["w01"]
    for name, (px, _) in probes.items():
        pg = px.double()[:, :2]
        exact = -float((NBETA / 2 * ((pg @ (s_g @ h @ s_g)) * pg).sum(1)).mean())
        assert abs(chi[name][0] - exact) < 3 * chi[name][1]
    for z in (np.concatenate(z_exact), np.concatenate(z_pair)):
        assert abs(z.mean()) < 1.0 and 0.5 < np.sqrt((z**2).mean()) < 1.6 and np.abs(z).max() < 4
    z = np.concatenate(z_kernel)
    assert abs(z.mean()) < 1.0 and 0.5 < np.sqrt((z**2).mean()) < 1.6 and np.mean(np.abs(z) > 3) < 0.03


def test_probe_windows_follow_the_whole_model_and_a_checkpoint_continues_exactly():
    """Every whole-model window has its probe sets' window at the same step and status (a skipped
    step's placeholders included); a state taken mid-run restores a monitor that continues exactly
    (probe windows, influence and loss kernel, a group's susceptibilities, which the callbacks' group
    keys carry); a state of a monitor without probe sets, or without the kernel, is refused with a
    message that says why."""
    model, x, y, fresh = _regression()
    probes = {"fresh": fresh}
    # Segments of 10 windows (2 / (eps gamma) = 50 steps).
    kw = dict(window=10, warmup=5, localization=40.0, probe_kernel=True, groups={"w0": ParamSlice("weight", torch.tensor([[True, False, False, False]]))})
    mon = _monitor(model, probes, **kw)
    for step in range(1, 501):
        if step == 137:
            mon.skip_step(step)  # a failed update's placeholders, as the callbacks add them under DDP
        else:
            mon.update((x, y), step)
    hist = mon.probes.history("fresh")
    assert [(e.step, e.status) for e in hist] == [(e.step, e.status) for e in mon.history()]
    assert any(e.status == "diverged" for e in hist)  # the skipped step's window
    assert any(e.filtered for e in hist) and mon.probes.influence()["fresh"].num_probes == 20
    state = mon.state_dict()
    resumed = _monitor(model, probes, **kw)
    resumed.load_state_dict(state)
    for step in range(501, 651):
        mon.update((x, y), step)
        resumed.update((x, y), step)
    assert resumed.probes.history("fresh") == mon.probes.history("fresh")
    a, b = resumed.probes.influence()["fresh"], mon.probes.influence()["fresh"]
    assert np.array_equal(a.influence, b.influence) and np.array_equal(a.influence_std, b.influence_std)
    assert a.kernel.shape == (20, 20) and np.array_equal(a.kernel, b.kernel) and np.array_equal(a.kernel_std, b.kernel_std)
    chi = mon.susceptibilities()
    assert resumed.susceptibilities() == chi and set(chi) == {"w0"}
    assert mon.group_probes["w0"].influence()["fresh"].kernel is None  # the kernel is the whole model's
    logged = group_metrics({"w0": mon.group_history("w0")[-1]}, mon.group_probes)
    assert (logged["llc/w0/probe/fresh/susceptibility"], logged["llc/w0/probe/fresh/susceptibility_std"]) == chi["w0"]["fresh"]
    no_kernel = {**kw, "probe_kernel": False}
    with pytest.raises(ValueError, match=r"Expected a state with probe sets, as this monitor has"):
        _monitor(model, probes, **kw).load_state_dict(_monitor(model, None, **no_kernel).state_dict())
    with pytest.raises(ValueError, match=r"Expected a state with probe_kernel=False like this monitor's"):
        _monitor(model, probes, **no_kernel).load_state_dict(state)
    with pytest.raises(ValueError, match=r"Expected `probes` with probe_kernel or probe_loss_fn"):
        _monitor(model, None, **kw)
    with pytest.raises(ValueError, match=r"Expected `probe_loss_fn` to be callable as probe_loss_fn\(model, batch\), got 3\."):
        _monitor(model, probes, **{**kw, "probe_loss_fn": 3})
    with pytest.raises(KeyError, match=r"No probe set 'other'"):
        mon.probes.history("other")
    # A state from before groups carried probe sets: the group's start afresh, with a warning.
    old = {k: v for k, v in state.items() if k != "group_probes"}
    with pytest.warns(UserWarning, match=r"no probe statistics for group 'w0': they start afresh"):
        _monitor(model, probes, **kw).load_state_dict(old)
    # The monitor's own accessor: the set's result, an unknown set or no probe sets refused.
    assert np.array_equal(mon.influence("fresh").influence, b.influence)
    with pytest.raises(KeyError, match=r"No probe set 'other'; the sets are \['fresh'\]"):
        mon.influence("other")
    with pytest.raises(KeyError, match=r"No probe set 'fresh'; the sets are \[\]"):
        _monitor(model, None, **no_kernel).influence("fresh")


def test_probe_passes_leave_training_bit_identical():
    """A dropout network trained in training mode (its masks from the global generator), watched
    by a monitor with a probe set (its passes in ``mode="train"`` too, dropout on): the weights
    after 60 SGD steps equal, bit for bit, those of the same run without the monitor."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(256, 6, generator=g), torch.randn(256, 2, generator=g)

    def run(watch: bool) -> list:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = OnlineLLC(model, _mse, num_samples=256, every_n_steps=1, window=5, warmup=2, mode="train",
                        probes={"p": (x[:8], y[:8])}) if watch else None
        for step in range(1, 61):
            b = slice(32 * (step % 8), 32 * (step % 8) + 32)
            opt.zero_grad()
            _mse(model, (x[b], y[b])).mean().backward()
            opt.step()
            if mon is not None:
                mon.update((x[b], y[b]), step)
        if mon is not None:
            assert mon.probes.history("p")
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))



def test_live_per_token_probes_sum_to_the_per_sample_probes():
    """``probe_loss_fn`` live: per-token probes (``[B, T]``) keep their shape, and the per-sample
    probes of a monitor with the same seed (the per-sample loss is the tokens' sum) read their
    influence summed over tokens, to float rounding (the chains are the same, the statistics
    linear)."""
    from test_probes import _per_token, _two_token_regression

    model, x, y = _two_token_regression()
    probes = {"few": (x[:8], y[:8])}
    kw = dict(window=10, warmup=5, localization=40.0)  # segments of 10 windows (2 / (eps gamma) = 50 steps)
    tokens, samples = _monitor(model, probes, probe_loss_fn=_per_token, **kw), _monitor(model, probes, **kw)
    for step in range(1, 401):
        tokens.update((x, y), step)
        samples.update((x, y), step)
    a, b = tokens.probes.influence()["few"], samples.probes.influence()["few"]
    assert a.shape == (8, 2) and b.shape == (8,)
    summed = a.influence.reshape(a.shape).sum(1)
    assert np.allclose(b.influence, summed, rtol=1e-6, atol=1e-6 * np.abs(summed).max())
    assert tokens.probes.history("few")[-1].raw_mean == pytest.approx(samples.probes.history("few")[-1].raw_mean / 2, rel=1e-6)


def test_probe_losses_at_every_chain_in_one_vectorized_pass_or_one_pass_each():
    """``ProbeBatches.losses_at``: the centre's and every chain's probe losses in one vmap pass equal
    the passes one point at a time (to float rounding); a loss that vmap cannot run (a host read
    inside) falls back to one pass per point, with the same numbers, and stays there."""
    from online_llc.kernel.evaluator import LossEvaluator
    from online_llc.kernel.probes import ProbeBatches

    model, x, y, fresh = _regression()
    center = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    offsets = [{n: 0.05 * torch.randn(t.shape, generator=g) for n, t in center.items()} for _ in range(3)]
    looped = torch.stack([ProbeBatches({"f": fresh}, LossEvaluator(model, _mse)).losses(
        {n: center[n] + o[n] for n in center} if o else center) for o in [None] + offsets])

    def host_read(m, batch):
        out = _mse(m, batch)
        float(out.sum())  # not vmappable
        return out

    for loss_fn, vectorized in ((_mse, True), (host_read, False)):
        sets = ProbeBatches({"f": fresh}, LossEvaluator(model, loss_fn))
        got = sets.losses_at(center, offsets)
        assert got.shape == (4, 20) and sets._vectorize is vectorized
        assert torch.allclose(got, looped, rtol=1e-6, atol=1e-7)
