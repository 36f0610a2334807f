"""`mlstm` (xLSTM's mLSTM layer): against the layer written out with the op's token loop (float64, every
gradient), the cache contract and state_bytes, packed documents, left-padded generation. The op:
tests/ops/test_mlstm.py; context parallel: tests/distributed/test_cp_blocks.py; the import:
tests/convert/test_xlstm_import.py."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import (check_block_vs_reference, check_cache_bytes_and_documents,
                           check_left_padded_generation, make_block)
from zoo.ops.mlstm import mlstm_ref

F64 = torch.float64


def written_out(block, x):
    b, t, _ = x.shape
    h = block.cfg.n_heads
    cap = lambda z: block.cfg.gate_soft_cap * torch.tanh(z / block.cfg.gate_soft_cap)   # noqa: E731
    out = mlstm_ref(block.q(x).view(b, t, h, -1), block.k(x).view(b, t, h, -1), block.v(x).view(b, t, h, -1),
                    cap(block.igate_preact(x)), cap(block.fgate_preact(x)), eps=block.cfg.eps)
    normed = F.layer_norm(out, out.shape[-1:], eps=block.cfg.norm_eps).reshape(b, t, -1) * block.norm_weight
    if block.norm_bias is not None:
        normed = normed + block.norm_bias
    return block.out_proj(torch.sigmoid(block.ogate_preact(x)) * normed)


@pytest.mark.parametrize("cfg", [{"n_heads": 2, "chunk_size": 4}, {"n_heads": 3, "qk_dim_factor": 0.25, "bias": True,
                                                                   "gate_soft_cap": 3.0, "chunk_size": 64}])
def test_block_equals_the_written_out_layer(cfg):
    torch.manual_seed(0)
    check_block_vs_reference(make_block("mlstm", 12, std=0.3, **cfg), written_out, torch.randn(2, 13, 12, dtype=F64))


def test_cache_contract_state_bytes_and_documents():
    torch.manual_seed(1)
    block = make_block("mlstm", 12, std=0.3, n_heads=2, chunk_size=4)
    cache = check_cache_bytes_and_documents(block)
    assert cache.nbytes() == 2 * 2 * (3 * 6 + 3 + 1) * 8


def test_left_padded_generation_equals_each_row_alone():
    check_left_padded_generation({
        "name": "xlstm", "model": {"d_model": 16, "n_layers": 2, "vocab_size": 32, "pattern": "M",
                                   "blocks": {"M": {"type": "mlstm", "n_heads": 2, "chunk_size": 4}}},
        "train": {"seq_len": 32}}, seed=5)
