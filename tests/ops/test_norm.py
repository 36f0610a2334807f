"""zoo.ops.norm: RMSNorm and the blocked gated RMSNorm against the formulas as written."""
import pytest
import torch

from tests.helpers import assert_close
from zoo.ops.norm import gated_rms_norm, gated_rms_norm_ref, rms_norm, rms_norm_ref

F64 = torch.float64


def run(fn, y, z, weight, group_size):
    leaves = [t.clone().requires_grad_() for t in (y, z, weight)]
    out = fn(*leaves, group_size)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(2, 37, 12), (5, 12), (1, 1, 12)])
@pytest.mark.parametrize("group_size", [12, 4, 3])
@pytest.mark.parametrize("block", [None, 7 * 12])
def test_matches_ref(shape, group_size, block, monkeypatch):
    """One block of rows, or blocks of 7 rows (37 rows: a ragged last block); z a slice of a wider
    tensor, as the Mamba-2 block passes it."""
    import zoo.ops.norm as norm
    if block is not None:
        monkeypatch.setattr(norm, "_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(*shape, generator=g, dtype=F64)
    z = torch.randn(*shape[:-1], 20, generator=g, dtype=F64)[..., 3:15]
    weight = torch.randn(shape[-1], generator=g, dtype=F64)
    got, want = run(gated_rms_norm, y, z, weight, group_size), run(gated_rms_norm_ref, y, z, weight, group_size)
    for name, a, b in zip(["out", "grad y", "grad z", "grad weight"], got, want):
        assert a.shape == b.shape, name
        assert_close(a, b, 1e-12, name)


@pytest.mark.parametrize("block", [None, 7 * 12])
@pytest.mark.parametrize("group_size", [12, 4])
def test_without_gradients(block, group_size, monkeypatch):
    """No autograd node: F.rms_norm on one block (a decoding step; the weight inside it for one group), the
    blocked forward beyond."""
    import zoo.ops.norm as norm
    if block is not None:
        monkeypatch.setattr(norm, "_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(0)
    y, z, weight = (torch.randn(*s, generator=g, dtype=F64) for s in ((2, 37, 12), (2, 37, 12), (12,)))
    with torch.no_grad():
        assert_close(gated_rms_norm(y, z, weight, group_size), gated_rms_norm_ref(y, z, weight, group_size), 1e-12)


def test_low_precision_returns_input_dtype():
    g = torch.Generator().manual_seed(0)
    y, z, weight = torch.randn(3, 40, 16, generator=g), torch.randn(3, 40, 16, generator=g), torch.randn(16, generator=g)
    want = gated_rms_norm_ref(y.double(), z.double(), weight.double(), 8)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        out = gated_rms_norm(y.to(dtype), z.to(dtype), weight, 8)
        assert out.dtype == dtype
        assert_close(out, want, tol, str(dtype))


@pytest.mark.parametrize("fn", [gated_rms_norm, gated_rms_norm_ref])
def test_bad_input_names_the_argument(fn):
    y = torch.zeros(2, 12)
    with pytest.raises(ValueError, match="z: expected the shape of y"):
        fn(y, torch.zeros(2, 11), torch.ones(12), 4)
    with pytest.raises(ValueError, match=r"weight: expected \[12\]"):
        fn(y, y, torch.ones(11), 4)
    with pytest.raises(ValueError, match="group_size: expected a positive divisor of 12"):
        fn(y, y, torch.ones(12), 5)


@pytest.mark.parametrize("shape", [(2, 37, 12), (5, 1), (1, 1, 7)])
def test_rms_norm_matches_ref(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape[:-1], shape[-1] + 3, generator=g, dtype=F64)[..., 2:-1]   # a strided view
    weight = torch.randn(shape[-1], generator=g, dtype=F64)
    results = []
    for fn in (rms_norm, rms_norm_ref):
        leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        out = fn(*leaves, 1e-5)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for name, a, b in zip(["out", "grad x", "grad weight"], *results):
        assert a.shape == b.shape, name
        assert_close(a, b, 1e-12, name)


def test_rms_norm_low_precision_and_torch():
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 40, 16, generator=g), torch.randn(16, generator=g)
    assert_close(rms_norm(x, weight, 1e-5), torch.nn.functional.rms_norm(x, (16,), weight, 1e-5), 1e-6)
    out = rms_norm(x.bfloat16(), weight.bfloat16(), 1e-5)
    assert out.dtype == torch.bfloat16
    assert_close(out, rms_norm_ref(x.double(), weight.double(), 1e-5), 2e-2)


def test_model_norm_trains_through_the_op_and_evaluates_through_torch():
    """zoo.model.RMSNorm: same values with and without gradients, nn.RMSNorm's state dict."""
    from zoo.layer import RMSNorm
    norm = RMSNorm(12, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 12))
    x = torch.randn(4, 5, 12, dtype=F64, requires_grad=True)
    with torch.no_grad():
        want = torch.nn.functional.rms_norm(x, (12,), norm.weight, 1e-5)
        assert_close(norm(x), want, 1e-15)
    assert_close(norm(x), want, 1e-14)
    assert list(norm.state_dict()) == list(torch.nn.RMSNorm(12).state_dict())
