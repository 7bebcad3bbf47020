"""Count the host's reads of tensor values: each is a device sync on an accelerator.

The kernel promises one host read per shadow step (:mod:`online_llc.kernel.step`); this counter is how
the tests pin that and how ``benchmarks/memory.py`` and ``benchmarks/gpu_check.py`` report it.
It works on CPU too: it counts the calls a CUDA run would sync on.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReads"]


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values inside its ``with`` block (``reads.count``).

    ``item()``, ``bool()``, ``float()`` and ``int()`` reach the dispatcher as
    ``aten._local_scalar_dense`` and are counted there (whatever Python call led to them);
    ``tolist()``, ``numpy()`` and ``cpu()`` copy without that op, so they are counted at the Python
    level, one per call however many values it copies.
    """

    COPIES = {"tolist", "numpy", "cpu"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._scalars = _ScalarReads(self)

    def __enter__(self):
        self._scalars.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._scalars.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.COPIES:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _ScalarReads(TorchDispatchMode):
    def __init__(self, owner: HostReads) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.owner.count += 1
        return func(*args, **(kwargs or {}))
