"""zoo.ops.delta: the chunked delta rule (WY / UT form) against its token loop, in float64 with every gradient;
whole == chunked through the state == token by token; packed documents; transformers' torch paths."""
import pytest
import torch

from zoo.ops.delta import chunk_gated_delta_rule, delta_rule, delta_rule_ref

F64 = torch.float64


def make(b=2, t=23, h=3, dk=5, dv=4, decay="head", beta_max=1.0, dtype=F64, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)   # noqa: E731
    x = dict(q=r(b, t, h, dk), k=r(b, t, h, dk), v=r(b, t, h, dv),
             beta=torch.rand(b, t, h, generator=g, dtype=dtype) * beta_max)
    if decay == "head":
        x["g"] = -torch.rand(b, t, h, generator=g, dtype=dtype)
    elif decay == "channel":
        x["g"] = -torch.rand(b, t, h, dk, generator=g, dtype=dtype) * 2
    if state:
        x["initial_state"] = r(b, h, dk, dv)
    return x


def run(fn, x, grads=False, **kw):
    """(output, final state) and, with grads, the gradients of a fixed random loss on both w.r.t. every input."""
    x = {k: v.clone().requires_grad_(grads) for k, v in x.items()}
    o, s = fn(**x, output_final_state=True, **kw)
    if not grads:
        return o, s, {}
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + (
        s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    loss.backward()
    return o, s, {k: v.grad for k, v in x.items()}


@pytest.mark.parametrize("decay", [None, "head", "channel"])
@pytest.mark.parametrize("t,chunk", [(23, 4), (23, 7), (9, 64), (64, 16), (1, 8), (37, 32)])
@pytest.mark.parametrize("l2,beta_max", [(True, 1.0), (False, 2.0)])
def test_chunked_equals_the_token_loop_with_every_gradient(decay, t, chunk, l2, beta_max):
    x = make(t=t, decay=decay, beta_max=beta_max)
    if not l2:   # unnormalised keys: keep the recurrence contractive enough to compare at 1e-10
        x["k"] = x["k"] * 0.4
    want = run(delta_rule_ref, x, grads=True, qk_l2norm=l2)
    got = run(delta_rule, x, grads=True, qk_l2norm=l2, chunk_size=chunk)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-10)
    assert set(got[2]) == set(want[2]) == set(x)
    for name in x:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("decay", [None, "head", "channel"])
def test_whole_equals_chunked_through_the_state_equals_token_by_token(decay):
    x = make(t=29, decay=decay)
    whole, final = delta_rule(**x, output_final_state=True, qk_l2norm=True, chunk_size=8)
    seq = {k: v for k, v in x.items() if k != "initial_state"}
    for cuts in ([11], [1, 2, 3, 17], list(range(1, 29))):
        state, outs = x["initial_state"], []
        for lo, hi in zip([0] + cuts, cuts + [29]):
            part = {k: v[:, lo:hi] for k, v in seq.items()}
            o, state = delta_rule(**part, initial_state=state, output_final_state=True, qk_l2norm=True, chunk_size=8)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)
        torch.testing.assert_close(state, final, rtol=0, atol=1e-12)


@pytest.mark.parametrize("decay", [None, "head", "channel"])
@pytest.mark.parametrize("fn", [delta_rule_ref, delta_rule])
def test_packed_documents_equal_each_document_alone(decay, fn):
    """seq_idx zeroes the state at each document's start; the initial state belongs to the first document, the
    final state is the last document's."""
    x = make(b=1, t=26, decay=decay)
    seq_idx = torch.tensor([[4] * 6 + [2] * 1 + [4] * 12 + [9] * 7])   # ids repeat non-adjacently: 4 documents
    packed, final = fn(**x, output_final_state=True, seq_idx=seq_idx, qk_l2norm=True,
                       **({"chunk_size": 5} if fn is delta_rule else {}))
    pieces, state = [], None
    for lo, hi in [(0, 6), (6, 7), (7, 19), (19, 26)]:
        part = {k: v[:, lo:hi] for k, v in x.items() if k != "initial_state"}
        o, state = delta_rule_ref(**part, initial_state=x["initial_state"] if lo == 0 else None,
                                  output_final_state=True, qk_l2norm=True)
        pieces.append(o)
    torch.testing.assert_close(packed, torch.cat(pieces, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(final, state, rtol=0, atol=1e-12)


def test_one_token_by_hand():
    """S = (I - beta k k^T) e^g S0 + beta k v^T, o = S^T q / sqrt(d_k), with a per-channel decay."""
    x = make(b=1, t=1, h=1, dk=3, dv=2, decay="channel")
    o, s = delta_rule(**x, output_final_state=True)
    q, k, v, beta = x["q"][0, 0, 0], x["k"][0, 0, 0], x["v"][0, 0, 0], x["beta"][0, 0, 0]
    S = torch.diag(x["g"][0, 0, 0].exp()) @ x["initial_state"][0, 0]
    S = (torch.eye(3, dtype=F64) - beta * torch.outer(k, k)) @ S + beta * torch.outer(k, v)
    torch.testing.assert_close(s[0, 0], S, rtol=0, atol=1e-14)
    torch.testing.assert_close(o[0, 0, 0], S.T @ q / 3 ** 0.5, rtol=0, atol=1e-14)


def test_float32_follows_the_float64_recurrence():
    x = make(t=70, decay="channel")
    want, _ = delta_rule_ref(**x, output_final_state=True, qk_l2norm=True)
    got, _ = delta_rule(**{k: v.float() for k, v in x.items()}, output_final_state=True, qk_l2norm=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_strong_decay_never_overflows():
    """Per-channel log-decays of -30 a step over a 64-token chunk: e^{c_i - c_j} is formed pairwise (<= 1)."""
    x = make(t=64, decay="channel", dtype=torch.float32)
    x["g"] = x["g"] * 15
    got, s = delta_rule(**x, output_final_state=True, qk_l2norm=True, chunk_size=64)
    want, s_ref = delta_rule_ref(**{k: v.double() for k, v in x.items()}, output_final_state=True, qk_l2norm=True)
    assert torch.isfinite(got).all() and torch.isfinite(s).all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


transformers = pytest.importorskip("transformers")


def test_equals_transformers_gated_delta_rule_and_kimi_delta_attention():
    """Qwen3-Next's torch paths (scalar decay per head; [b, t, h, d] in, float32) and Kimi Linear's recurrent KDA
    (per-channel decay): the same recurrence, the same scale and l2norm."""
    from transformers.models.kimi_linear.modeling_kimi_linear import recurrent_kimi_delta_attention
    from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                    torch_recurrent_gated_delta_rule)
    x = {k: v.float() for k, v in make(t=37, decay="head").items()}
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    ours, s = delta_rule(**x, output_final_state=True, qk_l2norm=True)
    for fn in (torch_recurrent_gated_delta_rule, torch_chunk_gated_delta_rule):
        theirs, s_theirs = fn(*args, initial_state=x["initial_state"], output_final_state=True,
                              use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=2e-5)
        torch.testing.assert_close(s, s_theirs.float(), rtol=0, atol=2e-5)
    # design.md's fla-compatible entry point, called positionally in fla's (and transformers') order
    ours, s = chunk_gated_delta_rule(*args, initial_state=x["initial_state"], output_final_state=True,
                                     use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(s, s_theirs.float(), rtol=0, atol=2e-5)
    x = {k: v.float() for k, v in make(t=37, decay="channel").items()}
    ours, s = delta_rule(**x, output_final_state=True, qk_l2norm=True)
    theirs, s_theirs = recurrent_kimi_delta_attention(x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"],
                                                      True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    torch.testing.assert_close(s, s_theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("decay", [None, "head", "channel"])
def test_chunk_gated_delta_rule_is_delta_rule_in_flas_order_and_dtypes(decay):
    x = make(t=19, decay=decay, dtype=torch.float32)
    want_o, want_s = delta_rule(**x, output_final_state=True, qk_l2norm=True, chunk_size=8)
    o, s = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x.get("g"), x["beta"], initial_state=x["initial_state"],
                                  output_final_state=True, use_qk_l2norm_in_kernel=True, chunk_size=8)
    torch.testing.assert_close(o, want_o, rtol=0, atol=0)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    half = {k: v.to(torch.bfloat16) for k, v in x.items()}
    o, s = chunk_gated_delta_rule(half["q"], half["k"], half["v"], half.get("g"), half["beta"], chunk_size=8)
    assert o.dtype == torch.bfloat16 and s is None     # o in v's dtype; no state unless asked, as fla


@pytest.mark.parametrize("change,message", [
    (dict(k=torch.zeros(2, 5, 3, 4)), r"q, k: expected equal shapes"),
    (dict(v=torch.zeros(2, 5, 2, 4)), r"v: expected \[batch, length, heads, d_v\]"),
    (dict(beta=torch.zeros(2, 5)), r"beta: expected \[batch, length, heads\]"),
    (dict(g=torch.zeros(2, 5, 3, 2)), r"g: expected \[batch, length, heads\] .* or \[batch, length, heads, d_k\]"),
    (dict(initial_state=torch.zeros(2, 3, 4, 4)), r"initial_state: expected \[batch, heads, d_k, d_v\]"),
    (dict(seq_idx=torch.zeros(2, 4, dtype=torch.long)), r"seq_idx: expected shape \(2, 5\)"),
])
def test_bad_shapes_name_the_argument(change, message):
    x = {k: v.float() for k, v in make(t=5, decay="head").items()}
    with pytest.raises(ValueError, match=message):
        delta_rule(**{**x, **change})
    with pytest.raises(ValueError, match="chunk_size: must be >= 1"):
        delta_rule(**x, chunk_size=0)
