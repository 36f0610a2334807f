"""The delta-rule blocks (deltanet, gated_deltanet, kda): the block against the same math written out with the
op's token loop (float64, every gradient), the cache contract and state_bytes, packed documents, left-padded
generation, shared key heads, and the fields' errors. Context parallel: tests/distributed/test_cp_blocks.py."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import (check_block_vs_reference, check_cache_contract, check_left_padded_generation, make_block,
                           train_losses)
from zoo.ops.delta import delta_rule_ref

BLOCKS = ["deltanet", "gated_deltanet", "kda"]
F64 = torch.float64


def reference(block, x):
    """The block written out: projections, a depthwise causal conv as F.conv1d with left zeros, SiLU, the
    decay, the token loop, the per-head norm and gate."""
    cfg = block.cfg
    b, t, _ = x.shape
    mixed = torch.cat([block.q_proj(x), block.k_proj(x), block.v_proj(x)], -1).transpose(1, 2)
    mixed = F.silu(F.conv1d(F.pad(mixed, (cfg.d_conv - 1, 0)), block.conv1d.weight, block.conv1d.bias,
                            groups=block.conv_dim)).transpose(1, 2)
    q, k, v = mixed.split([block.key_dim, block.key_dim, block.value_dim], -1)
    rep = cfg.n_heads // cfg.k_heads
    q = q.reshape(b, t, cfg.k_heads, cfg.head_k_dim).repeat_interleave(rep, 2)
    k = k.reshape(b, t, cfg.k_heads, cfg.head_k_dim).repeat_interleave(rep, 2)
    v = v.reshape(b, t, cfg.n_heads, cfg.v_dim)
    beta = torch.sigmoid(block.b_proj(x)) * (2 if cfg.allow_neg_eigval else 1)
    if block.decay == "head":
        g = -block.A_log.exp() * F.softplus(block.a_proj(x) + block.dt_bias)
    elif block.decay == "channel":
        gate = (block.f_b_proj(block.f_a_proj(x)) + block.dt_bias).view(b, t, cfg.n_heads, cfg.head_k_dim)
        g = -block.A_log.exp()[:, None] * F.softplus(gate)
    else:
        g = None
    o = delta_rule_ref(q, k, v, beta, g, qk_l2norm=cfg.qk_l2norm)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * block.o_norm.weight
    if cfg.output_gate:
        z = block.z_proj(x) if block.z_proj is not None else block.z_b_proj(block.z_a_proj(x))
        act = F.silu if cfg.output_gate_act == "silu" else torch.sigmoid
        o = o * act(z.view(b, t, cfg.n_heads, cfg.v_dim))
    return block.out_proj(o.reshape(b, t, -1))


def _block(name, **cfg):
    block = make_block(name, 12, std=0.3, n_heads=4, head_k_dim=6, head_v_dim=5, chunk_size=8, **cfg)
    if block.decay is not None:   # decays of a useful size: A around 1, softplus around 0.7
        with torch.no_grad():
            block.A_log.normal_(0.0, 0.3)
    return block


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("cfg", [{}, dict(n_k_heads=2, allow_neg_eigval=True, output_gate=False, d_conv=3,
                                          conv_bias=True),
                                 dict(output_gate_rank=3, output_gate_act="sigmoid")])   # Kimi Linear's gate
def test_block_equals_its_math_with_every_gradient(name, cfg):
    torch.manual_seed(0)
    check_block_vs_reference(_block(name, **cfg), reference, torch.randn(2, 21, 12, dtype=F64))


@pytest.mark.parametrize("name", BLOCKS)
def test_cache_contract_and_state_bytes(name):
    torch.manual_seed(1)
    block = _block(name, n_k_heads=2)
    x = torch.randn(2, 23, 12, dtype=F64)
    check_cache_contract(block, x, splits=((1,), (3, 5), (9,)))
    cache = block.init_cache(2, dtype=F64)
    with torch.no_grad():
        block(x, cache=cache)
    assert cache.nbytes() == block.state_bytes(23, batch_size=2, dtype=F64)
    # the state is kept in float32 for a bfloat16 model: its bytes say so
    assert block.state_bytes(1, dtype=torch.bfloat16) == (block.conv_dim * 3 * 2 + 4 * 6 * 5 * 4)


@pytest.mark.parametrize("name", BLOCKS)
def test_packed_documents_equal_each_document_alone(name):
    torch.manual_seed(2)
    block = _block(name)
    x = torch.randn(1, 20, 12, dtype=F64)
    seq_idx = torch.tensor([[0] * 7 + [1] * 2 + [2] * 11])
    with torch.no_grad():
        packed = block(x, seq_idx=seq_idx)
        alone = torch.cat([block(x[:, lo:hi]) for lo, hi in [(0, 7), (7, 9), (9, 20)]], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-12)


def _recipe(block, pattern="DAD"):
    return {"name": "tiny-delta", "model": {"d_model": 16, "n_layers": 3, "vocab_size": 32, "pattern": pattern,
            "blocks": {"D": {"type": block, "n_heads": 2, "head_k_dim": 8}, "A": {"type": "attn", "n_heads": 2}}},
            "train": {"seq_len": 32}}


@pytest.mark.parametrize("name", BLOCKS)
def test_trains_and_generates_left_padded_rows_as_each_alone(name):
    torch.manual_seed(3)
    losses, _ = train_losses(zoo.build_model(_recipe(name)), torch.randint(0, 32, (4, 24)), 6)
    assert losses[-1] < losses[0], losses
    check_left_padded_generation(_recipe(name), prompts=((5, 3), (9, 9, 1, 4, 4, 2, 8), (6, 6, 6, 6)), new_tokens=6)


@pytest.mark.parametrize("block,fields,message", [
    ("gated_deltanet", {"n_k_heads": 3}, r"n_k_heads: must divide n_heads 2, got 3"),
    ("kda", {"head_k_dim": 0}, r"head_k_dim: must be an integer >= 1, got 0"),
    ("deltanet", {"decay_rank": 4}, r"decay_rank: only the kda block has a low-rank per-channel decay"),
    ("gated_deltanet", {"a_init_min": 0.0}, r"a_init_min: must satisfy 0 < a_init_min"),
])
def test_bad_fields_name_the_field(block, fields, message):
    recipe = _recipe(block, "D")
    recipe["model"]["blocks"]["D"].update(fields)
    with pytest.raises((zoo.RecipeError, ValueError), match=message):
        zoo.build_model(recipe)
