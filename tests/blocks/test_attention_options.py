"""The attention options of issues 19, 25 and 26 on attn, blockwise, ring and swa: partial RoPE (`rope_dim`), no RoPE
(`rope_base: null`), the softmax scale override (`scale`), per-head q/k RMSNorm (`qk_norm`), the sigmoid
output gate (`output_gate`) and log-length query scaling (`logn_length`). Each against a dense float64 reference
that rotates with transformers' Bamba `apply_rotary_pos_emb` (the partial RoPE Bamba and Granite use),
the cache contract, packed documents, state bytes, and recipe validation naming the field."""
import math

import pytest
import torch

import zoo
from tests.helpers import (assert_close, cache_bytes, check_block_vs_reference, check_cache_contract, make_block,
                           run_chunks)
from zoo.config import RecipeError
from zoo.ops.attention import attention_ref

transformers = pytest.importorskip("transformers")
from transformers.models.bamba import modeling_bamba  # noqa: E402

D_MODEL = 24
SHAPES = {
    "attn": {"n_heads": 4, "n_kv_heads": 2},
    "blockwise": {"n_heads": 3, "head_dim": 10, "block_size": 5},
    "ring": {"n_heads": 2, "n_kv_heads": 1, "block_size": 4},
    "swa": {"n_heads": 4, "n_kv_heads": 2, "window": 6, "block_size": 4},
}
OPTIONS = {
    "partial": {"rope_dim": 2, "rope_base": 500.0},
    "half": {"rope_dim": 4},           # head_dim 6 (attn, swa), 10 (blockwise), 12 (ring): a different fraction each
    "nope": {"rope_base": None},
    "scale": {"scale": 0.37},
    "nope_scale": {"rope_base": None, "scale": 1.9},
    "partial_scale": {"rope_dim": 4, "scale": 0.05},
    "gated": {"qk_norm": True, "output_gate": True, "rope_dim": 2},   # Qwen3-Next's gated attention
    "qknorm_nope": {"qk_norm": True, "qk_norm_eps": 0.1, "rope_base": None},
    "qknorm_all": {"qk_norm": True, "qk_norm_scope": "all"},         # OLMo's: over all heads' channels
    "logn": {"logn_length": 3},   # queries past the third key sharpen (swa: up to its window of 6)
    "logn_nope_scale": {"logn_length": 5, "rope_base": None, "scale": 0.4},
}
CASES = [(b, o) for b in SHAPES for o in OPTIONS]


def make(block, option):
    return make_block(block, D_MODEL, **SHAPES[block], **OPTIONS[option])


def hf_rotated(q, k, head_dim, rope_dim, base, positions):
    """q, k [b, t, heads, hd] rotated by transformers' Bamba RoPE: inv_freq over rope_dim (its
    `dim * partial_rotary_factor`), `apply_rotary_pos_emb` on the first rope_dim dims. Angles in float64,
    cos and sin rounded to float32 as both transformers and zoo hold them, then applied in q's dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    freqs = positions.to(torch.float64)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = (t.float().to(q.dtype)[None] for t in (emb.cos(), emb.sin()))
    qh, kh = modeling_bamba.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qh.transpose(1, 2), kh.transpose(1, 2)


def dense_forward(block, x):
    b, t, _ = x.shape
    hd, cfg = block.head_dim, block.cfg
    q, k, v = (proj(x).view(b, t, -1, hd) for proj in (block.q_proj, block.k_proj, block.v_proj))
    if cfg.qk_norm and cfg.qk_norm_scope == "all":
        q, k = (y.reshape(b, t, -1) for y in (q, k))
        q, k = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.qk_norm_eps) * norm.weight
                for y, norm in ((q, block.q_norm), (k, block.k_norm)))
        q, k = (y.view(b, t, -1, hd) for y in (q, k))
    elif cfg.qk_norm:   # written out: x / sqrt(mean x^2 + eps) * w over each head's dims
        q, k = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.qk_norm_eps) * norm.weight
                for y, norm in ((q, block.q_norm), (k, block.k_norm)))
    if cfg.logn_length is not None:   # written out: each query times max(1, log(keys it sees) / log(logn_length))
        seen = [min(i + 1, getattr(cfg, "window", None) or t) for i in range(t)]
        q = q * torch.tensor([max(1.0, math.log(n) / math.log(cfg.logn_length)) for n in seen],
                             dtype=q.dtype)[None, :, None, None]
    if cfg.rope_base is not None:
        q, k = hf_rotated(q, k, hd, cfg.rope_dim or hd, cfg.rope_base, torch.arange(t))
    scale = cfg.scale if cfg.scale is not None else 1 / math.sqrt(hd)
    out = attention_ref(q, k, v, causal=True, window=getattr(cfg, "window", None), scale=scale)
    if cfg.output_gate:
        out = out * torch.sigmoid(block.gate_proj(x)).view(b, t, -1, hd)
    return block.out_proj(out.reshape(b, t, -1))


@pytest.mark.parametrize("block,option", CASES)
@pytest.mark.parametrize("length", [1, 13])
def test_block_matches_dense_reference(block, option, length):
    check_block_vs_reference(make(block, option), dense_forward, torch.randn(2, length, D_MODEL, dtype=torch.float64))


@pytest.mark.parametrize("block,option", CASES)
def test_cache_contract(block, option):
    x = torch.randn(2, 17, D_MODEL, dtype=torch.float64)
    check_cache_contract(make(block, option), x, splits=((1,), (4, 7), (17,)))


@pytest.mark.parametrize("block,option", [("attn", "partial"), ("swa", "nope_scale"), ("blockwise", "partial_scale")])
def test_state_bytes_equals_cache_bytes(block, option):
    b = make(block, option)
    with torch.no_grad():
        _, cache = run_chunks(b, torch.randn(1, 9, D_MODEL, dtype=torch.float64), [4])
    assert cache_bytes(cache) == b.state_bytes(9, batch_size=1, dtype=torch.float64)


@pytest.mark.parametrize("block,option", [("attn", "partial_scale"), ("swa", "half"), ("ring", "nope_scale"),
                                          ("attn", "logn"), ("swa", "logn_nope_scale")])
def test_packed_documents_equal_each_alone(block, option):
    b = make(block, option)
    lengths = [5, 1, 8]
    seq_idx = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor(lengths))[None]
    x = torch.randn(1, sum(lengths), D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        packed = b(x, seq_idx=seq_idx)
        starts = [0, 5, 6]
        alone = torch.cat([b(x[:, s:s + n]) for s, n in zip(starts, lengths)], 1)
    assert_close(packed, alone, 1e-10)


def test_no_rope_is_position_blind_and_scale_changes_the_output():
    """Without RoPE and with a causal mask the last token's output is invariant to permuting the earlier
    tokens; with RoPE it is not. A different scale gives a different output."""
    x = torch.randn(1, 7, D_MODEL, dtype=torch.float64)
    perm = torch.cat([torch.tensor([3, 0, 5, 1, 4, 2]), torch.tensor([6])])
    nope, rope = make("attn", "nope"), make("attn", "scale")
    with torch.no_grad():
        assert_close(nope(x[:, perm])[:, -1], nope(x)[:, -1], 1e-12)
        assert rope(x[:, perm])[:, -1].sub(rope(x)[:, -1]).abs().max() > 1e-3
        other = make_block("attn", D_MODEL, **SHAPES["attn"], scale=0.9)
        other.load_state_dict(rope.state_dict())
        assert other(x).sub(rope(x)).abs().max() > 1e-3


def test_zoo_rope_equals_bamba_rotary_embedding():
    """zoo's cos / sin at rope_dim are transformers' BambaRotaryEmbedding with partial_rotary_factor."""
    from transformers import BambaConfig
    from zoo.ops.rope import rope_cos_sin
    cfg = BambaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5})
    rotary = modeling_bamba.BambaRotaryEmbedding(cfg)
    positions = torch.arange(40)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    zcos, zsin = rope_cos_sin(positions, 8, 1000.0)
    assert cos.shape[-1] == 8
    assert_close(zcos, cos[0], 1e-5)
    assert_close(zsin, sin[0], 1e-5)


def _recipe(**block):
    return {"model": {"d_model": 32, "n_layers": 1, "vocab_size": 16, "pattern": "A",
                      "blocks": {"A": {"type": "attn", "n_heads": 4, **block}}}, "train": {"seq_len": 16}}


@pytest.mark.parametrize("block,match", [
    ({"rope_dim": 3}, r"model\.blocks\.A\.rope_dim: must be null .* even"),
    ({"rope_dim": 16}, r"model\.blocks\.A\.rope_dim: 16 exceeds head_dim 8"),
    ({"rope_dim": 4, "rope_base": None}, r"model\.blocks\.A\.rope_dim: 4 given with rope_base null"),
    ({"rope_base": 0.5}, r"model\.blocks\.A\.rope_base: must be null \(no RoPE\) or > 1"),
    ({"scale": 0.0}, r"model\.blocks\.A\.scale: must be null"),
    ({"scale": -1.0}, r"model\.blocks\.A\.scale: must be null"),
    ({"head_dim": 7}, r"model\.blocks\.A\.head_dim: must be even when RoPE rotates all of it"),
    ({"logn_length": 1}, r"model\.blocks\.A\.logn_length: must be null \(off\) or an integer >= 2, got 1"),
    ({"logn_length": True}, r"model\.blocks\.A\.logn_length: .*True"),   # OmegaConf refuses a bool
])
def test_recipe_errors_name_the_field(block, match):
    with pytest.raises(RecipeError, match=match):
        zoo.load_recipe(_recipe(**block))


def test_logn_length_changes_only_the_queries_past_it():
    """Up to logn_length keys the block is the one without the option, bit for bit; past it the outputs differ."""
    x = torch.randn(1, 12, D_MODEL, dtype=torch.float64)
    plain, logn = make("attn", "scale"), make_block("attn", D_MODEL, **SHAPES["attn"], scale=0.37, logn_length=8)
    logn.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain(x), logn(x)
    assert torch.equal(a[:, :8], b[:, :8]) and (a[:, 8:] - b[:, 8:]).abs().amin(-1).gt(0).all()


def test_odd_head_dim_is_fine_without_full_rope():
    for block in ({"head_dim": 7, "rope_base": None}, {"head_dim": 7, "rope_dim": 4}):
        model = zoo.build_model(_recipe(**block))
        assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 16)


def test_recipe_round_trips_the_options():
    recipe = zoo.load_recipe(_recipe(rope_base=None, scale=0.25))
    again = zoo.load_recipe(recipe.to_dict())
    assert again.layers[0].cfg.rope_base is None and again.layers[0].cfg.scale == 0.25
    recipe = zoo.load_recipe(_recipe(rope_dim=4, rope_base=100.0))
    assert zoo.load_recipe(recipe.to_dict()).layers[0].cfg.rope_dim == 4


@pytest.mark.parametrize("block", ["infini", "selective"])
@pytest.mark.parametrize("field,value", [("rope_dim", 4), ("scale", 0.5), ("rope_base", None), ("qk_norm", True),
                                         ("output_gate", True), ("logn_length", 64)])
def test_attention_families_without_the_options_refuse_them(block, field, value):
    extra = {"segment_len": 4} if block == "infini" else {}
    spec = {"type": block, "n_heads": 4, field: value, **extra}
    raw = {"model": {"d_model": 32, "n_layers": 1, "vocab_size": 16, "pattern": "A", "blocks": {"A": spec}},
           "train": {"seq_len": 16}}
    with pytest.raises(RecipeError, match=rf"model\.blocks\.A\.{field}: .*not supported by the {block} block"):
        zoo.load_recipe(raw)
