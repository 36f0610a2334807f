"""Long-range repeats written into training rows: data whose dependencies span thousands of tokens.

Natural text and code rarely make a model look more than a few hundred tokens back: the token that predicts
the next one is almost always near. A model trained only on them at 4,096 tokens learns little that uses the
history past 2,048 (docs/long-context.md). Synthetic retrieval in the training mixture is how recent work
teaches that use ("Repeat After Me", arXiv 2402.01032; Xiong et al., arXiv 2406.19292): here a fraction of the
rows get `count` spans of their own text each copied `distance` tokens later, so predicting the copy rewards finding
its first occurrence far back.

    insert_repeats(batch, fraction=0.5, count=4, span=(32, 256), distance=(1024, 3840), rng=rng)

`source="random"` first overwrites each source span with a random string (`random_string`: lowercase words for a
byte vocabulary, random ids otherwise), then copies it: its second occurrence can be predicted only by finding
the first, where a copied span of natural text is partly predictable from its own left context, so the gradient
toward copying is weak (a 1M-parameter transformer trained on 2M tokens of text repeats copied nothing,
docs/long-context.md). This is the synthetic copying task of "Repeat After Me" written into natural rows.
`source="bytes"` draws the string from the 94 printable bytes instead: each byte is then nearly unique within a
few hundred, so the current byte alone finds the source (the one-token match of an induction head), where
lowercase words need a match of several letters.

Rows too short for the smallest span and distance are left as they are. With document ids (`seq_idx`,
`train.cross_doc: false`) a repeat stays inside one document, so the model can see its source. The draw
depends only on `rng`, so a trainer that seeds it with (seed, step, micro) resumes bit-identically.
"""
from __future__ import annotations

import numpy as np
import torch

from zoo.data.packing import IGNORE_INDEX


SOURCES = ("text", "random", "bytes")
PRINTABLE = (33, 127)   # "!" .. "~": the bytes `source="bytes"` draws from


def random_string(length: int, vocab_size: int, rng: np.random.Generator, exclude=(), printable: bool = False) -> np.ndarray:
    """`length` tokens nothing but a copy can predict: for a byte vocabulary (256) lowercase words of 2-8 letters
    separated by spaces (text-like bytes), or with `printable` the 94 printable non-space bytes drawn uniformly;
    otherwise ids drawn uniformly from the vocabulary less `exclude`."""
    if vocab_size == 256 and printable:
        return rng.integers(*PRINTABLE, size=length).astype(np.int64)
    if vocab_size == 256:
        letters = []
        while len(letters) < length:
            letters += list(rng.integers(ord("a"), ord("z") + 1, size=int(rng.integers(2, 9)))) + [ord(" ")]
        return np.asarray(letters[:length], dtype=np.int64)
    allowed = np.array([i for i in range(vocab_size) if i not in exclude])
    return rng.choice(allowed, size=length).astype(np.int64)


def insert_repeats(batch: dict, fraction: float, count: int, span, distance, rng: np.random.Generator,
                   source: str = "text", vocab_size: int = 256, return_copies: bool = False):
    """In a `fraction` of the rows, `count` times in turn: copy span[0]..span[1] tokens from `src` to `src + d`,
    d drawn from distance[0]..distance[1] (both inclusive; a later copy may overwrite an earlier one). With
    source "random" the span at `src` is first replaced by a `random_string` over `vocab_size` tokens.
    Returns a new batch (`batch` is left as it was) and, with `return_copies`, a bool [rows, length] mask of the
    positions that hold a copy (the second occurrences; a later repeat's source written over one clears it)."""
    if source not in SOURCES:
        raise ValueError(f"source: {source!r}; allowed: {', '.join(SOURCES)}")
    ids = batch["input_ids"].clone()
    labels = batch["labels"].clone()
    seq_idx = batch.get("seq_idx")
    rows, length = ids.shape
    copies = torch.zeros(rows, length, dtype=torch.bool)
    for row in np.flatnonzero(rng.random(rows) < fraction):
        for _ in range(count):
            placed = _draw(rng, length, span, distance)
            if placed is None:
                break
            src, d, n = placed
            if seq_idx is not None and seq_idx[row, src] != seq_idx[row, src + d + n - 1]:
                continue   # source and copy in different documents: the model could not see the source
            if source != "text":
                ids[row, src:src + n] = torch.from_numpy(random_string(n, vocab_size, rng, printable=source == "bytes"))
                keep = labels[row, src:src + n] == IGNORE_INDEX     # a document's first token stays unscored
                labels[row, src:src + n] = ids[row, src:src + n].masked_fill(keep, IGNORE_INDEX)
            copies[row, src:src + n] = False
            ids[row, src + d:src + d + n] = ids[row, src:src + n].clone()
            labels[row, src + d:src + d + n] = ids[row, src + d:src + d + n]
            copies[row, src + d:src + d + n] = True
    out = {**batch, "input_ids": ids, "labels": labels}
    return (out, copies) if return_copies else out


def _draw(rng: np.random.Generator, length: int, span, distance):
    """(source start, distance, span length) fitting a row of `length` tokens, or None when none fits."""
    n = int(rng.integers(span[0], span[1] + 1))
    d = int(rng.integers(distance[0], distance[1] + 1))
    if d + n > length:   # a shorter stage of a seq_len schedule: the largest distance that fits, if any
        d = length - n
        if d < distance[0]:
            n = length - distance[0]
            if n < span[0]:
                return None
            d = distance[0]
    return int(rng.integers(0, length - d - n + 1)), d, n
