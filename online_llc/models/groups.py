"""Parameter groups for the weight-refined (per-module) LLC.

A group is a set of trainable parameters; its weight-refined LLC (Wang et al. 2024) samples only
those parameters, the rest held at the current weights. Groups are given as a mapping of name to
a list of

* parameter-name patterns (``fnmatch``, e.g. ``"encoder.*"`` or ``"blocks.3.attn.*"``),
* modules (all their trainable parameters), or
* parameters, or
* :class:`ParamSlice` entries: part of a parameter given by a boolean mask (e.g. one attention
  head's rows of a packed projection; see :func:`attention_heads`),

and must be disjoint (slices of one parameter may share it if their masks do not overlap). A
group's chain offset lives only on its parameters; for slices the offset tensor is full-size
but zero outside the mask.

Names are those of ``model.named_parameters()``: a tensor shared by several modules (tied
weights, e.g. GPT-2's ``lm_head.weight``, which is ``transformer.wte.weight``) appears there once,
under its first name, and so belongs to one group. A module given as an entry brings its tied
tensor under that first name. Per-head groups of attention layers (``nn.MultiheadAttention``,
GPT-2, LLaMA with grouped-query attention, GPT-NeoX) are built in :mod:`online_llc.models.heads`.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from online_llc.models.heads import ParamSlice, is_conv1d

__all__ = ["resolve_groups", "resolve_group_masks", "groups_by_child", "groups_by_linear", "tied_names"]


def tied_names(model: nn.Module) -> Dict[str, List[str]]:
    """``{name: [other names of the same tensor]}`` for every parameter registered under more than
    one name (tied weights); ``name`` is the one ``model.named_parameters()`` reports."""
    first: Dict[int, str] = {}
    out: Dict[str, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.setdefault(first[id(p)], []).append(name)
        else:
            first[id(p)] = name
    return out


def _tie_hint(name: str, aliases: Mapping[str, List[str]]) -> str:
    """`` ('x' is tied to 'y' and named 'y')`` when ``name`` or a pattern names a tied alias."""
    for canonical, others in aliases.items():
        hits = [a for a in others if fnmatch.fnmatchcase(a, name)]
        if hits:
            return f" ({hits[0]!r} is tied to {canonical!r} and named {canonical!r} once)"
    return ""


def resolve_groups(model: nn.Module, groups: Mapping[str, Any]) -> Dict[str, List[str]]:
    """Turn a group specification into ``{name: [trainable parameter names]}``.

    Raises:
        ValueError: a group is empty, matches nothing trainable, or overlaps another group.
        TypeError: ``groups`` is not a mapping of names to lists.
    """
    return {g: list(masks) for g, masks in resolve_group_masks(model, groups).items()}


def resolve_group_masks(model: nn.Module, groups: Mapping[str, Any]) -> Dict[str, Dict[str, Optional[Tensor]]]:
    """Like :func:`resolve_groups`, with each parameter's mask (``None``: the whole parameter)."""
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError(f"Expected `groups` to be a non-empty mapping of name to parameter patterns, got {groups!r}.")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    by_id = {id(p): name for name, p in trainable.items()}
    aliases = tied_names(model)
    out: Dict[str, Dict[str, Optional[Tensor]]] = {}
    claimed: Dict[str, Any] = {}  # parameter name -> (group, mask or None) already claimed
    for gname, spec in groups.items():
        if not isinstance(gname, str) or not gname or "/" in gname:
            raise ValueError(f"Expected group names to be non-empty strings without '/', got {gname!r}.")
        items: Sequence[Any] = spec if isinstance(spec, (list, tuple)) and not isinstance(spec, ParamSlice) else [spec]
        found: Dict[str, Optional[Tensor]] = {}
        for item in items:
            if isinstance(item, ParamSlice):
                p = trainable.get(item.name)
                if p is None or tuple(item.mask.shape) != tuple(p.shape) or item.mask.dtype != torch.bool:
                    raise ValueError(
                        f"Expected group {gname!r}'s slice of {item.name!r} to name a trainable parameter with a "
                        f"boolean mask of its shape, got {tuple(item.mask.shape)} ({item.mask.dtype})"
                        f"{_tie_hint(item.name, aliases)}."
                    )
                if not bool(item.mask.any()):
                    raise ValueError(f"Expected group {gname!r}'s slice of {item.name!r} to select something, got none.")
                prev = found.get(item.name)
                found[item.name] = item.mask.clone() if prev is None else (prev | item.mask)
                continue
            if isinstance(item, str):
                names = [n for n in trainable if fnmatch.fnmatchcase(n, item)]
            elif isinstance(item, nn.Parameter):
                names = [by_id[id(item)]] if id(item) in by_id else []
            elif isinstance(item, nn.Module):
                names = [by_id[id(p)] for p in item.parameters() if id(p) in by_id]
            else:
                raise TypeError(
                    f"Expected group {gname!r} to hold parameter-name patterns, modules, parameters or ParamSlices, "
                    f"got {item!r}."
                )
            if not names:
                hint = _tie_hint(item, aliases) if isinstance(item, str) else ""
                raise ValueError(
                    f"Expected group {gname!r}'s entry {item!r} to match a trainable parameter, got none{hint}."
                )
            for n in names:
                found[n] = None
        for n, mask in found.items():
            for other, other_mask in claimed.get(n, []):
                if mask is None or other_mask is None or bool((mask & other_mask).any()):
                    tied = f" (tied as {', '.join(map(repr, aliases[n]))})" if n in aliases else ""
                    raise ValueError(
                        f"Expected disjoint groups, got parameter {n!r} in both {other!r} and {gname!r}{tied}."
                    )
            claimed.setdefault(n, []).append((gname, mask))
        out[gname] = found
    return out


def groups_by_child(model: nn.Module) -> Dict[str, List[str]]:
    """One group per top-level child module that owns trainable parameters (``"0"``,
    ``"encoder"``...). A tied tensor belongs to the child under whose name
    ``model.named_parameters()`` reports it: GPT-2's ``lm_head`` owns none of its own, so it
    has no group (its weight is in ``"transformer"``)."""
    out: Dict[str, List[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and "." in name:
            child = name.split(".", 1)[0]
            out.setdefault(child, [f"{child}.*"])
    return out


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def groups_by_linear(model: nn.Module) -> Dict[str, List[str]]:
    """One group per linear layer with trainable parameters (``nn.Linear``, or GPT-2's
    ``Conv1D``), named by its module path. A tied tensor is listed once, under its
    ``named_parameters()`` name, in the first linear layer that uses it: GPT-2's ``lm_head``
    group holds ``transformer.wte.weight`` (the embedding is not a linear layer)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    taken: set = set()
    out: Dict[str, List[str]] = {}
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        own = [names[id(q)] for _, q in module.named_parameters(recurse=False) if id(q) in names and id(q) not in taken]
        if own:
            taken.update(id(q) for q in module.parameters(recurse=False))
            out[name or "linear"] = own
    return out
