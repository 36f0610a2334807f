"""zoo.ops.triton.ssd (ssd_scan(impl="triton")) against the step-by-step reference under Triton's
interpreter: outputs, final states and every gradient, in float64 (tolerance 1e-10, the interpreter
runs float64 dots in float64), float32 (1e-4 relative to the float64 reference) and bfloat16
(2e-2), odd lengths that the chunk does not divide, batch 2, groups, documents, chunk_size above
the kernels' 64."""
import pytest
import torch

from tests.ops.test_ssd import assert_all_close, make_inputs, outputs_and_grads
from zoo.ops.ssd import ssd_scan, ssd_scan_ref

pytest.importorskip("triton")


def compare(inputs, chunk_size, tol=1e-10, **kw):
    got, names = outputs_and_grads(lambda **a: ssd_scan(chunk_size=chunk_size, impl="triton", **a), inputs, **kw)
    want, _ = outputs_and_grads(ssd_scan_ref, {k: v.detach().double().requires_grad_() for k, v in inputs.items()},
                                **kw)
    assert_all_close(got, [w.to(g.dtype) for g, w in zip(got, want)], names, tol)


@pytest.mark.parametrize("length,chunk_size,heads,groups", [(27, 8, 4, 2), (19, 5, 3, 1), (1, 4, 2, 2)])
def test_triton_ssd_matches_ref(length, chunk_size, heads, groups):
    compare(make_inputs(length, heads, groups), chunk_size, dt_softplus=True)


def test_triton_ssd_without_extras_and_long_chunk():
    # chunk_size 100 runs as kernel chunks of 64: a length of 70 makes one full chunk and a partial one
    compare(make_inputs(70, heads=2, groups=2, head_dim=4, d_state=3, batch=1, extras=False), 100)


def test_triton_ssd_per_channel_D():
    compare(make_inputs(23, heads=2, groups=1, D_per_channel=True), 8)


def test_triton_ssd_documents():
    inputs = make_inputs(29, heads=3, groups=1)
    # a document change inside a chunk, one on a chunk boundary (16), ids repeated non-adjacently
    seq_idx = torch.tensor([[0] * 5 + [1] * 11 + [2] * 9 + [0] * 4, [3] * 29])
    compare(inputs, 8, seq_idx=seq_idx, dt_softplus=True)


def test_triton_ssd_float32():
    compare(make_inputs(21, 2, 2, dtype=torch.float32), 8, tol=1e-4, dt_softplus=True)


def test_triton_ssd_strong_decay():
    # decays exp(dt A) near exp(-40) per step: the direct sums of the dA gradient stay exact
    compare(make_inputs(21, 2, 1, A_scale=40.0), 8)


def test_triton_ssd_bfloat16():
    # bf16 inputs, float32 arithmetic inside: the outputs and gradients are rounded to bf16 (2^-8
    # relative), so 2e-2 against the float64 reference on the same bf16 inputs
    compare(make_inputs(21, 2, 2, dtype=torch.bfloat16), 8, tol=2e-2, dt_softplus=True)


@pytest.mark.parametrize("kernel", ["_chunk_state_fwd", "_chunk_bwd"])
def test_triton_ssd_out_of_resources_falls_back_to_torch(kernel, monkeypatch):
    """A device that refuses a kernel (shared memory) gets the torch path, forward or backward, with a
    warning, and still the reference's results."""
    import zoo.ops.triton.ssd as triton_ssd
    from triton.runtime.errors import OutOfResources

    class Refused:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(240000, 232448, "shared memory")
            return launch

    monkeypatch.setattr(triton_ssd, kernel, Refused())
    with pytest.warns(UserWarning, match="ssd: the Triton kernels do not fit this device"):
        compare(make_inputs(13, 2, 1), 4, dt_softplus=True)


def test_triton_ssd_refuses_tiles_beyond_its_shared_memory():
    # head_dim 64 x d_state 256 does not fit the backward kernel: the torch path runs, with the reason
    import zoo.ops.dispatch as dispatch
    dispatch._warned.clear()
    inputs = make_inputs(3, heads=1, groups=1, head_dim=64, d_state=256, batch=1, extras=False)
    with pytest.warns(UserWarning, match=r"exceeds the Triton kernels' 8192 \(64 x 128\)\); running 'torch'"):
        got = ssd_scan(**inputs, chunk_size=4, impl="triton")
    assert torch.equal(got, ssd_scan(**inputs, chunk_size=4, impl="torch"))
