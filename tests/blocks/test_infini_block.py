"""Infini-attention block: wiring vs the segment-loop reference, cache contract, constant state, gate hook."""
import pytest
import torch

import zoo.blocks.infini  # noqa: F401  (registers `infini` until zoo.blocks imports it)
from tests.helpers import (assert_close, cache_bytes, check_block_vs_reference, check_cache_contract, make_block,
                           projected_qkv, run_chunks)
from zoo.config import RecipeError, load_recipe
from zoo.model import ZooLM
from zoo.ops.infini import infini_attention_ref
from zoo.train.optim import build_optimizer, param_groups

D_MODEL = 24
CASES = {
    "delta": {"n_heads": 4, "segment_len": 5},
    "linear_gqa": {"n_heads": 4, "n_kv_heads": 2, "segment_len": 4, "delta_rule": False},
    "delta_gqa_bias": {"n_heads": 2, "n_kv_heads": 1, "segment_len": 7, "qkv_bias": True, "out_bias": True},
    "segment_1": {"n_heads": 3, "segment_len": 1},
}


def make(case, dtype=torch.float64, **extra):
    return make_block("infini", D_MODEL, dtype, **{**CASES[case], **extra})


def ref_forward(block, x):
    """The block's math with the segment-loop reference: RoPE on the local path only."""
    q, k, v, q_rot, k_rot = projected_qkv(block, x)
    out = infini_attention_ref(q, k, v, block.gate, block.cfg.segment_len, delta_rule=block.cfg.delta_rule,
                               q_local=q_rot, k_local=k_rot)
    return block.out_proj(out.reshape(*x.shape[:2], -1))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [1, 13, 29])
def test_block_matches_reference(case, length):
    block = make(case)
    check_block_vs_reference(block, ref_forward, torch.randn(2, length, D_MODEL, dtype=torch.float64))


def test_memory_path_is_used():
    # Past the first segment the output depends on tokens outside the segment only through the memory:
    # changing token 0 must change the output at token 12 (segment 2 of length 5), and must not with
    # the gate shut (sigmoid(-inf) = 0: local attention alone).
    block = make("delta")
    x = torch.randn(1, 13, D_MODEL, dtype=torch.float64)
    y = x.clone()
    y[:, 0] += 1.0
    with torch.no_grad():
        assert (block(x)[:, 12] - block(y)[:, 12]).abs().max() > 1e-6
        block.gate.fill_(-torch.inf)
        assert_close(block(x)[:, 10:], block(y)[:, 10:], 0.0)


@pytest.mark.parametrize("case", list(CASES))
def test_cache_contract(case):
    block = make(case)
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    check_cache_contract(block, x, splits=((1,), (4, 7), (5,), (2, 9), (23,)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [1, 5, 17, 20, 31])
def test_state_bytes_equals_cache_bytes(case, length):
    block = make(case)
    x = torch.randn(1, length, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [3])
    assert cache.k.shape[1] == length % block.cfg.segment_len
    assert cache_bytes(cache) == block.state_bytes(length, batch_size=1, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_stays_float32_and_state_bytes_match(dtype):
    block = make("linear_gqa", dtype=dtype)
    x = torch.randn(2, 18, D_MODEL, dtype=dtype)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [5, 2])
    assert cache.M.dtype == cache.z.dtype == torch.float32 and cache.k.dtype == dtype
    assert cache_bytes(cache) == block.state_bytes(18, batch_size=2, dtype=dtype)


def test_state_bytes_constant_in_length():
    block = make("delta")
    per_segment = [block.state_bytes(n * 5) for n in (1, 10, 1000, 10**6)]
    assert len(set(per_segment)) == 1
    assert max(block.state_bytes(n) for n in range(200)) == block.state_bytes(4)  # peak: 4 unfolded tokens


def test_gate_gets_its_learning_rate_multiplier():
    recipe = load_recipe({"model": {"d_model": 24, "n_layers": 2, "pattern": "I",
                                    "blocks": {"I": {"type": "infini", "segment_len": 8, "gate_lr_mult": 7.5}}},
                          "train": {"seq_len": 32, "lr": 1e-3}})
    model = ZooLM(recipe)
    groups = param_groups(model, weight_decay=0.1)
    gate_groups = [g for g in groups if any(n.endswith("mixer.gate") for n in g["names"])]
    assert len(gate_groups) == 1
    (g,) = gate_groups
    assert sorted(g["names"]) == ["layers.0.mixer.gate", "layers.1.mixer.gate"]
    assert g["lr_mult"] == 7.5 and g["weight_decay"] == 0.0
    assert all(gr["lr_mult"] == 1.0 for gr in groups if gr is not g)
    opt = build_optimizer(model, recipe.train)
    lrs = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
    assert lrs[id(model.layers[0].mixer.gate)] == pytest.approx(7.5e-3)
    assert lrs[id(model.layers[0].mixer.q_proj.weight)] == pytest.approx(1e-3)


def test_gate_survives_model_init():
    recipe = load_recipe({"model": {"d_model": 24, "n_layers": 1, "pattern": "I", "blocks": {"I": {"type": "infini"}}},
                          "train": {"seq_len": 32}})
    assert torch.equal(ZooLM(recipe).layers[0].mixer.gate, torch.zeros(4))


@pytest.mark.parametrize("field,value", [("segment_len", 0), ("gate_lr_mult", 0.0), ("n_kv_heads", 3)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(RecipeError, match=f"model.blocks.I.{field}"):
        load_recipe({"model": {"d_model": 24, "n_layers": 1, "pattern": "I",
                               "blocks": {"I": {"type": "infini", field: value}}}})
