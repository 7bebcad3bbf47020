"""Parameter groups for the weight-refined (per-module) LLC.

A group is a set of trainable parameters; its weight-refined LLC (Wang et al. 2024) samples only
those parameters, the rest held at the current weights. Groups are given as a mapping of name to
a list of

* parameter-name patterns (``fnmatch``, e.g. ``"encoder.*"`` or ``"blocks.3.attn.*"``),
* modules (all their trainable parameters), or
* parameters,

and must be disjoint, so that the groups' chain offsets together are one copy of the model's
trainable parameters.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Mapping, Sequence

from torch import nn

__all__ = ["resolve_groups", "groups_by_child", "groups_by_linear"]


def resolve_groups(model: nn.Module, groups: Mapping[str, Any]) -> Dict[str, List[str]]:
    """Turn a group specification into ``{name: [trainable parameter names]}``.

    Raises:
        ValueError: a group is empty, matches nothing trainable, or overlaps another group.
        TypeError: ``groups`` is not a mapping of names to lists.
    """
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError(f"Expected `groups` to be a non-empty mapping of name to parameter patterns, got {groups!r}.")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    by_id = {id(p): name for name, p in trainable.items()}
    out: Dict[str, List[str]] = {}
    owner: Dict[str, str] = {}
    for gname, spec in groups.items():
        if not isinstance(gname, str) or not gname or "/" in gname:
            raise ValueError(f"Expected group names to be non-empty strings without '/', got {gname!r}.")
        items: Sequence[Any] = spec if isinstance(spec, (list, tuple)) else [spec]
        names: List[str] = []
        for item in items:
            if isinstance(item, str):
                found = [n for n in trainable if fnmatch.fnmatchcase(n, item)]
            elif isinstance(item, nn.Parameter):
                found = [by_id[id(item)]] if id(item) in by_id else []
            elif isinstance(item, nn.Module):
                found = [by_id[id(p)] for p in item.parameters() if id(p) in by_id]
            else:
                raise TypeError(
                    f"Expected group {gname!r} to hold parameter-name patterns, modules or parameters, got {item!r}."
                )
            if not found:
                raise ValueError(f"Expected group {gname!r}'s entry {item!r} to match a trainable parameter, got none.")
            names += [n for n in found if n not in names]
        for n in names:
            if n in owner:
                raise ValueError(f"Expected disjoint groups, got parameter {n!r} in both {owner[n]!r} and {gname!r}.")
            owner[n] = gname
        out[gname] = names
    return out


def groups_by_child(model: nn.Module) -> Dict[str, List[str]]:
    """One group per top-level child module that has trainable parameters (``"0"``, ``"encoder"``...)."""
    out: Dict[str, List[str]] = {}
    for name, child in model.named_children():
        if any(p.requires_grad for p in child.parameters()):
            out[name] = [f"{name}.*"]
    return out


def groups_by_linear(model: nn.Module) -> Dict[str, List[str]]:
    """One group per ``nn.Linear`` layer with trainable parameters, named by its module path."""
    out: Dict[str, List[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters(recurse=False)):
            out[name or "linear"] = [f"{name}.{p}" if name else p for p, q in module.named_parameters(recurse=False)
                                     if q.requires_grad]
    return out
