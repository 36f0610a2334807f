"""The whole model under context parallel: a hybrid of every registered block on W in {1, 2, 3, 4} gloo
ranks, both layouts, float64. Local logits, the global loss and aux loss, and the parameter gradients
summed over ranks equal the single-process run within 1e-10 relative; labels shift across chunk
boundaries (the last token of a chunk predicts the first label of the next chunk, on another rank)."""
import pytest
import torch
import torch.distributed as dist

import zoo
from tests.helpers import EVERY_BLOCK, cp_errors, every_block_recipe
from zoo.distributed import ContextParallel, all_reduce_grads, shard
from zoo.model import IGNORE_INDEX

TOL = 1e-10
VOCAB = 37
RECIPE = every_block_recipe("every-block-cp", d_model=16, vocab_size=VOCAB, seq_len=64, init_std=0.2)


def test_covers_every_registered_block():
    assert {b["type"] for b in EVERY_BLOCK.values()} == set(zoo.list_blocks())


def _model_vs_single(recipe, lengths):
    worst = {}
    group = dist.group.WORLD
    for layout in ("contiguous", "zigzag"):
        for length in lengths:
            torch.manual_seed(0)
            model = zoo.build_model(recipe).double().train()
            ids = torch.randint(0, VOCAB, (2, length))
            labels = ids.clone()
            labels[0, length // 2] = IGNORE_INDEX   # ignored labels count on no rank
            labels[1, -1] = IGNORE_INDEX
            torch.manual_seed(1)  # Taipan's Gumbel noise: the same draw in both runs
            ref = model(ids, labels=labels)
            _total(ref).backward()
            ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()

            torch.manual_seed(1)
            # the layout from the keyword, and (zigzag) from the recipe's default
            kw = {"cp_layout": layout} if layout == "contiguous" else {}
            out = model(shard(ids, group, layout), labels=shard(labels, group, layout), cp_group=group, **kw)
            _total(out).backward()
            all_reduce_grads(model, group)
            cp_errors(worst, f"{layout} L={length}", out, ref, ref_grads, model, group, layout)
    return worst


def _total(out):
    return out.loss if out.aux_loss is None else out.loss + out.aux_loss


@pytest.mark.parametrize("w", (1, 2, 3, 4))
def test_hybrid_model_under_context_parallel(ranks, w):
    lengths = (2 * w + 1, 7 * w + 2)
    for rank, worst in enumerate(ranks.run(w, _model_vs_single, RECIPE, lengths)):
        bad = {k: v for k, v in worst.items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"


def _wrong_shard(recipe):
    model = zoo.build_model(recipe).double()
    ids = torch.zeros(1, 5 + 2 * dist.get_rank(), dtype=torch.long)
    try:
        model(ids, cp_group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return ""


def test_a_shard_that_does_not_fit_the_layout_is_named(ranks):
    msgs = ranks.run(2, _wrong_shard, RECIPE)
    assert "input_ids: rank 0 holds 5 tokens but layout 'zigzag' over W=2 gives it 6 of the 12" in msgs[0]
