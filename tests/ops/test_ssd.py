"""zoo.ops.ssd: the chunked SSD scan against the step-by-step reference (outputs, final states and
every gradient in float64), documents packed with seq_idx, streaming through initial_states,
dtypes, extreme decays, errors."""
import pytest
import torch

import zoo.ops.ssd as ssd
from tests.helpers import assert_close
from zoo.ops.ssd import ssd_scan, ssd_scan_ref, ssd_state_update

F64 = torch.float64
TOL = 1e-10
NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]

# (length, chunk_size): one token, a prime over a chunk that does not divide it, an exact multiple,
# one partial chunk, one chunk exactly, chunk_size 1 (every token its own chunk).
SHAPES = [(1, 4), (37, 8), (16, 4), (5, 16), (13, 13), (11, 1)]
HEADS = [(4, 2), (3, 1), (2, 2)]  # (heads, groups)


def make_inputs(length, heads=4, groups=2, head_dim=3, d_state=5, batch=2, D_per_channel=False, seed=0,
                dtype=F64, A_scale=1.0, extras=True):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    inputs = dict(x=make(batch, length, heads, head_dim),
                  # dt around softplus(-1): positive with or without softplus, as in a trained model
                  dt=make(batch, length, heads).mul(0.5).sub(1.0).exp(),
                  A=-torch.rand(heads, generator=g, dtype=F64).add(0.2).mul(A_scale),
                  B=make(batch, length, groups, d_state), C=make(batch, length, groups, d_state))
    if extras:
        inputs.update(D=make(heads, head_dim) if D_per_channel else make(heads), z=make(batch, length, heads, head_dim),
                      dt_bias=make(heads).mul(0.3), initial_states=make(batch, heads, head_dim, d_state))
    return {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}


def outputs_and_grads(fn, inputs, **kw):
    """y, final state, then the gradient of every input of a random projection of both."""
    y, final = fn(**inputs, return_final_states=True, **kw)
    g = torch.Generator().manual_seed(7)
    cot = lambda t: torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)
    loss = (y * cot(y)).sum() + (final * cot(final)).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()), materialize_grads=True)
    return [y, final, *grads], ["y", "final_states", *inputs]


def assert_all_close(got, want, names, tol=TOL):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        if b.numel() and b.abs().max() == 0:
            assert a.abs().max() <= tol, f"{name}: {a.abs().max():.3e} where the reference is 0"
        else:
            assert_close(a, b, tol, name)


def compare(inputs, chunk_size, **kw):
    got, names = outputs_and_grads(lambda **a: ssd_scan(chunk_size=chunk_size, **a), inputs, **kw)
    want, _ = outputs_and_grads(ssd_scan_ref, inputs, **kw)
    assert_all_close(got, want, names)
    return got


@pytest.fixture(params=["one group", "small groups", "group per chunk"])
def chunk_groups(request, monkeypatch):
    """The chunks run in groups that carry the state (forward) and its gradient (backward) from
    one to the next: a budget of 1024 elements makes groups of two chunks at (37, 8) with the
    last one partial; a budget of 1, one chunk per group."""
    budget = {"one group": ssd._GROUP_ELEMENTS, "small groups": 1024, "group per chunk": 1}[request.param]
    monkeypatch.setattr(ssd, "_GROUP_ELEMENTS", budget)


@pytest.mark.parametrize("length,chunk_size", SHAPES)
@pytest.mark.parametrize("heads,groups", HEADS)
@pytest.mark.parametrize("dt_softplus", [False, True])
def test_fast_matches_ref(length, chunk_size, heads, groups, dt_softplus, chunk_groups):
    inputs = make_inputs(length, heads, groups)
    compare(inputs, chunk_size, dt_softplus=dt_softplus)


@pytest.mark.parametrize("length,chunk_size", [(1, 4), (37, 8)])
@pytest.mark.parametrize("options", ["bare", "D per channel", "D only", "z only", "initial state only"])
def test_optional_inputs(length, chunk_size, options):
    full = make_inputs(length, D_per_channel=options == "D per channel")
    keep = {"bare": (), "D per channel": ("D",), "D only": ("D",), "z only": ("z",),
            "initial state only": ("initial_states",)}[options]
    inputs = {k: v for k, v in full.items() if k in ("x", "dt", "A", "B", "C") + keep}
    compare(inputs, chunk_size)


def resets(length, positions, batch=2):
    """seq_idx [batch, length] whose id changes at the given positions (row 1 shifted by one)."""
    rows = []
    for row in range(batch):
        ids, doc = [], 0
        for t in range(length):
            doc += (t in positions) if row == 0 else (t - 1 in positions and t > 1)
            ids.append(doc)
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("positions", [
    (3,),              # inside the first chunk
    (8, 16),           # exactly at chunk boundaries
    (7, 9, 15, 20),    # last token of a chunk, just after a boundary, inside
    (1, 2, 3, 22),     # one-token documents, and a document starting at the last token
])
@pytest.mark.parametrize("dt_softplus", [False, True])
def test_seq_idx_matches_ref(positions, dt_softplus, chunk_groups):
    inputs = make_inputs(23)
    compare(inputs, 8, seq_idx=resets(23, positions), dt_softplus=dt_softplus)


def test_seq_idx_ids_need_not_increase():
    """The state resets wherever the id changes, also when an earlier id comes back."""
    inputs = make_inputs(19)
    seq_idx = torch.tensor([[5] * 4 + [2] * 6 + [5] * 9, [0] * 10 + [1] * 3 + [0] * 6])
    compare(inputs, 4, seq_idx=seq_idx)


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 64])
def test_packed_documents_equal_separate_runs(chunk_size):
    lengths = [5, 11, 7]
    inputs = make_inputs(sum(lengths), batch=1, extras=False)
    D, z = torch.randn(4, dtype=F64), torch.randn(1, sum(lengths), 4, 3, dtype=F64)
    h0 = torch.randn(1, 4, 3, 5, dtype=F64)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    packed, final = ssd_scan(**inputs, chunk_size=chunk_size, D=D, z=z, initial_states=h0, seq_idx=seq_idx,
                             dt_softplus=True, return_final_states=True)
    start, separate = 0, []
    for i, n in enumerate(lengths):
        part = {k: (v[:, start:start + n] if v.dim() > 1 else v) for k, v in inputs.items()}
        y, last = ssd_scan(**part, chunk_size=chunk_size, D=D, z=z[:, start:start + n], dt_softplus=True,
                           initial_states=h0 if i == 0 else None, return_final_states=True)
        separate.append(y)
        start += n
    assert_close(packed, torch.cat(separate, 1), TOL, "packed vs separate outputs")
    assert_close(final, last, TOL, "final state vs the last document's")


@pytest.mark.parametrize("chunk_size", [4, 8])
def test_no_gradient_leaks_between_documents(chunk_size):
    inputs = make_inputs(20, batch=1)
    seq_idx = torch.tensor([[0] * 9 + [1] * 11])
    y = ssd_scan(**inputs, chunk_size=chunk_size, seq_idx=seq_idx)
    grads = torch.autograd.grad(y[:, 9:].square().sum(), [inputs["x"], inputs["B"], inputs["initial_states"]])
    for name, grad in zip(["x", "B", "initial_states"], grads):
        assert (grad[:, :9] if name != "initial_states" else grad).abs().max() == 0, f"{name}: leak"
    assert grads[0][:, 9:].abs().max() > 0


@pytest.mark.parametrize("split", [1, 8, 13])
def test_streaming_through_initial_states(split):
    """Scanning a prefix, then the rest from its final state, equals one scan of the whole."""
    inputs = make_inputs(29)
    whole, final = ssd_scan(**inputs, chunk_size=8, return_final_states=True)
    first = {k: (v[:, :split] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    rest = {k: (v[:, split:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    y1, state = ssd_scan(**first, chunk_size=8, return_final_states=True)
    y2, final2 = ssd_scan(**{**rest, "initial_states": state}, chunk_size=8, return_final_states=True)
    assert_close(torch.cat([y1, y2], 1), whole, TOL, "streamed outputs")
    assert_close(final2, final, TOL, "streamed final state")


def test_strided_views_as_inputs():
    """Blocks pass slices of one projection (x, z, B, C, dt side by side in the last dim), and
    the upstream gradient may be strided too."""
    batch, length, heads, head_dim, groups, d_state = 2, 21, 4, 3, 2, 5
    width = 2 * heads * head_dim + 2 * groups * d_state + heads
    proj = torch.randn(batch, length, width, dtype=F64, requires_grad=True)
    cuts = [heads * head_dim, heads * head_dim, groups * d_state, groups * d_state, heads]
    x, z, B, C, dt = torch.split(proj, cuts, dim=-1)
    views = dict(x=x.unflatten(-1, (heads, head_dim)), z=z.unflatten(-1, (heads, head_dim)),
                 B=B.unflatten(-1, (groups, d_state)), C=C.unflatten(-1, (groups, d_state)), dt=dt)
    A = -torch.rand(heads, dtype=F64)
    y = ssd_scan(**views, A=A, chunk_size=8, dt_softplus=True)
    y_ref = ssd_scan_ref(**{k: v.contiguous() for k, v in views.items()}, A=A, dt_softplus=True)
    assert_close(y, y_ref, TOL, "output")
    cot = torch.randn(batch, heads, length, head_dim, dtype=F64).transpose(1, 2)  # strided
    got = torch.autograd.grad(y, proj, cot)[0]
    want = torch.autograd.grad(y_ref, proj, cot)[0]
    assert_close(got, want, TOL, "gradient of the projection")


def test_padding_is_invisible():
    """Outputs and final states do not depend on how the length is padded to whole chunks."""
    inputs = make_inputs(21)
    runs = [ssd_scan(**inputs, chunk_size=q, return_final_states=True) for q in (3, 7, 8, 21, 32)]
    for y, final in runs[1:]:
        assert_close(y, runs[0][0], TOL, "output")
        assert_close(final, runs[0][1], TOL, "final state")


def test_extreme_decays_stay_exact():
    """Decays far below exp(-87) inside a chunk (where a naive exp underflows to slow denormals)
    keep outputs and gradients finite and equal to the reference."""
    inputs = make_inputs(37, A_scale=60.0)
    compare(inputs, 16, dt_softplus=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    inputs = make_inputs(70, dtype=dtype)
    y, final = ssd_scan(**inputs, chunk_size=16, return_final_states=True)
    assert y.dtype == dtype and final.dtype == torch.float32
    exact = {k: v.detach().double() for k, v in inputs.items()}
    y_ref, final_ref = ssd_scan_ref(**exact, return_final_states=True)
    # Inputs are the same numbers in both runs; only the arithmetic differs, plus y's final rounding.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(y, y_ref, tol, "output")
    assert_close(final, final_ref, 1e-5, "final state")
    y.float().sum().backward()
    assert all(inputs[k].grad.dtype == dtype and torch.isfinite(inputs[k].grad).all() for k in inputs)


@pytest.mark.parametrize("A_scale", [1.0, 10.0])
def test_float32_gradients_keep_float32_precision(A_scale):
    """Float32 against the same inputs in float64, with chunks of 256 where the in-chunk
    cumulative decay reaches hundreds: every gradient, d(dt A) included, within 1e-5. (The
    shortcut dcs = dy.y - u.du lost d A to cancellation here, 2e-5 to 1e-4; float32 differences of
    cumulative sums lost y to 1e-5.)"""
    inputs = make_inputs(512, heads=2, groups=1, head_dim=32, d_state=32, batch=1, dtype=torch.float32,
                         A_scale=A_scale)
    got, names = outputs_and_grads(lambda **a: ssd_scan(chunk_size=256, **a), inputs, dt_softplus=True)
    exact = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    want, _ = outputs_and_grads(lambda **a: ssd_scan(chunk_size=256, **a), exact, dt_softplus=True)
    assert_all_close(got, want, names, tol=1e-5)


@pytest.mark.parametrize("heads,groups", HEADS)
@pytest.mark.parametrize("dt_softplus", [False, True])
@pytest.mark.parametrize("options", [{}, {"D_per_channel": True}, {"extras": False}])
@pytest.mark.parametrize("state_dtype,tol", [(F64, TOL), (torch.float32, 1e-5)])
def test_state_update_steps_match_ref(heads, groups, dt_softplus, options, state_dtype, tol):
    """ssd_state_update token by token == the loop over time; the state is updated in place (a float32
    state under float64 inputs: computed in float64, written back in float32)."""
    inputs = {k: v.detach() for k, v in make_inputs(7, heads, groups, **options).items()}
    want, final = ssd_scan_ref(**inputs, dt_softplus=dt_softplus, return_final_states=True)
    state = inputs.pop("initial_states", None)
    state = (torch.zeros(2, heads, 3, 5, dtype=F64) if state is None else state).to(state_dtype).clone()
    held, ys = state, []
    with torch.no_grad():
        for t in range(7):
            step = {k: inputs[k][:, t] for k in ("x", "dt", "B", "C", "z") if k in inputs}
            ys.append(ssd_state_update(state, **step, A=inputs["A"], D=inputs.get("D"),
                                       dt_bias=inputs.get("dt_bias"), dt_softplus=dt_softplus))
    assert state is held
    assert_close(torch.stack(ys, dim=1), want, tol, "y")
    assert_close(state.double(), final, tol, "state")


def test_state_update_of_a_strided_state():
    """A state that is a non-contiguous view (rows reordered for beams) is still written in place."""
    inputs = {k: v.detach()[:, 0] if v.dim() > 2 and k != "initial_states" else v.detach()
              for k, v in make_inputs(1, 4, 2).items()}
    base = inputs.pop("initial_states").transpose(0, 1).contiguous().transpose(0, 1)   # [b, h, p, n] strided
    want_state = base.contiguous()
    y_want = ssd_state_update(want_state, **inputs, dt_softplus=True)
    y = ssd_state_update(base, **inputs, dt_softplus=True)
    assert not base.is_contiguous()
    assert_close(y, y_want, TOL)
    assert_close(base, want_state, TOL)


def test_ref_is_the_recurrence():
    """One step by hand: h_1 = exp(dt A) h_0 + dt x B^T, y = h_1 C + D x, gated by silu(z)."""
    inputs = {k: v.detach() for k, v in make_inputs(1, heads=2, groups=1, batch=1).items()}
    x, dt, A, B, C = (inputs[k][0, 0] if inputs[k].dim() > 1 else inputs[k] for k in ("x", "dt", "A", "B", "C"))
    D, z, h0 = inputs["D"], inputs["z"][0, 0], inputs["initial_states"][0]
    dt = dt + inputs["dt_bias"]
    h1 = torch.exp(dt * A)[:, None, None] * h0 + (dt[:, None] * x)[..., None] * B[0]
    y = (h1 @ C[0] + D[:, None] * x) * torch.nn.functional.silu(z)
    got, final = ssd_scan_ref(**inputs, return_final_states=True)
    assert_close(got[0, 0], y, 1e-14, "output")
    assert_close(final[0], h1, 1e-14, "state")


def test_cpu_tensors_never_need_mamba_ssm():
    inputs = make_inputs(9)
    assert ssd_scan(**inputs, chunk_size=4).device.type == "cpu"


def bad(**changes):
    inputs = {k: v.detach() for k, v in make_inputs(6).items()}
    inputs["seq_idx"] = torch.zeros(2, 6, dtype=torch.int64)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("changes,chunk_size,match", [
    (dict(B=torch.randn(2, 6, 3, 5, dtype=F64), C=torch.randn(2, 6, 3, 5, dtype=F64)), 4, "groups 3 must divide heads 4"),
    (dict(x=torch.randn(2, 6, 4, dtype=F64)), 4, "x: expected"),
    (dict(x=torch.randn(2, 0, 4, 3, dtype=F64)), 4, "x: length"),
    (dict(dt=torch.randn(2, 5, 4, dtype=F64)), 4, "dt: expected"),
    (dict(A=torch.randn(4, 1, dtype=F64)), 4, "A: expected"),
    (dict(B=torch.randn(2, 7, 2, 5, dtype=F64)), 4, "B: expected"),
    (dict(C=torch.randn(2, 6, 2, 4, dtype=F64)), 4, "C: expected"),
    (dict(D=torch.randn(3, dtype=F64)), 4, "D: expected"),
    (dict(z=torch.randn(2, 6, 4, 2, dtype=F64)), 4, "z: expected"),
    (dict(dt_bias=torch.randn(2, dtype=F64)), 4, "dt_bias: expected"),
    (dict(initial_states=torch.randn(2, 4, 3, 4, dtype=F64)), 4, "initial_states: expected"),
    (dict(seq_idx=torch.zeros(2, 5, dtype=torch.int64)), 4, "seq_idx: expected shape"),
    (dict(seq_idx=torch.zeros(2, 6)), 4, "seq_idx: expected an integer"),
    ({}, 0, "chunk_size: expected an int >= 1"),
    ({}, 2.0, "chunk_size: expected an int >= 1"),
])
def test_bad_inputs_raise(changes, chunk_size, match):
    with pytest.raises(ValueError, match=match):
        ssd_scan(**bad(**changes), chunk_size=chunk_size)
    if chunk_size == 4:  # the reference validates the same way
        with pytest.raises(ValueError, match=match):
            ssd_scan_ref(**bad(**changes))
