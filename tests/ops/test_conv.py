"""zoo.ops.conv: the F.conv1d path of the causal depthwise convolution against the loop over time."""
import pytest
import torch

from tests.helpers import assert_close
from zoo.ops.conv import causal_conv1d, causal_conv1d_ref, causal_conv1d_update

F64 = torch.float64
TOL = 1e-12


def conv_inputs(batch=2, d=5, length=37, width=4, bias=True, states=True, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return {"x": rand(batch, d, length), "weight": rand(d, width), "bias": rand(d) if bias else None,
            "initial_states": rand(batch, d, width - 1) if states else None}


def run(fn, inputs, activation):
    inputs = {k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()}
    out, final = fn(**inputs, return_final_states=True, activation=activation)
    g = torch.Generator().manual_seed(1)
    cotangent = lambda t: torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)
    loss = (out * cotangent(out)).sum() + (final * cotangent(final)).sum()
    leaves = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {"out": out, "final_states": final,
            **{f"grad {k}": gr for k, gr in zip(leaves, grads) if gr is not None}}


@pytest.mark.parametrize("length", [1, 2, 3, 37])
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("bias,states", [(True, True), (False, False), (True, False)])
def test_matches_ref(length, width, activation, bias, states):
    """Lengths below width - 1 included: the final states then still hold initial-state columns."""
    inputs = conv_inputs(length=length, width=width, bias=bias, states=states)
    got, want = run(causal_conv1d, inputs, activation), run(causal_conv1d_ref, inputs, activation)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert_close(got[name], want[name], TOL, name)


def test_states_continue_a_sequence():
    """Any split of the sequence, each piece starting from the previous piece's final states."""
    inputs = conv_inputs(length=37, states=False)
    whole, final = causal_conv1d(**inputs, return_final_states=True, activation="silu")
    states, outs = None, []
    for start, stop in ((0, 1), (1, 3), (3, 4), (4, 20), (20, 37)):
        out, states = causal_conv1d(inputs["x"][..., start:stop], inputs["weight"], inputs["bias"], states,
                                    return_final_states=True, activation="silu")
        outs.append(out)
    assert_close(torch.cat(outs, dim=-1), whole, TOL)
    assert_close(states, final, TOL)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(F64, TOL), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_update_steps_match_ref(width, activation, bias, dtype, tol):
    """causal_conv1d_update token by token == the loop over time, its state updated in place == the final states."""
    inputs = conv_inputs(length=9, width=width, bias=bias)
    want, final = causal_conv1d_ref(**inputs, return_final_states=True, activation=activation)
    state = inputs["initial_states"].to(dtype).clone()
    held = state
    outs = [causal_conv1d_update(inputs["x"][..., t].to(dtype), state, inputs["weight"], inputs["bias"], activation)
            for t in range(9)]
    assert state is held and all(o.dtype == dtype for o in outs)
    assert_close(torch.stack(outs, dim=-1).double(), want, tol)
    assert_close(state.double(), final, tol)


def test_low_precision_returns_input_dtype():
    inputs = conv_inputs(dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        cast = {k: v.to(dtype) for k, v in inputs.items()}
        out, final = causal_conv1d(**cast, return_final_states=True, activation="silu")
        assert out.dtype == dtype and final.dtype == dtype
        want = causal_conv1d_ref(**{k: v.double() for k, v in cast.items()}, activation="silu")
        assert_close(out, want, 1e-6 if dtype == torch.float32 else 1e-2, str(dtype))


@pytest.mark.parametrize("change,message", [
    ({"activation": "relu"}, "activation: must be one of None, 'silu', 'swish'"),
    ({"x": torch.zeros(2, 5)}, "x: expected [batch, dim, length]"),
    ({"weight": torch.zeros(4, 4)}, "weight: expected [dim=5, width >= 1]"),
    ({"weight": torch.zeros(5, 0)}, "weight: expected [dim=5, width >= 1]"),
    ({"bias": torch.zeros(4)}, "bias: expected [dim=5]"),
    ({"initial_states": torch.zeros(2, 5, 4)}, "initial_states: expected [batch, dim, width - 1]"),
])
@pytest.mark.parametrize("fn", [causal_conv1d, causal_conv1d_ref])
def test_bad_input_names_the_argument(fn, change, message):
    kwargs = {**conv_inputs(), **{k: v.double() if torch.is_tensor(v) else v for k, v in change.items()}}
    with pytest.raises(ValueError) as err:
        fn(**kwargs)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("length", [2, 3, 5, 37])
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block", [None, 2 * 7 * 3])
def test_channel_last_matches_ref(length, width, activation, bias, block, monkeypatch):
    """x as a Mamba block hands it over: a transposed slice of a wider [b, l, c] tensor (the shifted
    multiply-add path), in one block of positions or in blocks of 3 (a block boundary inside the taps);
    the gradient reaches the wider tensor, zero outside the slice."""
    import zoo.ops.conv as conv
    if block is not None:
        monkeypatch.setattr(conv, "_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, length, 9, generator=g, dtype=F64)
    weight, b = torch.randn(7, width, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)
    results = []
    for fn in (causal_conv1d, causal_conv1d_ref):
        leaves = [wide.clone().requires_grad_(), weight.clone().requires_grad_(), b.clone().requires_grad_()]
        x = leaves[0][..., 1:8].transpose(1, 2)
        assert fn is causal_conv1d_ref or conv._channel_last(x)
        out = fn(x, leaves[1], leaves[2] if bias else None, activation=activation)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        results.append([out] + [t.grad for t in leaves[: 3 if bias else 2]])
    for name, got, want in zip(["out", "grad x", "grad weight", "grad bias"], *results):
        assert got.shape == want.shape, name
        assert_close(got, want, TOL, name)


def test_channel_last_low_precision():
    g = torch.Generator().manual_seed(0)
    wide, weight, b = torch.randn(2, 50, 9, generator=g), torch.randn(7, 4, generator=g), torch.randn(7, generator=g)
    want = causal_conv1d_ref(wide[..., 1:8].transpose(1, 2).double(), weight.double(), b.double(), activation="silu")
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        out = causal_conv1d(wide.to(dtype)[..., 1:8].transpose(1, 2), weight, b, activation="silu")
        assert out.dtype == dtype and out.stride(1) == 1
        assert_close(out, want, tol, str(dtype))
