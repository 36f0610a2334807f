import json
import os

import numpy as np
import pytest

from tests.data.conftest import SAMPLES
from zoo.data import SPLITS, ByteTokenizer, DataError, TokenFile, TokenWriter, load_corpus, prepare, train_bpe
from zoo.data.memmap import token_dtype


@pytest.mark.parametrize("vocab_size, dtype", [(256, "uint16"), (65536, "uint16"), (65537, "uint32"),
                                               (100_003, "uint32")])
@pytest.mark.parametrize("eos_id", [None, 0])
def test_round_trip(tmp_path, vocab_size, dtype, eos_id):
    rng = np.random.default_rng(vocab_size)
    docs = [rng.integers(0, vocab_size, size=n) for n in (1, 13, 0, 97, 2, 1)]
    with TokenWriter(tmp_path / "train", vocab_size, eos_id, corpus="x") as w:
        for d in docs:
            w.add_document(d, num_bytes=3 * len(d))
    f = TokenFile(tmp_path / "train")
    ended = [np.append(d, eos_id) if eos_id is not None else d for d in docs]
    assert f.header == w.header and f.header["corpus"] == "x" and f.tokens.dtype == np.dtype(dtype)
    assert isinstance(f.tokens, np.memmap) and isinstance(f.offsets, np.memmap)   # read lazily, not loaded
    assert f.header["num_docs"] == len(docs) and f.header["num_bytes"] == 3 * sum(map(len, docs))
    assert np.array_equal(f.tokens, np.concatenate(ended))
    assert os.path.getsize(tmp_path / "train.bin") == len(f) * np.dtype(dtype).itemsize
    for i, d in enumerate(ended):
        assert np.array_equal(f.document(i), d)
    # every position maps to the document holding it (a loop over documents as the reference)
    want = np.concatenate([np.full(len(d), i) for i, d in enumerate(ended)])
    assert np.array_equal(f.doc_ids(np.arange(len(f))), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.docs.npy", "train.json"]


def test_dtype_limits():
    assert token_dtype(1 << 16) == np.uint16 and token_dtype((1 << 16) + 1) == np.uint32
    with pytest.raises(DataError, match="vocab_size: must be positive"):
        token_dtype(0)


def test_id_outside_vocab_and_interrupted_write_leave_nothing(tmp_path):
    with pytest.raises(DataError, match=r"token id 300 is outside the vocabulary \[0, 256\)"):
        with TokenWriter(tmp_path / "train", 256) as w:
            w.add_document([1, 2, 3], 3)
            w.add_document([300], 1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="would be empty"):
        with TokenWriter(tmp_path / "train", 256) as w:
            w.add_document([], 0)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(DataError, match=r"train.json not found; prepare the data first"):
        TokenFile(tmp_path / "train")
    with TokenWriter(tmp_path / "train", 256) as w:
        w.add_document(np.arange(100), 100)
    with open(tmp_path / "train.bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(DataError, match=r"train.bin holds 150 bytes, the header says 100 uint16 tokens"):
        TokenFile(tmp_path / "train")


def test_prepare_keeps_documents_and_boundaries(text_dir, tmp_path):
    corpus = load_corpus(text_dir, holdout=0.1)
    out = prepare(corpus, "byte", root=tmp_path / "data")
    assert out == tmp_path / "data" / "docs-byte"
    tok = ByteTokenizer()
    for split in SPLITS:
        f = TokenFile(out / split)
        texts = list(corpus.documents(split))
        assert f.header["num_docs"] == len(texts) and f.header["num_bytes"] == sum(len(t.encode()) for t in texts)
        for i, text in enumerate(texts):
            doc = f.document(i)
            assert doc[-1] == tok.eos_id and tok.decode(doc[:-1]) == text


def test_prepare_with_bpe(jsonl_file, tmp_path):
    corpus = load_corpus(jsonl_file, holdout=0.1)
    tok = train_bpe(corpus.documents("train"), 290, tmp_path / "tok")
    out = prepare(corpus, str(tmp_path / "tok"), root=tmp_path / "data")
    assert out.name == "docs-tok"
    f = TokenFile(out / "val")
    assert f.header["vocab_size"] == 290 and f.header["eos_id"] == tok.eos_id
    for i, text in enumerate(corpus.documents("val")):
        doc = f.document(i)
        assert doc[-1] == tok.eos_id and tok.decode(doc[:-1]) == text


def test_prepare_is_cached_until_the_corpus_changes(text_dir, tmp_path):
    out = prepare(str(text_dir), "byte", root=tmp_path)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    before = json.loads((out / "train.json").read_text())["corpus_fingerprint"]
    assert prepare(str(text_dir), "byte", root=tmp_path) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    (text_dir / "doc00.txt").write_text("changed text, changed size\n")
    prepare(str(text_dir), "byte", root=tmp_path)
    assert json.loads((out / "train.json").read_text())["corpus_fingerprint"] != before
    assert all(p.stat().st_mtime_ns != stamp[p.name] for p in out.iterdir())


def test_prepare_rejects_a_corpus_too_small_to_split(tmp_path):
    root = tmp_path / "two"
    root.mkdir()
    for i in range(2):
        (root / f"{i}.txt").write_text(SAMPLES[i])
    with pytest.raises(DataError, match=r"corpus: directory .*two \(2 files\) has no documents in split 'train'"):
        prepare(str(root), "byte", root=tmp_path / "data")
