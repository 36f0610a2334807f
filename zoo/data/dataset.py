"""Batches from prepared data, each a pure function of a seed and a position, so resume is exact.

    data = PreparedData(prepare("stdlib", "byte"), seed=0, cross_doc=False)
    batch = data.train_batch(step, micro, batch_size, seq_len)   # {"input_ids", "labels"[, "seq_idx"]}
    for batch in data.val_batches(n, batch_size, seq_len): ...   # the same n batches every call
    data.bytes_per_token                                         # of the val split, for bits per byte
    check_vocab(data, recipe.model.vocab_size)

`PreparedData` is what `zoo.train.Trainer` consumes. Training windows start at offsets drawn uniformly
from [0, num_tokens - seq_len] by a NumPy generator seeded with (seed, step, micro): no iterator state
exists, so a trainer that restores its step count draws bit-identical batches. `BatchStream` gives the
same guarantee to a plain loop: its only state is a batch counter (`state_dict` / `load_state_dict`).
Evaluation windows are evenly spaced over the split, so they cover it from start to end.
Batches are built by `zoo.data.packing.pack_batch` (labels, document ids).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from zoo.data.corpus import SPLITS
from zoo.data.errors import DataError
from zoo.data.memmap import TokenFile
from zoo.data.packing import pack_batch


def _check_positive(**values):
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise DataError(f"{name}: must be a positive integer, got {v!r}")


class TokenDataset:
    """Windows of `seq_len` tokens from one prepared split (`<prefix>.bin`), read through a memmap."""

    def __init__(self, source: Union[str, Path, TokenFile], cross_doc: bool = True):
        self.file = source if isinstance(source, TokenFile) else TokenFile(source)
        self.cross_doc = cross_doc

    def __len__(self) -> int:
        return len(self.file)

    def _check(self, batch_size: int, seq_len: int):
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        if seq_len > len(self.file):
            raise DataError(f"seq_len: {seq_len} is longer than the data: {self.file.prefix} holds "
                            f"{len(self.file)} tokens")

    def windows(self, starts: np.ndarray, seq_len: int) -> dict:
        """The batch of windows [starts[i], starts[i] + seq_len)."""
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len)
        tokens = self.file.tokens[idx]
        return pack_batch(tokens, None if self.cross_doc else self.file.doc_ids(idx))

    def sample(self, batch_size: int, seq_len: int, seed: int, *key: int) -> dict:
        """`batch_size` windows at offsets drawn by a generator seeded with (seed, *key)."""
        self._check(batch_size, seq_len)
        if any(not isinstance(k, (int, np.integer)) or k < 0 for k in (seed, *key)):
            raise DataError(f"seed / key: must be non-negative integers, got {(seed, *key)}")
        rng = np.random.default_rng([int(seed), *map(int, key)])
        return self.windows(rng.integers(0, len(self.file) - seq_len + 1, size=batch_size), seq_len)

    def eval_batches(self, n: int, batch_size: int, seq_len: int) -> list[dict]:
        """`n` batches of windows evenly spaced over the whole split (overlapping only when the split
        holds fewer than n * batch_size * seq_len tokens)."""
        self._check(batch_size, seq_len)
        _check_positive(n=n)
        starts = np.linspace(0, len(self.file) - seq_len, n * batch_size).round().astype(np.int64)
        return [self.windows(s, seq_len) for s in starts.reshape(n, batch_size)]


class BatchStream:
    """An endless iterator of `dataset.sample` batches; batch k depends only on (seed, k)."""

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int = 0):
        dataset._check(batch_size, seq_len)
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.dataset.sample(self.batch_size, self.seq_len, self.seed, self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict):
        self.seed, self.position = int(state["seed"]), int(state["position"])


class PreparedData:
    """train / val / test of one prepared directory (see `zoo.data.prepare`), in the trainer's interface."""

    def __init__(self, directory: Union[str, Path], seed: int = 0, cross_doc: bool = True):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DataError(f"data: {self.directory} is not a directory of prepared data "
                            "(python scripts/prepare_data.py --out ...)")
        self.seed, self.cross_doc = seed, cross_doc
        self.splits = {s: TokenDataset(self.directory / s, cross_doc) for s in SPLITS}
        headers = [d.file.header for d in self.splits.values()]
        for key in ("vocab_size", "tokenizer_fingerprint", "corpus_fingerprint"):
            if len({str(h.get(key)) for h in headers}) > 1:
                raise DataError(f"data: the splits in {self.directory} disagree on {key}; prepare them again")
        self.header = headers[0]
        self.vocab_size: int = self.header["vocab_size"]
        self.tokenizer: str = self.header.get("tokenizer", "?")
        val = self.splits["val"].file.header
        # bits per byte = (nats per token) / ln 2 / (bytes per token); end-of-document tokens carry no bytes
        self.bytes_per_token = val["num_bytes"] / val["num_tokens"]

    @property
    def train(self) -> TokenDataset:
        return self.splits["train"]

    @property
    def val(self) -> TokenDataset:
        return self.splits["val"]

    @property
    def test(self) -> TokenDataset:
        return self.splits["test"]

    def train_batch(self, step: int, micro: int, batch_size: int, seq_len: int) -> dict:
        return self.train.sample(batch_size, seq_len, self.seed, step, micro)

    def token_counts(self) -> np.ndarray:
        """How often each token id occurs in the train split ([vocab_size] int64), read in chunks."""
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        tokens = self.train.file.tokens
        for start in range(0, len(tokens), 1 << 24):
            counts += np.bincount(tokens[start:start + (1 << 24)], minlength=self.vocab_size)[:self.vocab_size]
        return counts

    def val_batches(self, n: int, batch_size: int, seq_len: int) -> list[dict]:
        return self.val.eval_batches(n, batch_size, seq_len)

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {len(d):,} tokens / {d.file.header['num_docs']} docs" for s, d in self.splits.items())
        return (f"{self.directory} (corpus {self.header.get('corpus', '?')}, tokenizer {self.tokenizer}, "
                f"vocab {self.vocab_size}; {sizes}; cross_doc {str(self.cross_doc).lower()})")
