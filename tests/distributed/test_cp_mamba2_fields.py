"""Context parallel for the Mamba-2 fields of issue 19 (n_heads width, no norm, norm eps, dt_limit): the shard's
output and every gradient equal the single process's within 1e-10, as tests/distributed/test_cp_blocks.py."""
import math

import pytest

from tests.distributed.test_cp_blocks import TOL, _check_cases, _lengths

CASES = [
    ("mamba2", dict(d_state=4, d_conv=3, head_dim=4, n_heads=6, n_groups=2, chunk_size=3, norm=False,
                    dt_limit=[0.3, math.inf]), False),
    ("mamba2", dict(d_state=4, head_dim=8, n_heads=3, chunk_size=2, norm_eps=0.5, dt_limit=[0.2, 1.0]), False),
]


@pytest.mark.parametrize("world_size", [1, 2])
def test_mamba2_fields_match_single_process(ranks, world_size):
    results = ranks.run(world_size, _check_cases, CASES, _lengths(world_size))
    bad = {k: v for res in results for k, v in res.items() if not v <= TOL}
    assert not bad, "\n".join(f"{k}: {v:.3e}" for k, v in sorted(bad.items()))
    assert len(results[0]) > 0
