"""`rglru` (Griffin's / RecurrentGemma's recurrent block): against the block written out with F.conv1d, explicit
gate matrices and the op's token loop (float64, every gradient), the cache contract and state_bytes, packed
documents, left-padded generation. The op: tests/ops/test_rglru_op.py; context parallel: tests/distributed/
test_cp_blocks.py; RecurrentGemma's import: tests/convert."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import (check_block_vs_reference, check_cache_bytes_and_documents,
                           check_left_padded_generation, make_block)
from zoo.ops.rglru import rg_lru_ref

F64 = torch.float64


def written_out(block, x):
    y = F.gelu(block.linear_y(x), approximate="tanh")
    w = block.conv1d.weight
    u = F.conv1d(F.pad(block.linear_x(x).transpose(1, 2), (w.shape[-1] - 1, 0)), w, block.conv1d.bias,
                 groups=w.shape[0]).transpose(1, 2)
    # the gates as one dense matrix each: block-diagonal, n_heads blocks
    dense = lambda blocks: torch.block_diag(*blocks)   # noqa: E731
    gate_x = u @ dense(block.input_gate_weight) + block.input_gate_bias.flatten()
    gate_a = u @ dense(block.recurrent_gate_weight) + block.recurrent_gate_bias.flatten()
    return block.out_proj(rg_lru_ref(u, gate_x, gate_a, block.recurrent_param, block.cfg.c) * y)


@pytest.mark.parametrize("cfg", [{}, {"lru_width": 9, "n_heads": 3, "d_conv": 2, "bias": False, "chunk_size": 4},
                                 {"n_heads": 1, "d_conv": 1, "c": 4.0}])
def test_block_equals_the_formula(cfg):
    torch.manual_seed(0)
    check_block_vs_reference(make_block("rglru", 12, **cfg), written_out, torch.randn(2, 13, 12, dtype=F64))


def test_cache_contract_state_bytes_and_documents():
    torch.manual_seed(1)
    block = make_block("rglru", 12, n_heads=3, chunk_size=4)
    cache = check_cache_bytes_and_documents(block)
    assert cache.started.all() and cache.nbytes() == 2 * (12 * 4 * 8 + 1)


def test_left_padded_generation_equals_each_row_alone():
    check_left_padded_generation({
        "name": "griffin", "model": {"d_model": 16, "n_layers": 2, "vocab_size": 32, "pattern": "RA",
                                     "blocks": {"R": {"type": "rglru", "n_heads": 2},
                                                "A": {"type": "swa", "n_heads": 2, "n_kv_heads": 1, "window": 4}}},
        "train": {"seq_len": 32}}, seed=3)


@pytest.mark.parametrize("cfg,message", [
    ({"lru_width": 10, "n_heads": 4}, r"lru_width: 10 must be divisible by n_heads 4"),
    ({"n_heads": 5}, r"n_heads: 5 must divide model.d_model 12"),
    ({"c": 0}, r"c: must be > 0"),
])
def test_bad_fields_name_the_field(cfg, message):
    recipe = {"name": "r", "model": {"d_model": 12, "n_layers": 1, "pattern": "R",
                                     "blocks": {"R": {"type": "rglru", **cfg}}}, "train": {"seq_len": 16}}
    with pytest.raises(zoo.RecipeError, match=message):
        zoo.build_model(recipe)
