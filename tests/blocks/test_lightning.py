"""`lightning` (MiniMax's lightning attention): against transformers' MiniMaxLightningAttention on the same weights
(its own block-wise loop; float64), against the recurrence written out token by token with every gradient, the
cache contract and state_bytes, packed documents, left-padded generation. Context parallel:
tests/distributed/test_cp_blocks.py; the import: tests/convert/test_minimax_import.py."""
import pytest
import torch

from tests.helpers import (check_block_vs_reference, check_cache_bytes_and_documents,
                           check_left_padded_generation, make_block)
from zoo.blocks.lightning.block import slopes

F64 = torch.float64


def token_loop(block, x):
    q, k, v = block.heads(x)
    decay = torch.exp(-block.slope.to(x.dtype))
    b, t, h, d = q.shape
    S, outs = x.new_zeros(b, h, d, d), []
    for i in range(t):
        S = decay[None, :, None, None] * S + k[:, i, :, :, None] * v[:, i, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i], S))
    o = torch.stack(outs, 1).reshape(b, t, h * d)
    return block.out_proj(torch.sigmoid(block.output_gate(x)) * block.norm(o))


@pytest.mark.parametrize("cfg", [{"n_heads": 3, "chunk_size": 4}, {"n_heads": 2, "head_dim": 5, "act": "relu",
                                                                   "decay_layers": 4, "chunk_size": 64}])
def test_block_equals_the_recurrence(cfg):
    torch.manual_seed(0)
    block = make_block("lightning", 12, std=0.2, **cfg)
    check_block_vs_reference(block, token_loop, torch.randn(2, 13, 12, dtype=F64))


def test_equals_transformers_minimax_lightning_attention():
    """float32 (transformers keeps its decay factors in float32 buffers), a layer of a 5-layer model (the slopes
    scaled by its depth), lengths across its 8-token blocks."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention
    cfg = transformers.MiniMaxConfig(hidden_size=24, num_attention_heads=4, num_hidden_layers=5, block_size=8,
                                     layer_types=["linear_attention"] * 5)
    torch.manual_seed(0)
    theirs = MiniMaxLightningAttention(cfg, layer_idx=3)
    ours = make_block("lightning", 24, dtype=torch.float32, n_heads=4, decay_layers=5, chunk_size=16)
    ours.slope = slopes(4, 3, 5).float()   # the buffer the block has when built at layer 3
    with torch.no_grad():
        for name in ("qkv_proj", "output_gate", "out_proj"):
            getattr(ours, name).weight.copy_(getattr(theirs, name).weight)
        theirs.norm.weight.add_(torch.rand(24))
        ours.norm.weight.copy_(theirs.norm.weight)
    torch.testing.assert_close(ours.slope, theirs.slope_rate.flatten(), rtol=1e-6, atol=0)
    x = torch.randn(2, 21, 24)
    with torch.no_grad():
        want, _ = theirs(x, None, None)
        got = ours(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_cache_contract_state_bytes_and_documents():
    torch.manual_seed(1)
    block = make_block("lightning", 12, std=0.2, n_heads=3, chunk_size=4)
    cache = check_cache_bytes_and_documents(block)
    assert cache.nbytes() == 2 * 3 * 4 * 4 * 8


def test_left_padded_generation_equals_each_row_alone():
    check_left_padded_generation({
        "name": "minimax", "model": {"d_model": 16, "n_layers": 2, "vocab_size": 32, "pattern": "LA",
                                     "blocks": {"L": {"type": "lightning", "n_heads": 2, "chunk_size": 4},
                                                "A": {"type": "attn", "n_heads": 2}}},
        "train": {"seq_len": 32}}, seed=4)
