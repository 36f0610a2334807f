"""MoE op: the gathered-per-expert fast path vs its dense masked twin in float64 (outputs and every
gradient, odd sizes, k = 1 and k = E, experts that receive no token), and the routing variants."""
import pytest
import torch

from tests.helpers import assert_close
from zoo.ops.moe import expert_counts, moe_swiglu, moe_swiglu_ref, route


def _inputs(tokens, d, hidden, experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
    return mk(tokens, d), mk(d, experts), mk(experts, 2 * hidden, d), mk(experts, d, hidden)


def _run(fn, x, router, gate_up, down, top_k, normalize):
    _, weights, experts = route(x @ router, top_k, normalize)
    y = fn(x, weights, experts, gate_up, down)
    y.pow(2).sum().backward()
    return y, [t.grad.clone() for t in (x, router, gate_up, down)]


@pytest.mark.parametrize("tokens, d, hidden, experts, top_k", [
    (1, 5, 3, 4, 2), (13, 7, 5, 3, 1), (29, 6, 9, 5, 5), (40, 8, 4, 8, 2), (3, 4, 2, 16, 2)])
@pytest.mark.parametrize("normalize", [False, True])
def test_fast_matches_dense(tokens, d, hidden, experts, top_k, normalize):
    x, router, gate_up, down = _inputs(tokens, d, hidden, experts)
    got, got_grads = _run(moe_swiglu, x, router, gate_up, down, top_k, normalize)
    for t in (x, router, gate_up, down):
        t.grad = None
    want, want_grads = _run(moe_swiglu_ref, x, router, gate_up, down, top_k, normalize)
    assert_close(got, want, 1e-12)
    for name, a, b in zip(("x", "router", "gate_up", "down"), got_grads, want_grads):
        assert_close(a, b, 1e-12, f"grad {name}", floor=1.0)


def test_dense_ref_is_the_sum_of_chosen_experts():
    """The twin itself against the definition, token by token."""
    x, router, gate_up, down = _inputs(6, 4, 3, 5)
    _, w, e = route(x @ router, 2)
    y = moe_swiglu_ref(x, w, e, gate_up, down)
    for t in range(6):
        want = 0
        for j in range(2):
            gate, up = (gate_up[e[t, j]] @ x[t]).chunk(2)
            want = want + w[t, j] * (down[e[t, j]] @ (torch.nn.functional.silu(gate) * up))
        assert_close(y[t], want, 1e-13)


def test_routing_variants():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    probs, w, e = route(logits, 2)
    assert torch.allclose(probs.sum(-1), torch.ones(1, dtype=torch.float64))
    assert e.tolist() == [[0, 1]]
    assert torch.allclose(w, probs[:, :2])                # Jamba: the softmax over all E, not renormalised
    assert w.sum() < 1
    _, wn, en = route(logits, 2, normalize=True)
    assert en.tolist() == [[0, 1]]
    assert torch.allclose(wn, torch.softmax(logits[:, :2], -1))   # = softmax over the chosen logits
    assert expert_counts(torch.tensor([[0, 1], [1, 3]]), 5).tolist() == [1, 2, 0, 1, 0]


def test_half_precision_keeps_dtype():
    x, router, gate_up, down = (t.detach().to(torch.bfloat16) for t in _inputs(9, 8, 4, 4))
    _, w, e = route(x @ router, 2)
    assert w.dtype == torch.bfloat16
    y = moe_swiglu(x, w, e, gate_up, down)
    assert y.dtype == torch.bfloat16
    assert_close(y.double(), moe_swiglu_ref(x.double(), w.double(), e, gate_up.double(), down.double()), 3e-2)
