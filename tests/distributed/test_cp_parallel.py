"""Context parallel for the `parallel` block (issue 19): each branch runs its own cp path on the shard, so the
sum equals the single process's within 1e-10 (float64, gloo, outputs and every gradient), as
tests/distributed/test_cp_blocks.py; a branch without a cp path makes the model refuse cp, naming it."""
import pytest
import torch

import zoo
from tests.distributed.test_cp_blocks import TOL, _check_cases, _lengths

CASES = [
    ("parallel", dict(branches=[{"type": "attn", "n_heads": 4, "n_kv_heads": 2, "out_scale": 0.5},
                                {"type": "mamba2", "d_state": 4, "d_conv": 3, "head_dim": 8, "chunk_size": 3,
                                 "norm": False, "out_scale": 1.7}]), False),
    ("parallel", dict(branches=[{"type": "swa", "n_heads": 2, "window": 4, "block_size": 3},
                                {"type": "infini", "n_heads": 2, "segment_len": 3, "out_scale": -0.4}]), False),
]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_parallel_block_matches_single_process(ranks, world_size):
    results = ranks.run(world_size, _check_cases, CASES, _lengths(world_size))
    bad = {k: v for res in results for k, v in res.items() if not v <= TOL}
    assert not bad, "\n".join(f"{k}: {v:.3e}" for k, v in sorted(bad.items()))
    assert len(results[0]) > 0


def test_a_branch_without_cp_is_named():
    from tests.blocks.test_new_block import register, unregister   # dwconv_plain: a block without a cp path
    register()
    try:
        model = zoo.build_model({"model": {"d_model": 16, "n_layers": 1, "vocab_size": 11, "pattern": "P",
                                           "blocks": {"P": {"type": "parallel", "branches": [
                                               {"type": "attn", "n_heads": 2},
                                               {"type": "dwconv_plain", "width": 3}]}}}})
    finally:
        unregister()
    with pytest.raises(ValueError, match=r"not supported by block\(s\) parallel\(attn\+dwconv_plain\)"):
        model(torch.zeros(1, 4, dtype=torch.long), cp_group=object())
    with pytest.raises(ValueError, match=r"cp: not supported by branch 1 \(dwconv_plain\) of the parallel block"):
        model.layers[0].mixer(torch.zeros(1, 4, 16), cp=object())
