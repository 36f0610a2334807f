"""GraniteMoeHybridForCausalLM (Granite-4.0-H) -> ZooLM on small random configs: Mamba-2 / attention layer
patterns, attention without RoPE and with attention_multiplier as its scale (and with RoPE), GQA, tied and
untied, the embedding / residual / logits multipliers, dense (shared_mlp alone) and MoE; logits within 1e-4
of transformers' (float32) and greedy generate equal."""
import pytest
import torch

from zoo.convert import from_transformers
from zoo.hf import ZooForCausalLM

transformers = pytest.importorskip("transformers")
VOCAB = 101
M, A = "linear_attention", "full_attention"


def granite(layer_types, tied=False, kv_heads=2, experts=0, position=None, **extra):
    cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=40, shared_intermediate_size=48,
        num_hidden_layers=len(layer_types), layer_types=list(layer_types), num_attention_heads=4,
        num_key_value_heads=kv_heads, tie_word_embeddings=tied, num_local_experts=experts, num_experts_per_tok=2,
        position_embedding_type=position, embedding_multiplier=6.0, residual_multiplier=0.3, logits_scaling=4.0,
        attention_multiplier=0.05, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=8, max_position_embeddings=128, pad_token_id=0, **extra)
    torch.manual_seed(0)
    hf = transformers.GraniteMoeHybridForCausalLM(cfg).eval()
    with torch.no_grad():   # non-trivial D, dt_bias, norm weights and expert weights: every path shows
        for name, p in hf.named_parameters():
            if name.endswith(("mamba.D", "mamba.dt_bias")) or "experts" in name:
                p.normal_(0.0, 0.5 if "experts" not in name else 0.1)
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return hf


def check(hf):
    model = from_transformers(hf).eval()
    ids = torch.randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        want, got = hf(ids).logits, model(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"relative logit error {err:.2e}"
    prompt = torch.randint(1, VOCAB, (1, 9))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert ZooForCausalLM.from_zoo(model).generate(prompt, **kw).tolist() == hf.generate(prompt, **kw).tolist()
    return model


@pytest.mark.parametrize("types,tied,kv_heads", [
    ((M, M, A, M), False, 2),        # Granite-4.0-H's shape: mostly Mamba-2, attention every few layers
    ((A, M, M), True, 1),
    ((M, A, A, M), True, 4),
])
def test_dense(types, tied, kv_heads):
    model = check(granite(types, tied, kv_heads))
    m = model.recipe.model
    assert m.pattern == "".join("M" if t == M else "A" for t in types) and m.tie_embeddings == tied
    assert (m.embedding_multiplier, m.residual_multiplier, m.logits_divisor) == (6.0, 0.3, 4.0)
    attn = next(spec.cfg for spec in model.recipe.layers if spec.type == "attn")
    assert attn.rope_base is None and attn.scale == 0.05


def test_rope_attention():
    model = check(granite((A, M), position="rope",
                          rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    assert model.recipe.layers[0].cfg.rope_base == 500.0


@pytest.mark.parametrize("tied", [False, True])
def test_moe(tied):
    model = check(granite((M, A, M), tied, experts=4))
    assert model.recipe.layers[0].ffn.type == "moe" and model.recipe.layers[0].ffn.experts == 4


def test_time_step_limit_converts():
    model = check(granite((M, A), time_step_limit=(0.0, 2.0)))
    assert list(model.recipe.layers[0].cfg.dt_limit) == [0.0, 2.0]


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("position_embedding_type", "alibi")])
def test_unsupported_fields_are_refused_naming_them(field, value):
    hf = granite((M, A))
    setattr(hf.config, field, value)
    with pytest.raises(ValueError, match=f"^{field}: "):
        from_transformers(hf)


def test_unknown_layer_type_is_refused():
    hf = granite((M, A))
    hf.config.layer_types = [M, "sliding_attention"]
    with pytest.raises(ValueError, match="^layer_types: "):
        from_transformers(hf)


def test_left_padded_batch_generates_as_each_row_alone():
    from tests.test_hf import left_pad
    model = ZooForCausalLM.from_zoo(from_transformers(granite((M, A, M), experts=4)).eval())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (2, 9, 5)]
    ids, mask = left_pad(prompts)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)
        for r, p in enumerate(prompts):
            alone = model.generate(torch.tensor([p]), **kw)
            assert batch[r, ids.shape[1]:].tolist() == alone[0, len(p):].tolist(), f"row {r}"
