"""The delta rule with its chunk pass as Triton kernels (zoo.ops.triton.delta) against the token loop under the
interpreter: outputs, final state and every gradient (q, k, v, beta, g, initial state) in float64 for no decay,
a decay per head and per channel, odd lengths and chunks shorter than a tile, d_v over two column blocks, packed
documents; float32 against the torch path; "auto" picks it on CUDA."""
import pytest
import torch

from tests.ops.test_delta_rule import make, run
from zoo.ops.delta import delta_rule, delta_rule_ref

pytest.importorskip("triton")


@pytest.mark.parametrize("decay", [None, "head", "channel"])
@pytest.mark.parametrize("t,chunk,dk,dv", [(23, 7, 5, 4), (37, 16, 12, 80), (9, 64, 5, 4), (64, 32, 16, 16)])
def test_triton_chunk_pass_equals_the_token_loop_float64(decay, t, chunk, dk, dv):
    x = make(t=t, dk=dk, dv=dv, decay=decay, beta_max=2.0)
    want = run(delta_rule_ref, x, grads=True, qk_l2norm=True)
    got = run(delta_rule, x, grads=True, qk_l2norm=True, chunk_size=chunk, impl="triton")
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-10)
    assert set(got[2]) == set(x)
    for name in x:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("decay", [None, "channel"])
def test_triton_packed_documents_and_no_initial_state(decay):
    x = make(b=1, t=26, decay=decay, state=False)
    seq_idx = torch.tensor([[4] * 6 + [2] * 1 + [4] * 12 + [9] * 7])
    want = run(delta_rule_ref, x, grads=True, qk_l2norm=True, seq_idx=seq_idx)
    got = run(delta_rule, x, grads=True, qk_l2norm=True, seq_idx=seq_idx, chunk_size=8, impl="triton")
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for name in x:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=1e-10, msg=name)


def test_triton_float32_equals_the_torch_path():
    x = make(t=70, dk=16, dv=24, decay="head", dtype=torch.float32)
    want = run(delta_rule, x, grads=True, qk_l2norm=True, impl="torch")
    got = run(delta_rule, x, grads=True, qk_l2norm=True, impl="triton")
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in x:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_prefers_triton_on_cuda_and_torch_on_cpu():
    from zoo.ops.dispatch import OPS, choose
    assert OPS["delta_rule"][0] == "triton"
    assert choose("delta_rule", "auto", torch.zeros(1)) == "torch"


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "kda"])
def test_a_block_with_triton_kernels_equals_its_torch_path(name):
    """A recipe's `model.kernels: {delta_rule: triton}` reaches the op: output and every parameter gradient."""
    from tests.helpers import make_block
    block = make_block(name, 12, n_heads=4, head_k_dim=6, head_v_dim=5, chunk_size=8)
    x = torch.randn(2, 37, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for impl in ("torch", "triton"):
        block.kernels = {"delta_rule": impl}
        block.zero_grad()
        out = block(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in block.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=0, atol=1e-10, msg=n)
