"""Per-head parameter groups of attention layers, as masked slices of their projections.

A head's weight-refined LLC samples only the weights that act on that head: its rows (or columns)
of the query, key and value projections and its input columns of the output projection. The
output projection's bias is shared by every head and left out, as are layer norms.

Four layouts are recognised, by their parts, so that the core never imports a framework:

* ``torch.nn.MultiheadAttention`` with packed ``in_proj_weight`` (rows ``[q | k | v]``, each
  ``[head0 | head1 | ...]``) and ``out_proj``;
* GPT-2 (``c_attn`` and ``c_proj``, ``transformers``' ``Conv1D`` whose weight is ``[in, out]``,
  transposed against ``nn.Linear``): ``c_attn``'s output columns are ``[q | k | v]``, each split
  by head; a cross-attention block has ``q_attn`` for the queries and ``c_attn = [k | v]``;
* LLaMA-style separate ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` (``nn.Linear``),
  grouped-query attention included (fewer key/value heads than query heads);
* GPT-NeoX's fused ``query_key_value`` (``nn.Linear``), whose output rows are interleaved per
  head: ``[head0 q, k, v | head1 q, k, v | ...]`` (``modeling_gpt_neox.py`` views the projection
  as ``[..., heads, 3 * head_size]`` and chunks the last axis into q, k, v).

Grouped-query attention: a key/value head is shared by ``G = heads / kv_heads`` query heads
(query head ``h`` reads key/value head ``h // G``, as ``repeat_kv`` does). Groups must be
disjoint, so a group is one key/value head with its ``G`` query heads: their query rows, the
shared key and value rows, and the ``G`` heads' columns of the output projection. With
``G = 1`` that is one head per group.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ParamSlice", "attention_heads", "groups_by_head", "is_conv1d"]


class ParamSlice(NamedTuple):
    """Part of a parameter: ``name`` and a boolean ``mask`` of the parameter's shape."""

    name: str
    mask: Tensor


def is_conv1d(module: Any) -> bool:
    """True for a ``transformers`` ``Conv1D`` (GPT-2's linear layer, weight ``[in, out]``),
    recognised by its class name and shape attributes so that ``transformers`` is not imported."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    )


def _layout(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.MultiheadAttention):
        return "mha" if module.in_proj_weight is not None else None
    if is_conv1d(getattr(module, "c_attn", None)) and is_conv1d(getattr(module, "c_proj", None)):
        return "gpt2"
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "llama"
    if isinstance(getattr(module, "query_key_value", None), nn.Linear) and isinstance(getattr(module, "dense", None), nn.Linear):
        return "neox"
    return None


def _count(module: nn.Module, given: Optional[int], arg: str, attrs: Sequence[str]) -> Optional[int]:
    """A head count: as given, else the first int attribute of the module or of its config."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given <= 0:
            raise ValueError(f"Expected `{arg}` to be a positive int, got {given!r}.")
        return given
    config = getattr(module, "config", None)
    for owner in (module, config):
        for attr in attrs:
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _features(width: int, heads: int, where: str) -> int:
    if width % heads:
        raise ValueError(f"Expected {where}'s width {width} to be divisible by the {heads} heads, got a remainder.")
    return width // heads


def _rows(n: int, spans: Sequence[range]) -> Tensor:
    sel = torch.zeros(n, dtype=torch.bool)
    for span in spans:
        sel[span.start : span.stop] = True
    return sel


def _slices(prefix: str, layer: str, module: nn.Module, out_sel: Optional[Tensor], in_sel: Optional[Tensor]) -> List[ParamSlice]:
    """Masks of ``module``'s weight (and bias) selecting output features ``out_sel`` or input
    features ``in_sel``, in the layer's own layout (``nn.Linear``: ``[out, in]``; ``Conv1D``:
    ``[in, out]``). An output selection also takes the bias; an input selection does not."""
    weight = module.weight
    conv = is_conv1d(module)
    n_out, n_in = (weight.shape[1], weight.shape[0]) if conv else (weight.shape[0], weight.shape[1])
    mask = torch.zeros(n_out, n_in, dtype=torch.bool)
    if out_sel is not None:
        mask[out_sel, :] = True
    if in_sel is not None:
        mask[:, in_sel] = True
    name = f"{prefix}.{layer}" if prefix else layer
    out = [ParamSlice(f"{name}.weight", mask.t().contiguous() if conv else mask)]
    bias = getattr(module, "bias", None)
    if out_sel is not None and isinstance(bias, Tensor):
        out.append(ParamSlice(f"{name}.bias", out_sel.clone()))
    return out


def attention_heads(
    module: nn.Module, prefix: str, *, num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None
) -> Dict[str, List[ParamSlice]]:
    """One group per head (per key/value head under grouped-query attention) of an attention
    layer, as masked slices of its projections; see the module docstring for the layouts.

    Args:
        module: the attention module: an ``nn.MultiheadAttention`` with packed projections, or
            a block with GPT-2's ``c_attn``/``c_proj``, LLaMA's ``q_proj``/``k_proj``/``v_proj``/
            ``o_proj`` or GPT-NeoX's ``query_key_value``/``dense``.
        prefix: its name in the model (a ``dict(model.named_modules())`` key), e.g.
            ``"transformer.h.0.attn"``.
        num_heads: query heads; ``None`` reads ``num_heads`` / ``num_attention_heads`` from the
            module or its ``config``.
        num_kv_heads: key/value heads (LLaMA layout only); ``None`` reads
            ``num_key_value_heads`` from the module or its ``config``, else ``num_heads``.

    Returns:
        ``{f"{prefix}.head{h}": [ParamSlice, ...]}`` for each head ``h``, or, when key/value heads
        are shared (``num_kv_heads < num_heads``), ``{f"{prefix}.kv{j}": ...}`` for each
        key/value head ``j`` with its query heads.

    Raises:
        ValueError: the module has none of these layouts, or its widths do not split into heads.
    """
    layout = _layout(module)
    if layout is None:
        raise ValueError(
            "Expected `module` to be an attention layer: an nn.MultiheadAttention with packed projections, or a "
            f"module with c_attn/c_proj, q_proj/k_proj/v_proj/o_proj or query_key_value/dense, got {type(module).__name__}."
        )
    if layout == "mha":
        heads = module.num_heads
    else:
        heads = _count(module, num_heads, "num_heads", ("num_heads", "num_attention_heads"))
        if heads is None:
            raise ValueError(
                f"Expected `num_heads` to be given: {type(module).__name__} has no num_heads or "
                "config.num_attention_heads."
            )
    return _BUILDERS[layout](module, prefix, heads, num_kv_heads)


def _name(prefix: str, kind: str, k: int) -> str:
    return f"{prefix}.{kind}{k}" if prefix else f"{kind}{k}"


def _mha(module: nn.MultiheadAttention, prefix: str, heads: int, _: Any) -> Dict[str, List[ParamSlice]]:
    e = module.embed_dim
    d = _features(e, heads, "embed_dim")
    out: Dict[str, List[ParamSlice]] = {}
    name = f"{prefix}." if prefix else ""
    for k in range(heads):
        rows = _rows(3 * e, [range(part * e + k * d, part * e + (k + 1) * d) for part in range(3)])
        slices = [ParamSlice(f"{name}in_proj_weight", rows[:, None].expand(3 * e, e).clone())]
        slices += _slices(prefix, "out_proj", module.out_proj, None, _rows(e, [range(k * d, (k + 1) * d)]))
        if module.in_proj_bias is not None:
            slices.append(ParamSlice(f"{name}in_proj_bias", rows.clone()))
        out[_name(prefix, "head", k)] = slices
    return out


def _gpt2(module: nn.Module, prefix: str, heads: int, _: Any) -> Dict[str, List[ParamSlice]]:
    d = _features(module.c_proj.nx, heads, "c_proj")
    cross = is_conv1d(getattr(module, "q_attn", None))
    parts = 2 if cross else 3  # c_attn holds [k | v] beside q_attn, else [q | k | v]
    if module.c_attn.nf != parts * heads * d:
        raise ValueError(f"Expected c_attn to have {parts} x {heads} x {d} output columns, got {module.c_attn.nf}.")
    out: Dict[str, List[ParamSlice]] = {}
    for k in range(heads):
        head = range(k * d, (k + 1) * d)
        cols = _rows(parts * heads * d, [range(p * heads * d + k * d, p * heads * d + (k + 1) * d) for p in range(parts)])
        slices = _slices(prefix, "c_attn", module.c_attn, cols, None)
        if cross:
            slices += _slices(prefix, "q_attn", module.q_attn, _rows(heads * d, [head]), None)
        slices += _slices(prefix, "c_proj", module.c_proj, None, _rows(heads * d, [head]))
        out[_name(prefix, "head", k)] = slices
    return out


def _llama(module: nn.Module, prefix: str, heads: int, num_kv_heads: Optional[int]) -> Dict[str, List[ParamSlice]]:
    d = _features(module.q_proj.out_features, heads, "q_proj")
    kv = _count(module, num_kv_heads, "num_kv_heads", ("num_key_value_heads", "num_kv_heads"))
    if kv is None:
        kv = module.k_proj.out_features // d
    if heads % kv or module.k_proj.out_features != kv * d or module.v_proj.out_features != kv * d:
        raise ValueError(
            f"Expected k_proj and v_proj to have {kv} key/value heads of size {d} that divide the {heads} query "
            f"heads, got widths {module.k_proj.out_features} and {module.v_proj.out_features}."
        )
    g = heads // kv
    out: Dict[str, List[ParamSlice]] = {}
    for j in range(kv):
        queries = _rows(heads * d, [range((j * g) * d, (j * g + g) * d)])  # query heads j*g .. j*g+g-1
        shared = _rows(kv * d, [range(j * d, (j + 1) * d)])
        slices = _slices(prefix, "q_proj", module.q_proj, queries, None)
        slices += _slices(prefix, "k_proj", module.k_proj, shared, None)
        slices += _slices(prefix, "v_proj", module.v_proj, shared.clone(), None)
        slices += _slices(prefix, "o_proj", module.o_proj, None, queries.clone())
        out[_name(prefix, "head" if g == 1 else "kv", j)] = slices
    return out


def _neox(module: nn.Module, prefix: str, heads: int, _: Any) -> Dict[str, List[ParamSlice]]:
    d = _features(module.dense.in_features, heads, "dense")
    if module.query_key_value.out_features != 3 * heads * d:
        raise ValueError(
            f"Expected query_key_value to have 3 x {heads} x {d} outputs, got {module.query_key_value.out_features}."
        )
    out: Dict[str, List[ParamSlice]] = {}
    for k in range(heads):
        rows = _rows(3 * heads * d, [range(3 * d * k, 3 * d * (k + 1))])  # interleaved: head k's q, k, v
        slices = _slices(prefix, "query_key_value", module.query_key_value, rows, None)
        slices += _slices(prefix, "dense", module.dense, None, _rows(heads * d, [range(k * d, (k + 1) * d)]))
        out[_name(prefix, "head", k)] = slices
    return out


_BUILDERS = {"mha": _mha, "gpt2": _gpt2, "llama": _llama, "neox": _neox}


def groups_by_head(model: nn.Module) -> Dict[str, List[ParamSlice]]:
    """:func:`attention_heads` for every attention layer of ``model`` that has a recognised
    layout, named by module path (e.g. ``"transformer.h.0.attn.head1"``).

    Raises:
        ValueError: ``model`` has no recognised attention layer.
    """
    out: Dict[str, List[ParamSlice]] = {}
    for name, module in model.named_modules():
        if _layout(module) is not None:
            out.update(attention_heads(module, name))
    if not out:
        raise ValueError(
            "Expected `model` to contain an attention layer (nn.MultiheadAttention, or c_attn/c_proj, "
            "q_proj/k_proj/v_proj/o_proj, query_key_value/dense), got none."
        )
    return out
