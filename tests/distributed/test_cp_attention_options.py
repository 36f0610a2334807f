"""Context parallel for the attention options (partial RoPE, no RoPE, a scale override, q/k norm, output gate,
log-length query scaling): the ring (attn, blockwise, ring) and swa's halo exchange, W in {1, 2, 3, 4}, both
layouts, float64; the output shard, its input gradient and every parameter gradient summed over ranks equal one
process's within 1e-10 relative."""
import pytest

from tests.distributed.test_cp_attention import TOL, _compare_blocks

CASES = [
    ("attn", dict(n_heads=4, n_kv_heads=2, rope_dim=2, scale=0.3)),
    ("blockwise", dict(n_heads=2, block_size=3, rope_base=None)),
    ("ring", dict(n_heads=2, n_kv_heads=1, head_dim=6, block_size=2, rope_dim=4, scale=1.7)),
    ("swa", dict(n_heads=4, n_kv_heads=2, window=4, block_size=3, rope_dim=2)),
    ("swa", dict(n_heads=2, window=3, block_size=2, rope_base=None, scale=0.5)),
    ("attn", dict(n_heads=2, n_kv_heads=1, qk_norm=True, output_gate=True)),
    ("swa", dict(n_heads=2, window=4, block_size=3, qk_norm=True, output_gate=True, rope_dim=2)),
    ("attn", dict(n_heads=2, n_kv_heads=1, logn_length=3)),
    ("ring", dict(n_heads=2, block_size=2, logn_length=2, rope_base=None)),
    ("swa", dict(n_heads=2, window=5, block_size=3, logn_length=3)),
]


@pytest.mark.parametrize("w", (1, 2, 3, 4))
def test_attention_options_under_context_parallel(ranks, w):
    lengths = (2 * w + 1, 5 * w + 3)
    for rank, worst in enumerate(ranks.run(w, _compare_blocks, CASES, lengths)):
        bad = {k: v for k, v in worst.items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"
