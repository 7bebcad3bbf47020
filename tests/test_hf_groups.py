"""Per-head and per-layer groups on ``transformers`` models (tiny, random, built from configs):
every head's slices select exactly the weights that act on that head, tied weights are grouped
once, and the groups run in :class:`OnlineLLC`."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from online_llc import OnlineLLC  # noqa: E402
from online_llc.models.groups import groups_by_child, groups_by_linear, resolve_group_masks
from online_llc.models.heads import (
    ParamSlice,
    attention_heads,
    groups_by_head,
    is_conv1d,  # noqa: E402
)
from online_llc.models.losses import causal_lm_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(kv_heads: int) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def neox() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                     attention_bias=True)
    return transformers.GPTNeoXForCausalLM(cfg).eval()


# (model, its first attention layer's name, the output projection's name in it, heads per group name)
MODELS = {
    "gpt2": (gpt2, "transformer.h.0.attn", "c_proj"),
    "llama_gqa": (lambda: llama(2), "model.layers.0.self_attn", "o_proj"),
    "llama_mha": (lambda: llama(4), "model.layers.0.self_attn", "o_proj"),
    "neox": (neox, "gpt_neox.layers.0.attention", "dense"),
}


def tokens(batch: int = 4, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def proj_features(mask: torch.Tensor, proj: nn.Module) -> set:
    """The input features of the output projection that a mask covers entirely."""
    per_input = mask.all(1) if is_conv1d(proj) else mask.all(0)  # Conv1D weight [in, out]; Linear [out, in]
    return set(torch.nonzero(per_input).flatten().tolist())


def run_capturing_proj_input(model: nn.Module, proj: nn.Module, params: Dict[str, torch.Tensor], ids: torch.Tensor):
    seen: List[torch.Tensor] = []
    handle = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            torch.func.functional_call(model, params, (ids,), strict=False)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", list(MODELS))
def test_each_heads_slices_act_on_that_head_only(kind):
    """Perturbing one group's query/key/value slices changes exactly that group's features at the
    output projection's input (the model's own reshape decides which); perturbing its slice of the
    output projection changes nothing once those features are zeroed. The groups cover every
    weight of the projections (but the output bias) exactly once."""
    build, prefix, proj_name = MODELS[kind]
    model = build()
    modules = dict(model.named_modules())
    attn, proj = modules[prefix], modules[f"{prefix}.{proj_name}"]
    heads = attention_heads(attn, prefix)
    expected_groups = {"gpt2": 2, "llama_gqa": 2, "llama_mha": 4, "neox": 4}[kind]
    assert len(heads) == expected_groups
    if kind == "llama_gqa":
        assert list(heads) == [f"{prefix}.kv0", f"{prefix}.kv1"]
    else:
        assert list(heads) == [f"{prefix}.head{h}" for h in range(expected_groups)]
    params = dict(model.named_parameters())
    ids = tokens()
    base = run_capturing_proj_input(model, proj, params, ids)
    width = base.shape[-1]
    proj_weight = f"{prefix}.{proj_name}.weight"
    covered: Dict[str, torch.Tensor] = {}
    seen_features: set = set()
    g = torch.Generator().manual_seed(1)
    for name, slices in heads.items():
        feats = proj_features(next(s.mask for s in slices if s.name == proj_weight), proj)
        assert feats and not (feats & seen_features)
        seen_features |= feats
        moved = dict(params)
        for s in slices:
            covered[s.name] = covered.get(s.name, torch.zeros_like(s.mask)) | s.mask
            if s.name != proj_weight and not s.name.startswith(f"{prefix}.{proj_name}."):
                moved[s.name] = params[s.name] + 0.5 * torch.randn(s.mask.shape, generator=g) * s.mask
        out = run_capturing_proj_input(model, proj, moved, ids)
        changed = set(torch.nonzero((out - base).abs().amax(dim=(0, 1)) > 1e-6).flatten().tolist())
        assert changed == feats, (name, sorted(changed), sorted(feats))
        # The output projection's slice multiplies exactly these features.
        mask = next(s.mask for s in slices if s.name == proj_weight)
        x = torch.randn(3, width, generator=g)
        delta = {"weight": params[proj_weight] + torch.randn(mask.shape, generator=g) * mask}
        with torch.no_grad():
            assert not torch.allclose(torch.func.functional_call(proj, delta, (x,)), proj(x))
            x[:, sorted(feats)] = 0
            assert torch.allclose(torch.func.functional_call(proj, delta, (x,)), proj(x), atol=1e-6)
    assert seen_features == set(range(width))
    for name, mask in covered.items():
        assert bool(mask.all()), f"{name} not fully covered"
    assert f"{prefix}.{proj_name}.bias" not in covered  # shared by all heads
    resolve_group_masks(model, heads)  # disjoint and resolvable


def test_gqa_group_holds_its_query_heads_and_shared_key_value_head():
    """LLaMA with 4 query heads sharing 2 key/value heads: group j holds query heads 2j and 2j+1
    (``repeat_kv``: query head h reads key/value head h // 2) and key/value head j."""
    model = llama(2)
    attn = model.model.layers[0].self_attn
    heads = attention_heads(attn, "a")
    d = attn.head_dim
    for j, name in enumerate(["a.kv0", "a.kv1"]):
        masks = {s.name: s.mask for s in heads[name]}
        q_rows = torch.nonzero(masks["a.q_proj.weight"].all(1)).flatten().tolist()
        k_rows = torch.nonzero(masks["a.k_proj.weight"].all(1)).flatten().tolist()
        assert q_rows == list(range(2 * j * d, (2 * j + 2) * d))
        assert k_rows == list(range(j * d, (j + 1) * d))
        assert torch.equal(masks["a.v_proj.weight"], masks["a.k_proj.weight"])
    with pytest.raises(ValueError, match=r"Expected k_proj and v_proj to have 3 key/value heads"):
        attention_heads(attn, "a", num_kv_heads=3)


def test_gpt2_cross_attention_layout():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16, add_cross_attention=True)
    model = transformers.GPT2LMHeadModel(cfg)
    cross = model.transformer.h[0].crossattention
    heads = attention_heads(cross, "x")
    names = [s.name for s in heads["x.head0"]]
    assert names == ["x.c_attn.weight", "x.c_attn.bias", "x.q_attn.weight", "x.q_attn.bias", "x.c_proj.weight"]
    cols = heads["x.head1"][0].mask.all(0)  # Conv1D [in, out]: k then v output columns
    assert torch.nonzero(cols).flatten().tolist() == list(range(8, 16)) + list(range(24, 32))


def test_tied_lm_head_is_grouped_once():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert groups_by_child(model) == {"transformer": ["transformer.*"]}
    linear = groups_by_linear(model)
    assert linear["transformer.h.0.attn.c_attn"] == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"]
    assert linear["lm_head"] == ["transformer.wte.weight"]
    assert len(linear) == 2 * 4 + 1  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per layer, and the head
    resolve_group_masks(model, linear)
    resolve_group_masks(model, groups_by_child(model))
    with pytest.raises(ValueError, match=r"'lm_head\.weight' is tied to 'transformer\.wte\.weight'"):
        resolve_group_masks(model, {"head": ["lm_head.*"]})
    with pytest.raises(ValueError, match=r"in both 'emb' and 'head' \(tied as 'lm_head\.weight'\)"):
        resolve_group_masks(model, {"emb": ["transformer.wte.*"], "head": [model.lm_head]})


@pytest.mark.parametrize("kind", list(MODELS))
def test_head_groups_run_in_the_monitor(kind):
    """Every attention head of both layers (plus the rest of the model as one group) resolves in
    OnlineLLC; a few shadow steps run; a group's chain moves only inside its masks."""
    build, prefix, proj_name = MODELS[kind]
    model = build().train()
    heads = groups_by_head(model)
    assert len(heads) == 2 * len(attention_heads(dict(model.named_modules())[prefix], prefix))
    monitor = OnlineLLC(model, causal_lm_loss, num_samples=256, every_n_steps=1, window=2, warmup=0,
                        groups=heads, group_budget=len(heads), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for s in range(4):
        monitor.update({"input_ids": tokens(seed=s), "attention_mask": torch.ones(4, 7, dtype=torch.long)}, step=s + 1)
    assert len(monitor.history()) == 2
    assert all(len(monitor.group_history(n)) == 2 for n in heads)
    name = next(iter(heads))
    track = monitor._group(name)
    for s in heads[name]:
        offset = track.sampler.offsets[0][s.name]
        assert bool((offset[~s.mask] == 0).all()) and bool((offset[s.mask] != 0).any()), s.name
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_attention_heads_errors_name_the_argument():
    model = gpt2()
    with pytest.raises(ValueError, match=r"Expected `module` to be an attention layer"):
        attention_heads(model.transformer.h[0].mlp, "mlp")
    with pytest.raises(ValueError, match=r"Expected `num_heads` to be a positive int, got 0\."):
        attention_heads(model.transformer.h[0].attn, "a", num_heads=0)
    with pytest.raises(ValueError, match=r"Expected c_proj's width 32 to be divisible by the 3 heads"):
        attention_heads(model.transformer.h[0].attn, "a", num_heads=3)
    assert isinstance(attention_heads(model.transformer.h[0].attn, "a")["a.head0"][0], ParamSlice)
