"""RoPE: the half tables (`rope_cos_sin_half` / `apply_rope_half`, what decoding uses) give `apply_rope`'s
values bit for bit, full and partial, shared and per-row positions."""
import pytest
import torch

from zoo.ops.rope import apply_rope, apply_rope_half, rope_cos_sin, rope_cos_sin_half


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_dim", [16, 6])
@pytest.mark.parametrize("per_row", [False, True])
def test_half_tables_equal_the_full_ones(dtype, rope_dim, per_row):
    x = torch.randn(3, 7, 2, 16, dtype=dtype)
    positions = torch.randint(0, 100_000, (3, 7) if per_row else (7,))
    want = apply_rope(x, *rope_cos_sin(positions, rope_dim, 10000.0))
    got = apply_rope_half(x, *rope_cos_sin_half(positions, rope_dim, 10000.0))
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rope_dim", [16, 6])
@pytest.mark.parametrize("per_row", [False, True])
def test_half_tables_backward_is_the_formulas(dtype, rope_dim, per_row):
    """`apply_rope_half`'s own backward (the rotation by -theta, into one output) == autograd through
    `apply_rope`'s slices and concatenation, bit for bit; x a strided view, as the attention block's q, k."""
    base = torch.randn(3, 7, 2, 20, dtype=dtype, requires_grad=True)
    x = base[..., 2:18]
    positions = torch.randint(0, 100_000, (3, 7) if per_row else (7,))
    cot = torch.randn(3, 7, 2, 16, dtype=dtype)
    want = torch.autograd.grad((apply_rope(x, *rope_cos_sin(positions, rope_dim, 10000.0)) * cot).sum(), base)[0]
    got = torch.autograd.grad((apply_rope_half(x, *rope_cos_sin_half(positions, rope_dim, 10000.0)) * cot).sum(), base)[0]
    assert torch.equal(got, want)
    if dtype == torch.float64:
        tables = rope_cos_sin_half(positions[..., :3], rope_dim, 10000.0, torch.float64)
        assert torch.autograd.gradcheck(lambda t: apply_rope_half(t, *tables), x[:, :3].detach().requires_grad_())
