"""zoo.ops.selective: blocked path against the dense reference, the selection rule element by element,
streaming and decoding through the cache, eviction under a budget, saved-activation bound, errors."""
import math

import pytest
import torch

from tests.helpers import assert_close, assert_each_close
from zoo.ops.selective import (
    selective_attention,
    selective_attention_ref,
    selective_cache_step,
    selective_evict,
    selective_keep_index,
    selective_memory,
    selective_memory_ref,
)

F64 = torch.float64
TOL = 1e-10

LENGTHS = [1, 2, 7, 13, 31]  # 1, 2 (no selection possible yet), primes not divided by the blocks
BLOCKS = [1, 4, 5, 64]
HEADS = [(3, 3), (4, 2)]


def qkv(lq, lk, heads, kv_heads, head_dim=6, batch=2, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    # Scaled up so that head 0's logits are large enough for F to matter (F of order 10 at L = 31).
    make = lambda length, h: (2 * torch.randn(batch, length, h, head_dim, generator=g, dtype=dtype)).requires_grad_()
    return make(lq, heads), make(lk, kv_heads), make(lk, kv_heads)


def out_scores_grads(fn, q, k, v, scores=None, **kw):
    out, final = fn(q, k, v, scores=scores, return_scores=True, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g, dtype=final.dtype)).sum()
    leaves = [q, k, v] + ([scores] if scores is not None else [])
    return [out, final, *torch.autograd.grad(loss, leaves, materialize_grads=True)]


def assert_all_close(got, want, tol=TOL):
    assert_each_close(("out", "scores", "dq", "dk", "dv", "dscores"), got, want, tol)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("length", LENGTHS)
def test_blocked_matches_ref(length, block_size, heads, kv_heads):
    q, k, v = qkv(length, length, heads, kv_heads)
    got = out_scores_grads(selective_attention, q, k, v, block_size=block_size)
    want = out_scores_grads(selective_attention_ref, q, k, v)
    assert_all_close(got, want)


@pytest.mark.parametrize("lq,lk", [(1, 9), (5, 13), (13, 14)])
@pytest.mark.parametrize("block_size", [1, 4, 64])
def test_cached_keys_with_scores_match_ref(lq, lk, block_size):
    q, k, v = qkv(lq, lk, 4, 2)
    scores = (3 * torch.rand(2, lk - lq, dtype=F64)).requires_grad_()
    got = out_scores_grads(selective_attention, q, k, v, scores, block_size=block_size)
    want = out_scores_grads(selective_attention_ref, q, k, v, scores)
    assert_all_close(got, want)


def test_ref_follows_the_selection_rule_element_by_element():
    # The paper's definition written out with scalars: S from head 0 with BOS column, diagonal and
    # future zeroed; F[i, j] = sum over strictly earlier queries; every head's logits minus F.
    q, k, v = (t.detach() for t in qkv(6, 6, 2, 2, batch=1))
    scale = 1 / math.sqrt(q.shape[-1])
    L, H = 6, 2
    S = [[max(0.0, scale * float(q[0, i, 0] @ k[0, j, 0])) if 0 < j < i else 0.0 for j in range(L)] for i in range(L)]
    want = torch.zeros(1, L, H, q.shape[-1], dtype=F64)
    for i in range(L):
        for h in range(H):
            logit = torch.tensor([scale * float(q[0, i, h] @ k[0, j, h]) - sum(S[r][j] for r in range(i))
                                  for j in range(i + 1)], dtype=F64)
            want[0, i, h] = logit.softmax(0) @ v[0, : i + 1, h]
    out, final = selective_attention_ref(q, k, v, return_scores=True)
    assert_close(out, want, 1e-12)
    assert_close(final[0], torch.tensor([sum(S[i][j] for i in range(L)) for j in range(L)], dtype=F64), 1e-12)
    assert final[0, 0] == 0 and final[0, -1] == 0  # BOS is never selected; the last key not yet


def test_first_two_tokens_are_plain_causal_attention():
    # No key satisfies 0 < j < i before the third query, so F is 0 and the output is ordinary attention.
    q, k, v = (t.detach() for t in qkv(2, 2, 3, 3))
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    p = logits.masked_fill(torch.ones(2, 2, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    assert_close(selective_attention(q, k, v), torch.einsum("bhij,bjhd->bihd", p, v), TOL)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("length", LENGTHS)
def test_memory_blocked_matches_ref(length, block_size, heads, kv_heads, tau):
    q, k, _ = qkv(length, length, heads, kv_heads)
    w = torch.randn(2, length, dtype=F64, generator=torch.Generator().manual_seed(3))
    got = selective_memory(q, k, tau=tau, block_size=block_size)
    want = selective_memory_ref(q, k, tau=tau)
    grads = lambda m: torch.autograd.grad((m * w).sum(), [q, k])
    assert_each_close(("M", "dq", "dk"), [got, *grads(got)], [want, *grads(want)], TOL)


def test_memory_ref_counts_kept_keys_element_by_element():
    # M[i] = (i + 1) - sum_{j <= i} min(F[i, j], tau) / tau with F[i, j] = sum over earlier queries of S.
    q, k, _ = (t.detach() for t in qkv(7, 7, 2, 2, batch=1))
    scale, L, tau = 1 / math.sqrt(q.shape[-1]), 7, 1.5
    S = [[max(0.0, scale * float(q[0, i, 0] @ k[0, j, 0])) if 0 < j < i else 0.0 for j in range(L)] for i in range(L)]
    Fm = [[sum(S[r][j] for r in range(i)) for j in range(L)] for i in range(L)]
    want = [i + 1 - sum(min(Fm[i][j], tau) for j in range(i + 1)) / tau for i in range(L)]
    got = selective_memory_ref(q, k, tau=tau)[0]
    assert_close(got, torch.tensor(want, dtype=F64), 1e-12)
    assert got[0] == 1 and got[1] == 2 and got.min() < L - 1  # selection starts at the third query


def test_memory_reads_head_zero_only_and_is_all_keys_without_selection():
    q, k, _ = (t.detach() for t in qkv(11, 11, 3, 3))
    base = selective_memory(q, k, block_size=4)
    q2, k2 = q.clone(), k.clone()
    q2[:, :, 1:] += 5.0
    k2[:, :, 1:] -= 5.0
    assert_close(selective_memory(q2, k2, block_size=4), base, 1e-12)
    # Head 0's logits all negative: S = 0, nothing is masked, M[i] = i + 1.
    none = selective_memory(torch.ones_like(q), -torch.ones_like(k), block_size=4)
    assert torch.equal(none, torch.arange(1, 12, dtype=F64).expand(2, 11))


def test_memory_bad_inputs_raise():
    q, k, _ = (t.detach() for t in qkv(5, 5, 2, 2))
    with pytest.raises(ValueError, match="tau"):
        selective_memory(q, k, tau=0.0)
    with pytest.raises(ValueError, match="block_size"):
        selective_memory(q, k, block_size=0)
    with pytest.raises(ValueError, match="q, k"):
        selective_memory(q, k[:, :4])


def saved_numel(fn):
    """Elements held for the backward by tensors saved during fn (unique storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_blocked_path_saves_inputs_and_carries_only():
    b, L, h, d, block = 1, 192, 4, 8, 16
    q, k, v = qkv(L, L, h, h, head_dim=d, batch=b)
    fast = saved_numel(lambda: selective_attention(q, k, v, block_size=block))
    # q, k, v plus one [b, L] carry of column sums per query block; no [heads, L, L] tensor.
    assert fast <= 3 * b * L * h * d + (L // block) * b * L
    assert saved_numel(lambda: selective_attention_ref(q, k, v)) > h * L * L  # the dense twin does


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("sizes", [(1,), (3, 5), (4,), (2, 7)])
def test_streaming_through_the_cache_equals_one_call(sizes, heads, kv_heads):
    q, k, v = (t.detach() for t in qkv(17, 17, heads, kv_heads))
    whole, final = selective_attention_ref(q, k, v, return_scores=True)
    outs, cache, start, i = [], None, 0, 0
    while start < 17:
        n = sizes[i % len(sizes)]
        out, cache = selective_cache_step(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n], cache,
                                          block_size=3)
        # At every step the output equals the matching rows of the full computation.
        assert_close(out, whole[:, start:start + n], TOL, f"step at {start}")
        outs.append(out)
        start, i = start + n, i + 1
    assert_close(torch.cat(outs, 1), whole, TOL)
    assert_close(cache[2], final, TOL, "scores")


@pytest.mark.parametrize("budget", [17, 40])
def test_budget_at_least_the_length_is_exact(budget):
    q, k, v = (t.detach() for t in qkv(17, 17, 4, 2))
    whole = selective_attention_ref(q, k, v)
    cache = None
    for t in range(17):
        out, cache = selective_cache_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache, budget=budget)
        assert_close(out, whole[:, t:t + 1], TOL, f"token {t}")
    assert cache[0].shape[1] == 17


def test_keep_index_keeps_bos_and_the_least_selected_in_order():
    scores = torch.tensor([[0.0, 5.0, 1.0, 0.0, 3.0, 2.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 1.0]], dtype=F64)
    keep = selective_keep_index(scores, 4)
    # Row 0: BOS, then F = 0, 0, 1 (positions 3, 6, 2). Row 1: BOS, then the newest three of the
    # zeros at positions 1, 2, 3, 5.
    assert keep.tolist() == [[0, 2, 3, 6], [0, 2, 3, 5]]
    assert selective_keep_index(scores, 1).tolist() == [[0], [0]]
    assert selective_keep_index(scores, 7).tolist() == [list(range(7))] * 2


def test_evict_gathers_keys_values_and_scores():
    k = torch.randn(2, 7, 2, 3, dtype=F64)
    v = torch.randn(2, 7, 2, 5, dtype=F64)
    scores = torch.rand(2, 7, dtype=F64)
    k2, v2, s2 = selective_evict(k, v, scores, 3)
    keep = selective_keep_index(scores, 3)
    for row in range(2):
        assert_close(k2[row], k[row, keep[row]], 0.0)
        assert_close(v2[row], v[row, keep[row]], 0.0)
        assert_close(s2[row], scores[row, keep[row]], 0.0)
    assert selective_evict(k, v, scores, 7)[0] is k


@pytest.mark.parametrize("budget", [3, 6])
def test_pruned_decoding_attends_to_the_kept_keys_with_their_full_scores(budget):
    # Eviction only removes keys: what stays keeps the F the whole sequence would give it, so each
    # pruned step equals the dense reference restricted to the kept positions.
    L = 15
    q, k, v = (t.detach() for t in qkv(L, L, 4, 2, batch=1))
    cache, kept = None, torch.zeros(1, 0, dtype=torch.long)
    for t in range(L):
        out, cache = selective_cache_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache)
        positions = torch.cat([kept, torch.full((1, 1), t)], 1)
        # Oracle: F of every earlier key after query t - 1, from the unpruned sequence.
        if t > 0:
            _, f_before = selective_attention_ref(q[:, :t], k[:, :t], v[:, :t], return_scores=True)
            f_kept = f_before[:, positions[0, :-1]]
        else:
            f_kept = torch.zeros(1, 0, dtype=F64)
        want = selective_attention_ref(q[:, t:t + 1], k[:, positions[0]], v[:, positions[0]], scores=f_kept)
        assert_close(out, want, TOL, f"token {t}")
        keep = selective_keep_index(cache[2], budget)
        cache = selective_evict(*cache, budget)
        kept = positions[:, keep[0]]
        assert kept[0, 0] == 0 and cache[0].shape[1] == min(budget, t + 1)


def test_pruning_with_a_small_budget_changes_the_output():
    # The exactness tests above would also pass if eviction never happened; this one would not.
    q, k, v = (t.detach() for t in qkv(15, 15, 4, 2))
    whole = selective_attention_ref(q, k, v)
    cache, outs = None, []
    for t in range(15):
        out, cache = selective_cache_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache, budget=3)
        outs.append(out)
    assert (torch.cat(outs, 1) - whole).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    q, k, v = (t.detach() for t in qkv(13, 13, 4, 2))
    out, final = selective_attention(q.to(dtype), k.to(dtype), v.to(dtype), block_size=4, return_scores=True)
    assert out.dtype == dtype and final.dtype == torch.float32
    want = selective_attention_ref(*(t.to(dtype).double() for t in (q, k, v)))
    assert_close(out, want, 1e-5 if dtype == torch.float32 else 2e-2)


def test_bad_inputs_raise():
    q, k, v = (t.detach() for t in qkv(5, 7, 4, 2))
    with pytest.raises(ValueError, match="scores"):
        selective_attention(q, k, v)  # two cached keys without their scores
    with pytest.raises(ValueError, match="scores"):
        selective_attention(q, k, v, scores=torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="Lq"):
        selective_attention(k.repeat(1, 1, 2, 1), q[:, :, :2], q[:, :, :2])
    with pytest.raises(ValueError, match="block_size"):
        selective_attention(q, k, v, scores=torch.zeros(2, 2, dtype=F64), block_size=0)
    with pytest.raises(ValueError, match="kv heads"):
        selective_attention(q, k[:, :, :1].repeat(1, 1, 3, 1), v[:, :, :1].repeat(1, 1, 3, 1),
                            scores=torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="budget"):
        selective_keep_index(torch.zeros(2, 4), 0)
