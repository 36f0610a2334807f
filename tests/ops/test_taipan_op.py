"""Taipan's selective window attention op (arXiv 2410.18572; zoo.ops.taipan) against its dense twin: outputs
and every gradient in float64 on odd lengths, queries at the end of the keys, what a query sees, bad arguments."""
import pytest
import torch

from tests.helpers import assert_close
from zoo.ops.taipan import selective_window_attention, selective_window_attention_ref

@pytest.mark.parametrize("length", [1, 13, 29])
@pytest.mark.parametrize("window", [1, 4, 7, 64])
@pytest.mark.parametrize("all_rows", [True, False])
def test_op_matches_dense_twin(length, window, all_rows):
    b, h, d = 3, 2, 5
    q, k, v = (torch.randn(b, length, h, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    selected = torch.rand(b, length) < 0.4
    selected[0] = False                      # a row with no selected key at all
    rows = None if all_rows else torch.rand(b, length) < 0.5
    do = torch.randn(b, length, h, d, dtype=torch.float64)
    got = selective_window_attention(q, k, v, selected, window, rows=rows, block_size=4)
    got_grads = torch.autograd.grad((got * do).sum(), (q, k, v))
    want = selective_window_attention_ref(q, k, v, selected, window, rows=rows)
    want_grads = torch.autograd.grad((want * do).sum(), (q, k, v))
    assert_close(got, want, 1e-12)
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert_close(g, w, 1e-12, f"grad {name}")


@pytest.mark.parametrize("lq", [1, 6, 11])
def test_op_queries_at_the_end_of_the_keys(lq):
    b, lk, h, d = 2, 17, 2, 4
    q = torch.randn(b, lq, h, d, dtype=torch.float64)
    k, v = torch.randn(b, lk, h, d, dtype=torch.float64), torch.randn(b, lk, h, d, dtype=torch.float64)
    selected = torch.rand(b, lk) < 0.5
    got = selective_window_attention(q, k, v, selected, 5, block_size=3)
    assert_close(got, selective_window_attention_ref(q, k, v, selected, 5), 1e-12)


def test_op_sees_only_itself_and_selected_keys_in_the_window():
    # one-hot values make the attention weights readable off the output
    L = 9
    q = k = torch.zeros(1, L, 1, L, dtype=torch.float64)      # equal scores: uniform over visible keys
    v = torch.eye(L, dtype=torch.float64)[None, :, None, :]   # value of key j is e_j (head_dim = L)
    selected = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    out = selective_window_attention(q, k, v, selected, window=4, block_size=2)[0, :, 0]
    # position 6 sees itself and selected 3 (6 - 4 < 3); position 8 sees itself and selected 6
    assert torch.allclose(out[6], torch.tensor([0, 0, 0, .5, 0, 0, .5, 0, 0], dtype=torch.float64))
    assert torch.allclose(out[8], torch.tensor([0, 0, 0, 0, 0, 0, .5, 0, .5], dtype=torch.float64))
    # position 4 is unselected: it still attends (itself + 2, 3), for the straight-through gradient
    assert torch.allclose(out[4], torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float64) / 3)


def test_op_rejects_bad_arguments():
    q = k = v = torch.randn(1, 5, 1, 2)
    sel = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="^window:"):
        selective_window_attention(q, k, v, sel, 0)
    with pytest.raises(ValueError, match="^selected:"):
        selective_window_attention(q, k, v, sel.long(), 3)
    with pytest.raises(ValueError, match="^rows:"):
        selective_window_attention(q, k, v, sel, 3, rows=sel[:, :4])
    with pytest.raises(ValueError, match="^block_size:"):
        selective_window_attention(q, k, v, sel, 3, block_size=0)
    with pytest.raises(ValueError, match="^q:"):
        selective_window_attention(torch.randn(1, 6, 1, 2), k, v, sel, 3)


