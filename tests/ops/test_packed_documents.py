"""seq_idx (packed documents) in the ops: the helpers of zoo.ops.documents against loops; attention,
blockwise attention, the causal convolution and the selective scan against their references (outputs
and every gradient, float64), and the references against each document run alone."""
import pytest
import torch

from tests.helpers import assert_close, assert_each_close
from tests.ops.test_conv import conv_inputs
from tests.ops.test_ssm import scan_inputs
from zoo.ops import attention as attention_ops
from zoo.ops import ssm
from zoo.ops.attention import attention, attention_ref, blockwise_attention, blockwise_attention_ref
from zoo.ops.conv import causal_conv1d, causal_conv1d_ref
from zoo.ops.documents import document_number, document_positions, document_spans, per_document
from zoo.ops.ssm import selective_scan, selective_scan_ref

F64 = torch.float64
TOL = 1e-10


def packed_ids(batch, length, seed=0):
    """[batch, length] ids, boundaries different in every row: a length-1 document first, two near the
    middle (one of length 1) and a length-1 document last, plus two random cuts; consecutive documents
    cycle through 3 ids, so an id comes back after another document. With 3 rows or more the last row
    is one document."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(batch):
        ids = torch.zeros(length, dtype=torch.int64)
        if not (batch >= 3 and r == batch - 1):
            cuts = {1, length // 2 + r, length // 2 + r + 1, length - 1, *torch.randint(1, max(length, 2), (2,), generator=g).tolist()}
            for i, c in enumerate(sorted(c for c in cuts if 0 < c < length)):
                ids[c:] = (i + 1 + r) % 3
        rows.append(ids)
    return torch.stack(rows)


def spans_of(ids_row):
    """[start, end) of the maximal runs of equal ids, by a plain loop."""
    spans, start = [], 0
    for t in range(1, len(ids_row) + 1):
        if t == len(ids_row) or ids_row[t] != ids_row[t - 1]:
            spans.append((start, t))
            start = t
    return spans


def test_document_helpers_match_loops():
    ids = packed_ids(4, 23)
    spans = document_spans(ids)
    number, positions = document_number(ids), document_positions(ids)
    for r in range(ids.shape[0]):
        assert spans[r] == spans_of(ids[r].tolist())
        for i, (s, e) in enumerate(spans[r]):
            assert number[r, s:e].tolist() == [i] * (e - s)
            assert positions[r, s:e].tolist() == list(range(e - s))
    assert spans_of([5, 5, 2, 5]) == document_spans(torch.tensor([[5, 5, 2, 5]]))[0] == [(0, 2), (2, 3), (3, 4)]
    x = torch.randn(4, 23, 3)
    doubled = per_document(lambda t: t * torch.arange(1, t.shape[1] + 1)[None, :, None], ids, x)
    assert torch.equal(doubled, x * (positions + 1)[..., None])


# ---------------------------------------------------------------------------------------------
# Attention

def qkv(batch, lq, lk, heads=4, kv_heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, lq, heads, d, generator=g, dtype=F64),
            torch.randn(batch, lk, kv_heads, d, generator=g, dtype=F64),
            torch.randn(batch, lk, kv_heads, d, generator=g, dtype=F64))


def run_attention(fn, q, k, v, **kw):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    res = fn(q, k, v, **kw)
    out, lse = res if isinstance(res, tuple) else (res, None)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum()
    if lse is not None:
        loss = loss + (lse * torch.randn(lse.shape, generator=g, dtype=F64)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return {"out": out, "lse": lse, "grad q": grads[0], "grad k": grads[1], "grad v": grads[2]}


def compare(got, want, tol=TOL):
    names = [n for n in want if want[n] is not None]
    assert_each_close(names, [got[n] for n in names], [want[n] for n in names], tol)


@pytest.mark.parametrize("block_size", [1, 4, 7, 64])
@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("lq,lk", [(23, 23), (1, 1), (9, 23)])
def test_blockwise_matches_ref(block_size, window, lq, lk):
    q, k, v = qkv(3, lq, lk)
    seq_idx = packed_ids(3, lk)
    kw = dict(causal=True, window=window, seq_idx=seq_idx)
    got = run_attention(blockwise_attention, q, k, v, block_size=block_size, return_lse=True, **kw)
    want = run_attention(blockwise_attention_ref, q, k, v, return_lse=True, **kw)
    compare(got, want)


@pytest.mark.parametrize("block_size", [3, 8])
def test_blockwise_non_causal_matches_ref(block_size):
    q, k, v = qkv(3, 19, 19)
    seq_idx = packed_ids(3, 19)
    got = run_attention(blockwise_attention, q, k, v, causal=False, block_size=block_size, seq_idx=seq_idx)
    compare(got, run_attention(blockwise_attention_ref, q, k, v, causal=False, seq_idx=seq_idx))


@pytest.mark.parametrize("per_document_calls,dense_limit", [(attention_ops._PER_DOCUMENT_CALLS, 1 << 25),
                                                              (0, 1 << 25), (0, 0)])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("lq,lk", [(23, 23), (9, 23), (1, 23)])
def test_attention_matches_ref(monkeypatch, per_document_calls, dense_limit, window, lq, lk):
    """SDPA per document; with too many documents SDPA with a dense document mask; past the mask's size
    limit the blockwise path."""
    monkeypatch.setattr(attention_ops, "_PER_DOCUMENT_CALLS", per_document_calls)
    monkeypatch.setattr(attention_ops, "_DENSE_DOCUMENT_MASK", dense_limit)
    q, k, v = qkv(3, lq, lk)
    seq_idx = packed_ids(3, lk)
    compare(run_attention(attention, q, k, v, window=window, seq_idx=seq_idx),
            run_attention(attention_ref, q, k, v, window=window, seq_idx=seq_idx))


@pytest.mark.parametrize("window", [None, 4])
def test_attention_ref_is_each_document_alone(window):
    q, k, v = qkv(3, 23, 23)
    seq_idx = packed_ids(3, 23)
    packed = attention_ref(q, k, v, window=window, seq_idx=seq_idx)
    for r, spans in enumerate(document_spans(seq_idx)):
        for s, e in spans:
            alone = attention_ref(q[r:r + 1, s:e], k[r:r + 1, s:e], v[r:r + 1, s:e], window=window)
            assert_close(packed[r:r + 1, s:e], alone, 1e-12, f"row {r} [{s}, {e})")


def test_blockwise_skips_other_documents_and_masks_per_tile(monkeypatch):
    """Four documents of 8 tokens with 8-token blocks: only the 4 diagonal tiles are computed (not the
    10 of causal attention), and no mask larger than one tile is ever built."""
    tiles, masks = [], []
    tiles_fn, hidden_fn = attention_ops._tiles, attention_ops.hidden_keys

    def count_tiles(*args):
        for tile in tiles_fn(*args):
            tiles.append(tile)
            yield tile

    def record_hidden(*args):
        mask = hidden_fn(*args)
        masks.append(tuple(mask.shape))
        return mask

    monkeypatch.setattr(attention_ops, "_tiles", count_tiles)
    monkeypatch.setattr(attention_ops, "hidden_keys", record_hidden)
    q, k, v = qkv(2, 32, 32)
    seq_idx = torch.arange(4).repeat_interleave(8)[None].expand(2, 32)
    got = run_attention(blockwise_attention, q, k, v, block_size=8, seq_idx=seq_idx)
    assert len(tiles) == 2 * 4  # forward and backward
    assert all(shape[1:] == (8, 8) for shape in masks)
    compare(got, run_attention(blockwise_attention_ref, q, k, v, seq_idx=seq_idx))
    tiles.clear()
    run_attention(blockwise_attention, q, k, v, block_size=8)
    assert len(tiles) == 2 * 10


# ---------------------------------------------------------------------------------------------
# Convolution and selective scan

def run_op(fn, inputs, **kw):
    inputs = {k: v if v is None or not v.is_floating_point() else v.clone().requires_grad_()
              for k, v in inputs.items()}
    out, final = fn(**inputs, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g, dtype=F64)).sum()
    leaves = {k: v for k, v in inputs.items() if v is not None and v.is_floating_point()}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"out": out, "final": final, **{f"grad {k}": gr for k, gr in zip(leaves, grads)}}


@pytest.mark.parametrize("length", [1, 2, 23])
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("states", [True, False])
def test_conv_matches_ref(length, width, activation, states):
    inputs = {**conv_inputs(batch=3, length=length, width=width, states=states), "seq_idx": packed_ids(3, length)}
    kw = dict(return_final_states=True, activation=activation)
    compare(run_op(causal_conv1d, inputs, **kw), run_op(causal_conv1d_ref, inputs, **kw), 1e-12)


def test_conv_is_each_document_alone():
    """Every document from zero history except the first, which continues the initial states; the final
    states are those of the last document alone."""
    inputs = conv_inputs(batch=3, length=23, width=4)
    seq_idx = packed_ids(3, 23)
    out, final = causal_conv1d(**inputs, seq_idx=seq_idx, return_final_states=True, activation="silu")
    for r, spans in enumerate(document_spans(seq_idx)):
        for i, (s, e) in enumerate(spans):
            h0 = inputs["initial_states"][r:r + 1] if i == 0 else None
            alone, last = causal_conv1d_ref(inputs["x"][r:r + 1, :, s:e], inputs["weight"], inputs["bias"], h0,
                                            return_final_states=True, activation="silu")
            assert_close(out[r:r + 1, :, s:e], alone, 1e-12, f"row {r} [{s}, {e})")
        assert_close(final[r:r + 1], last, 1e-12, f"final states of row {r}")


@pytest.fixture
def small_blocks(monkeypatch):
    """Chunks of 4 steps and blocks of 8, so documents start inside chunks, on their edges and in later blocks."""
    monkeypatch.setattr(ssm, "CHUNK", 4)
    monkeypatch.setattr(ssm, "_block_len", lambda states, chunk: 2 * chunk)


@pytest.mark.parametrize("length", [1, 9, 23, 37])
@pytest.mark.parametrize("groups", [None, 3])
@pytest.mark.parametrize("initial", [True, False])
def test_selective_scan_matches_ref(small_blocks, length, groups, initial):
    inputs = scan_inputs(batch=3, length=length, groups=groups)
    if not initial:
        inputs["initial_state"] = None
    inputs["seq_idx"] = packed_ids(3, length)
    kw = dict(delta_softplus=True, return_last_state=True)
    compare(run_op(selective_scan, inputs, **kw), run_op(selective_scan_ref, inputs, **kw))


def test_selective_scan_is_each_document_alone(small_blocks):
    inputs = scan_inputs(batch=3, length=23, groups=3)
    seq_idx = packed_ids(3, 23)
    out, last = selective_scan(**inputs, seq_idx=seq_idx, delta_softplus=True, return_last_state=True)
    per_token = ("u", "delta", "z", "B", "C")
    for r, spans in enumerate(document_spans(seq_idx)):
        for i, (s, e) in enumerate(spans):
            piece = {k: (v[r:r + 1, ..., s:e] if k in per_token else v) for k, v in inputs.items()}
            piece["initial_state"] = inputs["initial_state"][r:r + 1] if i == 0 else None
            alone, alone_last = selective_scan_ref(**piece, delta_softplus=True, return_last_state=True)
            assert_close(out[r:r + 1, :, s:e], alone, TOL, f"row {r} [{s}, {e})")
        assert_close(last[r:r + 1], alone_last, TOL, f"last state of row {r}")


def test_blockwise_masks_only_the_rows_a_boundary_crosses(monkeypatch):
    """A tile the causal mask leaves whole but a document boundary crosses in some batch rows gets a
    document mask in those rows alone (the rest of the batch computes it unmasked)."""
    masked_rows = []
    mask_fn = attention_ops._mask_documents

    def record(s, doc, rows, *args):
        masked_rows.append(list(rows))
        return mask_fn(s, doc, rows, *args)

    monkeypatch.setattr(attention_ops, "_mask_documents", record)
    q, k, v = qkv(3, 23, 23)
    seq_idx = packed_ids(3, 23)  # the last row is one document: never masked
    got = run_attention(blockwise_attention, q, k, v, block_size=4, seq_idx=seq_idx)
    compare(got, run_attention(blockwise_attention_ref, q, k, v, seq_idx=seq_idx))
    assert masked_rows and all(rows and 2 not in rows for rows in masked_rows)
