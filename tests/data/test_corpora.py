import hashlib
import json

import pytest

from zoo.data import SPLITS, DataError, DirectoryCorpus, JsonlCorpus, StdlibCorpus, TextFileCorpus, load_corpus
from zoo.data.corpus import STDLIB_HOLDOUT_BYTES, hash_split


@pytest.fixture(scope="module")
def stdlib():
    return StdlibCorpus()


def test_stdlib_split_is_deterministic_disjoint_and_by_file(stdlib):
    again = StdlibCorpus()
    files = {s: stdlib.files(s) for s in SPLITS}
    assert files == {s: again.files(s) for s in SPLITS}
    assert all(f == sorted(f) for f in files.values())
    everything = [f for s in SPLITS for f in files[s]]
    assert len(everything) == len(set(everything))
    assert sorted(everything) == stdlib._rels
    largest = max((stdlib.root / f).stat().st_size for f in everything)
    for split in ("val", "test"):
        size = sum((stdlib.root / f).stat().st_size for f in files[split])
        assert STDLIB_HOLDOUT_BYTES <= size < STDLIB_HOLDOUT_BYTES + largest, split
    assert sum((stdlib.root / f).stat().st_size for f in files["train"]) > 4 * STDLIB_HOLDOUT_BYTES


def test_stdlib_leaves_out_tests_third_party_and_build_files(stdlib):
    for rel in stdlib._rels:
        parts = rel.split("/")
        assert rel.endswith(".py") and not parts[-1].startswith("_sysconfigdata")
        assert not {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"} & set(parts[:-1])
        assert not parts[0].startswith("config-")
    assert "os.py" in stdlib._rels and "json/decoder.py" in stdlib._rels


def test_stdlib_rules_on_a_made_up_tree(tmp_path):
    keep = ["a.py", "pkg/b.py", "pkg/sub/c.py"]
    drop = ["test/t.py", "pkg/tests/u.py", "idlelib/idle_test/v.py", "site-packages/w.py", "__pycache__/x.py",
            "config-3.11-x86_64-linux-gnu/python-config.py", "_sysconfigdata__linux.py", "notes.txt", "empty.py"]
    for rel in keep + drop:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("" if rel == "empty.py" else f"# {rel}\n")
    (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    corpus = StdlibCorpus(tmp_path, holdout_bytes=1)
    assert sorted(f for s in SPLITS for f in corpus.files(s)) == keep
    assert all(len(corpus.files(s)) == 1 for s in SPLITS)


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_hash_split_fills_val_then_test_in_hash_order(n):
    keys = [f"file{i}.py" for i in range(n)]
    sizes = [(i * 37) % 11 + 1 for i in range(n)]
    split = hash_split(keys, sizes, 10, 10)
    order = sorted(range(n), key=lambda i: hashlib.sha256(keys[i].encode()).digest())
    # the naive twin: walk the hash order, val first until >= 10 bytes, then test
    want, filled = ["train"] * n, {"val": 0, "test": 0}
    for i in order:
        for s in ("val", "test"):
            if filled[s] < 10:
                want[i], filled[s] = s, filled[s] + sizes[i]
                break
    assert split == want
    # the split of a key does not depend on the order items are listed in
    assert dict(zip(keys[::-1], hash_split(keys[::-1], sizes[::-1], 10, 10))) == dict(zip(keys, split))


def test_directory_corpus(text_dir):
    corpus = load_corpus(text_dir, holdout=0.1)
    assert isinstance(corpus, DirectoryCorpus) and corpus.name == "docs"
    files = {s: corpus.files(s) for s in SPLITS}
    assert sorted(sum(files.values(), [])) == sorted(
        p.relative_to(text_dir).as_posix() for p in text_dir.rglob("*") if p.is_file() and p.name != ".hidden")
    for s in SPLITS:
        assert files[s], s
        assert list(corpus.documents(s)) == [(text_dir / f).read_bytes().decode() for f in files[s]]  # \r\n kept
    assert files == {s: DirectoryCorpus(text_dir, holdout=0.1).files(s) for s in SPLITS}


def test_directory_corpus_rejects_binary_file(text_dir):
    (text_dir / "zz.bin").write_bytes(b"\xff\xfe\x00")
    corpus = DirectoryCorpus(text_dir, holdout=0.45)
    split = next(s for s in SPLITS if "zz.bin" in corpus.files(s))
    with pytest.raises(DataError, match=r"zz.bin is not UTF-8 text"):
        list(corpus.documents(split))


def test_jsonl_corpus(jsonl_file):
    corpus = load_corpus(jsonl_file, holdout=0.1)
    assert isinstance(corpus, JsonlCorpus) and corpus.name == "docs"
    want = [json.loads(line)["text"] for line in jsonl_file.read_text(encoding="utf-8").splitlines() if line]
    got = {s: list(corpus.documents(s)) for s in SPLITS}
    assert all(got[s] for s in SPLITS)
    assert sorted(sum(got.values(), [])) == sorted(want)
    # documents keep their file order within a split
    assert got["train"] == [t for t, s in zip(want, _splits_by_line(corpus, jsonl_file)) if s == "train"]


def _splits_by_line(corpus, path):
    return [corpus._split[str(i)] for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"docs.jsonl:3: not valid JSON"),
    ('{"body": "no text field"}', r"docs.jsonl:3: expected a JSON object with a string field 'text'"),
    ('{"text": 5}', r"docs.jsonl:3: expected a JSON object with a string field 'text'"),
    ('["text"]', r"docs.jsonl:3: expected a JSON object"),
])
def test_bad_jsonl_line_names_the_line(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n' + line + '\n{"text": "d"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=message):
        JsonlCorpus(path)


def test_text_file_corpus_cuts_at_newlines(tmp_path):
    text = "".join(f"line {i} ünï\n" for i in range(101)) + "no newline at the end"
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(path, holdout=0.1)
    assert isinstance(corpus, TextFileCorpus) and corpus.name == "book"
    parts = [list(corpus.documents(s)) for s in SPLITS]
    assert all(len(p) == 1 for p in parts)
    train, val, test = (p[0] for p in parts)
    assert train + val + test == text
    assert train.endswith("\n") and val.endswith("\n")
    assert 0.75 < len(train) / len(text) < 0.85 and 0.05 < len(val) / len(text) < 0.15


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "empty_file", "empty_jsonl", "only_empty_texts"])
def test_missing_or_empty_corpus(tmp_path, kind):
    spec, message = {
        "missing": (tmp_path / "nope", r"corpus: '.*nope' is not a named corpus .*no such file or directory"),
        "empty_dir": (tmp_path / "d", r"corpus: directory .*d holds no non-empty files"),
        "empty_file": (tmp_path / "e.txt", r"corpus: .*e.txt is empty"),
        "empty_jsonl": (tmp_path / "e.jsonl", r"corpus: .*e.jsonl holds no document with non-empty 'text'"),
        "only_empty_texts": (tmp_path / "f.jsonl", r"corpus: .*f.jsonl holds no document with non-empty 'text'"),
    }[kind]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "zero.txt").write_text("")
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "f.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match=message):
        load_corpus(spec)


def test_bad_split_and_holdout(text_dir):
    with pytest.raises(DataError, match=r"split: 'dev' is not one of train, val, test"):
        list(DirectoryCorpus(text_dir).documents("dev"))
    with pytest.raises(DataError, match=r"holdout: must be in \(0, 0.5\)"):
        DirectoryCorpus(text_dir, holdout=0.5)
