"""zoo.ops.loss: the blocked cross-entropy against F.cross_entropy in float32 (or float64)."""
import pytest
import torch

from tests.helpers import assert_close
from zoo.ops.loss import cross_entropy, cross_entropy_ref

F64 = torch.float64


def run(fn, logits, targets):
    x = logits.clone().requires_grad_()
    loss = fn(x, targets)
    (loss * 1.7).backward()
    return loss, x.grad


@pytest.mark.parametrize("rows,vocab", [(37, 11), (1, 5), (64, 300)])
@pytest.mark.parametrize("block", [None, 7 * 11])
@pytest.mark.parametrize("ignored", [False, True])
def test_matches_ref(rows, vocab, block, ignored, monkeypatch):
    """Whole or in blocks of rows (a ragged last block); some rows ignored (not the only one)."""
    import zoo.ops.loss as loss
    if block is not None:
        monkeypatch.setattr(loss, "_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g, dtype=F64) * 4
    targets = torch.randint(0, vocab, (rows,), generator=g)
    if ignored and rows > 1:
        targets[::3] = -100
    got, want = run(cross_entropy, logits, targets), run(cross_entropy_ref, logits, targets)
    for name, a, b in zip(["loss", "grad logits"], got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, 1e-13, name)


def test_low_precision_logits():
    """bf16 logits: the loss in float32 (as F.cross_entropy of the float32 upcast), the gradient in bf16."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(50, 300, generator=g) * 4).bfloat16()
    targets = torch.randint(0, 300, (50,), generator=g)
    got, want = run(cross_entropy, logits, targets), run(cross_entropy_ref, logits, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    assert_close(got[0], want[0], 1e-6, "loss")
    assert_close(got[1], want[1], 1e-2, "grad logits")


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_backward_leaves_the_logits_alone(dtype):
    """The model returns the logits it took the loss of: backward must not reuse them as workspace."""
    logits = torch.randn(9, 7).to(dtype).requires_grad_()
    before = logits.detach().clone()
    cross_entropy(logits, torch.randint(0, 7, (9,))).backward()
    assert torch.equal(logits.detach(), before)


def test_every_row_ignored_is_nan_as_torch():
    logits, targets = torch.randn(4, 6), torch.full((4,), -100)
    assert torch.isnan(cross_entropy(logits, targets)) and torch.isnan(cross_entropy_ref(logits, targets))


@pytest.mark.parametrize("fn", [cross_entropy, cross_entropy_ref])
def test_bad_input_names_the_argument(fn):
    with pytest.raises(ValueError, match=r"logits: expected \[rows, vocab\]"):
        fn(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets: expected shape \(2,\)"):
        fn(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets: expected an integer dtype"):
        fn(torch.zeros(2, 3), torch.zeros(2))
