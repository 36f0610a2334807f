"""zoo.ops.triton.ssm (selective_scan(impl="triton")) against the loop over time under Triton's
interpreter: output, last state and every gradient, in float64 (tolerance 1e-10), float32 (1e-4)
and bfloat16 (2e-2, both relative to the float64 reference), lengths that the chunk does not
divide, batch 2, groups, channel blocks of one and of several channels, documents (seq_idx)."""
import pytest
import torch

from tests.ops.test_ssm import assert_all_close, run, scan_inputs
from zoo.ops.ssm import selective_scan, selective_scan_ref

pytest.importorskip("triton")
import zoo.ops.triton.ssm as triton_ssm  # noqa: E402


@pytest.fixture
def short_chunks(monkeypatch):
    """Chunks of 8 steps, so short lengths cross several chunks and end in a partial one."""
    monkeypatch.setattr(triton_ssm, "CHUNK", 8)


def compare(inputs, tol=1e-10, seq_idx=None, **kw):
    got = run(lambda **a: selective_scan(**a, seq_idx=seq_idx, impl="triton"), inputs, **kw)
    want = run(lambda **a: selective_scan_ref(**a, seq_idx=seq_idx),
               {k: None if v is None else v.double() for k, v in inputs.items()}, **kw)
    assert_all_close(got, {k: v.to(got[k].dtype) for k, v in want.items()}, tol)


@pytest.mark.parametrize("length,d,groups", [(21, 6, None), (19, 8, 2), (1, 4, 1)])
def test_triton_scan_matches_ref(short_chunks, length, d, groups):
    # d 6 ungrouped: blocks of 2 channels; d 8 in 2 groups: blocks of 4; odd channel counts: blocks of 1
    compare(scan_inputs(d=d, length=length, groups=groups))


def test_triton_scan_odd_channels_no_extras(short_chunks):
    inputs = {**scan_inputs(d=5, n=3, length=13), "D": None, "z": None, "delta_bias": None, "initial_state": None}
    compare(inputs, delta_softplus=False)


def test_triton_scan_default_chunk():
    # the kernels' own chunk of 32: one full chunk and a partial one
    compare(scan_inputs(batch=1, d=4, n=2, length=45, groups=1))


def test_triton_scan_float32(short_chunks):
    compare(scan_inputs(d=4, length=19, groups=2, dtype=torch.float32), tol=1e-4)


def test_triton_scan_bfloat16(short_chunks):
    # bf16 inputs, float32 arithmetic inside, results rounded to bf16 (2^-8 relative): 2e-2
    compare(scan_inputs(d=4, length=19, groups=2, dtype=torch.bfloat16), tol=2e-2)


def test_triton_scan_documents(short_chunks):
    # a document start inside a chunk, one on a chunk boundary (8), one at the last step, ids repeated
    seq_idx = torch.tensor([[0] * 3 + [1] * 5 + [2] * 8 + [0] * 2 + [5], [4] * 19])
    compare(scan_inputs(d=4, length=19, groups=2), seq_idx=seq_idx)
