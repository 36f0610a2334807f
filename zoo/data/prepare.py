"""Tokenize a corpus once into the memory-mapped format of `zoo.data.memmap`, cached.

    path = prepare("stdlib", "byte", root="data")    # -> data/stdlib-byte/{train,val,test}.{bin,docs.npy,json}

The directory is `<root>/<corpus name>-<tokenizer name>`. A second call returns at once when all three
headers exist and record the same corpus and tokenizer fingerprints (corpus: its files' paths, sizes and
modification times; tokenizer: its serialized state), and otherwise prepares again. Every split is
written to temporary names and renamed into place, so concurrent callers (e.g. data-parallel ranks
that all call prepare) each leave complete, identical files.
"""
from __future__ import annotations

import os
import shutil
import time
from itertools import islice
from pathlib import Path
from typing import Callable, Optional, Union

from zoo.data.corpus import SPLITS, load_corpus
from zoo.data.dataset import PreparedData
from zoo.data.errors import DataError
from zoo.data.memmap import TokenWriter, read_header
from zoo.data.tokenizer import check_vocab, count_bytes, load_tokenizer

_ENCODE_BATCH = 64   # documents per tokenizer call: batched calls let HF fast tokenizers use threads


def _meta(corpus, tok) -> dict:
    return {"corpus": corpus.name, "corpus_source": corpus.describe(), "corpus_fingerprint": corpus.fingerprint(),
            "tokenizer": tok.spec, "tokenizer_fingerprint": tok.fingerprint()}


def _is_prepared(out: Path, meta: dict) -> bool:
    try:
        headers = [read_header(out / split) for split in SPLITS]
    except DataError:
        return False
    return all(h.get(k) == v for h in headers for k, v in meta.items() if k != "corpus_source")


def prepare(corpus="stdlib", tokenizer="byte", root: Union[str, Path] = "data", force: bool = False,
            log: Optional[Callable[[str], None]] = None, field: str = "text") -> Path:
    """Prepare (or find prepared) train/val/test of `corpus` tokenized by `tokenizer`; returns the
    directory. `corpus`, `tokenizer`: specs for `load_corpus` / `load_tokenizer`, or loaded objects; `field`: the
    text column of a row corpus (.jsonl, Parquet, `datasets`)."""
    corpus, tok = load_corpus(corpus, field=field), load_tokenizer(tokenizer)
    out = Path(root) / f"{corpus.name}-{tok.name}"
    meta = _meta(corpus, tok)
    if not force and _is_prepared(out, meta):
        return out
    # all three splits are written into a temporary sibling that replaces `out` only when every split is complete:
    # a failure (a split with no document, a file that is not text) leaves neither an empty nor a partial directory
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    root_existed = Path(root).exists()
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_splits(corpus, tok, tmp, meta, log, shown=out)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not root_existed:
            shutil.rmtree(root, ignore_errors=True)   # nothing else can be in a root this call created
        raise
    return out


PROGRESS_BYTES = 32 << 20   # a progress line every 32 MiB of text


def _write_splits(corpus, tok, out: Path, meta: dict, log, shown: Path):
    for split in SPLITS:
        docs = corpus.documents(split)
        start, shown_at = time.perf_counter(), 0
        with TokenWriter(out / split, tok.vocab_size, tok.eos_id, split=split, **meta) as writer:
            n = done = 0
            while texts := list(islice(docs, _ENCODE_BATCH)):
                for text, ids in zip(texts, tok.encode_batch(texts)):
                    size = count_bytes(text)
                    writer.add_document(ids, size)
                    done += size
                n += len(texts)
                if log is not None and done - shown_at >= PROGRESS_BYTES:
                    shown_at = done
                    log(f"{shown / split}: {n:,} documents, {done / 1e6:,.0f} MB so far "
                        f"({done / 1e6 / (time.perf_counter() - start):.1f} MB/s)")
            if n == 0:
                raise DataError(f"corpus: {corpus.describe()} has no documents in split '{split}' "
                                "(too small to hold out val and test?)")
        if log is not None:
            h, seconds = writer.header, time.perf_counter() - start
            log(f"{shown / split}: {h['num_docs']} documents, {h['num_bytes']:,} bytes, "
                f"{h['num_tokens']:,} tokens ({h['dtype']}) in {seconds:.1f} s, "
                f"{h['num_bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s")


def prepared_data(recipe, directory=None, root: Union[str, Path] = "data", log=print):
    """The recipe's corpus (`train.corpus`, `train.tokenizer`) tokenized once, cached under `root`, as the trainer
    reads it (`train.seed`, `train.cross_doc`), checked against the model's vocabulary; `directory`: prepared data
    to use instead."""
    directory = directory or prepare(recipe.train.corpus, recipe.train.tokenizer, root=root, log=log,
                                     field=recipe.train.corpus_field)
    data = PreparedData(directory, seed=recipe.train.seed, cross_doc=recipe.train.cross_doc)
    check_vocab(data, recipe.model.vocab_size)
    return data
