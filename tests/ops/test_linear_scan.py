"""zoo.ops.linear_scan: h_t = a_t h_{t-1} + b_t by chunks against its loop (float64, every gradient), resets and
packed documents, whole == chunked through the state, float32 against float64."""
import pytest
import torch

from zoo.ops.linear_scan import linear_scan, linear_scan_ref

F64 = torch.float64


def make(b=2, t=29, d=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(b, t, d, generator=g, dtype=dtype) * 0.9 + 0.05,
            "b": torch.randn(b, t, d, generator=g, dtype=dtype),
            "initial_state": torch.randn(b, d, generator=g, dtype=dtype)}


def run(fn, x, **kw):
    x = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    h, last = fn(**x, return_final_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    ((h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum() + (last * 3).sum()).backward()
    return h, last, {k: v.grad for k, v in x.items()}


@pytest.mark.parametrize("t,chunk", [(29, 4), (29, 7), (8, 16), (1, 3), (64, 16)])
def test_chunked_equals_the_loop_with_every_gradient(t, chunk):
    x = make(t=t)
    seq_idx = torch.tensor([[0] * (t // 2) + [1] * (t - t // 2), [0] * t])   # a reset inside a chunk, row 0
    want, got = run(linear_scan_ref, x, seq_idx=seq_idx), run(linear_scan, x, chunk_size=chunk, seq_idx=seq_idx)
    for w, g in zip(want[:2], got[:2]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    for name in x:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=1e-12, msg=name)


def test_a_zero_forgets_everything_before():
    """a = 0 (a value, not a document start) starts over: the log-space chunks never take log 0 into a sum. Its
    gradient in a is not compared: at a = 0 the log-space form has none to give."""
    x = make(t=23)
    x["a"][:, [0, 5, 6, 22]] = 0.0
    for chunk in (4, 7, 16):
        torch.testing.assert_close(linear_scan(**x, chunk_size=chunk), linear_scan_ref(**x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [linear_scan_ref, linear_scan])
def test_packed_documents_equal_each_alone(fn):
    x = make(b=1, t=20)
    seq_idx = torch.tensor([[3] * 6 + [1] * 1 + [3] * 13])
    packed, last = fn(**x, return_final_state=True, seq_idx=seq_idx)
    pieces, state = [], None
    for lo, hi in [(0, 6), (6, 7), (7, 20)]:
        h, state = linear_scan_ref(x["a"][:, lo:hi], x["b"][:, lo:hi], x["initial_state"] if lo == 0 else None,
                                   return_final_state=True)
        pieces.append(h)
    torch.testing.assert_close(packed, torch.cat(pieces, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(last, state, rtol=0, atol=1e-12)


def test_whole_equals_chunked_through_the_state_and_float32_follows():
    x = make(t=33)
    whole, last = linear_scan(**x, return_final_state=True, chunk_size=8)
    h1, s = linear_scan(x["a"][:, :10], x["b"][:, :10], x["initial_state"], return_final_state=True)
    h2, s = linear_scan(x["a"][:, 10:], x["b"][:, 10:], s, return_final_state=True)
    torch.testing.assert_close(torch.cat([h1, h2], 1), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, last, rtol=0, atol=1e-12)
    got = linear_scan(**{k: v.float() for k, v in x.items()})
    torch.testing.assert_close(got.double(), linear_scan_ref(**x), rtol=0, atol=1e-5)


def test_bad_shapes_name_the_argument():
    x = make(t=5)
    with pytest.raises(ValueError, match=r"a, b: expected equal shapes"):
        linear_scan(x["a"], x["b"][:, :4])
    with pytest.raises(ValueError, match=r"initial_state: expected \[batch, channels\]"):
        linear_scan(x["a"], x["b"], x["initial_state"][:, :2])
    with pytest.raises(ValueError, match="chunk_size: must be >= 1"):
        linear_scan(x["a"], x["b"], chunk_size=0)
