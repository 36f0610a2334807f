"""zoo.ops.norm: the blocked gated RMSNorm against the formula as written."""
import pytest
import torch

from tests.helpers import assert_close
from zoo.ops.norm import gated_rms_norm, gated_rms_norm_ref

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
