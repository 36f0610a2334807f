"""Context parallel for swa, taipan, mamba, mamba2, infini, selective and the delta-rule blocks: on W in
{1, 2, 3, 4} gloo ranks, both layouts, float64, lengths that split unevenly and chunks shorter than the window / conv / segment,
the shard's output, its input gradient and every parameter gradient (summed over ranks) equal the
single process's within 1e-10 relative."""
import pytest
import torch
import torch.distributed as dist

from tests.helpers import make_block, rel_err
from zoo.blocks.base import split_aux
from zoo.distributed import ContextParallel, all_reduce_grads, shard

TOL = 1e-10
# Relative to max(|reference|, FLOOR): swa with window 1 has q and k gradients that are zero in exact
# arithmetic, rounding noise of ~1e-15 in both runs; every other gradient here is of order 1 or more.
FLOOR = 1e-3
D_MODEL = 16

# (block, config, training): small windows, segments and chunk sizes so that windows, conv halos and
# segments straddle chunks, and the short-chunk lengths below make them reach over several chunks.
CASES = [
    ("swa", dict(n_heads=4, n_kv_heads=2, window=5, block_size=3), False),
    ("swa", dict(n_heads=2, window=1, block_size=4), False),
    ("taipan", dict(n_heads=2, window=5, block_size=3), False),
    ("taipan", dict(n_heads=2, window=4, block_size=2, rope_base=100.0), True),
    ("mamba", dict(d_state=4, d_conv=4, expand=2), False),
    ("mamba2", dict(d_state=4, d_conv=3, expand=2, head_dim=8, n_groups=2, chunk_size=3), False),
    ("infini", dict(n_heads=4, n_kv_heads=2, segment_len=3, delta_rule=True), False),
    ("infini", dict(n_heads=2, segment_len=4, delta_rule=False), False),
    ("infini", dict(n_heads=2, segment_len=2, delta_rule=True), False),
    ("selective", dict(n_heads=4, n_kv_heads=2, block_size=3), False),
    ("selective", dict(n_heads=2, block_size=16), False),
]


def _lengths(w):
    # chunks of 1-2 tokens (windows span several chunks), and an uneven split into longer chunks
    return (2 * w + 1, 6 * w + 5)


def _check_cases(cases, lengths):
    """On every rank: each case's single-process run and its context-parallel run; the worst relative errors."""
    torch.set_default_dtype(torch.float64)
    worst = {}
    try:
        for name, cfg, training in cases:
            for layout in ("contiguous", "zigzag"):
                for length in lengths:
                    errs = _compare(name, cfg, training, layout, length)
                    for k, v in errs.items():
                        key = f"{name} {cfg} train={training} {layout} L={length}: {k}"
                        worst[key] = v
    finally:
        torch.set_default_dtype(torch.float32)
    return worst


def _compare(name, cfg, training, layout, length):
    torch.manual_seed(0)
    block = make_block(name, D_MODEL, **cfg).train(training)
    x = torch.randn(2, length, D_MODEL)
    g = torch.randn(2, length, D_MODEL)

    xr = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # Taipan's Gumbel draw: every rank and the reference draw the same noise
    ref, ref_aux = split_aux(block(xr))
    loss = (ref * g).sum()
    if ref_aux is not None:
        loss = loss + ref_aux
        ref_aux = ref_aux.detach()
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad()

    cp = ContextParallel.for_length(None, length, layout)
    xs = shard(x, None, layout).requires_grad_(True)
    torch.manual_seed(1)
    out, aux = split_aux(block(xs, cp=cp))
    loss = (out * shard(g, None, layout)).sum()
    errs = {}
    if aux is not None:
        errs["aux_loss"] = rel_err(aux, ref_aux, FLOOR)
        loss = loss + aux
    loss.backward()
    all_reduce_grads(block)
    errs["output"] = rel_err(out, shard(ref.detach(), None, layout), FLOOR)
    errs["grad x"] = rel_err(xs.grad, shard(xr.grad, None, layout), FLOOR)
    for n, want in ref_grads.items():
        p = dict(block.named_parameters())[n]
        errs[f"grad {n}"] = float("inf") if p.grad is None else rel_err(p.grad, want, FLOOR)
    return errs


@pytest.mark.slow   # 15-60 s per world size on a shared 2-core machine (W processes, 52 comparisons each)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_blocks_match_single_process(ranks, world_size):
    _assert_within_tolerance(ranks.run(world_size, _check_cases, CASES, _lengths(world_size)))


def _assert_within_tolerance(results):
    bad = {k: v for res in results for k, v in res.items() if not v <= TOL}
    assert not bad, "\n".join(f"{k}: {v:.3e}" for k, v in sorted(bad.items()))
    assert len(results[0]) > 0


def _check_selective_key_tiles(lengths):
    """Selective with key tiles of 2 positions: a chunk's keys span several tiles, so the carried column
    sums (forward) and their gradients (backward) cross tiles within every pair of chunks."""
    import zoo.blocks.selective.cp as selective_cp
    old, selective_cp._KEY_TILE = selective_cp._KEY_TILE, 2
    try:
        return _check_cases([case for case in CASES if case[0] == "selective"], lengths)
    finally:
        selective_cp._KEY_TILE = old


@pytest.mark.slow   # 10-20 s per world size
@pytest.mark.parametrize("world_size", [2, 4])
def test_selective_key_tiles_match_single_process(ranks, world_size):
    _assert_within_tolerance(ranks.run(world_size, _check_selective_key_tiles,
                                       (6 * world_size + 5, 11 * world_size + 3)))


@pytest.mark.parametrize("name, cfg", list({name: (name, cfg) for name, cfg, _ in reversed(CASES)}.values()))
def test_cache_with_cp_is_refused(name, cfg):
    # refused before any communication, so a handle without a process group is enough
    block = make_block(name, D_MODEL, **cfg)
    cp = ContextParallel(None, "zigzag", 0, 1, 6)
    x = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"cache: {name} got both a cache and a context-parallel handle"):
        block(x, cache=block.init_cache(1, dtype=torch.float64), cp=cp)


# the delta-rule blocks and mla: state passing with a [d_k, d_k] transition per head and chunk (zoo/blocks/delta/cp.py)
DELTA_CASES = [
    ("deltanet", dict(n_heads=2, head_k_dim=4, head_v_dim=3, d_conv=3, chunk_size=3), False),
    ("gated_deltanet", dict(n_heads=4, n_k_heads=2, head_k_dim=4, d_conv=4, chunk_size=2, allow_neg_eigval=True),
     False),
    ("kda", dict(n_heads=2, head_k_dim=4, decay_rank=3, d_conv=2, chunk_size=5, output_gate=False), False),
    ("mla", dict(n_heads=2, kv_lora_rank=5, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3, q_lora_rank=3),
     False),
    ("short_conv", dict(d_conv=4, bias=True), False),
    ("rglru", dict(n_heads=2, d_conv=3, chunk_size=3), False),
    ("lightning", dict(n_heads=2, chunk_size=3, decay_layers=3), False),
    ("mlstm", dict(n_heads=2, chunk_size=3), False),
]


@pytest.mark.slow   # 5-20 s per world size
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_delta_blocks_match_single_process(ranks, world_size):
    _assert_within_tolerance(ranks.run(world_size, _check_cases, DELTA_CASES, _lengths(world_size)))
