"""zoo.ops.ssm: the chunked selective scan and the decoding step against the loop over time."""
import pytest
import torch

from tests.helpers import assert_close
from zoo.ops import ssm
from zoo.ops.ssm import selective_scan, selective_scan_ref, selective_scan_step

F64 = torch.float64
TOL = 1e-10
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def scan_inputs(batch=2, d=6, n=3, length=37, groups=None, dtype=F64, seed=0):
    """Random inputs; groups None gives B, C as [b, n, l], else [b, groups, n, l]."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    bc = (batch, n, length) if groups is None else (batch, groups, n, length)
    return {
        "u": rand(batch, d, length),
        "delta": rand(batch, d, length) - 1,
        "A": -torch.exp(rand(d, n)),                      # Mamba's A = -exp(A_log) < 0
        "B": rand(*bc),
        "C": rand(*bc),
        "D": rand(d),
        "z": rand(batch, d, length),
        "delta_bias": rand(d),
        "initial_state": rand(batch, d, n),
    }


def run(fn, inputs, delta_softplus=True):
    """Output, last state and the gradient of every tensor input, for random cotangents."""
    inputs = {k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()}
    out, last = fn(**inputs, delta_softplus=delta_softplus, return_last_state=True)
    g = torch.Generator().manual_seed(1)
    cotangent = lambda t: torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)   # same across dtypes
    loss = (out * cotangent(out)).sum() + (last * cotangent(last)).sum()
    leaves = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"out": out, "last_state": last, **{f"grad {k}": gr for k, gr in zip(leaves, grads)}}


def assert_all_close(got, want, tol=TOL):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values"
        assert_close(got[name], want[name], tol, name)


@pytest.fixture
def small_blocks(monkeypatch):
    """Chunks of 4 steps and blocks of 8, so short test lengths cross chunks and blocks."""
    monkeypatch.setattr(ssm, "CHUNK", 4)
    monkeypatch.setattr(ssm, "_block_len", lambda states, chunk: 2 * chunk)


@pytest.mark.parametrize("length", [1, 2, 4, 8, 9, 37, 64])
@pytest.mark.parametrize("groups", [None, 1, 3])
def test_chunked_matches_ref(small_blocks, length, groups):
    inputs = scan_inputs(length=length, groups=groups)
    assert_all_close(run(selective_scan, inputs), run(selective_scan_ref, inputs))


@pytest.mark.parametrize("chunk,length", [(16, 37), (16, 300), (5, 37), (1, 9)])
def test_default_blocking_and_other_chunks(monkeypatch, chunk, length):
    """The block length from BLOCK_ELEMENTS (one block here, or several when it is small)."""
    monkeypatch.setattr(ssm, "CHUNK", chunk)
    for budget in (ssm.BLOCK_ELEMENTS, 2 * 6 * 3 * chunk):
        monkeypatch.setattr(ssm, "BLOCK_ELEMENTS", budget)
        inputs = scan_inputs(length=length, groups=2)
        assert_all_close(run(selective_scan, inputs), run(selective_scan_ref, inputs))


@pytest.mark.parametrize("drop", [("D", "z", "delta_bias", "initial_state"), ("D",), ("z",), ("initial_state",)])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_arguments(small_blocks, drop, softplus):
    inputs = scan_inputs(length=23, groups=3)
    for name in drop:
        inputs[name] = None
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()   # a step size must be >= 0 without softplus
    assert_all_close(run(selective_scan, inputs, softplus), run(selective_scan_ref, inputs, softplus))


def test_without_last_state_returns_the_output_only(small_blocks):
    inputs = scan_inputs(length=11)
    out = selective_scan(**inputs, delta_softplus=True)
    assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), TOL)


def test_float32_accumulates_in_float32_and_returns_input_dtype():
    inputs = scan_inputs(length=300, groups=2)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        cast = {k: v.to(dtype) for k, v in inputs.items()}
        out, last = selective_scan(**cast, delta_softplus=True, return_last_state=True)
        assert out.dtype == dtype and last.dtype == dtype
        assert_close(out, selective_scan_ref(**{k: v.double() for k, v in cast.items()}, delta_softplus=True),
                     tol, f"{dtype} output")


def test_strong_decay_stays_finite(small_blocks):
    """delta A down to about -1e3 per step: exp of a cumulative sum would overflow float32 within a
    chunk; products of per-step decays in [0, 1] cannot."""
    inputs = {k: v.float() for k, v in scan_inputs(length=45, groups=1).items()}
    inputs["delta"] = inputs["delta"].abs() * 30 + 1
    inputs["A"] = inputs["A"] * 10
    got = run(selective_scan, inputs, delta_softplus=False)
    want = run(selective_scan_ref, {k: v.double() for k, v in inputs.items()}, delta_softplus=False)
    assert_all_close(got, want, tol=1e-5)


def test_initial_state_continues_a_sequence(small_blocks):
    """Scanning [0, k) then [k, l) from the first part's last state == scanning [0, l)."""
    inputs = scan_inputs(length=29, groups=3)
    inputs["initial_state"] = None
    whole, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    k = 13
    cut = lambda t, s: t[..., s] if t is not None and t.dim() >= 3 and t.shape[-1] == 29 else t
    first = {n: cut(v, slice(0, k)) for n, v in inputs.items()}
    second = {n: cut(v, slice(k, None)) for n, v in inputs.items()}
    out1, h = selective_scan(**first, delta_softplus=True, return_last_state=True)
    out2, h2 = selective_scan(**{**second, "initial_state": h}, delta_softplus=True, return_last_state=True)
    assert_close(torch.cat([out1, out2], dim=-1), whole, TOL)
    assert_close(h2, last, TOL)


@pytest.mark.parametrize("groups", [None, 3])
def test_step_matches_ref(groups):
    """selective_scan_step applied token by token == the reference scan."""
    inputs = scan_inputs(length=7, groups=groups)
    want, want_last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    state, outs = inputs["initial_state"], []
    for t in range(7):
        out, state = selective_scan_step(state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"],
                                         inputs["B"][..., t], inputs["C"][..., t], inputs["D"], inputs["z"][..., t],
                                         inputs["delta_bias"], dt_softplus=True)
        outs.append(out)
    assert_close(torch.stack(outs, dim=-1), want, TOL)
    assert_close(state, want_last, TOL)


def test_step_fits_mamba2_heads():
    """Heads of head_dim p flattened into d = h p, with A and dt repeated per head, are Mamba-2's step."""
    b, h, p, n, g = 2, 4, 3, 5, 2
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    state, x, dt, A, B, C = rand(b, h, p, n), rand(b, h, p), rand(b, h), -rand(h).exp(), rand(b, g, n), rand(b, g, n)
    out, new = selective_scan_step(state.flatten(1, 2), x.flatten(1, 2), dt.repeat_interleave(p, 1),
                                   A.repeat_interleave(p)[:, None].expand(h * p, n), B, C)
    Bh, Ch = B.repeat_interleave(h // g, 1), C.repeat_interleave(h // g, 1)   # head i reads group i // (h / g)
    want = torch.exp(dt * A)[..., None, None] * state + (dt[..., None] * x)[..., None] * Bh[:, :, None]
    assert_close(new.view(b, h, p, n), want, TOL)
    assert_close(out.view(b, h, p), (want * Ch[:, :, None]).sum(-1), TOL)


@pytest.mark.parametrize("name,value,message", [
    ("u", torch.zeros(2, 6), "u: expected [batch, dim, length]"),
    ("delta", torch.zeros(2, 6, 36), "delta: expected the shape of u"),
    ("A", torch.zeros(5, 3), "A: expected [dim=6, d_state]"),
    ("B", torch.zeros(2, 4, 3, 37), "B: expected"),
    ("C", torch.zeros(2, 3, 36), "C: expected"),
    ("D", torch.zeros(5), "D: expected [dim=6]"),
    ("z", torch.zeros(2, 6, 36), "z: expected the shape of u"),
    ("delta_bias", torch.zeros(6, 1), "delta_bias: expected [dim=6]"),
    ("initial_state", torch.zeros(2, 6, 4), "initial_state: expected [batch, dim, d_state]"),
])
@pytest.mark.parametrize("fn", [selective_scan, selective_scan_ref])
def test_bad_shapes_name_the_argument(fn, name, value, message):
    inputs = {**scan_inputs(length=37), name: value.double()}
    with pytest.raises(ValueError) as err:
        fn(**inputs)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("name,value,message", [
    ("x", torch.zeros(2, 6, 1), "x: expected [batch, dim]"),
    ("dt", torch.zeros(2, 5), "dt: expected the shape of x"),
    ("A", torch.zeros(6), "A: expected [dim=6, d_state]"),
    ("B", torch.zeros(2, 4, 3), "B: expected [batch, d_state]"),
    ("D", torch.zeros(3), "D: expected [dim=6]"),
    ("state", torch.zeros(2, 6, 2), "state: expected [batch, dim, d_state]"),
])
def test_step_bad_shapes_name_the_argument(name, value, message):
    i = scan_inputs(length=1)
    args = {"state": i["initial_state"], "x": i["u"][..., 0], "dt": i["delta"][..., 0], "A": i["A"],
            "B": i["B"][..., 0], "C": i["C"][..., 0], name: value.double()}
    with pytest.raises(ValueError) as err:
        selective_scan_step(**args)
    assert str(err.value).startswith(message), str(err.value)
