"""Writes docs/api.md: the public API's signatures and docstrings (run: python docs/make_api.py)."""

from __future__ import annotations

import inspect
import os

import online_llc
from online_llc import cadence, config, fsdp, groups, heads, heat, losses, plot, settings, sharding, theory, toy, tuning, warmup
from online_llc.callbacks import hf as cb_hf
from online_llc.callbacks import lightning as cb_lightning

SECTIONS = [
    ("online_llc", online_llc, ["OnlineLLC", "LLCEstimate", "ChainHealth", "SmoothedPoint", "Transition", "estimate_llc", "LLCResult", "STATUSES",
                                "LLCFilter", "FilterInfo", "SGLDConfig", "SGLDInfo", "sgld_step", "mala_acceptance", "default_nbeta",
                                "NonFiniteDrawError", "MonitorError"]),
    ("online_llc.callbacks", cb_lightning, ["OnlineLLCCallback", "LOGGED_KEYS", "ESTIMATE_KEYS"]),
    ("online_llc.callbacks.hf", cb_hf, ["OnlineLLCTrainerCallback", "TASKS"]),
    ("online_llc.settings", settings, settings.__all__),
    ("online_llc.cadence", cadence, ["auto_cadence", "Cadence", "next_step"]),
    ("online_llc.config", config, ["default_estimand", "default_step_size", "lag_std", "relaxation_steps", "resolve_hyperparameters"]),
    ("online_llc.heat", heat, heat.__all__),
    ("online_llc.sharding", sharding, sharding.__all__),
    ("online_llc.fsdp", fsdp, fsdp.__all__),
    ("online_llc.tuning", tuning, [n for n in tuning.__all__ if n != "mala_acceptance"]),
    ("online_llc.warmup", warmup, warmup.__all__),
    ("online_llc.groups", groups, [n for n in groups.__all__ if n not in ("attention_heads", "groups_by_head")]),
    ("online_llc.heads", heads, [n for n in heads.__all__ if n != "ParamSlice"]),
    ("online_llc.losses", losses, losses.__all__),
    ("online_llc.theory", theory, theory.__all__),
    ("online_llc.toy", toy, toy.__all__),
    ("online_llc.plot", plot, plot.__all__),
]


def _stable_repr(obj: object) -> str:
    """``repr`` with functions by their qualified names (no memory addresses, so the file only
    changes when the API does)."""
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k!r}: {_stable_repr(v)}" for k, v in obj.items()) + "}"
    if inspect.isfunction(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    return repr(obj)


def render(name: str, obj: object) -> str:
    out = []
    if inspect.isclass(obj) or inspect.isfunction(obj):
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = ""
        kind = "class" if inspect.isclass(obj) else "def"
        out.append(f"### `{kind} {name}{sig}`\n")
    else:
        out.append(f"### `{name}`\n\n`{_stable_repr(obj)}`\n")
    doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
    if doc:
        out.append("```text\n" + doc + "\n```\n")
    return "\n".join(out)


def main() -> None:
    parts = ["# API reference\n", "Generated from the docstrings by `python docs/make_api.py`; the examples in them run as "
             "doctests in the test suite.\n"]
    for title, module, names in SECTIONS:
        parts.append(f"## {title}\n")
        if module.__doc__:
            parts.append("```text\n" + inspect.cleandoc(module.__doc__) + "\n```\n")
        for n in names:
            parts.append(render(n, getattr(module, n)))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api.md")
    with open(path, "w") as fh:
        fh.write("\n".join(parts))
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
