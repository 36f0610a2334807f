"""BambaForCausalLM -> ZooLM: equal logits (float32, 1e-4) and equal greedy generate on small random configs."""
import dataclasses

import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits
from zoo.blocks.attention.config import AttnConfig
from zoo.convert import from_transformers

transformers = pytest.importorskip("transformers")
V = 97
PARTIAL_ROPE = "rope_dim" in {f.name for f in dataclasses.fields(AttnConfig)}


def make(attn_layers, tied=False, groups=1, bias=False, n_layers=4, **kw):
    cfg = transformers.BambaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, attn_layer_indices=attn_layers, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=groups,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, mamba_proj_bias=bias,
        attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tied, rms_norm_eps=1e-3, **kw)
    torch.manual_seed(0)
    hf = transformers.BambaForCausalLM(cfg).eval()
    with torch.no_grad():  # every path visible: non-trivial D, dt bias, norm weights, biases
        for name, p in hf.named_parameters():
            if name.endswith(("D", "dt_bias", "norm.weight", "layernorm.weight", ".bias")):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return hf


@pytest.mark.parametrize("tied,groups,bias", [(False, 1, False), (True, 2, True)])
def test_all_mamba_layers(tied, groups, bias):
    hf = make([], tied=tied, groups=groups, bias=bias)
    model = compare_logits(hf, V)
    cfg = model.recipe.layers[0].cfg
    assert cfg.norm_eps == 1e-3 and cfg.n_heads == 8 and model.recipe.layers[0].ffn.type == "swiglu"
    compare_generate(hf, model, V, hf_generate=False)


@pytest.mark.parametrize("attn_layers,tied,bias", [([1], False, False), ([0, 3], True, True), ([1, 2], False, True)])
def test_hybrid_layers(attn_layers, tied, bias):
    hf = make(attn_layers, tied=tied, bias=bias)
    if not PARTIAL_ROPE:
        with pytest.raises(ValueError, match="partial_rotary_factor: zoo's attn block cannot express it yet"):
            from_transformers(hf)
        return
    model = compare_logits(hf, V)
    assert [l.type for l in model.recipe.layers] == ["attn" if i in attn_layers else "mamba2" for i in range(4)]
    compare_generate(hf, model, V)


@pytest.mark.parametrize("field,value,message", [
    ("z_loss_coefficient", 0.1, "z_loss_coefficient: zoo's loss has no z-loss"),
    ("hidden_act", "gelu", "hidden_act: zoo's mixers' convolutions and its SwiGLU use silu"),
])
def test_unsupported_fields_are_named(field, value, message):
    hf = make([], n_layers=2)
    setattr(hf.config, field, value)
    with pytest.raises(ValueError, match=message):
        from_transformers(hf)


def test_time_step_limit_becomes_dt_limit():
    hf = make([], n_layers=2, time_step_limit=(0.5, 2.0))
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mamba.dt_bias.normal_(0.5, 1.0)   # steps on both sides of the limits
    model = compare_logits(hf, V)
    assert model.recipe.layers[0].cfg.dt_limit == [0.5, 2.0]
