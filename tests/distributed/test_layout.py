"""Layouts, shard/unshard and the launcher itself (W in {1, 2, 3, 4}, gloo, float64)."""
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import RankError, RankPool
from zoo.distributed import ContextParallel, chunk_bounds, shard, unshard

WORLD_SIZES = (1, 2, 3, 4)
LAYOUTS = ("contiguous", "zigzag")


def test_chunks_cover_the_sequence_once():
    for w in WORLD_SIZES:
        for layout in LAYOUTS:
            for length in (2 * w, 2 * w + 1, 4 * w + 3, 37):
                seen = []
                for r in range(w):
                    cp = ContextParallel(None, layout, r, w, length)
                    pos = cp.positions()
                    assert len(pos) == cp.local_len == cp.shard_len(r)
                    seen.append(pos)
                    for c in cp.chunks():
                        assert torch.equal(pos[c.local], torch.arange(c.start, c.end))
                assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(length))
                sizes = [c.length for c in cp.all_chunks()]
                assert max(sizes) - min(sizes) <= 1 and [c.index for c in cp.all_chunks()] == list(range(cp.n_chunks))


def test_zigzag_pairs_chunks_for_balance():
    cp = ContextParallel(None, "zigzag", 1, 4, 80)
    assert cp.chunk_ids() == (1, 6)
    assert [c.start for c in cp.chunks()] == [10, 60]
    assert chunk_bounds(10, 4) == [0, 2, 5, 7, 10]


def test_bad_layout_and_too_short_sequence_are_named():
    with pytest.raises(ValueError, match="layout: unknown context-parallel layout 'zz'.*contiguous, zigzag"):
        ContextParallel(None, "zz", 0, 2, 16)
    with pytest.raises(ValueError, match="seq_len: 5 tokens cannot fill the 6 chunks of layout 'zigzag' over W=3"):
        ContextParallel(None, "zigzag", 0, 3, 5)


def _roundtrip(lengths):
    """shard -> unshard is the identity, unshard's backward is the adjoint (sum over ranks)."""
    w, r = dist.get_world_size(), dist.get_rank()
    for layout in LAYOUTS:
        for length in lengths:
            g = torch.Generator().manual_seed(length)
            x = torch.randn(2, length, 3, dtype=torch.float64, generator=g)
            weight = torch.randn(w, 2, length, 3, dtype=torch.float64, generator=g)
            xs = shard(x, None, layout).requires_grad_(True)
            assert xs.shape[1] == ContextParallel.for_length(None, length, layout).local_len
            for seq_len in (None, length):
                full = unshard(xs, None, layout, seq_len=seq_len)
                assert torch.equal(full, x), (layout, length)
            # each rank weights its gathered copy differently: the shard's gradient sums all weights
            (full * weight[r]).sum().backward()
            assert torch.allclose(xs.grad, shard(weight.sum(0), None, layout), rtol=0, atol=1e-12)
            # dim other than 1
            xt = x.transpose(0, 1).contiguous()
            assert torch.equal(unshard(shard(xt, None, layout, dim=0), None, layout, dim=0), xt)
    # a shard of the wrong length is named
    try:
        ContextParallel.from_shard(None, 3 + (r == 0), "zigzag")
    except ValueError as e:
        msg = str(e)
    else:
        msg = ""
    return msg


@pytest.mark.parametrize("w", WORLD_SIZES)
def test_shard_unshard_round_trip(ranks, w):
    lengths = (2 * w, 2 * w + 1, 4 * w + 3, 29)
    msgs = ranks.run(w, _roundtrip, lengths)
    if w > 1:
        assert "input_ids: rank 0 holds 4 tokens but layout 'zigzag'" in msgs[0]


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("rank one fails on purpose")
    dist.all_reduce(torch.ones(3))  # blocks on the missing peer until its exit breaks the connection
    return "finished"


def test_a_rank_that_raises_makes_the_others_fail_not_hang():
    pool = RankPool(2, pg_timeout_s=60)
    try:
        t0 = time.monotonic()
        with pytest.raises(RankError) as info:
            pool.run(_raise_on_rank_one, timeout=120, grace=30)
        took = time.monotonic() - t0
    finally:
        pool.close(force=True)
    outcomes = info.value.outcomes
    assert "rank one fails on purpose" in outcomes[1]
    # rank 0 failed on its own (a gloo error from the broken connection), not by the parent's deadline
    assert 0 in outcomes and "deadline" not in outcomes[0] and "Traceback" in outcomes[0], outcomes[0]
    assert took < 60, f"took {took:.0f} s: the surviving rank waited for the process-group timeout"
