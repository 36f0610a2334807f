"""Qwen3NextForCausalLM imported: logits within 1e-4 of transformers' (float32) and greedy generate equal, on
random small configs with several layer patterns (Gated DeltaNet and gated attention, MoE and dense layers,
shared key heads, partial RoPE)."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits

transformers = pytest.importorskip("transformers")
V = 97
A, L = "full_attention", "linear_attention"


def make(layer_types, experts=4, mlp_only=(), sparse_step=1, tied=False, k_heads=2, v_heads=4, **kw):
    cfg = transformers.Qwen3NextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=len(layer_types),
        layer_types=list(layer_types), num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=6, linear_num_key_heads=k_heads,
        linear_num_value_heads=v_heads, num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=12,
        shared_expert_intermediate_size=16, mlp_only_layers=list(mlp_only), decoder_sparse_step=sparse_step,
        tie_word_embeddings=tied, max_position_embeddings=256, rms_norm_eps=1e-5, **kw)
    torch.manual_seed(0)
    hf = transformers.Qwen3NextForCausalLM(cfg).eval()
    with torch.no_grad():   # every path visible: norms away from zero (1 + w), decays, experts, biases
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "dt_bias", "A_log")) or "experts" in name:
                p.normal_(0.0, 0.3)
            elif name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.1)
    return hf


@pytest.mark.parametrize("layer_types,kw", [
    ([L, L, L, A], {}),                                               # Qwen3-Next's 3 : 1
    ([L, A, L], {"mlp_only": [1], "tied": True}),                     # a dense layer among MoE ones
    ([A, L], {"experts": 0, "k_heads": 4}),                           # no experts; one key head per value head
    ([L, L, A, L], {"sparse_step": 2, "rope_parameters": {"rope_theta": 500.0, "partial_rotary_factor": 0.5,
                                                           "rope_type": "default"}}),
])
def test_logits_and_generate_equal_transformers(layer_types, kw):
    hf = make(layer_types, **kw)
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)


def test_the_recipe_says_what_was_imported():
    from zoo.convert import from_transformers
    model = from_transformers(make([L, L, L, A], mlp_only=[2]))
    r = model.recipe
    assert r.model.pattern == "GGgA"
    g, a = r.model.blocks["G"], r.model.blocks["A"]
    assert g["type"] == "gated_deltanet" and (g["n_heads"], g["n_k_heads"], g["head_v_dim"]) == (4, 2, 6)
    assert a["qk_norm"] and a["output_gate"] and a["rope_dim"] == 2      # partial_rotary_factor 0.25 of 8
    assert g["ffn"]["shared_gate"] and r.model.blocks["g"]["ffn"]["type"] == "swiglu"


def test_fields_zoo_cannot_express_are_refused_by_name():
    from zoo.convert import from_transformers
    with pytest.raises(ValueError, match="hidden_act: "):
        from_transformers(make([L, A], hidden_act="gelu"))


QWEN35 = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, layer_types=[L, L, A], num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, linear_conv_kernel_dim=4, linear_key_head_dim=8,
              linear_value_head_dim=6, linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=256)


def _randomised(hf):
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "dt_bias", "A_log")) or "experts" in name:
                p.normal_(0.0, 0.3)
            elif name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.1)
    return hf.eval()


@pytest.mark.parametrize("moe", [False, True])
def test_qwen3_5_text_models_equal_transformers(moe):
    """Qwen3.5 (dense) and Qwen3.5-MoE: separate q|k|v, z, b, a projections; every layer MoE in the latter."""
    torch.manual_seed(0)
    if moe:
        cfg = transformers.Qwen3_5MoeTextConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                                                shared_expert_intermediate_size=16, **QWEN35)
        hf = _randomised(transformers.Qwen3_5MoeForCausalLM(cfg))
    else:
        hf = _randomised(transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(intermediate_size=40,
                                                                                        **QWEN35)))
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)
    assert model.recipe.model.pattern == ("GGA" if moe else "gga")
