"""attn, blockwise and ring blocks under context parallel (the ring) vs one process: W in {1, 2, 3, 4},
both layouts, uneven lengths, float64; the output shard, its input gradient and every parameter gradient
summed over ranks within 1e-10 relative."""
import pytest
import torch
import torch.distributed as dist

from tests.helpers import make_block, rel_err
from zoo.distributed import ContextParallel, all_reduce_grads, shard

TOL = 1e-10
D_MODEL = 16
CASES = [
    ("attn", dict(n_heads=4, n_kv_heads=2, qkv_bias=True)),
    ("blockwise", dict(n_heads=2, block_size=3)),
    ("ring", dict(n_heads=4, n_kv_heads=1, block_size=2, out_bias=True)),
]


def _compare_blocks(cases, lengths):
    worst = {}
    for name, cfg in cases:
        for layout in ("contiguous", "zigzag"):
            for length in lengths:
                torch.manual_seed(0)
                block = make_block(name, D_MODEL, **cfg)
                x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
                g = torch.randn(2, length, D_MODEL, dtype=torch.float64)
                xr = x.clone().requires_grad_(True)
                ref = block(xr)
                (ref * g).sum().backward()
                ref_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
                block.zero_grad()

                cp = ContextParallel.for_length(None, length, layout)
                xs = shard(x, None, layout).requires_grad_(True)
                out = block(xs, cp=cp)
                (out * shard(g, None, layout)).sum().backward()
                all_reduce_grads(block)
                key = f"{name} {layout} L={length}"
                worst[f"{key} out"] = rel_err(out, shard(ref, None, layout))
                worst[f"{key} grad x"] = rel_err(xs.grad, shard(xr.grad, None, layout))
                for n, p in block.named_parameters():
                    worst[f"{key} grad {n}"] = rel_err(p.grad, ref_grads[n])
    return worst


@pytest.mark.parametrize("w", (1, 2, 3, 4))
def test_attention_blocks_under_context_parallel(ranks, w):
    lengths = (2 * w + 1, 5 * w + 3)  # chunks of one or two tokens, and longer uneven ones
    for rank, worst in enumerate(ranks.run(w, _compare_blocks, CASES, lengths)):
        bad = {k: v for k, v in worst.items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"


def test_cache_with_cp_is_refused():
    block = make_block("attn", D_MODEL, n_heads=2)
    cp = ContextParallel(None, "zigzag", 0, 1, 4)
    with pytest.raises(ValueError, match="cache: a cache continues one sequence"):
        block(torch.zeros(1, 4, D_MODEL, dtype=torch.float64), cache=block.init_cache(1), cp=cp)
