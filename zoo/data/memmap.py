"""The prepared-data format: a corpus split tokenized once into flat files that training memory-maps.

For a split at `<prefix>` (e.g. `data/stdlib-byte/train`):
- `<prefix>.bin`: every token id of the split, documents back to back (each ended by the tokenizer's
  end-of-document id when it has one), little-endian `uint16` when the vocabulary fits (<= 65536 ids),
  else `uint32`. No header inside, so `np.memmap` reads any window without loading the file.
- `<prefix>.docs.npy`: int64 document offsets, num_docs + 1 entries; document i is tokens
  [offsets[i], offsets[i + 1]). A separate memory-mapped array rather than a JSON list, so that a
  corpus of millions of documents still has a small header.
- `<prefix>.json`: the header, written last (a split without it is incomplete): format, dtype,
  num_tokens, num_docs, num_bytes (UTF-8 bytes of the documents' text, for bits per byte), vocab_size,
  eos_id, and whatever the writer adds (corpus, tokenizer, their fingerprints).

    with TokenWriter("data/x/train", vocab_size=256) as w:
        w.add_document(ids, num_bytes=len(text.encode()))
    header = w.header                                 # after the with block
    f = TokenFile("data/x/train"); f.tokens[1000:1512]; f.doc_ids(np.arange(1000, 1512))
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from zoo.data.errors import DataError

FORMAT = "zoo-tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest of uint16 / uint32 that holds ids below `vocab_size`."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size: must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise DataError(f"vocab_size: {vocab_size} does not fit uint32 token ids")


def _paths(prefix: Path) -> dict:
    return {k: prefix.with_name(prefix.name + ext) for k, ext in
            (("bin", ".bin"), ("docs", ".docs.npy"), ("json", ".json"))}


class TokenWriter:
    """Streams documents to `<prefix>.bin`; the three files appear (atomically renamed from temporary
    names) only when the block exits without error, so an interrupted run never leaves a split that
    looks complete."""

    def __init__(self, prefix: Union[str, Path], vocab_size: int, eos_id: Optional[int] = None, **meta):
        self.prefix = Path(prefix)
        self.vocab_size, self.eos_id, self.meta = vocab_size, eos_id, meta
        self.dtype = token_dtype(vocab_size)
        if eos_id is not None and not 0 <= eos_id < vocab_size:
            raise DataError(f"eos_id: {eos_id} is outside the vocabulary [0, {vocab_size})")
        self.header: Optional[dict] = None

    def __enter__(self):
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._final = _paths(self.prefix)
        self._tmp = {k: p.with_name(f".{p.name}.tmp{os.getpid()}") for k, p in self._final.items()}
        self._bin = open(self._tmp["bin"], "wb")
        self._offsets, self._bytes = [0], 0
        return self

    def add_document(self, ids, num_bytes: int):
        """`ids`: the document's token ids (the end-of-document id is appended here); `num_bytes`: the
        UTF-8 byte count of its text."""
        ids = np.asarray(ids)
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise DataError(f"token id {hi if hi >= self.vocab_size else lo} is outside the vocabulary "
                                f"[0, {self.vocab_size}) of the tokenizer")
        if self.eos_id is not None:
            ids = np.append(ids, self.eos_id)
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + ids.size)
        self._bytes += num_bytes

    def __exit__(self, exc_type, exc, tb):
        self._bin.close()
        try:
            if exc_type is None:
                if self._offsets[-1] == 0:
                    raise DataError(f"data: split {self.prefix} would be empty (no document has any token)")
                with open(self._tmp["docs"], "wb") as f:  # a file object: np.save would append ".npy" to a path
                    np.save(f, np.asarray(self._offsets, dtype=np.int64))
                self.header = {"format": FORMAT, "dtype": self.dtype.name, "num_tokens": self._offsets[-1],
                               "num_docs": len(self._offsets) - 1, "num_bytes": self._bytes,
                               "vocab_size": self.vocab_size, "eos_id": self.eos_id, **self.meta}
                self._tmp["json"].write_text(json.dumps(self.header, indent=1) + "\n")
                for key in ("bin", "docs", "json"):   # header last: its presence marks the split complete
                    os.replace(self._tmp[key], self._final[key])
        finally:
            for p in self._tmp.values():
                p.unlink(missing_ok=True)
        return False


def read_header(prefix: Union[str, Path]) -> dict:
    path = _paths(Path(prefix))["json"]
    if not path.is_file():
        raise DataError(f"data: {path} not found; prepare the data first "
                        "(python scripts/prepare_data.py --corpus ... --tokenizer ...)")
    header = json.loads(path.read_text())
    if header.get("format") != FORMAT:
        raise DataError(f"data: {path} has format {header.get('format')!r}, expected {FORMAT!r}; prepare it again")
    return header


class TokenFile:
    """A prepared split, memory-mapped: `.tokens` (1-D array of ids), `.offsets` (document offsets)."""

    def __init__(self, prefix: Union[str, Path]):
        self.prefix = Path(prefix)
        self.header = read_header(self.prefix)
        paths = _paths(self.prefix)
        n, dtype = self.header["num_tokens"], np.dtype(self.header["dtype"])
        size = paths["bin"].stat().st_size if paths["bin"].is_file() else -1
        if size != n * dtype.itemsize:
            raise DataError(f"data: {paths['bin']} holds {size} bytes, the header says {n} {dtype.name} tokens; "
                            "prepare it again")
        self.tokens = np.memmap(paths["bin"], dtype=dtype, mode="r", shape=(n,))
        self.offsets = np.load(paths["docs"], mmap_mode="r")
        if len(self.offsets) != self.header["num_docs"] + 1 or self.offsets[-1] != n:
            raise DataError(f"data: {paths['docs']} does not match the header; prepare it again")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    def doc_ids(self, positions: np.ndarray) -> np.ndarray:
        """The document index of each token position (int64, same shape)."""
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]])
