"""Preallocated K/V caches (zoo.blocks.attention.cache): decoding through buffers that double (attn,
blockwise, ring, selective) or wrap as a ring (swa, taipan) equals the whole-sequence forward in float64;
steady-state decoding writes in place (no new K/V buffer per step); the state read back in time order."""
import pytest
import torch

from tests.helpers import assert_close, check_cache_contract, make_block, projected_qkv, run_chunks
from zoo.blocks.attention.cache import AttentionCache

D_MODEL = 24
CASES = {
    "attn": ("attn", {"n_heads": 4, "n_kv_heads": 2}),
    "blockwise": ("blockwise", {"n_heads": 3, "block_size": 5}),
    "ring": ("ring", {"n_heads": 2, "n_kv_heads": 1, "block_size": 4}),
    "swa": ("swa", {"n_heads": 4, "n_kv_heads": 2, "window": 7, "block_size": 4}),
    "swa_w1": ("swa", {"n_heads": 2, "window": 1, "block_size": 3}),
    "swa_w20": ("swa", {"n_heads": 2, "window": 20, "block_size": 8}),   # the ring grows (16) before it wraps
    "selective": ("selective", {"n_heads": 4, "n_kv_heads": 2, "block_size": 4}),
    "selective_budget": ("selective", {"n_heads": 2, "kv_budget": 40, "block_size": 4}),
    "taipan": ("taipan", {"n_heads": 2, "window": 7, "capacity": 0.5, "block_size": 3}),
    "taipan_rope": ("taipan", {"n_heads": 2, "window": 7, "capacity": 0.5, "rope_base": 10000.0}),
}
# 71 tokens: the linear buffers double 16 -> 32 -> 64 -> 128 on the way; the rings (7 slots) wrap ten times
LENGTH = 71


def make(case):
    name, cfg = CASES[case]
    return make_block(name, D_MODEL, **cfg).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_decode_through_the_buffers_equals_the_whole_forward(case):
    block = make(case)
    x = torch.randn(2, LENGTH, D_MODEL, dtype=torch.float64)
    # odd chunks that straddle every doubling and wrap the ring mid-chunk; a prompt then token by token
    check_cache_contract(block, x, splits=((1,), (5, 1, 1, 11), (3, 9, 1), (37, 1), (LENGTH,)))


@pytest.mark.parametrize("case", ["attn", "swa", "selective", "taipan"])
def test_steady_state_decoding_writes_in_place(case):
    """The K/V storage changes only when a linear buffer doubles; a ring never reallocates once full."""
    block = make(case)
    x = torch.randn(1, 300, D_MODEL, dtype=torch.float64)
    cache = block.init_cache(1, x.device, x.dtype)
    seen = []
    with torch.no_grad():
        block(x[:, :5], cache=cache)
        for t in range(5, x.shape[1]):
            block(x[:, t:t + 1], cache=cache)
            seen.append((cache.keys.untyped_storage().data_ptr(), cache.values.untyped_storage().data_ptr(),
                         cache.capacity))
    capacities = [c for _, _, c in seen]
    for (k0, v0, c0), (k1, v1, c1) in zip(seen, seen[1:]):
        if c1 == c0:
            assert (k1, v1) == (k0, v0), f"a new K/V buffer at capacity {c0}"
        else:
            assert c1 == min(2 * c0, getattr(block.cfg, "window", 2 * c0)), f"capacity {c0} -> {c1}"
    if case in ("swa", "taipan"):
        assert capacities[-1] == block.cfg.window
        assert len(set(capacities)) <= 2
    else:
        assert sorted(set(capacities)) == [16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize("case", ["swa", "taipan_rope"])
def test_ring_reads_back_the_window_in_time_order(case):
    block = make(case)
    x = torch.randn(1, 23, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [1, 4])
        _, _, v, _, k = projected_qkv(block, x)
    keep = block.cfg.window - 1
    assert cache.k.shape[1] == keep and cache.capacity == block.cfg.window
    if case == "swa":
        assert_close(cache.k, k[:, -keep:], 1e-12, "k")
        assert_close(cache.v, v[:, -keep:], 1e-12, "v")
    else:   # taipan caches unselected positions as zeros
        sel = cache.selected[..., None, None]
        assert_close(cache.k, k[:, -keep:] * sel, 1e-12, "k")


def test_allocation_is_at_most_twice_the_state():
    block = make("attn")
    x = torch.randn(3, 100, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [1])
    assert cache.nbytes() == block.state_bytes(100, batch_size=3, dtype=torch.float64)
    assert cache.nbytes() <= cache.allocated_nbytes() <= 2 * cache.nbytes()


def test_index_rows_and_stack_keep_the_buffers():
    block = make("attn")
    x = torch.randn(3, 20, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        want = block(x)
        short, long_ = block.init_cache(1, dtype=x.dtype), block.init_cache(2, dtype=x.dtype)
        block(x[:1, :17], cache=short)                       # capacity 32 (grew at 17)
        block(x[1:, :16], cache=long_)                       # capacity 16 ...
        block(x[1:, 16:17], cache=long_)                     # ... then 32
        long_.reserve(64)                                    # a capacity the other cache does not have
        both = AttentionCache.stack([short, long_])
        assert both.capacity == 64 and both.pos == 17
        picked = both.index_rows(torch.tensor([2, 0, 2]))    # beam search's reordering
        assert_close(block(x[:, 17:], cache=both), want[:, 17:], 1e-10, "stacked")
        assert_close(block(x[[2, 0, 2], 17:], cache=picked), want[[2, 0, 2], 17:], 1e-10, "rows picked")
    with pytest.raises(ValueError, match="different positions"):
        AttentionCache.stack([block.init_cache(1), long_])
