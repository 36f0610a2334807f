"""The `parallel` block (issue 19, Falcon-H1's layers): branches on one normed input, summed with per-branch
output scales. Against the branches run separately and summed (float64, outputs and every gradient), the cache
contract through the joint cache, state bytes, left-padded generation equal to each row alone, packed
documents, and the refusals that name the branch."""
import pytest
import torch

import zoo
from tests.helpers import assert_close, cache_bytes, check_block_vs_reference, check_cache_contract, make_block
from tests.test_hf import generate, left_pad
from zoo.config import RecipeError
from zoo.hf import ZooForCausalLM

D = 16
BRANCHES = [{"type": "attn", "n_heads": 4, "n_kv_heads": 2, "out_scale": 0.37},
            {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 4, "norm": False, "out_scale": 1.9}]
# every family's own merge in one layer: attention (left-padded K/V), taipan, infini (row groups)
WIDE = [{"type": "swa", "n_heads": 2, "window": 5, "block_size": 4},
        {"type": "infini", "n_heads": 2, "segment_len": 4, "out_scale": -0.5},
        {"type": "mamba", "d_state": 4, "out_scale": 0.8}]
V = 41


def _recipe(branches, n_layers=2):
    return {"name": "parallel-test",
            "model": {"d_model": D, "n_layers": n_layers, "vocab_size": V, "pattern": "P", "init_std": 0.3,
                      "blocks": {"P": {"type": "parallel", "branches": branches}}, "ffn": {"type": "swiglu", "mult": 2}},
            "train": {"seq_len": 64}}


def _sum_of_branches(block, x):
    return sum(s * b(x) for b, s in zip(block.branches, block.out_scales))


@pytest.mark.parametrize("branches", [BRANCHES, WIDE], ids=["attn+mamba2", "swa+infini+mamba"])
def test_equals_the_branches_run_separately_and_summed(branches):
    torch.manual_seed(0)
    block = make_block("parallel", D, branches=branches)
    check_block_vs_reference(block, _sum_of_branches, torch.randn(2, 13, D, dtype=torch.float64))


@pytest.mark.parametrize("branches", [BRANCHES, WIDE], ids=["attn+mamba2", "swa+infini+mamba"])
def test_cache_contract_and_state_bytes(branches):
    torch.manual_seed(0)
    block = make_block("parallel", D, branches=branches)
    x = torch.randn(2, 17, D, dtype=torch.float64)
    check_cache_contract(block, x)
    cache = block.init_cache(2, dtype=torch.float64)
    with torch.no_grad():
        block(x, cache=cache)
    assert cache.nbytes() == cache_bytes(cache) == block.state_bytes(17, 2, torch.float64)
    assert cache.batch_size == 2 and cache.index_rows(torch.tensor([1, 1, 0])).batch_size == 3


def test_packed_documents_equal_each_document_alone():
    torch.manual_seed(0)
    block = make_block("parallel", D, branches=BRANCHES)
    x = torch.randn(1, 12, D, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        assert_close(block(x, seq_idx=seq_idx), torch.cat([block(x[:, :5]), block(x[:, 5:])], 1), 1e-10)


@pytest.mark.parametrize("branches", [BRANCHES, WIDE], ids=["attn+mamba2", "swa+infini+mamba"])
def test_left_padded_generate_equals_each_row_alone(branches):
    torch.manual_seed(0)
    lm = zoo.build_model(_recipe(branches)).double().eval()
    model = ZooForCausalLM.from_zoo(lm)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (3, 8, 5)]
    ids, mask = left_pad(prompts)
    batch = generate(model, ids, 6, attention_mask=mask)
    for r, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), 6)
        assert batch[r, ids.shape[1]:].tolist() == alone[0, len(p):].tolist(), f"row {r}"
    beams = model.generate(torch.tensor([prompts[1]]), max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (1, len(prompts[1]) + 4)


def test_describe_names_the_branches():
    assert "parallel(attn+mamba2)" in zoo.build_model(_recipe(BRANCHES)).describe()


def test_refusals_name_the_branch():
    block = make_block("parallel", D, branches=BRANCHES)
    block.branches[1].supports_cp = False          # as a block without a cp path
    block.branches[1].supports_seq_idx = False
    x = torch.randn(1, 4, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cp: not supported by branch 1 \(mamba2\) of the parallel block"):
        block(x, cp=object())
    with pytest.raises(ValueError, match=r"seq_idx: not supported by branch 1 \(mamba2\)"):
        block(x, seq_idx=torch.zeros(1, 4, dtype=torch.int64))


@pytest.mark.parametrize("bad, match", [
    ({"type": "atn"}, r"branches.0.type: unknown block 'atn' \(did you mean 'attn'"),
    ({"type": "attn", "n_head": 2}, r"branches.0.n_head: unknown key"),
    ({"type": "attn", "n_heads": 3}, r"branches.0.n_heads: 3 does not divide model.d_model"),
    ({"type": "attn", "out_scale": 0}, r"branches.0.out_scale: must be a finite non-zero number"),
    ({"type": "attn", "ffn": "none"}, r"branches.0.ffn: a branch is a mixer"),
])
def test_bad_branches_name_the_field(bad, match):
    with pytest.raises(RecipeError, match="model.blocks.P." + match):
        zoo.load_recipe(_recipe([bad]))


def test_saved_recipe_round_trips():
    recipe = zoo.load_recipe(_recipe(BRANCHES))
    again = zoo.load_recipe(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
    assert again.layers[0].cfg.branches[0]["out_scale"] == 0.37
