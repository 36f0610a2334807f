"""NemotronHForCausalLM -> ZooLM: equal logits (float32, 1e-4) and equal greedy generate on small random configs;
MLP layers become `none` + relu2 layers, Mamba-2's width is heads x head_dim, MoE layers are refused."""
import dataclasses
import typing

import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits
from zoo.blocks.attention.config import AttnConfig
from zoo.convert import from_transformers

transformers = pytest.importorskip("transformers")
V = 89
NOPE = type(None) in typing.get_args(typing.get_type_hints(AttnConfig)["rope_base"])


def make(pattern, tied=False, groups=2, bias=False, **kw):
    cfg = transformers.NemotronHConfig(
        hidden_size=32, layers_block_type=pattern, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        intermediate_size=40, ssm_state_size=8, mamba_num_heads=6, mamba_head_dim=8, n_groups=groups, conv_kernel=4,
        chunk_size=8, use_conv_bias=True, use_bias=bias, mlp_bias=bias, vocab_size=V, tie_word_embeddings=tied,
        layer_norm_epsilon=1e-4, **kw)
    torch.manual_seed(0)
    hf = transformers.NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("D", "norm.weight", "norm_f.weight", ".bias")):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return hf


M, A, F = "linear_attention", "full_attention", "mlp"


@pytest.mark.parametrize("pattern,tied,bias", [([M, F, M, F], False, False), ([F, M, M, F, F, M], True, True)])
def test_mamba_and_mlp_layers(pattern, tied, bias):
    hf = make(pattern, tied=tied, bias=bias)
    with torch.no_grad():   # softplus(dt + dt_bias) on both sides of time_step_min, which the forward clamps at
        for i, kind in enumerate(pattern):
            if kind == M:
                hf.model.layers[i].mixer.dt_bias.normal_(-6.5, 1.0)
    model = compare_logits(hf, V)
    layers = model.recipe.layers
    assert [l.type for l in layers] == ["mamba2" if k == M else "none" for k in pattern]
    mamba = next(l for l in layers if l.type == "mamba2")
    assert mamba.cfg.n_heads == 6 and model.layers[pattern.index(M)].mixer.d_inner == 48 != 2 * 32
    assert mamba.cfg.dt_limit[0] == hf.config.time_step_min and mamba.cfg.norm_eps == 1e-4
    assert next(l for l in layers if l.type == "none").ffn.type == "relu2"
    # transformers' Nemotron-H never ties its head (tie_word_embeddings notwithstanding), so neither does zoo
    assert not model.recipe.model.tie_embeddings and model.lm_head.weight is not model.embed.weight


@pytest.mark.parametrize("pattern,tied", [([M, F, M, F], True), ([F, M, F, M, M, F], False)])
def test_generate_equals_greedy_transformers(pattern, tied):
    # dt_bias 1 keeps the steps above time_step_min: transformers' one-token step skips the clamp its
    # prefill applies (zoo applies it in both), so only unclamped steps decode alike
    hf = make(pattern, tied=tied)
    with torch.no_grad():
        for i, kind in enumerate(pattern):
            if kind == M:
                hf.model.layers[i].mixer.dt_bias.fill_(1.0)
    model = compare_logits(hf, V)
    compare_generate(hf, model, V, hf_generate=False)   # transformers' generate needs an attention layer


@pytest.mark.parametrize("pattern,tied", [([M, F, A, F], False), ([A, M, F, M, A, F], True)])
def test_attention_layers(pattern, tied):
    hf = make(pattern, tied=tied, groups=1)
    if not NOPE:
        with pytest.raises(ValueError, match="full_attention \\(no RoPE\\): zoo's attn block cannot express it yet"):
            from_transformers(hf)
        return
    with torch.no_grad():
        for i, kind in enumerate(pattern):
            if kind == M:
                hf.model.layers[i].mixer.dt_bias.fill_(1.0)
    model = compare_logits(hf, V)
    assert [l.type for l in model.recipe.layers].count("attn") == pattern.count(A)
    compare_generate(hf, model, V)


def test_moe_layers_are_refused():
    hf = make([M, "moe", F, M], n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              moe_shared_expert_intermediate_size=16)
    with pytest.raises(ValueError, match="layers_block_type: 'moe' layers do not convert"):
        from_transformers(hf)


@pytest.mark.parametrize("field,value", [("mlp_hidden_act", "gelu"), ("mamba_hidden_act", "relu")])
def test_unsupported_activations_are_named(field, value):
    hf = make([M, F])
    setattr(hf.config, field, value)
    with pytest.raises(ValueError, match=f"{field}:"):
        from_transformers(hf)
