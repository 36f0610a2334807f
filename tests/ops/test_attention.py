"""zoo.ops.attention: SDPA and blockwise paths against the dense reference, merge, memory, errors."""
import math

import pytest
import torch

from tests.helpers import assert_close, assert_each_close
from zoo.ops.attention import (
    attention,
    attention_ref,
    blockwise_attention,
    blockwise_attention_ref,
    merge_attention,
    merge_attention_ref,
)

F64 = torch.float64
TOL = 1e-10

# (Lq, Lk): self-attention at 1, 7, 13 (prime) and 64; decoding (Lq = 1 < Lk); chunked prefill.
LENGTHS = [(1, 1), (7, 7), (13, 13), (64, 64), (1, 13), (5, 13), (13, 64)]
# (causal, window): unbounded, one key, a small window, a window >= every length used here.
MASKS = [(False, None), (True, None), (True, 1), (True, 4), (True, 100)]
HEADS = [(4, 2), (3, 1)]


def qkv(lq, lk, heads, kv_heads, head_dim=8, batch=2, dtype=F64):
    make = lambda length, h: torch.randn(batch, length, h, head_dim, dtype=dtype, requires_grad=True)
    return make(lq, heads), make(lk, kv_heads), make(lk, kv_heads)


def out_lse_grads(fn, q, k, v, with_lse=True):
    """Output, lse and the gradients of q, k, v for a random cotangent on out (and on lse)."""
    res = fn(q, k, v)
    out, lse = res if with_lse else (res, None)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    if lse is not None:
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = loss + (finite * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def assert_all_close(got, want, tol=TOL):
    assert_each_close(("out", "lse", "dq", "dk", "dv"), got, want, tol)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("lq,lk", LENGTHS)
@pytest.mark.parametrize("block_size", [5, 16])
def test_blockwise_matches_ref(lq, lk, causal, window, heads, kv_heads, block_size):
    q, k, v = qkv(lq, lk, heads, kv_heads)
    got = out_lse_grads(lambda *t: blockwise_attention(*t, causal=causal, window=window, block_size=block_size,
                                                       return_lse=True), q, k, v)
    want = out_lse_grads(lambda *t: blockwise_attention_ref(*t, causal=causal, window=window, return_lse=True), q, k, v)
    assert got[1].shape == (2, heads, lq)
    assert_all_close(got, want)


@pytest.mark.parametrize("heads,kv_heads", HEADS + [(2, 2)])
@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("lq,lk", LENGTHS)
def test_attention_matches_ref(lq, lk, causal, window, heads, kv_heads):
    q, k, v = qkv(lq, lk, heads, kv_heads)
    got = out_lse_grads(lambda *t: attention(*t, causal=causal, window=window), q, k, v, with_lse=False)
    want = out_lse_grads(lambda *t: attention_ref(*t, causal=causal, window=window), q, k, v, with_lse=False)
    assert got[0].shape == q.shape
    assert_all_close(got, want)


def test_window_masks_old_keys():
    """Independent of the reference: with window w, changing a key older than w leaves the output alone."""
    q, k, v = (t.detach() for t in qkv(13, 13, 2, 2))
    out = blockwise_attention(q, k, v, window=4, block_size=5)
    k2, v2 = k.clone(), v.clone()
    k2[:, 3], v2[:, 3] = 100.0, -100.0
    out2 = blockwise_attention(q, k2, v2, window=4, block_size=5)
    assert torch.equal(out[:, :3], out2[:, :3]) and torch.equal(out[:, 7:], out2[:, 7:])
    assert not torch.equal(out[:, 3:7], out2[:, 3:7])


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 3)])
def test_blockwise_gradcheck(causal, window):
    """Finite differences, so the backward (lse term included) is checked against no other code of ours."""
    q, k, v = qkv(5, 6, 2, 1, head_dim=3, batch=1)
    fn = lambda q, k, v: blockwise_attention(q, k, v, causal=causal, window=window, block_size=2, return_lse=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_only_lse_needs_grad():
    q, k, v = qkv(7, 7, 2, 1)
    _, lse = blockwise_attention(q, k, v, block_size=3, return_lse=True)
    _, lse_ref = blockwise_attention_ref(q, k, v, return_lse=True)
    got = torch.autograd.grad(lse.sum(), (q, k, v))
    want = torch.autograd.grad(lse_ref.sum(), (q, k))
    for name, a, b in zip(("dq", "dk"), got, want):
        assert_close(a, b, TOL, name)
    assert got[2].abs().max() == 0  # lse does not depend on v


def _split_attention(q, k, v, split, causal):
    """Attention of q over keys [0, split) and [split, Lk), merged by lse."""
    lq, lk = q.shape[1], k.shape[1]
    if causal:
        # The queries are the last Lq keys: the prefix [0, split) is fully visible to them all when
        # split <= Lk - Lq, and the suffix keeps causal bottom-right alignment.
        assert split <= lk - lq
    a = blockwise_attention(q, k[:, :split], v[:, :split], causal=False, block_size=4, return_lse=True)
    b = blockwise_attention(q, k[:, split:], v[:, split:], causal=causal, block_size=4, return_lse=True)
    return merge_attention(*a, *b)


@pytest.mark.parametrize("lq,lk,split,causal", [(7, 13, 5, False), (7, 13, 6, True), (1, 13, 12, True),
                                                 (13, 13, 0, True), (7, 9, 9, False), (5, 9, 0, False)])
def test_merge_equals_attention_over_all_keys(lq, lk, split, causal):
    q, k, v = qkv(lq, lk, 4, 2)
    got = out_lse_grads(lambda *t: _split_attention(*t, split, causal), q, k, v)
    want = out_lse_grads(lambda *t: blockwise_attention_ref(*t, causal=causal, return_lse=True), q, k, v)
    assert_all_close(got, want)


def test_merge_matches_ref():
    shape, lse_shape = (2, 7, 3, 4), (2, 3, 7)
    out_a, out_b = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
    lse_a, lse_b = torch.randn(lse_shape, dtype=F64) * 5, torch.randn(lse_shape, dtype=F64) * 5
    for got, want, name in zip(merge_attention(out_a, lse_a, out_b, lse_b),
                               merge_attention_ref(out_a, lse_a, out_b, lse_b), ("out", "lse")):
        assert_close(got, want, TOL, name)


def test_merge_empty_rows_give_no_nan():
    """Rows empty on one side take the other side; rows empty on both give 0 and -inf; grads stay finite."""
    shape = (2, 5, 3, 4)
    out_a = torch.randn(shape, dtype=F64, requires_grad=True)
    out_b = torch.randn(shape, dtype=F64, requires_grad=True)
    lse_a = torch.randn(2, 3, 5, dtype=F64)
    lse_b = torch.randn(2, 3, 5, dtype=F64)
    lse_a[:, :, 0] = -math.inf                        # only b saw keys
    lse_b[:, :, 1] = -math.inf                        # only a saw keys
    lse_a[:, :, 2] = lse_b[:, :, 2] = -math.inf       # nobody did
    lse_a.requires_grad_(True)
    lse_b.requires_grad_(True)
    with torch.no_grad():
        out_b[:, 2].zero_()
        out_a[:, 2].zero_()
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out[:, 0], out_b[:, 0]) and torch.equal(out[:, 1], out_a[:, 1])
    assert (out[:, 2] == 0).all() and (lse[:, :, 2] == -math.inf).all()
    assert torch.equal(lse[:, :, 0], lse_b[:, :, 0])
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    grads = torch.autograd.grad(out.sum() + finite.sum(), (out_a, lse_a, out_b, lse_b))
    for name, g in zip(("out_a", "lse_a", "out_b", "lse_b"), grads):
        assert torch.isfinite(g).all(), f"d{name}: non-finite"


def test_blockwise_empty_keys():
    """Non-causal attention over no keys is the empty side of a merge: out 0, lse -inf."""
    q, k, v = qkv(7, 0, 2, 1)
    out, lse = blockwise_attention(q, k, v, causal=False, block_size=3, return_lse=True)
    assert (out == 0).all() and (lse == -math.inf).all()
    assert (attention(q, k, v, causal=False) == 0).all()


def _saved_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("window", [None, 8])
def test_blockwise_saves_nothing_quadratic(window):
    batch, heads, length, head_dim = 1, 2, 128, 4
    q, k, v = qkv(length, length, heads, heads, head_dim=head_dim, batch=batch)
    scores = batch * heads * length * length
    linear = batch * length * heads * head_dim
    ref = _saved_numels(lambda: blockwise_attention_ref(q, k, v, window=window))
    assert max(ref) >= scores  # the check below can fail: the dense twin does save the scores
    fast = _saved_numels(lambda: blockwise_attention(q, k, v, window=window, block_size=16, return_lse=True))
    assert max(fast) <= linear, f"blockwise saved a tensor of {max(fast)} elements (q has {linear})"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_dtypes(dtype, tol):
    q, k, v = qkv(13, 13, 4, 2, head_dim=16, dtype=dtype)
    want, want_lse = blockwise_attention_ref(*(t.detach().double() for t in (q, k, v)), window=6, return_lse=True)
    out, lse = blockwise_attention(q, k, v, window=6, block_size=5, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, want, tol, "out")
    assert_close(lse, want_lse, tol, "lse")
    out.float().sum().backward()
    assert q.grad.dtype == dtype and k.grad.dtype == dtype
    assert attention(q, k, v).dtype == dtype


def test_explicit_scale():
    q, k, v = qkv(7, 7, 2, 2)
    for fn in (attention, lambda *t, **kw: blockwise_attention(*t, block_size=3, **kw)):
        assert_close(fn(q, k, v, scale=0.3), attention_ref(q, k, v, scale=0.3), TOL)


def _z(*shape, dtype=F64):
    return torch.zeros(shape, dtype=dtype)


def _bad(**changes):
    q, k, v = qkv(7, 7, 4, 2)
    args = dict(q=q, k=k, v=v, causal=True, window=None)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,match", [
    (dict(q=_z(7, 4, 8)), r"^q: expected \[batch, length, heads, head_dim\]"),
    (dict(v=_z(2, 6, 2, 8)), r"^k, v: shapes must match"),
    (dict(k=_z(2, 7, 3, 8), v=_z(2, 7, 3, 8)), r"^k: kv heads \(3\) must divide"),
    (dict(k=_z(2, 7, 2, 4), v=_z(2, 7, 2, 4)), r"^q, k: head_dim differs"),
    (dict(k=_z(3, 7, 2, 8), v=_z(3, 7, 2, 8)), r"^q, k: batch sizes differ"),
    (dict(k=_z(2, 7, 2, 8, dtype=torch.float32), v=_z(2, 7, 2, 8, dtype=torch.float32)),
     r"^q, k, v: dtypes must match"),
    (dict(window=0), r"^window: must be None or an integer >= 1"),
    (dict(window=2.5), r"^window: must be None or an integer >= 1"),
    (dict(window=3, causal=False), r"^window: .* needs causal=True"),
    (dict(q=_z(2, 8, 4, 8)), r"^q: .*Lq \(8\) must not exceed Lk \(7\)"),
])
@pytest.mark.parametrize("fn", [attention, blockwise_attention, attention_ref])
def test_bad_inputs(fn, changes, match):
    with pytest.raises(ValueError, match=match):
        fn(**_bad(**changes))


@pytest.mark.parametrize("block_size", [0, -3, 2.0])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match=r"^block_size: must be an integer >= 1"):
        blockwise_attention(**_bad(), block_size=block_size)


def test_merge_bad_shapes():
    out, lse = torch.zeros(2, 7, 3, 4), torch.zeros(2, 3, 7)
    with pytest.raises(ValueError, match=r"^out_a/out_b, lse_a/lse_b: shapes must match"):
        merge_attention(out, lse, out[:, :5], lse)
    with pytest.raises(ValueError, match=r"^lse_a: expected \[batch, heads, length\]"):
        merge_attention(out, lse.transpose(1, 2), out, lse.transpose(1, 2))
