"""FalconH1ForCausalLM -> ZooLM (issue 19): attention and Mamba-2 in parallel in every layer, its muP multipliers
folded into weights or carried as branch scales and model fields. Equal logits (float32, 1e-4) and equal greedy
generate on small random configs: GQA, tied and untied, biases, the gated norm on and off, non-trivial multipliers."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits
from zoo.convert import from_transformers

transformers = pytest.importorskip("transformers")
V = 97
MULTIPLIERS = dict(embedding_multiplier=1.7, lm_head_multiplier=0.6, attention_in_multiplier=0.8,
                   attention_out_multiplier=1.3, key_multiplier=0.7, ssm_in_multiplier=1.2, ssm_out_multiplier=0.45,
                   ssm_multipliers=[0.9, 1.4, 0.6, 1.8, 0.5], mlp_multipliers=[1.5, 0.7])


def make(tied=False, bias=False, rms_norm=False, groups=1, n_layers=3, **kw):
    cfg = transformers.FalconH1Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, mamba_d_ssm=48, mamba_n_heads=6, mamba_d_head=8, mamba_n_groups=groups, mamba_d_state=8,
        mamba_d_conv=4, mamba_chunk_size=8, mamba_rms_norm=rms_norm, mamba_norm_before_gate=False,
        mamba_proj_bias=bias, projectors_bias=bias, attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tied,
        rms_norm_eps=1e-3, max_position_embeddings=256, eos_token_id=None, bos_token_id=None, **kw)
    # no EOS: with min_new_tokens transformers would mask token 2 (FalconH1Config's default EOS) and zoo not
    torch.manual_seed(0)
    hf = transformers.FalconH1ForCausalLM(cfg).eval()
    with torch.no_grad():  # every path visible: non-trivial D, dt bias, A, norm weights, biases
        for name, p in hf.named_parameters():
            if name.endswith(("D", "dt_bias", "A_log", "norm.weight", "layernorm.weight", ".bias")):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
            elif name.endswith("proj.weight"):   # larger than the 0.02 init, so each multiplier moves the logits
                p.normal_(0.0, 0.12)
    return hf


@pytest.mark.parametrize("tied,bias,rms_norm,groups,mult", [
    (False, False, False, 1, True),
    (True, True, True, 2, True),
    (False, True, True, 1, False),
    (True, False, False, 3, True),
], ids=["untied", "tied-bias-norm-groups", "plain-multipliers", "tied-3-groups"])
def test_logits_and_greedy_generate(tied, bias, rms_norm, groups, mult):
    hf = make(tied=tied, bias=bias, rms_norm=rms_norm, groups=groups, **(MULTIPLIERS if mult else {}))
    model = compare_logits(hf, V)
    layer = model.layers[0].mixer
    assert layer.branch_types == ["mamba2", "attn"] and model.recipe.layers[0].ffn.type == "swiglu"
    assert layer.branches[0].cfg.n_heads == 6 and layer.branches[0].cfg.norm == rms_norm
    if mult:
        assert layer.out_scales == [0.45, 1.3] and model.recipe.model.embedding_multiplier == 1.7
    compare_generate(hf, model, V)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "gelu", "hidden_act: zoo's mixers' convolutions and its SwiGLU use silu"),
    ("mamba_norm_before_gate", True, "mamba_norm_before_gate: true with mamba_rms_norm"),
    ("projectors_bias", True, "projectors_bias: True differs from mamba_proj_bias"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, "rope_parameters.rope_type"),
])
def test_unsupported_fields_are_named(field, value, message):
    hf = make(n_layers=1, rms_norm=True)
    setattr(hf.config, field, value)
    with pytest.raises(ValueError, match=message):
        from_transformers(hf)
