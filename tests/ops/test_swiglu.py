"""zoo.ops.swiglu: the hand-written backward against autograd of the formula, bit for bit."""
import pytest
import torch

from zoo.ops.swiglu import swiglu, swiglu_ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 13, 24), (5, 7)])
def test_matches_the_formula_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(0)
    gate, up, cot = (torch.randn(*shape, generator=g).mul(3).to(dtype) for _ in range(3))
    results = []
    for fn in (swiglu, swiglu_ref):
        leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
        out = fn(*leaves)
        results.append([out, *torch.autograd.grad((out * cot).sum(), leaves)])
    for name, a, b in zip(["out", "grad gate", "grad up"], *results):
        assert a.dtype == dtype and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(swiglu(gate, up), swiglu_ref(gate, up))


def test_gradcheck_and_one_input_without_grad():
    gate = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    (grad,) = torch.autograd.grad(swiglu(gate, up.detach()).sum(), gate)
    (want,) = torch.autograd.grad(swiglu_ref(gate, up.detach()).sum(), gate)
    assert torch.equal(grad, want)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="up: expected the shape of gate"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
