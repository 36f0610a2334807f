"""zoo.ops.rglru: the RG-LRU chunked against its token loop (float64, every gradient), resets at a sequence's and
each document's start, whole == chunked through the state, the bounded square-root derivative, and transformers'
RecurrentGemmaRglru on the same weights."""
import pytest
import torch

from tests.ops.test_linear_scan import run
from zoo.ops.rglru import MAX_SQRT_GRADIENT, rg_lru, rg_lru_ref

F64 = torch.float64


def make(b=2, t=23, w=6, seed=0, dtype=F64, state=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)   # noqa: E731
    x = {"x": r(b, t, w), "gate_x": r(b, t, w), "gate_a": r(b, t, w), "lam": r(w)}
    if state:
        x["initial_state"] = r(b, w)
    return x


def assert_runs_equal(got, want, tol=1e-12):
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert set(got[2]) == set(want[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=tol, msg=name)


@pytest.mark.parametrize("t,chunk", [(23, 4), (23, 7), (5, 16), (1, 3), (48, 16)])
@pytest.mark.parametrize("state", [False, True])
def test_chunked_equals_the_loop_with_every_gradient(t, chunk, state):
    x = make(t=t, state=state)
    seq_idx = torch.tensor([[2] * (t // 3) + [5] * (t - t // 3), [0] * t])   # a document starting mid-row
    kw = {} if state else {"seq_idx": seq_idx}
    assert_runs_equal(run(rg_lru, x, chunk_size=chunk, **kw), run(rg_lru_ref, x, **kw))


def test_the_first_token_of_a_sequence_is_a_reset_and_streaming_continues_it():
    """No state: h_0 = sigmoid(gate_x) x (a = 0, no sqrt(1 - a^2) scaling). Split through the state, the later
    pieces are no reset: the same h as whole. A row marked first=True restarts even with a state."""
    x = make(t=19)
    h0 = torch.sigmoid(x["gate_x"][:, 0]) * x["x"][:, 0]
    whole, last = rg_lru(**x, return_final_state=True, chunk_size=4)
    torch.testing.assert_close(whole[:, 0], h0, rtol=0, atol=1e-15)
    state, parts = None, []
    for lo, hi in [(0, 1), (1, 8), (8, 19)]:
        piece = {k: (v[:, lo:hi] if v.dim() == 3 else v) for k, v in x.items()}
        h, state = rg_lru(**piece, initial_state=state, return_final_state=True, chunk_size=4)
        parts.append(h)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=0, atol=1e-12)
    again = rg_lru(**x, initial_state=torch.randn(2, 6, dtype=F64), first=torch.tensor([True, False]))
    torch.testing.assert_close(again[0], whole[0], rtol=0, atol=1e-12)
    assert not torch.allclose(again[1], whole[1])


def test_square_root_gradient_is_bounded():
    """sqrt(1 - a^2): its value exact, its derivative capped at MAX_SQRT_GRADIENT where 1 - a^2 -> 0 (a -> 1)."""
    from zoo.ops.rglru import _SqrtBoundedGradient
    x = torch.tensor([1e-12, 0.25, 0.0], dtype=F64, requires_grad=True)
    y = _SqrtBoundedGradient.apply(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), x.detach().sqrt(), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, torch.tensor([MAX_SQRT_GRADIENT, 1.0, MAX_SQRT_GRADIENT], dtype=F64))


@pytest.mark.parametrize("change,message", [
    (dict(gate_x=torch.zeros(2, 5, 4)), r"x, gate_x, gate_a: expected equal shapes"),
    (dict(lam=torch.zeros(3)), r"lam: expected \[width\] = \[6\]"),
    (dict(initial_state=torch.zeros(2, 4)), r"initial_state: expected \[batch, width\]"),
])
def test_bad_shapes_name_the_argument(change, message):
    x = make(t=5)
    with pytest.raises(ValueError, match=message):
        rg_lru(**{**x, **change})


def test_equals_transformers_recurrent_gemma_rglru():
    """RecurrentGemmaRglru (its block-diagonal gates written out here) on the same weights and inputs, float32:
    a prefill from position 0 and a continuation at positions 7.. from its recurrent state."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru
    cfg = transformers.RecurrentGemmaConfig(hidden_size=12, lru_width=12, num_attention_heads=3)
    torch.manual_seed(0)
    ref = RecurrentGemmaRglru(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 11, 12)

    def gates(u):
        heads = u.view(*u.shape[:2], 3, 4)
        return [(torch.einsum("bthi,hio->btho", heads, w) + b).reshape(u.shape)
                for w, b in ((ref.input_gate_weight, ref.input_gate_bias),
                             (ref.recurrent_gate_weight, ref.recurrent_gate_bias))]

    with torch.no_grad():
        want = ref(x[:, :7], torch.arange(7)[None].expand(2, 7))
        state = ref.recurrent_states
        want_more = ref(x[:, 7:], torch.arange(7, 11)[None].expand(2, 4))
        got, last = rg_lru(x[:, :7], *gates(x[:, :7]), ref.recurrent_param, return_final_state=True)
        got_more = rg_lru(x[:, 7:], *gates(x[:, 7:]), ref.recurrent_param, initial_state=last)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(last, state, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_more, want_more, rtol=0, atol=1e-5)
