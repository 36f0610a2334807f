import numpy as np
import pytest
import torch

from zoo.data import IGNORE_INDEX, pack_batch


def pack_batch_ref(tokens, doc_ids):
    """The naive twin: a loop over every position."""
    labels, seq_idx = tokens.astype(np.int64).copy(), np.zeros(tokens.shape, dtype=np.int64)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            seq_idx[b, t] = doc_ids[b, t] - doc_ids[b, 0]
            if t > 0 and doc_ids[b, t] != doc_ids[b, t - 1]:
                labels[b, t] = IGNORE_INDEX
    return labels, seq_idx


def test_hand_made_example():
    tokens = np.array([[5, 6, 0, 7, 8, 0, 9], [1, 2, 3, 4, 5, 6, 7]], dtype=np.uint16)
    docs = np.array([[3, 3, 3, 4, 4, 4, 5], [8, 8, 8, 8, 8, 8, 8]])
    batch = pack_batch(tokens, docs)
    assert batch["input_ids"].tolist() == tokens.tolist() and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].tolist() == [[5, 6, 0, -100, 8, 0, -100], [1, 2, 3, 4, 5, 6, 7]]
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 1, 2], [0] * 7] and batch["seq_idx"].dtype == torch.int32


@pytest.mark.parametrize("batch_size, seq_len", [(1, 1), (3, 2), (2, 17), (4, 101)])
def test_matches_reference(batch_size, seq_len):
    rng = np.random.default_rng(seq_len)
    tokens = rng.integers(0, 300, size=(batch_size, seq_len)).astype(np.uint16)
    docs = np.cumsum(rng.random((batch_size, seq_len)) < 0.2, axis=1) + rng.integers(0, 50, size=(batch_size, 1))
    batch = pack_batch(tokens, docs)
    labels, seq_idx = pack_batch_ref(tokens, docs)
    assert np.array_equal(batch["labels"].numpy(), labels)
    assert np.array_equal(batch["seq_idx"].numpy(), seq_idx)
    assert np.array_equal(batch["input_ids"].numpy(), tokens)


def test_cross_doc_true_has_no_seq_idx_and_no_masking():
    tokens = np.arange(12).reshape(2, 6)
    batch = pack_batch(tokens)
    assert set(batch) == {"input_ids", "labels"} and torch.equal(batch["labels"], batch["input_ids"])
    batch["labels"][0, 0] = -1   # labels are a copy: the trainer may edit them
    assert batch["input_ids"][0, 0] == 0


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"tokens: expected \[batch, seq_len\]"):
        pack_batch(np.arange(5))
    with pytest.raises(ValueError, match=r"doc_ids: shape \(2, 2\) differs from tokens \(2, 3\)"):
        pack_batch(np.zeros((2, 3)), np.zeros((2, 2)))
