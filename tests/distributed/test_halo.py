"""`halo.fetch`: any rank reads any global positions (overlapping spans, its own tokens, the same token
twice), and the backward returns every read's gradient to the owner, summed."""
import pytest
import torch
import torch.distributed as dist

from zoo.distributed import ContextParallel, shard
from zoo.distributed.halo import fetch, gather_chunks, preceding


def _spans(length):
    # overlapping, repeated and rank-dependent: rank r reads a prefix, the second half and one token twice
    return lambda r: [(0, min(length, r + 3)), (length // 2, length), (r % length, r % length + 1)]


def _check_fetch(lengths):
    rank = dist.get_rank()
    errors = []
    for layout in ("contiguous", "zigzag"):
        for length in lengths:
            torch.manual_seed(0)
            x = torch.randn(2, length, 3, dtype=torch.float64)
            cp = ContextParallel.for_length(None, length, layout)
            spans = _spans(length)
            positions = lambda r: torch.cat([torch.arange(a, b) for a, b in spans(r)])
            xs = shard(x, None, layout).requires_grad_(True)
            got, through = fetch(xs, cp, spans)
            errors.append((got - x[:, positions(rank)]).abs().max().item())
            # each rank weighs its reads by a rank-dependent factor; the owner's gradient is the sum
            (got * (rank + 1)).sum().backward()
            want = torch.zeros_like(x)
            for r in range(cp.world_size):
                want.index_add_(1, positions(r), torch.full_like(x[:, positions(r)], r + 1.0))
            errors.append((xs.grad - shard(want, None, layout)).abs().max().item())
            errors.append((through - xs).abs().max().item())

            # the halos before each chunk, and the per-chunk all-gather in global chunk order
            halos, _ = preceding(xs.detach(), cp, lambda start, end: 3)
            for c, halo in zip(cp.chunks(), halos):
                errors.append((halo - x[:, max(0, c.start - 3):c.start]).abs().max().item() if halo.numel() else 0.0)
            ids = torch.tensor([[float(c.index)] for c in cp.chunks()])
            errors.append((gather_chunks(ids, cp)[:, 0] - torch.arange(cp.n_chunks)).abs().max().item())
    return max(errors)


@pytest.mark.parametrize("w", (1, 2, 3, 4))
def test_fetch_reads_and_returns_gradients(ranks, w):
    assert max(ranks.run(w, _check_fetch, (2 * w + 1, 5 * w + 3))) == 0.0


def test_spans_outside_the_sequence_are_named():
    cp = ContextParallel(None, "zigzag", 0, 1, 6)
    with pytest.raises(ValueError, match=r"spans: rank 0 asks for positions \[4, 9\) outside \[0, 6\)"):
        fetch(torch.zeros(1, 6, 2), cp, lambda r: [(4, 9)])
