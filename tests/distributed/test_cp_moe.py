"""The MoE FFN under context parallel: a model of attention and Mamba layers with MoE FFNs on W in
{1, 2, 3, 4} gloo ranks, both layouts, float64. The load-balancing loss (its token counts and router
probabilities summed over the group), the logits, the loss and the parameter gradients summed over ranks
(what the Trainer's loss * W and DDP's mean give) equal one process within 1e-10 relative."""
import pytest
import torch
import torch.distributed as dist

import zoo
from tests.helpers import cp_errors
from zoo.distributed import all_reduce_grads, shard

TOL = 1e-10
VOCAB = 29
MOE = {"type": "moe", "experts": 4, "top_k": 2, "hidden": 8, "aux_loss_weight": 0.5}
RECIPE = {"name": "moe-cp",
          "model": {"d_model": 16, "n_layers": 3, "vocab_size": VOCAB, "pattern": "AMN", "init_std": 0.3,
                    "blocks": {"A": {"type": "attn", "n_heads": 2},
                               "M": {"type": "mamba", "d_state": 4},
                               "N": {"type": "mamba", "d_state": 4, "ffn": {**MOE, "normalize_top_k": True,
                                                                            "shared_hidden": 4}}},
                    "ffn": MOE},
          "train": {"seq_len": 64}}


def _model_vs_single(recipe, lengths):
    worst = {}
    group = dist.group.WORLD
    for layout in ("contiguous", "zigzag"):
        for length in lengths:
            torch.manual_seed(0)
            model = zoo.build_model(recipe).double().train()
            ids = torch.randint(0, VOCAB, (2, length))
            ref = model(ids, labels=ids)
            (ref.loss + ref.aux_loss).backward()
            ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            out = model(shard(ids, group, layout), labels=shard(ids, group, layout), cp_group=group,
                        cp_layout=layout)
            (out.loss + out.aux_loss).backward()
            all_reduce_grads(model, group)
            cp_errors(worst, f"{layout} L={length}", out, ref, ref_grads, model, group, layout)
    return worst


@pytest.mark.parametrize("w", (1, 2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)))
def test_moe_model_under_context_parallel(ranks, w):
    for rank, worst in enumerate(ranks.run(w, _model_vs_single, RECIPE, (2 * w + 1, 5 * w + 3))):
        bad = {k: v for k, v in worst.items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"
        assert any("experts" not in k and "gate_up" in k for k in worst)
