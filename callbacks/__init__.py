"""Framework adapters for online-llc, installed as ``online_llc.callbacks``.

* :class:`OnlineLLCCallback` - PyTorch Lightning (``pip install 'online-llc[lightning]'``).
* :class:`OnlineLLCTrainerCallback` - Hugging Face ``transformers.Trainer``
  (``pip install 'online-llc[hf]'``; module ``online_llc.callbacks.hf``).
* :data:`LOGGED_KEYS` - the keys both log at every closed window.

Adapters are imported lazily, so ``import online_llc.callbacks`` never imports a framework; a
plain PyTorch loop needs no adapter: call ``OnlineLLC.update(batch, step)`` after each optimizer
step.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OnlineLLCCallback", "OnlineLLCTrainerCallback", "LOGGED_KEYS", "ESTIMATE_KEYS"]

_HOMES = {"OnlineLLCCallback": "lightning", "OnlineLLCTrainerCallback": "hf", "LOGGED_KEYS": "_metrics", "ESTIMATE_KEYS": "_metrics"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'online_llc.callbacks' has no attribute {name!r}")
