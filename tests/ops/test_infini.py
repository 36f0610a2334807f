"""zoo.ops.infini: fast path against the segment-loop reference, streaming (memory and prefix), errors."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close, assert_each_close
import zoo.ops.infini as infini
from zoo.ops.infini import infini_attention, infini_attention_ref
from zoo.ops.rope import apply_rope_half, rope_cos_sin_half

F64 = torch.float64
TOL = 1e-10

# (length, segment_len): a single token, a prime length over a segment that does not divide it,
# an exact multiple, one partial segment only, and segment_len 1 (every token its own segment).
SHAPES = [(1, 4), (13, 4), (16, 4), (7, 8), (11, 3), (5, 1)]
HEADS = [(3, 3), (4, 2)]


def make_inputs(length, heads, kv_heads, d_k=5, d_v=3, batch=2, local=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).requires_grad_()
    x = dict(q=make(batch, length, heads, d_k), k=make(batch, length, kv_heads, d_k),
             v=make(batch, length, kv_heads, d_v), gate=make(heads))
    if local:
        x.update(q_local=make(batch, length, heads, d_k), k_local=make(batch, length, kv_heads, d_k))
    return x


def make_memory(batch, kv_heads, d_k=5, d_v=3, seed=1):
    """A memory as some earlier segments would leave it: z > 0 and M = sum sigma(K)^T V."""
    g = torch.Generator().manual_seed(seed)
    sk = F.elu(torch.randn(batch, 6, kv_heads, d_k, generator=g, dtype=F64)) + 1
    v = torch.randn(batch, 6, kv_heads, d_v, generator=g, dtype=F64)
    M = torch.einsum("btnk,btnv->bnkv", sk, v).requires_grad_()
    return M, sk.sum(1).requires_grad_()


def forward_and_grads(fn, x, memory=None, **kw):
    out, (M, z) = fn(**x, memory=memory, return_memory=True, **kw)
    g = torch.Generator().manual_seed(2)
    cot = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)
    loss = (out * cot(out)).sum() + (M * cot(M)).sum() + (z * cot(z)).sum()
    leaves = list(x.values()) + (list(memory) if memory is not None else [])
    names = ["out", "M", "z", *x] + (["M_in", "z_in"] if memory else [])
    return [out, M, z, *torch.autograd.grad(loss, leaves, materialize_grads=True)], names


def assert_all_close(got, want, names, tol=TOL):
    assert_each_close(names, got, want, tol)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("length,segment_len", SHAPES)
@pytest.mark.parametrize("delta_rule", [True, False])
@pytest.mark.parametrize("with_memory", [False, True])
def test_fast_matches_ref(length, segment_len, heads, kv_heads, delta_rule, with_memory):
    x = make_inputs(length, heads, kv_heads, local=True)
    memory = make_memory(2, kv_heads) if with_memory else None
    kw = dict(segment_len=segment_len, delta_rule=delta_rule)
    got, names = forward_and_grads(infini_attention, x, memory, **kw)
    want, _ = forward_and_grads(infini_attention_ref, x, memory, **kw)
    assert_all_close(got, want, names)


@pytest.mark.parametrize("delta_rule", [True, False])
def test_local_path_defaults_to_q_k(delta_rule):
    x = make_inputs(13, 4, 2)
    got = infini_attention(**x, segment_len=4, delta_rule=delta_rule)
    want = infini_attention(**x, segment_len=4, delta_rule=delta_rule, q_local=x["q"], k_local=x["k"])
    ref = infini_attention_ref(**x, segment_len=4, delta_rule=delta_rule)
    assert_close(got, want, 0.0)
    assert_close(got, ref, TOL)


def causal_attention(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("fn", [infini_attention, infini_attention_ref])
def test_first_segment_reads_an_empty_memory_as_zero(fn):
    # Before any segment is folded z = 0: the retrieval is 0 (not 0/0), so the first segment's
    # output is the gated local attention alone, with finite gradients.
    x = make_inputs(7, 4, 2)
    out = fn(**x, segment_len=8)
    w = torch.sigmoid(x["gate"])[:, None]
    assert_close(out, (1 - w) * causal_attention(x["q"], x["k"], x["v"]), TOL)
    grads = torch.autograd.grad(out.sum(), list(x.values()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_linear_memory_is_the_sum_over_complete_segments():
    x = make_inputs(11, 4, 2)
    M0, z0 = make_memory(2, 2)
    _, (M, z) = infini_attention(**x, segment_len=4, memory=(M0, z0), delta_rule=False, return_memory=True)
    sk = F.elu(x["k"][:, :8]) + 1  # 11 tokens = two complete segments and 3 unfolded tokens
    assert_close(M, M0 + torch.einsum("btnk,btnv->bnkv", sk, x["v"][:, :8]), TOL, "M")
    assert_close(z, z0 + sk.sum(1), TOL, "z")


def test_delta_rule_writes_nothing_the_memory_already_returns():
    # Folding a segment whose values equal what the memory retrieves for its keys leaves M unchanged.
    x = make_inputs(4, 2, 2)
    M0, z0 = (t.detach() for t in make_memory(2, 2))
    sk = F.elu(x["k"].detach()) + 1
    v = torch.einsum("btnk,bnkv->btnv", sk, M0) / torch.einsum("btnk,bnk->btn", sk, z0)[..., None]
    x = {**{n: t.detach() for n, t in x.items()}, "v": v}
    for fn in (infini_attention, infini_attention_ref):
        _, (M, z) = fn(**x, segment_len=4, memory=(M0, z0), delta_rule=True, return_memory=True)
        assert_close(M, M0, TOL, "M")
        assert_close(z, z0 + sk.sum(1), TOL, "z")


@pytest.mark.parametrize("delta_rule", [True, False])
@pytest.mark.parametrize("splits", [(8, 5), (4, 4, 4, 1), (12, 1)])
def test_memory_carried_across_aligned_calls_equals_one_call(delta_rule, splits):
    x = make_inputs(sum(splits), 4, 2, local=True)
    whole, (M_w, z_w) = infini_attention(**x, segment_len=4, delta_rule=delta_rule, return_memory=True)
    outs, memory, start = [], None, 0
    for n in splits:
        part = {name: t[:, start:start + n] if t.dim() == 4 else t for name, t in x.items()}
        out, memory = infini_attention(**part, segment_len=4, delta_rule=delta_rule, memory=memory,
                                       return_memory=True)
        outs.append(out)
        start += n
    assert_close(torch.cat(outs, 1), whole, TOL, "out")
    assert_close(memory[0], M_w, TOL, "M")
    assert_close(memory[1], z_w, TOL, "z")


def stream(x, segment_len, sizes, delta_rule, with_local):
    """Feed x in chunks of `sizes` (cycled), carrying memory and the partial segment as a block would."""
    length = x["q"].shape[1]
    outs, memory, prefix, start, i = [], None, None, 0, 0
    while start < length:
        n = sizes[i % len(sizes)]
        part = {name: t[:, start:start + n] if t.dim() == 4 else t for name, t in x.items()}
        out, memory = infini_attention(**part, segment_len=segment_len, delta_rule=delta_rule, memory=memory,
                                       prefix=prefix, return_memory=True)
        outs.append(out)
        names = ("k", "v", "k_local") if with_local else ("k", "v")
        seen = [torch.cat([p, part[name]], 1) for p, name in zip(prefix, names)] if prefix else \
            [part[name] for name in names]
        tail = seen[0].shape[1] % segment_len
        prefix = tuple(t[:, t.shape[1] - tail:] for t in seen)
        start, i = start + n, i + 1
    return torch.cat(outs, 1), memory, prefix


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("delta_rule", [True, False])
@pytest.mark.parametrize("sizes", [(1,), (3, 5), (7,), (2, 9)])
@pytest.mark.parametrize("with_local", [False, True])
def test_any_chunking_with_prefix_equals_one_call(delta_rule, sizes, heads, kv_heads, with_local):
    x = make_inputs(17, heads, kv_heads, local=with_local)
    whole, (M_w, z_w) = infini_attention_ref(**x, segment_len=4, delta_rule=delta_rule, return_memory=True)
    got, (M, z), prefix = stream(x, 4, sizes, delta_rule, with_local)
    assert_close(got, whole, TOL, "out")
    assert_close(M, M_w, TOL, "M")
    assert_close(z, z_w, TOL, "z")
    assert prefix[0].shape[1] == 17 % 4


def test_prefix_gradients_match_one_call():
    # The prefix's k, v (and k_local) are as differentiable as the new tokens: the chunk after the
    # split gives the same gradients as the corresponding slice of one call.
    x = make_inputs(11, 4, 2, local=True)
    whole = infini_attention_ref(**x, segment_len=4)
    g = torch.Generator().manual_seed(3)
    cot = torch.randn(whole.shape, generator=g, dtype=F64)
    want = torch.autograd.grad((whole[:, 6:] * cot[:, 6:]).sum(), list(x.values()))
    head = {n: t[:, :6] if t.dim() == 4 else t for n, t in x.items()}
    _, memory = infini_attention(**head, segment_len=4, return_memory=True)
    tail = {n: t[:, 6:] if t.dim() == 4 else t for n, t in x.items()}
    prefix = (x["k"][:, 4:6], x["v"][:, 4:6], x["k_local"][:, 4:6])
    out = infini_attention(**tail, segment_len=4, memory=memory, prefix=prefix)
    got = torch.autograd.grad((out * cot[:, 6:]).sum(), list(x.values()))
    for name, a, b in zip(x, got, want):
        assert_close(a, b, TOL, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    x = {n: t.detach() for n, t in make_inputs(13, 4, 2).items()}
    low = {n: t.to(dtype) for n, t in x.items()}
    out, (M, z) = infini_attention(**low, segment_len=4, return_memory=True)
    assert out.dtype == dtype and M.dtype == torch.float32 and z.dtype == torch.float32
    want = infini_attention_ref(**{n: t.to(dtype).double() for n, t in x.items()}, segment_len=4)
    assert_close(out, want, 1e-5 if dtype == torch.float32 else 2e-2)


def test_empty_sequence():
    x = make_inputs(0, 4, 2)
    memory = make_memory(2, 2)
    out, (M, z) = infini_attention(**x, segment_len=4, memory=memory, return_memory=True)
    assert out.shape == (2, 0, 4, 3)
    assert_close(M, memory[0], 0.0)


def test_bad_inputs_raise():
    x = {n: t.detach() for n, t in make_inputs(6, 4, 2).items()}
    with pytest.raises(ValueError, match="segment_len"):
        infini_attention(**x, segment_len=0)
    with pytest.raises(ValueError, match="gate"):
        infini_attention(**{**x, "gate": torch.zeros(2, dtype=F64)}, segment_len=4)
    with pytest.raises(ValueError, match="kv heads"):
        infini_attention(**{**x, "k": torch.zeros(2, 6, 3, 5, dtype=F64), "v": torch.zeros(2, 6, 3, 3, dtype=F64)},
                         segment_len=4)
    with pytest.raises(ValueError, match="memory"):
        infini_attention(**x, segment_len=4, memory=(torch.zeros(2, 4, 5, 3, dtype=F64), torch.zeros(2, 4, 5)))
    with pytest.raises(ValueError, match="prefix"):
        infini_attention(**x, segment_len=4, prefix=(x["k"][:, :4], x["v"][:, :4]))  # P must be < segment_len
    with pytest.raises(ValueError, match="prefix"):
        infini_attention(**x, segment_len=4, k_local=x["k"], prefix=(x["k"][:, :2], x["v"][:, :2]))
    with pytest.raises(ValueError, match="q_local"):
        infini_attention(**x, segment_len=4, q_local=x["q"][:, :3])


# The whole segments run in `_Segments`, whose local attention walks query tiles of `_TILE` rows: with
# tiles of 4, segments of 8 and 12 hold 2 and 3 tiles (the causal mask on each tile's last block, the
# keys of earlier tiles read whole), and a segment of 10 falls back to tiles of 2 rows.
TILED_SHAPES = [(37, 8), (24, 12), (23, 10), (16, 16)]


@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (4, 2), (6, 2)])
@pytest.mark.parametrize("length,segment_len", TILED_SHAPES)
@pytest.mark.parametrize("delta_rule", [True, False])
@pytest.mark.parametrize("with_memory", [False, True])
def test_tiled_segments_match_ref(monkeypatch, length, segment_len, heads, kv_heads, delta_rule, with_memory,
                                  keep_probs):
    # keep_probs False: the probabilities recomputed in the backward from each row's log-sum-exp
    monkeypatch.setattr(infini, "_TILE", 4)
    monkeypatch.setattr(infini, "_KEEP_PROBS", 10**9 if keep_probs else 0)
    x = make_inputs(length, heads, kv_heads, local=True, batch=2)
    memory = make_memory(2, kv_heads) if with_memory else None
    kw = dict(segment_len=segment_len, delta_rule=delta_rule)
    got, names = forward_and_grads(infini_attention, x, memory, **kw)
    want, _ = forward_and_grads(infini_attention_ref, x, memory, **kw)
    assert_all_close(got, want, names)


def rope_tables(length, d_k, start=0):
    cos, sin = rope_cos_sin_half(torch.arange(start, start + length), d_k, dtype=F64)
    return cos, sin


@pytest.mark.parametrize("tile", [64, 4])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("length,segment_len", [(37, 8), (13, 4), (7, 8), (24, 12)])
@pytest.mark.parametrize("delta_rule", [True, False])
@pytest.mark.parametrize("with_memory", [False, True])
def test_rope_equals_rotated_inputs(monkeypatch, tile, length, segment_len, heads, kv_heads, delta_rule, with_memory):
    # rope=(cos, sin): q, k rotated inside the op give what q_local, k_local rotated outside give,
    # outputs, memory and every gradient (the rotation's backward runs inside the op too).
    monkeypatch.setattr(infini, "_TILE", tile)
    x = make_inputs(length, heads, kv_heads, d_k=6)
    memory = make_memory(2, kv_heads, d_k=6) if with_memory else None
    cos, sin = rope_tables(length, 6)
    kw = dict(segment_len=segment_len, delta_rule=delta_rule)
    got, names = forward_and_grads(infini_attention, x, memory, rope=(cos, sin), **kw)
    rotated = lambda **a: infini_attention_ref(**a, q_local=apply_rope_half(a["q"], cos, sin),
                                               k_local=apply_rope_half(a["k"], cos, sin))
    want, _ = forward_and_grads(rotated, x, memory, **kw)
    assert_all_close(got, want, names)


@pytest.mark.parametrize("delta_rule", [True, False])
@pytest.mark.parametrize("sizes", [(3, 5), (2, 9), (17,)])
def test_rope_streams_with_prefix(delta_rule, sizes):
    # Chunks through memory and prefix (the prefix holding k rotated) give the whole call's output.
    x = {n: t.detach() for n, t in make_inputs(29, 4, 2, d_k=6).items()}
    cos, sin = rope_tables(29, 6)
    whole = infini_attention(**x, segment_len=8, delta_rule=delta_rule, rope=(cos, sin))
    outs, memory, prefix, start, i = [], None, None, 0, 0
    while start < 29:
        n = sizes[i % len(sizes)]
        part = {name: t[:, start:start + n] if t.dim() == 4 else t for name, t in x.items()}
        out, memory = infini_attention(**part, segment_len=8, delta_rule=delta_rule, memory=memory, prefix=prefix,
                                       rope=(cos[start:start + n], sin[start:start + n]), return_memory=True)
        outs.append(out)
        seen = [torch.cat([p, t], 1) for p, t in zip(prefix, (part["k"], part["v"], apply_rope_half(
            part["k"], cos[start:start + n], sin[start:start + n])))] if prefix else \
            [part["k"], part["v"], apply_rope_half(part["k"], cos[start:start + n], sin[start:start + n])]
        tail = seen[0].shape[1] % 8
        prefix = tuple(t[:, t.shape[1] - tail:] for t in seen)
        start, i = start + n, i + 1
    assert_close(torch.cat(outs, 1), whole, TOL)


def test_rope_bad_inputs_raise():
    x = {n: t.detach() for n, t in make_inputs(6, 4, 2, d_k=6).items()}
    cos, sin = rope_tables(6, 6)
    with pytest.raises(ValueError, match="rope"):
        infini_attention(**x, segment_len=4, rope=(cos, sin), q_local=x["q"])
    with pytest.raises(ValueError, match="rope"):
        infini_attention(**x, segment_len=4, rope=(cos[:5], sin[:5]))
    with pytest.raises(ValueError, match="prefix"):
        infini_attention(**x, segment_len=4, rope=(cos, sin), prefix=(x["k"][:, :2], x["v"][:, :2]))
