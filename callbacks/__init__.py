"""Framework adapters for online-llc, installed as ``online_llc.callbacks``.

Adapters are imported lazily so that the core never imports a training framework.
"""

from __future__ import annotations

__all__: list[str] = []
