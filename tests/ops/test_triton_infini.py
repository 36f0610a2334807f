"""Infini-attention with the Triton memory kernel (zoo.ops.triton.infini) against the reference under
the interpreter: outputs, final memory and every gradient (q, k, v, the local q/k, gate, carried
memory), both update rules, odd lengths with a partial last segment, segments longer than a tile,
GQA, two d_v blocks, float64 and float32; streaming through `prefix` equals the whole call."""
import pytest
import torch

import zoo.ops.triton.infini as triton_infini
from tests.helpers import assert_each_close, check_block_vs_reference, check_cache_contract, make_block, projected_qkv
from zoo.ops.infini import infini_attention, infini_attention_ref

pytest.importorskip("triton")
from zoo.ops.triton.infini import infini_memory_triton  # noqa: E402

F64, F32 = torch.float64, torch.float32
NAMES = ("out", "M", "z", "dq", "dk", "dv", "dq_local", "dk_local", "dgate", "dM", "dz")


def inputs(length, heads, kv_heads, dk=16, dv=16, batch=2, memory=True, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).to(dtype).requires_grad_()
    q, k, v = t(batch, length, heads, dk), t(batch, length, kv_heads, dk), t(batch, length, kv_heads, dv)
    q_local, k_local, gate = t(batch, length, heads, dk), t(batch, length, kv_heads, dk), t(heads)
    acc = F64 if dtype == F64 else F32
    mem = None
    if memory:  # a memory as if earlier segments had been folded: z > 0
        mem = (torch.randn(batch, kv_heads, dk, dv, generator=g, dtype=F64).to(acc).requires_grad_(),
               (5 * torch.rand(batch, kv_heads, dk, generator=g, dtype=F64)).to(acc).requires_grad_())
    return (q, k, v, q_local, k_local, gate), mem


def results(fn, tensors, mem, segment_len, delta_rule, **kw):
    q, k, v, q_local, k_local, gate = tensors
    out, (M, z) = fn(q, k, v, gate, segment_len, memory=mem, delta_rule=delta_rule, return_memory=True,
                     q_local=q_local, k_local=k_local, **kw)
    g = torch.Generator().manual_seed(1)
    weight = lambda t: torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)
    loss = (out * weight(out)).sum() + (M * weight(M)).sum() + (z * weight(z)).sum()
    leaves = list(tensors) + (list(mem) if mem is not None else [])
    return [out, M, z, *torch.autograd.grad(loss, leaves, materialize_grads=True)]


# (length, segment_len, heads, kv_heads, dk, dv, carried memory): one partial segment, several short
# segments, segments longer than a 32-token tile with a partial tail, GQA, an empty memory (whose
# first retrieval is 0), d_v = 80 over two 64-column blocks and a d_k that is not a power of two.
CASES = [
    (7, 3, 2, 2, 16, 16, True),
    (5, 8, 2, 2, 16, 16, True),
    (33, 8, 4, 2, 16, 16, True),
    (70, 40, 3, 1, 16, 16, False),
    (23, 10, 2, 2, 12, 80, True),
]


@pytest.mark.parametrize("delta_rule", [False, True], ids=["linear", "delta"])
@pytest.mark.parametrize("length,segment_len,heads,kv_heads,dk,dv,memory", CASES)
def test_triton_memory_matches_ref_float64(length, segment_len, heads, kv_heads, dk, dv, memory, delta_rule):
    tensors, mem = inputs(length, heads, kv_heads, dk, dv, memory=memory)
    got = results(infini_attention, tensors, mem, segment_len, delta_rule, impl="triton")
    want = results(infini_attention_ref, tensors, mem, segment_len, delta_rule)
    assert_each_close(NAMES, got, want, 1e-12)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["linear", "delta"])
def test_triton_memory_float32(delta_rule):
    tensors, mem = inputs(25, 10, 2, 2, dtype=F32)
    got = results(infini_attention, tensors, mem, 10, delta_rule, impl="triton")
    want = results(infini_attention_ref, [t.detach().double().requires_grad_() for t in tensors],
                   [t.detach().double().requires_grad_() for t in mem], 10, delta_rule)
    assert_each_close(NAMES, got, want, 2e-5)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["linear", "delta"])
def test_streaming_with_prefix_equals_whole(delta_rule):
    # The prefix's segment runs in torch, the aligned rest in the kernel; chunks of 5, 9, 4 tokens
    # cross segment boundaries of 6 at different offsets.
    (q, k, v, _, _, gate), _ = inputs(18, 2, 1)
    q, k, v = (t.detach() for t in (q, k, v))
    whole, memory = infini_attention_ref(q, k, v, gate.detach(), 6, return_memory=True, delta_rule=delta_rule)
    outs, mem, start, prefix = [], None, 0, None
    for n in (5, 9, 4):
        sl = slice(start, start + n)
        out, mem = infini_attention(q[:, sl], k[:, sl], v[:, sl], gate.detach(), 6, memory=mem, delta_rule=delta_rule,
                                    return_memory=True, prefix=prefix, impl="triton")
        outs.append(out)
        seen = start + n
        tail = seen % 6
        prefix = (k[:, seen - tail:seen], v[:, seen - tail:seen])
        start = seen
    assert_each_close(("out", "M", "z"), [torch.cat(outs, 1), *mem], [whole, *memory], 1e-12)


@pytest.mark.parametrize("bad", [8, 48, False])
def test_tile_size_must_be_a_power_of_two(bad):
    (q, k, v, *_), (M, z) = inputs(4, 1, 1)
    with pytest.raises(ValueError, match="block_t: must be a power of two >= 16"):
        infini_memory_triton(q, k, v, M, z, 2, True, block_t=bad)


@pytest.mark.parametrize("delta_rule", [False, True], ids=["linear", "delta"])
def test_block_runs_the_kernel_when_its_model_chooses_it(monkeypatch, delta_rule):
    # ZooLM hands a recipe's model.kernels to every mixer as `kernels`; set it as ZooLM does.
    calls = []
    kernel = triton_infini.infini_memory_triton
    monkeypatch.setattr(triton_infini, "infini_memory_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    block = make_block("infini", 24, n_heads=4, n_kv_heads=2, segment_len=6, delta_rule=delta_rule)
    block.kernels = {"infini": "triton"}

    def reference(block, x):
        q, k, v, q_rot, k_rot = projected_qkv(block, x)
        out = infini_attention_ref(q, k, v, block.gate, 6, delta_rule=delta_rule, q_local=q_rot, k_local=k_rot)
        return block.out_proj(out.reshape(*x.shape[:2], -1))

    check_block_vs_reference(block, reference, torch.randn(2, 17, 24, dtype=F64))
    assert calls, "the block did not run the Triton kernel"
    n_whole = len(calls)
    check_cache_contract(block, torch.randn(2, 17, 24, dtype=F64), splits=((7,),))
    assert len(calls) > n_whole, "the cache path did not run the Triton kernel"
