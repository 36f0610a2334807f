"""Selective attention block: wiring vs the dense reference, cache contract with and without pruning,
state bytes under a KV budget."""
import pytest
import torch

import zoo.blocks.selective  # noqa: F401  (registers `selective` until zoo.blocks imports it)
from tests.helpers import (assert_close, cache_bytes, check_block_vs_reference, check_cache_contract, make_block,
                           projected_qkv, run_chunks)
from zoo.blocks.base import split_aux
from zoo.config import RecipeError, load_recipe
from zoo.ops.attention import attention_ref
from zoo.ops.documents import document_spans
from zoo.ops.selective import selective_attention_ref, selective_memory_ref

D_MODEL = 24
CASES = {
    "mha": {"n_heads": 3, "block_size": 5},
    "gqa": {"n_heads": 4, "n_kv_heads": 2, "block_size": 4},
    "mqa_bias": {"n_heads": 2, "n_kv_heads": 1, "block_size": 64, "qkv_bias": True, "out_bias": True},
}


def make(case, dtype=torch.float64, **extra):
    return make_block("selective", D_MODEL, dtype, **{**CASES[case], **extra})


def qkv(block, x):
    _, _, v, q, k = projected_qkv(block, x)
    return q, k, v


def ref_forward(block, x, op=selective_attention_ref):
    """The block's math with the dense reference."""
    out = op(*qkv(block, x))
    return block.out_proj(out.reshape(*x.shape[:2], -1))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [1, 13, 29])
def test_block_matches_reference(case, length):
    block = make(case)
    check_block_vs_reference(block, ref_forward, torch.randn(2, length, D_MODEL, dtype=torch.float64))


def test_selection_changes_the_output():
    # Guards the reference comparison above: with these weights selective attention is not plain attention.
    block = make("gqa")
    x = torch.randn(2, 29, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        plain = ref_forward(block, x, op=lambda q, k, v: attention_ref(q, k, v, causal=True))
        assert (block(x) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("budget", [None, 23, 40])
@pytest.mark.parametrize("case", list(CASES))
def test_cache_contract_without_pruning(case, budget):
    # No budget, or one at least the length: nothing is evicted and the cache path is exact.
    block = make(case, kv_budget=budget)
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    check_cache_contract(block, x, splits=((1,), (4, 7), (5,), (2, 9), (23,)))


@pytest.mark.parametrize("budget", [1, 4, 9])
@pytest.mark.parametrize("case", ["mha", "gqa"])
def test_pruned_stream_is_chunking_invariant_and_bounded(case, budget):
    block = make(case, kv_budget=budget).eval()
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        whole = block(x)
        one_by_one, cache = run_chunks(block, x, [1])
        assert cache.k.shape[1] == cache.v.shape[1] == cache.scores.shape[1] == budget
        for sizes in ((4, 7), (5,), (23,)):
            got, _ = run_chunks(block, x, list(sizes))
            assert_close(got, one_by_one, 1e-10, f"chunks {sizes} vs token by token")
    # Exact until the first eviction (after token budget + 1), different afterwards.
    assert_close(one_by_one[:, :budget + 1], whole[:, :budget + 1], 1e-10, "before the first eviction")
    assert (one_by_one - whole).abs().max() > 1e-3


def test_cache_stays_at_the_budget_at_every_step():
    block = make("gqa", kv_budget=5).eval()
    x = torch.randn(1, 17, D_MODEL, dtype=torch.float64)
    cache = block.init_cache(1, x.device, x.dtype)
    with torch.no_grad():
        for t in range(17):
            block(x[:, t:t + 1], cache=cache)
            assert cache.k.shape[1] == min(t + 1, 5)
            assert cache_bytes(cache) == block.state_bytes(t + 1, batch_size=1, dtype=torch.float64)
    assert cache.pos == 17


@pytest.mark.parametrize("budget", [None, 3, 100])
@pytest.mark.parametrize("length", [1, 5, 17])
def test_state_bytes_equals_cache_bytes(budget, length):
    block = make("gqa", kv_budget=budget)
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [3])
    assert cache_bytes(cache) == block.state_bytes(length, batch_size=2, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_in_float32_and_state_bytes_match(dtype):
    block = make("gqa", dtype=dtype, kv_budget=6)
    x = torch.randn(2, 11, D_MODEL, dtype=dtype)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [4])
    assert cache.scores.dtype == torch.float32 and cache.k.dtype == dtype
    assert cache_bytes(cache) == block.state_bytes(11, batch_size=2, dtype=dtype)


def test_budget_bounds_state_bytes():
    assert make("mha", kv_budget=64).state_bytes(10**6) == make("mha").state_bytes(64)
    assert make("mha").state_bytes(2000) == 2 * make("mha").state_bytes(1000)


def memory_loss_ref(block, x, w):
    _, _, _, q, k = projected_qkv(block, x)
    return w * (selective_memory_ref(q, k, tau=block.cfg.mem_loss_tau).max(1).values / x.shape[1]).mean()


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("case", ["mha", "gqa"])
def test_memory_loss_is_set_in_training_only(case, tau):
    block = make(case, mem_loss_weight=0.25, mem_loss_tau=tau)
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    _, aux = split_aux(block.train()(x))
    want = memory_loss_ref(block, x, 0.25)
    assert_close(aux, want, 1e-12)
    g_got = torch.autograd.grad(aux, [block.q_proj.weight, block.k_proj.weight])
    g_want = torch.autograd.grad(want, [block.q_proj.weight, block.k_proj.weight])
    for got, ref in zip(g_got, g_want):
        assert_close(got, ref, 1e-10)
    assert g_got[0].abs().sum() > 0
    assert split_aux(block.eval()(x))[1] is None
    # a cached (inference) step never adds it
    assert split_aux(block.train()(x[:, :5], cache=block.init_cache(2, dtype=x.dtype)))[1] is None
    assert split_aux(make(case).train()(x))[1] is None


def test_memory_loss_counts_keys_within_each_document():
    block = make("gqa", mem_loss_weight=1.0).train()
    x = torch.randn(2, 17, D_MODEL, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 6 + [1] * 11, [0] * 13 + [1] * 4])
    _, aux = split_aux(block(x, seq_idx=seq_idx))
    peaks = [max(float(selective_memory_ref(*projected_qkv(block, x[r:r + 1, s:e])[3:]).detach().max()) for s, e in row)
             for r, row in enumerate(document_spans(seq_idx))]
    assert_close(aux, torch.tensor(sum(peaks) / 2 / 17, dtype=torch.float64), 1e-12)


def test_memory_loss_refused_under_context_parallelism():
    block = make("mha", mem_loss_weight=0.1).train()
    with pytest.raises(ValueError, match="mem_loss_weight"):
        block(torch.randn(1, 8, D_MODEL, dtype=torch.float64), cp=object())


def test_training_on_the_memory_loss_frees_keys():
    # The loss's gradient lowers the keys needed: a few steps on it alone shrink max_i M[i]. (Masking
    # needs a later query, so query i always keeps key 0, key i - 1 and itself: M[i] >= 3.)
    torch.manual_seed(0)
    block = make("mha", dtype=torch.float32, std=0.1, mem_loss_weight=1.0).train()
    x = torch.randn(4, 48, D_MODEL)
    opt = torch.optim.Adam(block.parameters(), lr=3e-2)
    first = split_aux(block(x))[1].item()
    for _ in range(30):
        opt.zero_grad()
        split_aux(block(x))[1].backward()
        opt.step()
    # From ~10 of 48 keys to ~5 (3 is the floor: BOS, the previous key and the query's own).
    assert split_aux(block(x))[1].item() < 0.6 * first


@pytest.mark.parametrize("field,value", [("kv_budget", 0), ("block_size", 0), ("n_kv_heads", 2),
                                         ("mem_loss_weight", -0.1), ("mem_loss_tau", 0.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(RecipeError, match=f"model.blocks.S.{field}"):
        load_recipe({"model": {"d_model": 24, "n_layers": 1, "pattern": "S",
                               "blocks": {"S": {"type": "selective", "n_heads": 3, field: value}}}})
