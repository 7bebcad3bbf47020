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
"""

from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ParamSlice", "resolve_groups", "resolve_group_masks", "groups_by_child", "groups_by_linear",
           "attention_heads"]


class ParamSlice(NamedTuple):
    """Part of a parameter: ``name`` and a boolean ``mask`` of the parameter's shape."""

    name: str
    mask: Tensor


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
                        f"boolean mask of its shape, got {tuple(item.mask.shape)} ({item.mask.dtype})."
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
                raise ValueError(f"Expected group {gname!r}'s entry {item!r} to match a trainable parameter, got none.")
            for n in names:
                found[n] = None
        for n, mask in found.items():
            for other, other_mask in claimed.get(n, []):
                if mask is None or other_mask is None or bool((mask & other_mask).any()):
                    raise ValueError(
                        f"Expected disjoint groups, got parameter {n!r} in both {other!r} and {gname!r}."
                    )
            claimed.setdefault(n, []).append((gname, mask))
        out[gname] = found
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


def attention_heads(module: nn.MultiheadAttention, prefix: str) -> Dict[str, List[ParamSlice]]:
    """One group per head of a ``torch.nn.MultiheadAttention`` with packed projections: the
    head's rows of ``in_proj_weight`` / ``in_proj_bias`` (its query, key and value slices) and
    its columns of ``out_proj.weight``. The output bias is shared by all heads and left out.

    Args:
        module: the attention module (``batch_first`` either way; packed ``in_proj_weight``).
        prefix: its name in the model (``dict(model.named_modules())`` key), e.g. ``"attn"``.

    Returns:
        ``{f"{prefix}.head{h}": [ParamSlice, ...]}`` for ``h`` in ``range(num_heads)``.
    """
    if not isinstance(module, nn.MultiheadAttention) or module.in_proj_weight is None:
        raise ValueError(f"Expected `module` to be an nn.MultiheadAttention with packed projections, got {module!r}.")
    e, h = module.embed_dim, module.num_heads
    d = e // h
    out: Dict[str, List[ParamSlice]] = {}
    for k in range(h):
        rows = torch.zeros(3 * e, dtype=torch.bool)
        for part in range(3):  # query, key, value
            rows[part * e + k * d : part * e + (k + 1) * d] = True
        w_in = rows[:, None].expand(3 * e, e).clone()
        cols = torch.zeros(e, e, dtype=torch.bool)
        cols[:, k * d : (k + 1) * d] = True
        slices = [ParamSlice(f"{prefix}.in_proj_weight", w_in), ParamSlice(f"{prefix}.out_proj.weight", cols)]
        if module.in_proj_bias is not None:
            slices.append(ParamSlice(f"{prefix}.in_proj_bias", rows.clone()))
        out[f"{prefix}.head{k}"] = slices
    return out
