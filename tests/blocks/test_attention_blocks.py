"""Attention blocks (attn, swa, blockwise, ring): wiring vs a dense reference, cache contract, state bytes."""
import pytest
import torch

from tests.helpers import (cache_bytes, check_block_vs_reference, check_cache_contract, make_block, projected_qkv,
                           run_chunks)
from zoo.ops.attention import attention_ref
from zoo.ops.rope import apply_rope, rope_cos_sin

D_MODEL = 24
CASES = {
    "attn": {"n_heads": 4, "n_kv_heads": 2},
    "blockwise": {"n_heads": 3, "block_size": 5},
    "ring": {"n_heads": 2, "n_kv_heads": 1, "block_size": 4},
    "swa": {"n_heads": 4, "n_kv_heads": 2, "window": 6, "block_size": 4},
    "swa_w1": {"n_heads": 2, "window": 1, "block_size": 3},
}


def make(case, **extra):
    return make_block(case.split("_")[0], D_MODEL, **{**CASES[case], **extra})


def dense_forward(block, x):
    """The block's math written out with the dense masked-softmax reference."""
    _, _, v, q, k = projected_qkv(block, x)
    out = attention_ref(q, k, v, causal=True, window=getattr(block.cfg, "window", None))
    return block.out_proj(out.reshape(*x.shape[:2], -1))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [1, 13, 29])
def test_block_matches_dense_reference(case, length):
    block = make(case)
    check_block_vs_reference(block, dense_forward, torch.randn(2, length, D_MODEL, dtype=torch.float64))


@pytest.mark.parametrize("case", list(CASES))
def test_cache_contract(case):
    block = make(case)
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    check_cache_contract(block, x, splits=((1,), (4, 7), (5,), (23,)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [1, 5, 17])
def test_state_bytes_equals_cache_bytes(case, length):
    block = make(case)
    x = torch.randn(1, length, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [3])
    assert cache_bytes(cache) == block.state_bytes(length, batch_size=1, dtype=torch.float64)


def test_swa_cache_keeps_window_minus_one():
    block = make("swa")
    x = torch.randn(1, 40, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [1])
    assert cache.k.shape[1] == CASES["swa"]["window"] - 1
    assert block.state_bytes(40) == block.state_bytes(10_000)


def test_rope_scores_depend_on_relative_position():
    hd = 8
    q, k = torch.randn(1, 1, 1, hd, dtype=torch.float64), torch.randn(1, 1, 1, hd, dtype=torch.float64)

    def score(m, n):
        cq, sq = rope_cos_sin(torch.tensor([m]), hd, dtype=torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([n]), hd, dtype=torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert torch.allclose(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))
