"""Perplexity by context length on a held-out split, under three schemes (issue 7).

    records = evaluate_perplexity(model, data.val, contexts=[256, 1024], scheme="sliding", stride=128,
                                  max_tokens=16384)
    records[0] -> {"scheme": "sliding", "context": 256, "stride": 128, "tokens_scored": 16384,
                   "loss_nats": 1.21, "ppl": 3.35, "bits_per_byte": 1.75, "buckets": [...], ...}

What is scored. Every scheme works document by document (the split's document boundaries), and in
every document it scores the same targets: each token after the first (the first has no history
without a beginning-of-document token; the end-of-document token, when the tokenizer has one, is a
target like any other). So the schemes differ only in how much history each target sees:
- `blocks`: the document's inputs cut into disjoint windows of `context` tokens; a target's history
  is its offset in its window (0 .. context - 1 tokens).
- `sliding`: windows of `context` tokens starting every `stride` tokens (the last one cut at the
  document's end); each window scores only the targets its predecessor did not, so every target has
  at least context - stride tokens of history (or all of its document before it), as in the Hugging
  Face perplexity guide. stride == context is `blocks`.
- `streaming`: the whole document fed in chunks of `chunk_size` through `model.init_cache`, which by
  the block contract equals one forward over the whole document; a target's history is everything
  before it. When `context` covers a document, `blocks` is one window of it, so both agree.
Per-document windows rather than windows over the concatenated split: otherwise "history" would
include unrelated documents, and streaming (which must reset its caches at a document boundary) could
not agree with the other schemes.

Budget. `max_tokens` targets at most, taken from the documents in split order (the last one
truncated to fit), so a run is deterministic and every scheme and context scores the same tokens.
`max_doc_tokens` caps each document's share (its first tokens), so that a budget of tens of thousands of
tokens spans many documents instead of the first long one: the interval below needs documents.

Uncertainty (issue 16). Documents, not tokens, are the independent unit: `bits_per_byte_ci` is the 95%
percentile interval of total nats / total bytes under resampling the scored documents with replacement
(evals/bootstrap.py; seeded), for the record and for every bucket. The per-document sums travel in the
record (`per_document`, and per bucket) so that a report can pair two recipes or two buckets on the same
documents.

Context use and length extrapolation. `extrapolation` streams the longest documents of the split, cut
to `factor` x the training length, with position buckets around the training length T (T/4, T/2, T,
2T, ...), scores the same targets again with the history cut to at most T tokens, and
`extrapolation_verdict` says from those numbers whether the history past T keeps lowering the loss, leaves
it flat, or breaks it (see its docstring for the rule).

Units. `loss_nats`: mean negative log-likelihood per scored token, in nats; `ppl` = exp(loss_nats),
per token; `bits_per_byte` = total nats / ln 2 / bytes of the scored targets' text. Bytes: for the byte
tokenizer exactly one per target, zero for the end-of-document token (it has no text; its nats still
count, as a compressor's end-of-stream does in its file size); for any other tokenizer each non-EOS
target is given the split's average (header num_bytes over non-EOS tokens), which is exact over a
whole split and fair between tokenizers, and the record says so (`bytes_method`).
`buckets` split the same sums by the target's position in its document (the number of tokens before
it): [0, 1K), [1K, 2K), [2K, 4K), ... which is where recurrent and compressive-memory models show
what long history buys them under `streaming`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from evals.bootstrap import LEVEL, RESAMPLES, SEED, difference_interval, ratio_interval
from zoo.data import TokenDataset, TokenFile

SCHEMES = ("blocks", "sliding", "streaming")
LN2 = math.log(2)


def _check_positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


def _token_file(data_split) -> TokenFile:
    if isinstance(data_split, TokenDataset):
        return data_split.file
    if isinstance(data_split, TokenFile):
        return data_split
    if isinstance(data_split, (str, Path)):
        return TokenFile(data_split)
    raise ValueError(f"data_split: expected a TokenDataset, TokenFile or split prefix path, "
                     f"got {type(data_split).__name__}")


def select_documents(file: TokenFile, max_tokens: Optional[int] = None, min_doc_tokens: int = 2,
                     max_doc_tokens: Optional[int] = None) -> list:
    """(document index, tokens used) in split order until `max_tokens` targets; a document of n tokens
    has n - 1 targets, and the last one is cut to n' = remaining + 1 tokens. `max_doc_tokens`: each
    document's first tokens at most (after the `min_doc_tokens` test, which sees its whole length)."""
    _check_positive_int("max_tokens", max_tokens, allow_none=True)
    _check_positive_int("min_doc_tokens", min_doc_tokens)
    _check_positive_int("max_doc_tokens", max_doc_tokens, allow_none=True)
    if max_doc_tokens is not None and max_doc_tokens < 2:
        raise ValueError(f"max_doc_tokens: a document needs at least 2 tokens to have a target, got {max_doc_tokens}")
    lengths = np.diff(np.asarray(file.offsets))
    chosen, left = [], max_tokens
    for i, n in enumerate(lengths.tolist()):
        if n < max(2, min_doc_tokens):
            continue
        if max_doc_tokens is not None:
            n = min(n, max_doc_tokens)
        if left is not None:
            n = min(n, left + 1)
            left -= n - 1
        chosen.append((i, n))
        if left == 0:
            break
    if not chosen:
        raise ValueError(f"data_split: {file.prefix} has no document with at least {max(2, min_doc_tokens)} "
                         f"tokens (min_doc_tokens)")
    return chosen


def longest_documents(file: TokenFile, n_docs: int, length: int) -> list:
    """(document index, `length`) for the `n_docs` longest documents of at least `length` tokens, in split
    order (fewer when fewer are that long; ties in length go to the earlier document)."""
    _check_positive_int("n_docs", n_docs)
    _check_positive_int("length", length)
    lengths = np.diff(np.asarray(file.offsets))
    order = sorted((i for i in range(len(lengths)) if lengths[i] >= length), key=lambda i: (-lengths[i], i))
    return [(i, length) for i in sorted(order[:n_docs])]


def segments(file: TokenFile, n_segments: int, length: int) -> list:
    """(document index, start, `length`) for up to `n_segments` disjoint segments of `length` tokens cut from the
    documents at least that long: every such document's first segment (in split order), then every second
    one, and so on, so that the segments spread over as many documents as there are."""
    _check_positive_int("n_segments", n_segments)
    _check_positive_int("length", length)
    lengths = np.diff(np.asarray(file.offsets))
    per_doc = {i: int(lengths[i]) // length for i in range(len(lengths)) if lengths[i] >= length}
    out, k = [], 0
    while len(out) < n_segments and any(n > k for n in per_doc.values()):
        out += [(i, k * length, length) for i, n in per_doc.items() if n > k]
        k += 1
    return out[:n_segments]


def document_tokens(file: TokenFile, doc: tuple) -> np.ndarray:
    """The int64 tokens of (index, tokens) — a document's first tokens — or of (index, start, tokens)."""
    i, start, n = doc if len(doc) == 3 else (doc[0], 0, doc[1])
    return np.asarray(file.document(i)[start:start + n], dtype=np.int64)


def windows(n_inputs: int, scheme: str, context: Optional[int] = None, stride: Optional[int] = None) -> list:
    """(start, end, score_from) over a document's input positions [0, n_inputs): feed inputs
    [start, end), score the targets of inputs [score_from, end). Together they score every input once."""
    if scheme == "streaming":
        return [(0, n_inputs, 0)]
    stride = context if scheme == "blocks" else stride
    out, end = [], min(context, n_inputs)
    out.append((0, end, 0))
    while end < n_inputs:
        # the start is not pulled back when the end is capped: the last window is short, as the others'
        # history would be, so that stride == context is exactly `blocks`
        out.append((end + stride - context, min(end + stride, n_inputs), end))
        end = out[-1][1]
    return out


def _nll(model, ids: torch.Tensor, targets: torch.Tensor, cache=None) -> torch.Tensor:
    logits = model(ids, cache=cache).logits
    # the log-softmax in at least float32: in bf16 the normaliser over the vocabulary loses ~2 digits
    logits = logits.float() if logits.element_size() < 4 else logits
    return -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]


def _bucket_edges(max_position: int, edges: Optional[Sequence[int]]) -> list:
    if edges is None:
        edges, e = [], 1024
        while e < max_position + 1:
            edges.append(e)
            e *= 2
    edges = [int(e) for e in edges]
    if any(b <= a for a, b in zip([0] + edges, edges)):
        raise ValueError(f"bucket_edges: must be positive and strictly increasing, got {edges}")
    return [0] + [e for e in edges if e <= max_position] + [max_position + 1]


def _label(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def _summary(nats: float, tokens: int, n_bytes: float) -> dict:
    loss = nats / tokens if tokens else float("nan")
    return {"tokens_scored": tokens, "bytes_scored": n_bytes, "loss_nats": loss, "ppl": math.exp(loss),
            "bits_per_byte": nats / LN2 / n_bytes if n_bytes else float("nan")}


def _byte_weights(file: TokenFile) -> tuple[np.ndarray, str]:
    """Bytes of text per token id (float64 [vocab]) and how they were counted."""
    h = file.header
    eos = h.get("eos_id")
    if h.get("tokenizer") == "byte":
        w = np.ones(h["vocab_size"], dtype=np.float64)
        method = "exact: byte tokenizer, 1 byte per token"
    else:
        text_tokens = h["num_tokens"] - (h["num_docs"] if eos is not None else 0)
        w = np.full(h["vocab_size"], h["num_bytes"] / text_tokens, dtype=np.float64)
        method = f"estimated: split's {w[0]:.4f} bytes per non-EOS token (header num_bytes / tokens)"
    if eos is not None:
        w[eos] = 0.0
    return w, method + ("; EOS 0 bytes" if eos is not None else "")


def _score_documents(model, docs: list, scheme: str, context, stride, chunk_size: int, batch_size: int,
                     device) -> list:
    """Per-document float64 arrays of target NLLs (entry t-1: the NLL of token t)."""
    nll = [np.full(len(d) - 1, np.nan) for d in docs]
    if scheme == "streaming":
        for k, doc in enumerate(docs):
            ids = torch.as_tensor(doc, device=device)[None]
            cache = model.init_cache(1)
            for s in range(0, len(doc) - 1, chunk_size):
                e = min(s + chunk_size, len(doc) - 1)
                nll[k][s:e] = _nll(model, ids[:, s:e], ids[:, s + 1:e + 1], cache=cache)[0].double().cpu().numpy()
        return nll
    # windows of equal length share a batch, across documents
    by_len = {}
    for k, doc in enumerate(docs):
        for w in windows(len(doc) - 1, scheme, context, stride):
            by_len.setdefault(w[1] - w[0], []).append((k, *w))
    for length in sorted(by_len):
        group = by_len[length]
        for b in range(0, len(group), batch_size):
            part = group[b:b + batch_size]
            ids = torch.as_tensor(np.stack([docs[k][s:e + 1] for k, s, e, _ in part]), device=device)
            out = _nll(model, ids[:, :-1], ids[:, 1:]).double().cpu().numpy()
            for row, (k, s, e, f) in zip(out, part):
                nll[k][f:e] = row[f - s:]
    return nll


@torch.no_grad()
def evaluate_perplexity(model, data_split, contexts: Iterable[int] = (256, 512, 1024, 2048),
                        scheme: str = "blocks", stride: Optional[int] = None, max_tokens: Optional[int] = 16384,
                        batch_size: int = 8, device=None, chunk_size: int = 1024, min_doc_tokens: int = 2,
                        bucket_edges: Optional[Sequence[int]] = None, max_doc_tokens: Optional[int] = None,
                        documents: Optional[Sequence[tuple]] = None, resamples: int = RESAMPLES,
                        seed: int = SEED, return_nll: bool = False, eos_prefix: bool = False) -> list:
    """One record per context (`streaming`: one record, `context` None) — see the module docstring.

    stride: `sliding` only; default context // 2. chunk_size: tokens per forward call under `streaming`
    (the result does not depend on it beyond float rounding). bucket_edges: position bucket bounds,
    default 1024, 2048, 4096, ... device: default the model's. documents: (document index, tokens)
    pairs to score instead of the budget's choice (e.g. `longest_documents`), or (document index, start,
    tokens) triples, a segment scored as a document of its own (`segments`). resamples, seed: of the
    bootstrap interval. return_nll: the record also holds `nll`, per document the float64 array of its
    targets' NLLs (entry t-1: token t), for analyses by target (evals.context_use); not JSON. eos_prefix: every
    token of a document is a target, the first given the end-of-document id before it (a document then reads
    [eos] + its tokens: lm-evaluation-harness's rolling log-likelihood, whose prefix token is the EOS; `blocks`
    then equals its windows exactly, evals.harness)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if stride is not None and scheme != "sliding":
        raise ValueError(f"stride: only the sliding scheme takes a stride (scheme {scheme!r})")
    contexts = [None] if scheme == "streaming" else list(contexts)
    if scheme != "streaming":
        if not contexts:
            raise ValueError("contexts: give at least one context length")
        for c in contexts:
            _check_positive_int("contexts", c)
    _check_positive_int("stride", stride, allow_none=True)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("chunk_size", chunk_size)
    file = _token_file(data_split)
    device = device if device is not None else next(model.parameters()).device
    _check_positive_int("resamples", resamples)
    chosen = (select_documents(file, max_tokens, min_doc_tokens, max_doc_tokens) if documents is None
              else [tuple(int(v) for v in d) for d in documents])
    if not chosen or min(d[-1] for d in chosen) < 2:
        raise ValueError(f"documents: need at least one, each of at least 2 tokens, got {chosen}")
    docs = [document_tokens(file, d) for d in chosen]
    if eos_prefix:
        eos = file.header.get("eos_id")
        if eos is None:
            raise ValueError(f"eos_prefix: the split {file.prefix} has no end-of-document id to put first")
        docs = [np.concatenate([np.asarray([eos], dtype=d.dtype), d]) for d in docs]
    weights, bytes_method = _byte_weights(file)
    max_position = max(len(d) for d in docs) - 1
    edges = _bucket_edges(max_position, bucket_edges)
    was_training = model.training
    model.eval()
    records = []
    try:
        for context in contexts:
            window_stride = None
            if scheme == "sliding":
                window_stride = stride if stride is not None else max(1, context // 2)
                if window_stride > context:
                    raise ValueError(f"stride: {window_stride} exceeds the context {context}; "
                                     "allowed 1 .. context")
            start = time.perf_counter()
            nll = _score_documents(model, docs, scheme, context, window_stride, chunk_size, batch_size, device)
            seconds = time.perf_counter() - start
            assert not any(np.isnan(a).any() for a in nll), "a target was never scored"
            # sums per document and position bucket; the totals are the sums of the buckets
            d_nats = np.zeros((len(docs), len(edges) - 1))
            d_tok = np.zeros((len(docs), len(edges) - 1), dtype=np.int64)
            d_bytes = np.zeros((len(docs), len(edges) - 1))
            for k, (doc, a) in enumerate(zip(docs, nll)):
                which = np.searchsorted(edges, np.arange(1, len(doc)), side="right") - 1
                d_nats[k] = np.bincount(which, weights=a, minlength=len(edges) - 1)
                d_tok[k] = np.bincount(which, minlength=len(edges) - 1)
                d_bytes[k] = np.bincount(which, weights=weights[doc[1:]], minlength=len(edges) - 1)
            b_nats, b_tok, b_bytes = d_nats.sum(0), d_tok.sum(0), d_bytes.sum(0)
            ci = dict(resamples=resamples, seed=seed)
            buckets = [{"positions": [int(lo), int(hi)], "label": f"{_label(lo)}-{_label(hi)}",
                        **_summary(float(b_nats[j]), int(b_tok[j]), float(b_bytes[j])),
                        "bits_per_byte_ci": list(ratio_interval(d_nats[:, j] / LN2, d_bytes[:, j], **ci)),
                        "documents": int((d_tok[:, j] > 0).sum()),
                        "per_document": {"nats": d_nats[:, j].tolist(), "bytes": d_bytes[:, j].tolist()}}
                       for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])) if b_tok[j]]
            records.append({"scheme": scheme, "context": context, "stride": window_stride,
                            "chunk": chunk_size if scheme == "streaming" else None,
                            "split": str(file.prefix), "documents": len(docs),
                            **_summary(float(b_nats.sum()), int(b_tok.sum()), float(b_bytes.sum())),
                            "bits_per_byte_ci": list(ratio_interval(d_nats.sum(1) / LN2, d_bytes.sum(1), **ci)),
                            "interval": {"method": "percentile bootstrap over documents", "level": LEVEL, **ci},
                            "per_document": {"index": [d[0] if len(d) == 2 else list(d[:2]) for d in chosen],
                                             "tokens": d_tok.sum(1).tolist(),
                                             "nats": d_nats.sum(1).tolist(), "bytes": d_bytes.sum(1).tolist()},
                            "bytes_method": bytes_method, "buckets": buckets, "seconds": seconds,
                            **({"nll": nll} if return_nll else {})})
    finally:
        model.train(was_training)
    return records


# -- context use and length extrapolation ------------------------------------------------------------------------

VERDICTS = ("keeps falling", "flat", "breaks")
MARGIN = 0.02


def extrapolation_edges(train_len: int, factor: int = 16) -> list:
    """Position bucket edges around the training length T: T/4, T/2, T, 2T, 4T, ... below factor x T, so
    the buckets are [0, T/4), [T/4, T/2), [T/2, T) inside the training length and [T, 2T), [2T, 4T), ...
    past it, up to the documents' end at factor x T."""
    _check_positive_int("train_len", train_len)
    _check_positive_int("factor", factor)
    if factor < 2:
        raise ValueError(f"factor: must be at least 2 (a bucket past the training length), got {factor}")
    edges = {e for e in (train_len // 4, train_len // 2) if e >= 1}
    k = 1
    while k < factor:
        edges.add(train_len * k)
        k *= 2
    return sorted(edges)


def extrapolation_verdict(record: dict, train_len: int, bounded: Optional[dict] = None, margin: float = MARGIN,
                          resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """Does the loss keep falling past the training length T, stay flat, or break there?

    Each bucket past T gets a difference of bits/byte with the paired bootstrap interval over the same
    documents (`difference_interval`), and the verdict reads those differences. With `bounded` (the same
    documents and buckets scored with the history cut to at most T tokens: `sliding` at context T), the
    difference of a bucket is streaming minus bounded on the very same targets: what the history beyond T
    tokens adds, with the text held fixed. Without it, the difference is the bucket minus the reference,
    the last bucket inside T ([T/2, T) with `extrapolation_edges`): the loss against position alone, which
    also moves with the documents' content (licence headers and imports first), so a model with no memory
    past its window can show a slope. With tol = `margin` x the reference's bits/byte:
    - "breaks": some bucket past T is worse, its whole interval above +tol (`breaks_at` names the first);
    - "keeps falling": none breaks and the furthest bucket is better, its whole interval below -tol;
    - "flat": otherwise.
    Every row keeps both differences where both exist (`difference`: against the reference;
    `vs_bounded`: against the bounded history); `basis` says which one the verdict read.
    `verdict` None: no bucket on one side of T (documents too short, or T below the first edge)."""
    buckets = record.get("buckets", [])
    inside = [b for b in buckets if b["positions"][1] <= train_len]
    past = [b for b in buckets if b["positions"][0] >= train_len]
    if not inside or not past:
        return {"verdict": None, "reference": None, "past": [], "breaks_at": None, "margin": margin, "basis": None}
    ref = inside[-1]
    control = {tuple(b["positions"]): b for b in (bounded or {}).get("buckets", [])}
    basis = "bounded history" if bounded is not None else "last bucket inside"

    def bits(b):
        return np.asarray(b["per_document"]["nats"]) / LN2, np.asarray(b["per_document"]["bytes"])
    ci = dict(resamples=resamples, seed=seed, level=level)
    rows = []
    for b in past:
        row = {"label": b["label"], "positions": b["positions"], "bits_per_byte": b["bits_per_byte"],
               "difference": b["bits_per_byte"] - ref["bits_per_byte"],
               "difference_ci": list(difference_interval(*bits(b), *bits(ref), **ci))}
        c = control.get(tuple(b["positions"]))
        if c is not None:
            row.update({"bounded_bits_per_byte": c["bits_per_byte"], "vs_bounded": b["bits_per_byte"] - c["bits_per_byte"],
                        "vs_bounded_ci": list(difference_interval(*bits(b), *bits(c), **ci))})
        elif bounded is not None:
            raise ValueError(f"bounded: no bucket {b['label']}; score the same documents with the same bucket edges")
        rows.append(row)
    key = "vs_bounded_ci" if bounded is not None else "difference_ci"
    tol = margin * ref["bits_per_byte"]
    broken = [r for r in rows if r[key][0] > tol]
    verdict = "breaks" if broken else "keeps falling" if rows[-1][key][1] < -tol else "flat"
    return {"verdict": verdict, "breaks_at": broken[0]["label"] if broken else None, "margin": margin, "basis": basis,
            "reference": {k: ref[k] for k in ("label", "positions", "bits_per_byte", "bits_per_byte_ci") if k in ref},
            "past": rows}


@torch.no_grad()
def extrapolation(model, data_split, train_len: int, factor: int = 16, max_docs: int = 16, chunk_size: int = 1024,
                  batch_size: int = 8, device=None, margin: float = MARGIN, resamples: int = RESAMPLES,
                  seed: int = SEED, bounded: bool = True, documents: Optional[Sequence[tuple]] = None,
                  return_nll: bool = False, cut_stride: Optional[int] = None) -> dict:
    """Streaming bits/byte by position on the `max_docs` longest documents of the split, each cut to
    `factor` x `train_len` tokens, bucketed by `extrapolation_edges`, with `extrapolation_verdict`'s keys.
    `bounded`: score the same targets again with `sliding` windows of `train_len` tokens at stride
    `cut_stride` (default train_len // 2: every target sees between T/2 and T tokens of history; a smaller stride
    keeps more of the cut, T - stride at least, for stride / T of the windows' cost) as the verdict's control, and
    keep its bits/byte per bucket under `bounded`. A split with no document that long gives `status`
    saying so, `documents` 0 and verdict None. documents: what to score instead of the longest documents
    (e.g. `segments(file, max_docs, factor * train_len)`). return_nll: the record also holds `nll`
    {"streaming": [...], "bounded": [...]}, each target's NLL per document (see `evaluate_perplexity`)."""
    file = _token_file(data_split)
    length = factor * train_len
    base = {"scheme": "streaming", "train_len": train_len, "factor": factor, "length": length}
    docs = longest_documents(file, max_docs, length) if documents is None else list(documents)
    if not docs:
        longest = int(np.diff(np.asarray(file.offsets)).max(initial=0))
        return {**base, "status": f"no document of {length} tokens in {file.prefix} (longest: {longest})",
                "documents": 0, "verdict": None, "buckets": []}
    common = dict(device=device, bucket_edges=extrapolation_edges(train_len, factor), documents=docs,
                  resamples=resamples, seed=seed)
    [rec] = evaluate_perplexity(model, file, scheme="streaming", chunk_size=chunk_size, return_nll=return_nll,
                                **common)
    control = None
    if bounded:
        [control] = evaluate_perplexity(model, file, [train_len], scheme="sliding",
                                        stride=cut_stride or max(1, train_len // 2),
                                        batch_size=batch_size, return_nll=return_nll, **common)
    nll = {"streaming": rec.pop("nll", None), "bounded": (control or {}).pop("nll", None)}
    out = {**rec, **base, "status": "ok", **extrapolation_verdict(rec, train_len, control, margin, resamples, seed)}
    if return_nll:
        out["nll"] = nll
    if control is not None:
        out["bounded"] = {"scheme": "sliding", "context": train_len, "stride": control["stride"],
                          "bits_per_byte": control["bits_per_byte"], "bits_per_byte_ci": control["bits_per_byte_ci"],
                          "seconds": control["seconds"],
                          "buckets": [{k: b[k] for k in ("positions", "label", "bits_per_byte", "bits_per_byte_ci")}
                                      for b in control["buckets"]]}
    return out


def documents_text(data_split, max_tokens: Optional[int] = None, min_doc_tokens: int = 2,
                   tokenizer=None, max_doc_tokens: Optional[int] = None) -> bytes:
    """UTF-8 text of the documents `evaluate_perplexity` scores with the same budget, concatenated
    (whole documents, EOS left out): what the compression reference lines compress. `tokenizer` (a
    zoo.data tokenizer) decodes non-byte splits; the byte tokenizer needs none."""
    file = _token_file(data_split)
    eos = file.header.get("eos_id")
    parts = []
    for i, n in select_documents(file, max_tokens, min_doc_tokens, max_doc_tokens):
        ids = np.asarray(file.document(i)[:n])
        ids = ids[ids != eos] if eos is not None else ids
        if file.header.get("tokenizer") == "byte":
            parts.append(ids.astype(np.uint8).tobytes())
        elif tokenizer is None:
            raise ValueError(f"tokenizer: the split {file.prefix} was made with tokenizer "
                             f"{file.header.get('tokenizer')!r}; pass it to decode the text")
        else:
            parts.append(tokenizer.decode(ids.tolist()).encode("utf-8"))
    return b"".join(parts)
