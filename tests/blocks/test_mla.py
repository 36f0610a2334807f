"""Multi-head latent attention (`mla`): against a dense softmax written out (float64, every gradient), the cache
contract with the latent cache's bytes, packed documents, left-padded generation, and its fields' errors. Context
parallel: tests/distributed/test_cp_blocks.py."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import (check_block_vs_reference, check_cache_contract, check_left_padded_generation,
                           make_block)

F64 = torch.float64
CFG = dict(n_heads=3, kv_lora_rank=7, qk_nope_head_dim=5, qk_rope_head_dim=3, v_head_dim=6)


def dense(block, x):
    cfg = block.cfg
    b, t, _ = x.shape
    q = block.q_proj(x) if cfg.q_lora_rank is None else block.q_b_proj(
        F.rms_norm(block.q_a_proj(x), (cfg.q_lora_rank,), block.q_a_norm.weight, cfg.norm_eps))
    q = q.view(b, t, cfg.n_heads, -1)
    latent, k_rope = block.kv_a_proj(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
    latent = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * block.kv_a_norm.weight
    k_nope, v = block.kv_b_proj(latent).view(b, t, cfg.n_heads, -1).split([cfg.qk_nope_head_dim, cfg.v_head_dim], -1)
    k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, cfg.n_heads, -1)], -1)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** 0.5
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
    return block.out_proj(out.reshape(b, t, -1))


@pytest.mark.parametrize("cfg", [CFG, {**CFG, "q_lora_rank": 4, "bias": True}, {**CFG, "qk_rope_head_dim": 0}])
def test_block_equals_dense_softmax(cfg):
    torch.manual_seed(0)
    check_block_vs_reference(make_block("mla", 12, **cfg), dense, torch.randn(2, 11, 12, dtype=F64))


def test_cache_keeps_the_latent():
    torch.manual_seed(1)
    block = make_block("mla", 12, **CFG)
    x = torch.randn(2, 17, 12, dtype=F64)
    check_cache_contract(block, x, splits=((1,), (3, 5), (17,)))
    cache = block.init_cache(2, dtype=F64)
    with torch.no_grad():
        block(x, cache=cache)
    assert cache.nbytes() == block.state_bytes(17, batch_size=2, dtype=F64) == 2 * 17 * (7 + 3) * 8


def test_packed_documents_and_left_padded_generation():
    torch.manual_seed(2)
    block = make_block("mla", 12, **CFG)
    x = torch.randn(1, 14, 12, dtype=F64)
    with torch.no_grad():
        packed = block(x, seq_idx=torch.tensor([[0] * 6 + [1] * 8]))
        alone = torch.cat([block(x[:, :6]), block(x[:, 6:])], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-12)
    check_left_padded_generation({
        "name": "mla", "model": {"d_model": 16, "n_layers": 2, "vocab_size": 32, "pattern": "MD",
                                 "blocks": {"M": {"type": "mla", **CFG}, "D": {"type": "kda", "n_heads": 2,
                                                                               "head_k_dim": 8}}},
        "train": {"seq_len": 32}})


@pytest.mark.parametrize("fields,message", [
    ({"rope_base": 10000.0}, r"rope_base: 10000.0 .* is not implemented; allowed: null"),
    ({"kv_lora_rank": 0}, r"kv_lora_rank: must be an integer >= 1, got 0"),
    ({"q_lora_rank": 0}, r"q_lora_rank: must be null or an integer >= 1"),
])
def test_bad_fields_name_the_field(fields, message):
    spec = {"type": "mla", **CFG, **fields}
    with pytest.raises(zoo.RecipeError, match=r"model.blocks.M." + message):
        zoo.load_recipe({"model": {"d_model": 16, "n_layers": 1, "vocab_size": 8, "pattern": "M", "blocks": {"M": spec}},
                         "train": {"seq_len": 16}})
