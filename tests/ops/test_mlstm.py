"""zoo.ops.mlstm: the chunked mLSTM against its token loop (float64, every gradient, the initial state's included)
on odd lengths and chunk sizes, strong and weak gates (the stabiliser exercised), whole == chunked through the
state, and transformers' xLSTM recurrence (mlstm_recurrent_sequence_native) on the same inputs."""
import pytest
import torch

from zoo.ops.mlstm import mlstm, mlstm_ref

F64 = torch.float64


def make(b=2, t=23, h=3, dk=5, dv=4, seed=0, state=False, gate_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)   # noqa: E731
    x = {"q": r(b, t, h, dk), "k": r(b, t, h, dk), "v": r(b, t, h, dv), "i": gate_scale * r(b, t, h),
         "f": gate_scale * r(b, t, h) + 2}
    if state:
        x["initial_state"] = (r(b, h, dk, dv), r(b, h, dk).abs(), r(b, h))
    return x


def run(fn, x, **kw):
    leaves = {k: (tuple(s.clone().requires_grad_() for s in v) if isinstance(v, tuple) else
                  v.clone().requires_grad_()) for k, v in x.items()}
    h, (C, n, m) = fn(**leaves, return_final_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    w = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)   # noqa: E731
    ((h * w(h)).sum() + (C * w(C)).sum() + (n * w(n)).sum() + (m * w(m)).sum()).backward()
    flat = [t for v in leaves.values() for t in (v if isinstance(v, tuple) else (v,))]
    return [h, C, n, m] + [t.grad for t in flat]


@pytest.mark.parametrize("t,chunk", [(23, 4), (23, 7), (9, 64), (32, 16), (1, 8)])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("gate_scale", [0.5, 6.0])
def test_chunked_equals_the_token_loop_with_every_gradient(t, chunk, state, gate_scale):
    x = make(t=t, state=state, gate_scale=gate_scale)
    want, got = run(mlstm_ref, x), run(mlstm, x, chunk_size=chunk)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_whole_equals_chunked_through_the_state():
    x = make(t=29)
    whole, last = mlstm(**x, return_final_state=True, chunk_size=8)
    state, parts = None, []
    for lo, hi in [(0, 1), (1, 12), (12, 29)]:
        h, state = mlstm(**{k: v[:, lo:hi] for k, v in x.items()}, initial_state=state, return_final_state=True,
                         chunk_size=8)
        parts.append(h)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-12)
    for a, b in zip(state, last):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bad_shapes_name_the_argument():
    x = make(t=5)
    with pytest.raises(ValueError, match=r"i: expected \[batch, length, heads\]"):
        mlstm(**{**x, "i": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match=r"initial_state: expected"):
        mlstm(**x, initial_state=(torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 5), torch.zeros(2, 3, 1)))


def test_equals_transformers_xlstm_recurrence():
    pytest.importorskip("transformers")
    from transformers.models.xlstm import modeling_xlstm
    if modeling_xlstm.external_xlstm:
        pytest.skip("the xlstm package replaces transformers' native kernels")
    x = {k: v.float() for k, v in make(t=19).items()}
    t = lambda a: a.transpose(1, 2)   # noqa: E731  transformers: [b, heads, t, d]
    want, (C, n, m) = modeling_xlstm.mlstm_recurrent_sequence_native(
        t(x["q"]), t(x["k"]), t(x["v"]), t(x["i"]), t(x["f"]), return_last_states=True)
    got, (C2, n2, m2) = mlstm(**x, return_final_state=True, chunk_size=8)
    torch.testing.assert_close(got, t(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(C2, C, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n2, n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2, m[..., 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [mlstm_ref, mlstm])
def test_packed_documents_equal_each_document_alone(fn):
    """A document starts from the empty memory; the initial state belongs to the first document, the final state
    is the last document's. Ids that come back after another document start a new one."""
    x = make(b=1, t=26, state=True)
    seq_idx = torch.tensor([[4] * 6 + [2] * 1 + [4] * 12 + [9] * 7])
    kw = {"chunk_size": 5} if fn is mlstm else {}
    packed, final = fn(**x, return_final_state=True, seq_idx=seq_idx, **kw)
    pieces, state = [], x["initial_state"]
    for lo, hi in [(0, 6), (6, 7), (7, 19), (19, 26)]:
        h, state = mlstm_ref(**{k: v[:, lo:hi] for k, v in x.items() if k != "initial_state"},
                             initial_state=state if lo == 0 else None, return_final_state=True)
        pieces.append(h)
    torch.testing.assert_close(packed, torch.cat(pieces, 1), rtol=0, atol=1e-12)
    for a, b in zip(final, state):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_packed_documents_chunked_equals_the_loop_with_every_gradient():
    x = make(b=2, t=23, state=True)
    seq_idx = torch.tensor([[0] * 5 + [1] * 9 + [2] * 9, [0] * 23])
    want, got = run(mlstm_ref, x, seq_idx=seq_idx), run(mlstm, x, seq_idx=seq_idx, chunk_size=4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
