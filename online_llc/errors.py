"""Errors and the one validation-message template used across the package.

Every invalid argument is reported as::

    Expected `<name>` to be <what is accepted>, got <value>.

so users (and tests) can rely on the argument's name appearing in the message; the value is
its repr, or for a tensor, an array or a long repr a one-line description (:func:`describe`).
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, Iterable, Mapping, Optional

__all__ = [
    "OnlineLLCError",
    "NonFiniteDrawError",
    "MonitorError",
    "as_int",
    "check_int",
    "check_positive_int",
    "check_nonneg_int",
    "check_positive_float",
    "check_nonneg_float",
    "check_choice",
    "check_bool",
    "reject_unknown",
    "describe",
]


class OnlineLLCError(RuntimeError):
    """Base class for runtime failures of the estimators (not for bad arguments)."""


class NonFiniteDrawError(OnlineLLCError):
    """A sampler produced a non-finite loss difference (the chain diverged).

    Attributes:
        chain: index of the chain that diverged.
        draw: index of the draw (SGLD step, burn-in included) at which it happened.
    """

    def __init__(self, chain: int, draw: int, detail: str = "") -> None:
        self.chain = chain
        self.draw = draw
        msg = (
            f"Chain {chain} produced a non-finite draw at step {draw}"
            + (f" ({detail})" if detail else "")
            + ". The SGLD chain diverged: lower `step_size` or raise `localization`."
        )
        super().__init__(msg)


class MonitorError(OnlineLLCError):
    """The online monitor failed and was disabled (raised only in strict mode)."""


def describe(value: Any, limit: int = 80) -> str:
    """``value`` for a one-line message: a tensor or array by its type, shape and dtype, a mapping
    by its keys, anything else by its repr cut to ``limit`` characters (a batch's repr runs to
    dozens of lines)."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype") and not isinstance(value, (int, float)):
        try:
            return f"a {type(value).__name__} of shape {list(shape)} ({value.dtype})"
        except TypeError:
            pass
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {describe(list(value), limit)}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt(name: str, accepted: str, value: Any) -> str:
    return f"Expected `{name}` to be {accepted}, got {describe(value)}."


def as_int(value: Any) -> Optional[int]:
    """``value`` as a Python int when it is an integer: a Python int, a numpy integer or a 0-d
    integer tensor; ``None`` otherwise (bools, floats, strings, tensors of other shapes)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, numbers.Integral):  # numpy integers (not numpy.bool_, which is no Integral)
        return int(value)
    torch = sys.modules.get("torch")  # a tensor can only exist when torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        dtype = value.dtype
        if value.dim() == 0 and not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
            return int(value.item())
    return None


def check_int(name: str, value: Any) -> int:
    """Return ``value`` as a Python int if it is an integer (see :func:`as_int`), else raise ``ValueError``."""
    v = as_int(value)
    if v is None:
        raise ValueError(_fmt(name, "an int", value))
    return v


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as a Python int if it is an integer > 0 (see :func:`as_int`), else raise ``ValueError``."""
    v = as_int(value)
    if v is None or v <= 0:
        raise ValueError(_fmt(name, "a positive int", value))
    return v


def check_nonneg_int(name: str, value: Any) -> int:
    """Return ``value`` as a Python int if it is an integer >= 0 (see :func:`as_int`), else raise ``ValueError``."""
    v = as_int(value)
    if v is None or v < 0:
        raise ValueError(_fmt(name, "a non-negative int", value))
    return v


def _as_float(value: Any) -> float | None:
    # Strings are not numbers here, even when float() would parse them ("100" is a typo for 100).
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def check_positive_float(name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite number > 0, else raise ``ValueError``."""
    f = _as_float(value)
    if f is None or f <= 0:
        raise ValueError(_fmt(name, "a finite float > 0", value))
    return f


def check_nonneg_float(name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite number >= 0, else raise ``ValueError``."""
    f = _as_float(value)
    if f is None or f < 0:
        raise ValueError(_fmt(name, "a finite float >= 0", value))
    return f


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(_fmt(name, "one of " + ", ".join(repr(c) for c in choices), value))
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool`` (not merely truthy), else raise ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(_fmt(name, "a bool", value))
    return value


def reject_unknown(where: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming every unknown keyword argument in ``kwargs``."""
    if kwargs:
        names = ", ".join(f"`{k}`" for k in sorted(kwargs))
        raise TypeError(f"{where} got unexpected keyword argument(s): {names}.")
