"""Context parallel for Mamba-1 with Jamba's dt / B / C RMSNorms (`dt_bc_norm`): on W in {1, 2, 3, 4} gloo
ranks, both layouts, float64, the shard's output, its input gradient and every parameter gradient (the
norms' included, summed over ranks) equal one process within 1e-10 relative (tests/distributed/test_cp_blocks)."""
import pytest

from tests.distributed.test_cp_blocks import TOL, _check_cases, _lengths

CASES = [("mamba", dict(d_state=4, d_conv=3, expand=2, dt_rank=3, dt_bc_norm=True), False)]


@pytest.mark.parametrize("world_size", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                        pytest.param(4, marks=pytest.mark.slow)])
def test_normed_mamba_matches_single_process(ranks, world_size):
    results = ranks.run(world_size, _check_cases, CASES, _lengths(world_size))
    bad = {k: v for res in results for k, v in res.items() if not v <= TOL}
    assert not bad, "\n".join(f"{k}: {v:.3e}" for k, v in sorted(bad.items()))
    assert any("grad b_layernorm.weight" in k for k in results[0])
