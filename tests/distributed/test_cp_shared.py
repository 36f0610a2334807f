"""Context parallel through shared blocks (Zamba2's): a model whose shared attention is used at two depths with its
adapters, on W in {1, 2, 3, 4} gloo ranks, both layouts, float64: local logits, the loss and every parameter
gradient (the shared weights' summed over their uses and over ranks) equal the single process within 1e-10."""
import pytest

from tests.blocks.test_shared_block import recipe
from tests.distributed.test_cp_model import _model_vs_single

TOL = 1e-10


@pytest.mark.parametrize("w", (1, 2, 3, 4))
def test_shared_blocks_under_context_parallel(ranks, w):
    r = recipe()   # vocabulary 37, test_cp_model's VOCAB: its ids are drawn below it
    lengths = (2 * w + 1, 5 * w + 3)
    for rank, worst in enumerate(ranks.run(w, _model_vs_single, r, lengths)):
        bad = {k: v for k, v in worst.items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"
