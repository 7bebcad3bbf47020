"""Private randomness: the monitor's draws never touch the training run's random streams.

* :func:`private_rng` forks the global CPU/CUDA generators and reseeds them from the monitor's own
  ``torch.Generator``: any draw the model makes from the global RNG (dropout) is then a function of
  the monitor's seed, the training run's random streams are left exactly as they were, and
  rewinding before a second pass gives it the same dropout masks as the first.
* :func:`derived_seed` computes seeds for (run seed, chain, step) on the host, drawing nothing.
* :func:`deterministic` tells whether a model's forward draws random numbers at all (so that
  the centre's loss can be shared between chains).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Callable, Iterator, List, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["chain_seed", "cuda_devices", "derived_seed", "deterministic", "private_rng"]


def cuda_devices(tensors: Mapping[str, Tensor]) -> List[int]:
    """The indices of the CUDA devices the tensors live on (empty on CPU)."""
    return sorted({t.device.index or 0 for t in tensors.values() if t.device.type == "cuda"})


def chain_seed(seed: int, chain: int) -> int:
    """The seed of chain ``chain``'s noise generator in a run seeded with ``seed``:
    ``seed * 1000003 + chain``, distinct for every ``(seed, chain)`` with fewer than 1000003 chains."""
    return seed * 1000003 + chain


def derived_seed(*parts: int) -> int:
    """A 62-bit seed that is a fixed function of the integers ``parts`` (blake2b of them), so that
    seeds for (run seed, chain, step) are computed on the host without drawing anything."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


def deterministic(model: nn.Module) -> bool:
    """Whether ``model``'s forward draws no random numbers, as far as its modules tell: no module of
    torch's dropout family (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ...) is in
    training mode with ``p > 0`` (so a model in eval mode is deterministic). Randomness that no
    module shows, such as ``F.dropout`` or an attention kernel's ``dropout_p`` called in training
    mode, or a random ``loss_fn``, is not seen: pass ``share_center_loss=False`` to
    :class:`~online_llc.monitor.shadow.ShadowSampler` for such models."""
    return not any(isinstance(m, _DropoutNd) and m.training and m.p > 0 for m in model.modules())


@contextmanager
def private_rng(
    tensors: Mapping[str, Tensor], generator: torch.Generator, seed: Optional[int] = None
) -> Iterator[Callable[[], None]]:
    """Fork the global CPU generator, and the CUDA generators of the devices ``tensors`` live on,
    and seed them for the duration of the block, with ``seed`` or else an integer drawn from
    ``generator``.

    The model's randomness inside the block (dropout) is then a function of the monitor's own
    seed; on exit the global generators are back in the state they had before the block. Yields
    ``rewind()``, which puts the forked generators back to their state just after seeding: a pass
    run on entering and a second pass run after ``rewind()`` see the same dropout masks. Reading
    the seed drawn from ``generator`` is a host read (a device sync when ``generator`` is a CUDA
    generator); a caller that owns a step counter passes a :func:`derived_seed` instead.
    """
    devices = cuda_devices(tensors)
    with torch.random.fork_rng(devices=devices):
        # The generator advances by this one draw whether or not ``seed`` is given, so a chain's
        # noise stream is the same either way (and as it was when the seed was always drawn).
        drawn = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
        if seed is None:
            seed = int(drawn.item())
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def rewind() -> None:
            torch.set_rng_state(cpu_state)
            for d, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, d)

        yield rewind
