"""train.repeats: long-range repeats written into training rows, checked against a plain re-derivation."""
import numpy as np
import pytest
import torch

import zoo
from tests.helpers import ToyData, toy_recipe, train_toy
from zoo.data.packing import IGNORE_INDEX, pack_batch
from zoo.data.repeats import insert_repeats, random_string


def _copies(before, after):
    """The (src, d, n) that explain row `after` from row `before` if it holds one copied span: the changed
    positions [lo, hi) and the one distance d >= 1 at which after[lo:hi] == before[lo - d:hi - d]."""
    changed = np.flatnonzero(before != after)
    lo, hi = changed[0], changed[-1] + 1
    return [d for d in range(1, lo + 1) if np.array_equal(after[lo:hi], before[lo - d:hi - d])]


def _moved_rows(before, after):
    """(row, changed positions, distances that explain the change as one copy) of every row a repeat changed."""
    for row in range(len(before)):
        a, b = before[row], after[row]
        if not np.array_equal(a, b):
            yield row, np.flatnonzero(a != b), _copies(a, b)


def test_each_repeat_is_a_span_of_the_row_copied_within_the_bounds():
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 50_000, size=(64, 301))   # distinct enough that a copy is never a coincidence
    batch = pack_batch(tokens)
    out = insert_repeats(batch, fraction=0.5, count=1, span=(7, 19), distance=(40, 111),
                         rng=np.random.default_rng(0))
    assert torch.equal(batch["input_ids"], torch.from_numpy(tokens))   # the batch given is left as it was
    assert torch.equal(out["labels"], out["input_ids"])
    moved = list(_moved_rows(tokens, out["input_ids"].numpy()))
    for row, changed, distances in moved:
        assert 7 <= len(changed) <= 19
        assert [d for d in distances if 40 <= d <= 111], row
    assert 20 <= len(moved) <= 44   # ~half of 64 rows
    again, copies = insert_repeats(batch, fraction=0.5, count=1, span=(7, 19), distance=(40, 111),
                                   rng=np.random.default_rng(0), return_copies=True)
    assert torch.equal(again["input_ids"], out["input_ids"])
    assert torch.equal(copies, out["input_ids"] != batch["input_ids"])   # distinct tokens: every copied one changed


def test_the_draw_is_a_function_of_the_generator_seed():
    batch = pack_batch(np.random.default_rng(1).integers(0, 999, size=(4, 200)))
    args = dict(fraction=1.0, count=3, span=(4, 30), distance=(10, 150))
    a = insert_repeats(batch, rng=np.random.default_rng([0, 7, 0, 1]), **args)
    b = insert_repeats(batch, rng=np.random.default_rng([0, 7, 0, 1]), **args)
    c = insert_repeats(batch, rng=np.random.default_rng([0, 8, 0, 1]), **args)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])


def test_rows_shorter_than_a_repeat_keep_their_tokens_and_long_distances_shrink_to_fit():
    batch = pack_batch(np.arange(2 * 40).reshape(2, 40))
    same = insert_repeats(batch, fraction=1.0, count=2, span=(8, 8), distance=(33, 50), rng=np.random.default_rng(0))
    assert torch.equal(same["input_ids"], batch["input_ids"])   # 8 + 33 > 40: nothing fits
    # a shorter stage of a schedule: distance drawn up to 500 but the row holds 40 tokens
    out = insert_repeats(batch, fraction=1.0, count=1, span=(8, 8), distance=(20, 500), rng=np.random.default_rng(0))
    for row in range(2):
        a, b = batch["input_ids"][row].numpy(), out["input_ids"][row].numpy()
        assert len(np.flatnonzero(a != b)) == 8 and [d for d in _copies(a, b) if 20 <= d <= 32]


def test_a_repeat_never_joins_two_documents():
    """With document ids the copy and its source lie in one document; a document's first label stays ignored."""
    tokens = np.random.default_rng(2).integers(0, 50_000, size=(200, 64))
    docs = np.repeat(np.arange(4), 16)[None].repeat(200, 0)          # four 16-token documents per row
    docs[100:] = np.r_[np.zeros(50, int), np.ones(14, int)]          # or one of 50 and one of 14
    batch = pack_batch(tokens, docs)
    out = insert_repeats(batch, fraction=1.0, count=1, span=(4, 6), distance=(8, 40), rng=np.random.default_rng(3))
    moved = list(_moved_rows(tokens, out["input_ids"].numpy()))
    for row, changed, distances in moved:
        d = [d for d in distances if 8 <= d <= 40][0]
        assert docs[row, changed[0] - d] == docs[row, changed[-1]], row
    assert len(moved) > 20   # the 50-token documents hold repeats
    starts = batch["labels"] == IGNORE_INDEX
    assert torch.equal(out["labels"] == IGNORE_INDEX, starts)
    assert torch.equal(out["labels"][~starts], out["input_ids"][~starts])


@pytest.mark.parametrize("vocab", [256, 1000])
def test_random_source_writes_a_random_string_and_copies_it(vocab):
    """source "random": the source span is replaced (lowercase words for bytes, ids of the vocabulary otherwise)
    and the copy is of the new string; labels follow the ids except a document's first, which stays ignored."""
    tokens = np.random.default_rng(4).integers(0, 3, size=(40, 120))    # ids 0-2: never letters, never random ids
    docs = np.r_[np.zeros(60, int), np.ones(60, int)][None].repeat(40, 0)
    batch = pack_batch(tokens, docs)
    out = insert_repeats(batch, fraction=1.0, count=1, span=(10, 20), distance=(15, 30), rng=np.random.default_rng(1),
                         source="random", vocab_size=vocab)
    ids = out["input_ids"].numpy()
    written = 0
    for row in range(40):
        new = np.flatnonzero(ids[row] >= 3)             # where a random string went (its ids are >= 3 here)
        if not len(new):
            continue
        written += 1
        lo = new[0]
        copies = [d for d in range(15, 31) if lo + d < 120 and ids[row, lo + d] == ids[row, lo]]
        assert copies, row
        assert ids[row, new].max() < vocab
        if vocab == 256:
            assert set(ids[row, new]) <= set(range(ord("a"), ord("z") + 1)) | {ord(" ")}
    assert written >= 15   # the rest drew a repeat across the two documents and were left alone
    starts = batch["labels"] == IGNORE_INDEX
    assert torch.equal(out["labels"] == IGNORE_INDEX, starts)
    assert torch.equal(out["labels"][~starts], out["input_ids"][~starts])
    with pytest.raises(ValueError, match="source: 'words'; allowed: text, random"):
        insert_repeats(batch, 1.0, 1, (10, 20), (15, 30), np.random.default_rng(1), source="words")


def test_random_string_is_words_of_letters_for_bytes_and_avoids_excluded_ids():
    words = random_string(200, 256, np.random.default_rng(0))
    assert len(words) == 200 and set(words) <= set(range(ord("a"), ord("z") + 1)) | {ord(" ")}
    assert all(2 <= len(w) <= 8 for w in bytes(words.tolist()).decode().split(" ")[:-1])
    ids = random_string(500, 10, np.random.default_rng(0), exclude=(3,))
    assert 3 not in ids and set(ids) == set(range(10)) - {3}
    printable = random_string(5000, 256, np.random.default_rng(0), printable=True)
    assert set(printable.tolist()) == set(range(33, 127))


def test_bytes_source_copies_a_string_of_printable_bytes():
    tokens = np.random.default_rng(4).integers(0, 3, size=(8, 120))
    batch = pack_batch(tokens, np.zeros((8, 120), int))
    out, copies = insert_repeats(batch, fraction=1.0, count=1, span=(10, 14), distance=(15, 30),
                                 rng=np.random.default_rng(1), source="bytes", return_copies=True)
    ids = out["input_ids"].numpy()
    for row in range(8):
        copy = np.flatnonzero(copies[row].numpy())
        assert 10 <= len(copy) <= 14 and (ids[row, copy] >= 33).all() and (ids[row, copy] < 127).all()
        source = np.flatnonzero(ids[row] >= 3)[:len(copy)]
        assert (ids[row, source] == ids[row, copy]).all() and 15 <= copy[0] - source[0] <= 30


@pytest.mark.parametrize("field,value,message", [
    ("source", "words", r"repeats.source: 'words'; allowed: text, random, bytes"),
    ("fraction", 1.5, r"repeats.fraction: must be in \[0, 1\], got 1.5"),
    ("count", 0, r"repeats.count: must be a positive integer, got 0"),
    ("span", "[9, 3]", r"repeats.span: must be \[low, high\] with 1 <= low <= high, got \[9, 3\]"),
    ("distance", "[0, 3]", r"repeats.distance: must be \[low, high\]"),
    ("distance", "[12, 20]", r"repeats: span\[0\] \+ distance\[0\] = 44 tokens do not fit train.seq_len 16"),
])
def test_bad_repeats_name_the_field(field, value, message):
    with pytest.raises(zoo.RecipeError, match=message):
        toy_recipe(**{"repeats.fraction": 0.5, "repeats.span": "[32, 64]", f"repeats.{field}": value})


class _Seen(ToyData):
    def __init__(self):
        self.seen = []

    def train_batch(self, step, micro, batch_size, seq_len):
        batch = super().train_batch(step, micro, batch_size, seq_len)
        self.seen.append(batch["input_ids"])
        return batch


def test_training_with_repeats_resumes_exactly(tmp_path):
    over = {"max_steps": 6, "save_every": 3, "repeats.fraction": 1.0, "repeats.span": "[2, 4]",
            "repeats.distance": "[5, 9]"}
    straight, res = train_toy(tmp_path / "a", **over)
    train_toy(tmp_path / "b", **over, keep_last=3)
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "step-00000003").rename(tmp_path / "c" / "checkpoints" / "step-00000003")
    resumed, res2 = train_toy(tmp_path / "c", resume="auto", **over)
    assert resumed.step == 6 and res2.train_loss == res.train_loss
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    # the rows trained on are the data's rows with repeats written in, and the same at every call
    trainer, data = straight, _Seen()
    trainer.data, trainer.step = data, 2
    first, again = trainer._train_batch(0, 4, 16), trainer._train_batch(0, 4, 16)
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["input_ids"], data.seen[0]) and (first["input_ids"] != data.seen[0]).sum() <= 4 * 4
