"""Triton selective attention (zoo.ops.triton.selective) against the dense reference under the
interpreter: outputs, lse, final scores and every gradient, odd lengths not multiples of the tiles,
several query and key blocks, GQA, cached keys with carried scores, float64 and float32."""
import math

import pytest
import torch

import zoo.ops.triton.selective as triton_selective
from tests.helpers import assert_each_close, check_block_vs_reference, check_cache_contract, make_block, projected_qkv
from zoo.ops.selective import selective_attention, selective_attention_ref, selective_cache_step

pytest.importorskip("triton")
from zoo.ops.triton.selective import selective_attention_triton  # noqa: E402

F64, F32 = torch.float64, torch.float32
NAMES = ("out", "lse", "scores", "dq", "dk", "dv", "dscores")


def qkv(lq, lk, heads, kv_heads, head_dim=16, v_dim=None, batch=2, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Scaled so that head 0's logits are large enough for F to matter (F of order 10 at L = 70).
    make = lambda n, h, d, s: (s * torch.randn(batch, n, h, d, generator=g, dtype=dtype)).requires_grad_()
    return make(lq, heads, head_dim, 2), make(lk, kv_heads, head_dim, 2), make(lk, kv_heads, v_dim or head_dim, 1)


def dense_lse(q, k, scores, scale=None):
    """log sum_j exp(l^h_ij - F_ij) over j <= p_i, from the same definition as the reference."""
    b, lq, h, d = q.shape
    lk, groups = k.shape[1], h // k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    logits = q.double().transpose(1, 2) @ k.double().repeat_interleave(groups, 2).permute(0, 2, 3, 1) * scale
    qpos = torch.arange(lq)[:, None] + lk - lq
    kpos = torch.arange(lk)[None, :]
    s = torch.where((kpos < qpos) & (kpos > 0), logits[:, 0].relu(), torch.zeros_like(logits[:, 0]))
    f = s.cumsum(1) - s
    if scores is not None:
        f = f + torch.nn.functional.pad(scores.double(), (0, lq))[:, None, :]
    return (logits - f[:, None]).masked_fill(kpos > qpos, -math.inf).logsumexp(-1)


def results(q, k, v, scores, triton_kw=None):
    """(out, lse, final scores, grads) of the kernel (triton_kw given) or of the reference."""
    if triton_kw is not None:
        out, final, lse = selective_attention_triton(q, k, v, scores=scores, return_scores=True, return_lse=True,
                                                     **triton_kw)
    else:
        out, final = selective_attention_ref(q, k, v, scores=scores, return_scores=True)
        lse = dense_lse(q, k, scores)
    g = torch.Generator().manual_seed(1)
    # drawn in float64 whatever the dtype, so that a float32 run and its float64 reference see one loss
    weight = lambda t: torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)
    loss = (out * weight(out)).sum() + (final * weight(final)).sum()
    leaves = [q, k, v] + ([scores] if scores is not None else [])
    return [out, lse, final, *torch.autograd.grad(loss, leaves, materialize_grads=True)]


# (Lq, Lk, heads, kv_heads, block_m, block_n): lengths 1 and 7 inside one tile, 33 and 70 over
# several query and key blocks, tiles of unequal sizes, GQA, cached keys (Lk > Lq) that start inside
# a key block.
CASES = [
    (1, 1, 3, 3, 16, 16),
    (7, 7, 2, 2, 16, 16),
    (33, 33, 3, 3, 16, 16),
    (70, 70, 3, 3, 32, 16),
    (33, 33, 4, 2, 16, 32),
    (13, 40, 2, 1, 16, 16),
]


@pytest.mark.parametrize("lq,lk,heads,kv_heads,block_m,block_n", CASES)
def test_kernel_matches_ref_float64(lq, lk, heads, kv_heads, block_m, block_n):
    q, k, v = qkv(lq, lk, heads, kv_heads)
    scores = (3 * torch.rand(2, lk - lq, dtype=F64)).requires_grad_() if lk > lq else None
    got = results(q, k, v, scores, dict(block_m=block_m, block_n=block_n))
    want = results(q, k, v, scores)
    assert_each_close(NAMES, got, want, 1e-12)


def test_kernel_float32_odd_head_dims():
    # head_dim 12 and value dim 20 are padded to a 16 / 32 tile inside the kernel; float32 against the
    # float64 reference: the error is the kernel's rounding, not the reference's.
    q, k, v = qkv(29, 29, 2, 2, head_dim=12, v_dim=20, dtype=F32)
    got = results(q, k, v, None, dict(block_m=16, block_n=16))
    want = results(*(t.detach().double().requires_grad_() for t in (q, k, v)), None)
    assert_each_close(NAMES, got, want, 2e-5)


def test_kernel_float16():
    # The 16-bit path: tile products in the input dtype with float32 accumulation, P, dx and the
    # head-0 term rounded to float16 before their products (as flash attention does), so the error is
    # of float16's order (unit roundoff 4.9e-4). bfloat16 takes the same path on GPUs but cannot be
    # checked here: Triton 3.9's interpreter multiplies bfloat16 tiles as their uint16 bit patterns.
    q, k, v = qkv(29, 29, 2, 2, dtype=torch.float16)
    got = results(q, k, v, None, dict(block_m=16, block_n=16))
    want = results(*(t.detach().double().requires_grad_() for t in (q, k, v)), None)
    assert_each_close(NAMES, got, want, 2e-3)


def test_op_dispatches_to_the_kernel():
    # The public op with impl="triton" (default tiles, one block at this length) and the cache step.
    q, k, v = qkv(21, 21, 2, 2)
    got = selective_attention(q, k, v, impl="triton")
    want = selective_attention_ref(q, k, v)
    assert_each_close(["out"], [got], [want], 1e-12)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    out1, cache = selective_cache_step(qd[:, :12], kd[:, :12], vd[:, :12], impl="triton")
    out2, cache = selective_cache_step(qd[:, 12:], kd[:, 12:], vd[:, 12:], cache, impl="triton")
    _, final = selective_attention_ref(qd, kd, vd, return_scores=True)
    assert_each_close(["streamed out", "cache scores"], [torch.cat([out1, out2], 1), cache[2]], [want, final], 1e-12)


def test_keys_with_infinite_scores_get_no_weight():
    # Cached keys with F = inf get weight exp(-inf) = 0 (zoo.hf pads a batched cache so). Keys 0..19 here:
    # every query meets a whole tile it sees nothing of before its first visible key.
    q, k, v = (t.detach() for t in qkv(5, 40, 2, 2))
    scores = torch.rand(2, 35, dtype=F64)
    scores[:, :20] = math.inf
    got, final = selective_attention_triton(q, k, v, scores=scores, return_scores=True, block_m=16, block_n=16)
    want, want_final = selective_attention_ref(q, k, v, scores=scores, return_scores=True)
    assert_each_close(["out", "scores"], [got, final[:, 20:]], [want, want_final[:, 20:]], 1e-12)
    assert torch.isinf(final[:, :20]).all()


@pytest.mark.parametrize("bad", [8, 24, True])
def test_tile_sizes_must_be_powers_of_two(bad):
    q, k, v = qkv(4, 4, 1, 1)
    with pytest.raises(ValueError, match="block_m: must be a power of two >= 16"):
        selective_attention_triton(q, k, v, block_m=bad)


def test_block_runs_the_kernel_when_its_model_chooses_it(monkeypatch):
    # ZooLM hands a recipe's model.kernels to every mixer as `kernels`; set it as ZooLM does.
    calls = []
    kernel = triton_selective.selective_attention_triton
    monkeypatch.setattr(triton_selective, "selective_attention_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    block = make_block("selective", 24, n_heads=4, n_kv_heads=2)
    block.kernels = {"selective_attention": "triton"}

    def reference(block, x):
        _, _, v, q, k = projected_qkv(block, x)
        return block.out_proj(selective_attention_ref(q, k, v).reshape(*x.shape[:2], -1))

    check_block_vs_reference(block, reference, torch.randn(2, 19, 24, dtype=F64))
    assert calls, "the block did not run the Triton kernel"
    n_whole = len(calls)
    check_cache_contract(block, torch.randn(2, 11, 24, dtype=F64), splits=((4,),))
    assert len(calls) > n_whole, "the cache path did not run the Triton kernel"
