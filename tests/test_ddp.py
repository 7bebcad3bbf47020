"""The core under DDP without a framework: two CPU processes (gloo) running a plain loop with
``OnlineLLC(..., gather=all_gather)``, as a user of ``torch.distributed`` would write it.

Each test's body runs on both ranks (forked processes); each rank writes what it holds to
``tmp_path/rank<r>.json`` and the test compares the two. A rank that raises, or a collective that
waits for a peer, fails the test (the process group times out after 10 s).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from online_llc import OnlineLLC
from online_llc.models.toy import deep_linear_problem
from online_llc.monitor.sketch import sketch, sketch_shift

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2


def all_gather(arr: np.ndarray) -> np.ndarray:
    """The plain-loop gather: every rank's window arrays, concatenated along the chain axis."""
    t = torch.as_tensor(arr, dtype=torch.float64)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return np.concatenate([p.numpy() for p in parts], axis=1)


def _entry(rank: int, body: Callable[..., Dict[str, Any]], port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=10)
    )
    try:
        report = body(rank, *args)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def run_ranks(body: Callable[..., Dict[str, Any]], tmp_path: Any, *args: Any) -> List[Dict[str, Any]]:
    """Run ``body(rank, *args)`` on two gloo ranks; their reports, rank 0 first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_entry, args=(body, port, str(tmp_path), args), nprocs=WORLD, start_method="fork", join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def problem() -> Any:
    return deep_linear_problem([6, 6, 6], r=2, num_samples=2048, seed=0)


# ---- seeds -----------------------------------------------------------------------------------------


def _same_seed_body(rank: int) -> Dict[str, Any]:
    p = problem()
    batches = list(p.batches)
    monitor = OnlineLLC(p.model, p.loss_fn, num_samples=2048, gather=all_gather, every_n_steps=1, window=5, warmup=0, seed=0)
    for step in range(1, 11):  # frozen weights, the same batch on both ranks: only the noise differs
        monitor.update(batches[0], step)
    past = monitor.stats.state_dict()["past"]
    return {
        "seed": monitor.seed,
        "noise": monitor.sampler.generators[0].get_state().tolist(),
        "offset": next(iter(monitor.sampler.offsets[0].values())).flatten().tolist(),
        "last_window": past[-1] if past else None,
        "history": [[e.step, e.mean, e.std] for e in monitor.history()],
    }


def test_plain_loop_with_the_same_seed_on_every_rank_gets_independent_chains(tmp_path):
    """The same ``seed`` on both ranks (what a plain loop naturally passes): with a ``gather`` in
    a process group the monitor seeds rank ``r``'s chains from ``seed + 104729 r`` itself, so the
    ranks' chains run on different noise and the pooled window holds two different chains."""
    r0, r1 = run_ranks(_same_seed_body, tmp_path)
    assert r0["noise"] != r1["noise"] and r0["offset"] != r1["offset"]
    assert r0["seed"] == 0 and r1["seed"] == 104729  # rank 0 keeps the user's seed
    chains = r0["last_window"]
    assert r1["last_window"] == chains and len(chains) == 2 and chains[0] != chains[1]
    assert r0["history"] == r1["history"]


# ---- weight jumps ----------------------------------------------------------------------------------


def _move_by(monitor: OnlineLLC, direction: List[torch.Tensor], target: float) -> float:
    """Move the weights along ``direction`` by the amount whose measured ``center_shift`` (the
    sketch distance the sampler will report) is ``target``, found by bisection; the shift."""
    params = list(monitor.evaluator.center().values())
    base = [w.detach().clone() for w in params]
    scratch = torch.Generator()
    old = sketch(base, scratch)

    def shift(t: float) -> float:
        return float(sketch_shift(sketch([w + t * d for w, d in zip(base, direction)], scratch), old, len(base)))

    lo, hi = 0.0, 1.0
    while shift(hi) < target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shift(mid) < target else (lo, mid)
    with torch.no_grad():
        for w, b, d in zip(params, base, direction):
            w.copy_(b + hi * d)
    return shift(hi)


def _jump_body(rank: int) -> Dict[str, Any]:
    p = problem()
    batches = list(p.batches)
    # Different seeds on the two ranks (as a user would give): their chains' spreads differ.
    monitor = OnlineLLC(
        p.model, p.loss_fn, num_samples=2048, gather=all_gather, every_n_steps=1, window=5, warmup=0, seed=rank
    )
    g = torch.Generator().manual_seed(7)  # the same direction on both ranks, as DDP keeps weights equal
    direction = [torch.randn(w.shape, generator=g) for w in monitor.evaluator.center().values()]
    step = 0

    def run(n: int) -> None:
        nonlocal step
        for _ in range(n):
            step += 1
            monitor.update(batches[(2 * step + rank) % len(batches)], step)

    run(30)  # frozen weights: the centre never moves, the chains spread out; 6 windows closed
    # A jump between the two ranks' rank-local spreads (if they were rank-local), measured on the
    # weights alike on both ranks: a rank-local decision would see a jump on one rank only.
    spreads = [None] * WORLD
    dist.all_gather_object(spreads, monitor._model.jumps.offset_mean)
    first = _move_by(monitor, direction, (spreads[0] + spreads[1]) / 2)
    run(20)
    jumps_after_first = monitor.weight_jumps
    _move_by(monitor, direction, 20 * max(spreads))  # unambiguous: every rank sees it
    run(20)
    return {
        "spreads": spreads,
        "first": first,
        "jumps_after_first": jumps_after_first,
        "weight_jumps": monitor.weight_jumps,
        "filter": json.dumps(monitor.filter.state_dict()),
        "history": [[e.step, e.status, e.mean, e.std] for e in monitor.history()],
    }


def test_weight_jump_decision_is_the_same_on_every_rank(tmp_path):
    """The weights jump by an amount between what the two ranks' own chains would call their
    spread: the decision uses only gathered quantities (the last window's offset norms over all
    ranks' chains), so both ranks decide alike and keep identical filters and histories."""
    r0, r1 = run_ranks(_jump_body, tmp_path)
    assert r0["first"] == r1["first"]
    assert r0["jumps_after_first"] == r1["jumps_after_first"]
    assert r0["weight_jumps"] == r1["weight_jumps"] == r0["jumps_after_first"] + 1
    assert r0["filter"] == r1["filter"]
    assert r0["history"] == r1["history"] and len(r0["history"]) == 14


# ---- resuming every rank from one rank's state -----------------------------------------------------


def test_reseed_for_rank_makes_every_track_its_own_after_loading_another_ranks_state():
    """In one process: a monitor that loaded another's state gets, from ``reseed_for_rank``, fresh
    noise in every track (groups too) and no pending window; on rank > 0 every chain warms up
    again with its offsets kept. The rank is validated."""
    p = problem()
    batches = list(p.batches)
    opts = dict(num_samples=2048, groups={"a": ["0.*"], "b": ["1.*"]}, group_budget=2, every_n_steps=1, window=5, warmup=3)
    source = OnlineLLC(p.model, p.loss_fn, seed=0, **opts)
    for step in range(1, 13):
        source.update(batches[step % len(batches)], step)
    state = source.state_dict()
    tracks = lambda m: [m._model, *m._groups.values()]  # noqa: E731
    for rank in (0, 1):
        m = OnlineLLC(p.model, p.loss_fn, seed=0, **opts)
        m.load_state_dict(state)
        m.reseed_for_rank(rank)
        for t, s in zip(tracks(m), tracks(source)):
            assert t.stats.num_pending == 0 and s.stats.num_pending == 2
            assert not torch.equal(t.sampler.generators[0].get_state(), s.sampler.generators[0].get_state())
            assert all(torch.equal(t.sampler.offsets[0][n], x) for n, x in s.sampler.offsets[0].items())
            assert t.warmup_left == ([3] if rank > 0 else [0])
    with pytest.raises(ValueError, match=r"^Expected `rank` to be a non-negative int, got -1\.$"):
        m.reseed_for_rank(-1)


# ---- a failed draw ---------------------------------------------------------------------------------


def test_skip_step_after_a_failed_group_draw_fills_only_the_tracks_that_owe_it():
    """In one process: a group's draw raises after the whole model's and another group's were
    added; ``owes_draw`` says so, and ``skip_step(step)`` adds a placeholder to that group alone
    (the round-robin does not advance again), so every track has the same number of draws."""
    p = problem()
    batches = list(p.batches)
    m = OnlineLLC(p.model, p.loss_fn, num_samples=2048, groups={"a": ["0.*"], "b": ["1.*"]}, group_budget=1,
                  every_n_steps=1, window=5, warmup=0, seed=0)
    m.update(batches[0], 1)  # the model and group "a" draw
    sampler = m._groups["b"].sampler
    real = sampler.step
    sampler.step = lambda batch, measure=True: (_ for _ in ()).throw(RuntimeError("group failure"))
    with pytest.raises(RuntimeError, match="group failure"):
        m.update(batches[1], 2)  # the model draws, then group "b" raises
    sampler.step = real
    pending = lambda: [t.stats.num_pending for t in (m._model, m._groups["a"], m._groups["b"])]  # noqa: E731
    assert m.owes_draw and m.shadow_steps == 2 and pending() == [2, 1, 0]
    assert m.skip_step(2) is None
    assert not m.owes_draw and m.shadow_steps == 2 and pending() == [2, 1, 1]
    assert m._groups["b"].stats.state_dict()["f"] == [[1.0]]  # a flagged placeholder
    m.update(batches[2], 3)  # the round-robin goes on with "a"
    assert pending() == [3, 2, 1]
    with pytest.raises(ValueError, match=r"the previous step 3"):
        m.skip_step(3)  # nothing owed: a repeated step


# ---- the step's size ---------------------------------------------------------------------------------


def _unequal_batches_body(rank: int) -> Dict[str, Any]:
    p = problem()
    x, y = next(iter(p.batches))
    size = 32 if rank == 0 else 24  # rank 1's first batch is short (the last of an uneven epoch)
    monitor = OnlineLLC(p.model, p.loss_fn, num_samples=2048, gather=all_gather, every_n_steps=1, window=5, warmup=0,
                        seed=0, gradient="plain")
    for step in range(1, 4):
        monitor.update((x[:size], y[:size]), step)
    return {"step_size": monitor.chain_config.step_size, "nbeta": monitor.config.nbeta}


def test_ranks_size_their_step_from_the_smallest_first_batch(tmp_path):
    """Ranks whose first batches differ (32 and 24 samples) size their chains' step from the
    smallest (one gather at the first shadow step), so both run the step
    ``default_step_size(nbeta, 24)`` (the plain gradient's batch-sized start); sized from their own
    batches, rank 0 ran a step 4/3 of rank 1's while their windows were pooled as one."""
    from online_llc.calibration.step import default_step_size

    r0, r1 = run_ranks(_unequal_batches_body, tmp_path)
    want = default_step_size(r0["nbeta"], 24, online=True)
    assert r0["step_size"] == r1["step_size"] == pytest.approx(want, rel=1e-12)


# ---- probe sets ------------------------------------------------------------------------------------


def _probes_body(rank: int) -> Dict[str, Any]:
    p = problem()
    batches = list(p.batches)
    held = batches[-1]
    # A given step and a strong pull: segments of two relaxation times (2 / (eps gamma) = 40 steps) are 8 windows.
    first = next(iter(dict(p.model.named_parameters())))
    monitor = OnlineLLC(p.model, p.loss_fn, num_samples=2048, gather=all_gather, every_n_steps=1, window=10, warmup=5,
                        num_chains=2, seed=0, probes={"held": held}, localization=100.0, step_size=5e-4,
                        probe_kernel=True, groups={"first": [first]}, group_budget=1)
    for step in range(1, 601):  # frozen weights; each rank its own batches
        monitor.update(batches[(2 * step + rank) % (len(batches) - 1)], step)
    influence = monitor.probes.influence()["held"]
    return {
        "history": [[e.step, e.status, e.raw_mean, e.mean] for e in monitor.probes.history("held")],
        "whole": [[e.step, e.status] for e in monitor.history()],
        "influence": influence.influence.tolist(),
        "kernel": influence.kernel.tolist(),
        "group_history": [[e.step, e.status, e.raw_mean] for e in monitor.group_probes["first"].history("held")],
        "group_windows": [[e.step, e.status] for e in monitor.group_history("first")],
        "susceptibilities": {g: {k: list(v) for k, v in d.items()} for g, d in monitor.susceptibilities().items()},
        "count": influence.count,
        "pooled": monitor.probes.pooled_chains,
    }


def test_probe_sets_pool_every_ranks_chains(tmp_path):
    """Probe sets under DDP: each rank evaluates them at its own chains, and the sets' windows and
    the influence's sums are gathered, so both ranks hold the same probe windows (at the whole
    model's steps and statuses) and the same influence and loss kernel over all four chains (2 per
    rank); beside a group's chains too (its probe windows at the group's steps, its
    susceptibilities)."""
    r0, r1 = run_ranks(_probes_body, tmp_path)
    assert r0["history"] == r1["history"] and r0["influence"] == r1["influence"] and r0["kernel"] == r1["kernel"]
    k = np.array(r0["kernel"])
    assert k.shape == (len(r0["influence"]),) * 2 and np.allclose(k, k.T) and np.all(np.diag(k) > 0)
    assert r0["group_history"] == r1["group_history"] and [h[:2] for h in r0["group_history"]] == r0["group_windows"]
    assert r0["susceptibilities"] == r1["susceptibilities"] and set(r0["susceptibilities"]) == {"first"}
    assert [h[:2] for h in r0["history"]] == r0["whole"]
    assert r0["pooled"] == 4 and r0["count"] > 0 and r0["count"] % 4 == 0
