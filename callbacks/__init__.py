"""Framework adapters for online-llc, installed as ``online_llc.callbacks``.

* :class:`OnlineLLCCallback` - PyTorch Lightning (``pip install 'online-llc[lightning]'``).

Adapters are imported lazily, so ``import online_llc.callbacks`` never imports a framework; a
plain PyTorch loop needs no adapter: call ``OnlineLLC.update(batch, step)`` after each optimizer
step.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OnlineLLCCallback", "LOGGED_KEYS", "ESTIMATE_KEYS"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module 'online_llc.callbacks' has no attribute {name!r}")
