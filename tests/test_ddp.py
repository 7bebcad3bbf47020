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
from online_llc.toy import deep_linear_problem

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

