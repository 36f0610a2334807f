"""zoo.convert for JambaForCausalLM: small random transformers models (no downloads), several layer
patterns, GQA, tied and untied heads, biases on and off: logits within 1e-4 (float32), greedy generate
equal to transformers', the balance loss equal to transformers' for one MoE layer, unsupported fields
refused by name."""
import pytest
import torch

from tests.helpers import assert_close
from zoo.convert import from_transformers
from zoo.hf import ZooForCausalLM

transformers = pytest.importorskip("transformers")
VOCAB = 71


def jamba(**kw):
    fields = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, num_experts=4, num_experts_per_tok=2,
                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0,
                  mamba_d_state=4, mamba_d_conv=3, mamba_dt_rank=3, max_position_embeddings=512)
    fields.update(kw)
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(**fields)).eval()
    with torch.no_grad():  # norms, D and biases away from their init, so the comparison sees every path
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return hf


def logits_match(hf, tol=1e-4):
    model = from_transformers(hf).eval()
    ids = torch.randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        got = model(ids).logits
    assert_close(got, want, tol, "logits")
    return model


CONFIGS = {
    # every other layer attention and every other MoE (attention layers dense), untied
    "alternate": dict(),
    # Jamba's own layout: attention once in 8 at 4, MoE every other layer at 1; tied head, MHA
    "jamba_v0.1": dict(num_hidden_layers=8, attn_layer_period=8, attn_layer_offset=4, expert_layer_offset=1,
                       tie_word_embeddings=True,
                       num_key_value_heads=4),
    # MoE on attention layers too, top-1, projection biases, no conv bias
    "moe_everywhere": dict(num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=2, expert_layer_period=1,
                           expert_layer_offset=0, num_experts_per_tok=1, mamba_proj_bias=True, mamba_conv_bias=False),
    # a single expert: dense SwiGLU on every layer; periods that do not tile the depth (full pattern)
    "dense": dict(num_hidden_layers=5, num_experts=1, attn_layer_period=3, attn_layer_offset=0,
                  num_key_value_heads=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match(name):
    hf = jamba(**CONFIGS[name])
    model = logits_match(hf)
    c = hf.config
    kinds = [("attn" if t == "attention" else "mamba") for t in c.layers_block_type]
    assert [layer.block_type for layer in model.layers] == kinds
    assert [layer.ffn.cfg.type == "moe" for layer in model.layers] == [n > 1 for n in c.layers_num_experts]
    assert model.recipe.model.tie_embeddings == c.tie_word_embeddings


def test_pattern_is_one_period_when_it_tiles():
    model = from_transformers(jamba(**CONFIGS["jamba_v0.1"]))
    assert model.recipe.model.pattern == "MNMNANMN"
    assert from_transformers(jamba(**CONFIGS["dense"])).recipe.model.pattern == "AMMAM"


@pytest.mark.parametrize("name", ["alternate", "jamba_v0.1"])
def test_greedy_generate_matches_transformers(name):
    hf = jamba(**CONFIGS[name])
    model = from_transformers(hf).eval()
    ids = torch.randint(1, VOCAB, (1, 9))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = hf.generate(ids, **kw)
        got = ZooForCausalLM.from_zoo(model).generate(ids, **kw)
    assert got.tolist() == want.tolist()


def test_balance_loss_matches_transformers_for_one_moe_layer():
    hf = jamba(num_hidden_layers=2, expert_layer_period=2, expert_layer_offset=1, router_aux_loss_coef=0.02)
    model = from_transformers(hf)
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        want = hf(ids, use_cache=False, output_router_logits=True).aux_loss
        got = model(ids).aux_loss
    assert model.layers[1].ffn.cfg.aux_loss_weight == pytest.approx(0.02)
    assert_close(got, 0.02 * want, 1e-5, "aux_loss")


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "gelu", r"hidden_act: zoo's Mamba convolution and SwiGLU use silu, got 'gelu'"),
    ("attention_dropout", 0.1, r"attention_dropout: zoo's attention has no dropout, got 0.1"),
])
def test_unsupported_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        from_transformers(jamba(**{field: value}))
