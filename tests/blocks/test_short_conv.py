"""`short_conv` (LFM2's gated short convolution): against the formula written out with F.conv1d (float64, every
gradient), the cache contract and state_bytes, packed documents, left-padded generation. Context parallel:
tests/distributed/test_cp_blocks.py."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import (check_block_vs_reference, check_cache_bytes_and_documents,
                           check_left_padded_generation, make_block)

F64 = torch.float64


def written_out(block, x):
    B, C, h = block.in_proj(x).transpose(1, 2).chunk(3, dim=1)
    w = block.conv1d.weight
    y = F.conv1d(F.pad(B * h, (w.shape[-1] - 1, 0)), w, block.conv1d.bias, groups=w.shape[0])
    return block.out_proj((C * y).transpose(1, 2))


@pytest.mark.parametrize("cfg", [{}, {"d_conv": 4, "bias": True}, {"d_conv": 1}])
def test_block_equals_the_formula(cfg):
    torch.manual_seed(0)
    check_block_vs_reference(make_block("short_conv", 12, **cfg), written_out, torch.randn(2, 13, 12, dtype=F64))


def test_cache_contract_state_bytes_and_documents():
    torch.manual_seed(1)
    block = make_block("short_conv", 12, d_conv=4)
    cache = check_cache_bytes_and_documents(block)
    assert cache.nbytes() == 2 * 12 * 3 * 8


def test_left_padded_generation_equals_each_row_alone():
    check_left_padded_generation({
        "name": "lfm", "model": {"d_model": 16, "n_layers": 2, "vocab_size": 32, "pattern": "CA",
                                 "blocks": {"C": {"type": "short_conv"}, "A": {"type": "attn", "n_heads": 2,
                                                                              "qk_norm": True}}},
        "train": {"seq_len": 32}}, seed=2)
