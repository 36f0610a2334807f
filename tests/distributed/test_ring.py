"""Ring attention over W gloo ranks vs dense attention on one process: outputs, lse, dq, dk, dv (float64)."""
import pytest
import torch
import torch.distributed as dist

from tests.helpers import assert_close
from zoo.distributed import ContextParallel, shard
from zoo.distributed.ring import ring_attention
from zoo.ops.attention import blockwise_attention_ref

WORLD_SIZES = (1, 2, 3, 4)
TOL = 1e-10


def _ring_vs_dense(cases):
    for layout, length, heads, kv_heads, block_size, causal in cases:
        g = torch.Generator().manual_seed(length * 31 + heads)
        q = torch.randn(2, length, heads, 6, dtype=torch.float64, generator=g)
        k = torch.randn(2, length, kv_heads, 6, dtype=torch.float64, generator=g)
        v = torch.randn(2, length, kv_heads, 6, dtype=torch.float64, generator=g)
        gout = torch.randn(q.shape, dtype=torch.float64, generator=g)
        glse = torch.randn(2, heads, length, dtype=torch.float64, generator=g)
        qf, kf, vf = (t.clone().requires_grad_(True) for t in (q, k, v))
        want, want_lse = blockwise_attention_ref(qf, kf, vf, causal=causal, return_lse=True)
        ((want * gout).sum() + (want_lse * glse).sum()).backward()

        cp = ContextParallel.for_length(None, length, layout)
        qs, ks, vs = (shard(t, None, layout).requires_grad_(True) for t in (q, k, v))
        out, lse = ring_attention(qs, ks, vs, cp, causal=causal, block_size=block_size, return_lse=True)
        ((out * shard(gout, None, layout)).sum() + (lse * shard(glse, None, layout, dim=2)).sum()).backward()
        what = f"{layout} L={length} h={heads}/{kv_heads} block={block_size} causal={causal}"
        assert_close(out, shard(want, None, layout), TOL, f"out {what}")
        assert_close(lse, shard(want_lse, None, layout, dim=2), TOL, f"lse {what}")
        for name, got, ref in (("dq", qs.grad, qf.grad), ("dk", ks.grad, kf.grad), ("dv", vs.grad, vf.grad)):
            assert_close(got, shard(ref, None, layout), TOL, f"{name} {what}")
        # only lse used downstream (dout is None in the backward), and only out (dlse is None)
        qs.grad = None
        out, lse = ring_attention(qs, ks, vs, cp, causal=causal, block_size=block_size, return_lse=True)
        lse.sum().backward()
        qf.grad = None
        blockwise_attention_ref(qf, kf, vf, causal=causal, return_lse=True)[1].sum().backward()
        assert_close(qs.grad, shard(qf.grad, None, layout), TOL, f"dq from lse alone {what}")
    return dist.get_rank()


@pytest.mark.parametrize("w", WORLD_SIZES)
def test_ring_attention_matches_dense(ranks, w):
    cases = []
    for layout in ("contiguous", "zigzag"):
        for length, heads, kv_heads, block_size, causal in (
                (4 * w, 2, 2, 512, True),          # one token... to a few per chunk
                (6 * w + 1, 4, 2, 3, True),        # uneven chunks, several blocks per chunk, GQA
                (5 * w + 3, 3, 1, 2, True),        # multi-query
                (3 * w + 2, 2, 1, 4, False)):      # non-causal: every pair, no masks
            cases.append((layout, length, heads, kv_heads, block_size, causal))
    assert ranks.run(w, _ring_vs_dense, cases) == list(range(w))


def test_wrong_shard_length_is_named():
    cp = ContextParallel(None, "zigzag", 0, 2, 10)
    q = torch.zeros(1, 4, 2, 4)
    with pytest.raises(ValueError, match="q: rank 0 holds 5 tokens of 10 in layout 'zigzag' over W=2, got length 4"):
        ring_attention(q, q, q, cp)


def test_second_backward_is_refused():
    # The backward releases the local K/V once it has passed it on: a second backward through the
    # same graph would find it gone, and says so (W = 1 runs in process: no messages).
    cp = ContextParallel(None, "zigzag", 0, 1, 6)
    q, k, v = (torch.randn(1, 6, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ring_attention(q, k, v, cp, block_size=2)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.sum().backward()
