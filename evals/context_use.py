"""Does a model use its history, and can it copy from far back? (issue 25)

    cell = context_use(model, data.test, corpus="shakespeare", history=2048, length=16384, n_segments=8)
    cell = synthetic_copy(model, length=1024, trials=8)

`context_use` cuts held-out documents of one corpus into segments of `length` tokens (`segments`: as many
documents as there are, each its first segment first) and streams each from its start
(evals.perplexity.extrapolation): bits/byte by position, with the same targets scored again with the history cut
to at most H tokens (the control: sliding windows of H at stride H/2, or `cut_stride`) and the verdict on the
buckets past H: does the history beyond H keep lowering the loss, leave it flat, or break the model (past its
training length)?
From the same per-target losses, two readings:
- the copy probe on real text ("Repeat After Me", arXiv 2402.01032, measured on natural data): a target is a
  *repeat* at distance d when the `span` tokens ending at it (the target and the span - 1 before it) occurred
  earlier in the segment, ending d tokens before it, the two occurrences disjoint (d >= span), the most recent
  such occurrence counting. A model that copies predicts it almost for free; one that cannot see or hold the
  first occurrence pays what a first occurrence costs. Bits/byte on repeats by distance bucket (64 ... 32K),
  streamed and under the history cut, beside targets with no earlier occurrence;
- gzip -9 and xz -9 on the same segments, each compressed alone: the reference that copies within its window
  (32 KiB for gzip, the whole segment for xz).
`synthetic_copy` is the controlled version: a string of random lowercase words (random token ids for tokenizers
other than bytes), a newline, the same string again; teacher-forced greedy accuracy on the second copy (its first
`skip` tokens left out: the model cannot know a copy has begun before it has seen it start), per trial, and how
many trials were copied without a single error.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from evals.bootstrap import LEVEL, RESAMPLES, SEED, difference_interval, proportion_interval, ratio_interval
from evals.compression import gzip_size, xz_size
from evals.perplexity import LN2, _byte_weights, _token_file, document_tokens, extrapolation, segments
from zoo.data.repeats import random_string

SPAN = 16   # 32 left 0.2% of Shakespeare's targets as repeats (16: 3.5%; the stdlib 21%)
COPY_SKIP = 8


def repeat_distances(ids: np.ndarray, span: int = SPAN) -> np.ndarray:
    """Per target t = 1 .. len(ids) - 1 (entry t - 1): the distance from t back to the end of the most recent
    earlier occurrence of ids[t - span + 1 : t + 1] that ends at most t - span (disjoint from it), or 0."""
    if span < 2:
        raise ValueError(f"span: must be at least 2 tokens, got {span}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.zeros(max(len(ids) - 1, 0), dtype=np.int64)
    last = {}
    grams = [ids[e - span + 1:e + 1].tobytes() for e in range(span - 1, len(ids))]   # grams[e - span + 1]: ends at e
    for t in range(span - 1, len(ids)):
        if t - span >= span - 1:   # the occurrence ending at t - span becomes visible now
            last[grams[t - 2 * span + 1]] = t - span
        end = last.get(grams[t - span + 1])
        if end is not None and t >= 1:
            out[t - 1] = t - end
    return out


def distance_edges(span: int, longest: int) -> list:
    """Bucket edges of repeat distances: span, 64, 128, ... (powers of two) up to past `longest`."""
    edges, e = [span], 64
    while e <= longest:
        if e > span:
            edges.append(e)
        e *= 2
    return edges + [e]


def _label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def copy_probe(docs: list, streamed: list, bounded: Optional[list], weights: np.ndarray, span: int = SPAN,
               resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Bits/byte of repeated targets by distance bucket, and of first occurrences, from per-target NLLs
    (`streamed`, `bounded`: per document arrays, entry t - 1 for token t) of the same documents."""
    dist = [repeat_distances(d, span) for d in docs]
    longest = max((int(x.max(initial=0)) for x in dist), default=0)
    edges = distance_edges(span, max(longest, span))
    ci = dict(resamples=resamples, seed=seed)

    def sums(nll, mask_of):
        nats = np.array([float(a[mask_of(k)].sum()) for k, a in enumerate(nll)])
        n_bytes = np.array([float(weights[d[1:]][mask_of(k)].sum()) for k, d in enumerate(docs)])
        return nats / LN2, n_bytes

    def row(mask_of, **extra):
        bits, n_bytes = sums(streamed, mask_of)
        targets = int(sum(mask_of(k).sum() for k in range(len(docs))))
        if not n_bytes.sum():
            return None
        r = {**extra, "targets": targets, "documents": int((n_bytes > 0).sum()),
             "bits_per_byte": bits.sum() / n_bytes.sum(), "bits_per_byte_ci": list(ratio_interval(bits, n_bytes, **ci)),
             "per_document": {"bits": bits.tolist(), "bytes": n_bytes.tolist()}}
        if bounded is not None:
            cbits, _ = sums(bounded, mask_of)
            r.update(bounded_bits_per_byte=cbits.sum() / n_bytes.sum(),
                     vs_bounded=r["bits_per_byte"] - cbits.sum() / n_bytes.sum(),
                     vs_bounded_ci=list(difference_interval(bits, n_bytes, cbits, n_bytes, **ci)))
        return r

    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        r = row(lambda k, lo=lo, hi=hi: (dist[k] >= lo) & (dist[k] < hi), distances=[lo, hi],
                label=f"{_label(lo)}-{_label(hi)}")
        if r is not None:
            rows.append(r)
    first = row(lambda k: dist[k] == 0, label="first occurrence")
    return {"span": span, "buckets": rows, "first_occurrence": first,
            "repeat_fraction": float(sum((d > 0).sum() for d in dist) / max(1, sum(len(d) for d in dist)))}


def compression_of(docs: list) -> Optional[dict]:
    """gzip -9 / xz -9 bits per byte of byte-token documents, each compressed alone (EOS left out); None for
    other tokenizers (their text would need decoding)."""
    parts = [np.asarray(d)[np.asarray(d) < 256].astype(np.uint8).tobytes() for d in docs]
    total = sum(len(p) for p in parts)
    if not total:
        return None
    return {"gzip-9": 8 * sum(gzip_size(p) for p in parts) / total,
            "xz-9": 8 * sum(xz_size(p) for p in parts) / total, "bytes": total}


@torch.no_grad()
def context_use(model, data_split, corpus: str, history: int, length: int, n_segments: int = 8, span: int = SPAN,
                device=None, resamples: int = RESAMPLES, seed: int = SEED, cut_stride: Optional[int] = None) -> dict:
    """The record of one (model, corpus): segments of `length` tokens streamed whole, by position with buckets
    around `history` (H/4, H/2, H, 2H, ...), the same targets with the history cut to at most `history` tokens
    as the control, and the verdict past H (evals.perplexity.extrapolation with train_len = H); `copy`
    (`copy_probe`) and `compression` (byte tokenizers only). `model_train_len`: the model's own training length.
    A split with no document of `length` tokens gives `status` saying so."""
    if length % history or length < 2 * history:
        raise ValueError(f"length: {length} must be a multiple of the history cut {history}, at least twice it")
    file = _token_file(data_split)
    docs = segments(file, n_segments, length)
    stride = cut_stride or max(1, history // 2)
    if not 1 <= stride <= history:
        raise ValueError(f"cut_stride: {stride} must be in [1, the history cut {history}]")
    base = {"corpus": corpus, "span": span, "history_cut": history, "cut_stride": stride,
            "model_train_len": model.recipe.train.seq_len,
            "segments": [list(d) for d in docs], "source_documents": len({d[0] for d in docs})}
    if not docs:
        longest = int(np.diff(np.asarray(file.offsets)).max(initial=0))
        return {**base, "scheme": "streaming", "train_len": history, "length": length, "documents": 0,
                "status": f"no document of {length} tokens in {file.prefix} (longest: {longest})", "verdict": None,
                "buckets": []}
    rec = extrapolation(model, file, history, length // history, device=device, resamples=resamples, seed=seed,
                        documents=docs, return_nll=True, cut_stride=stride)
    nll = rec.pop("nll")
    tokens = [document_tokens(file, d) for d in docs]
    weights, _ = _byte_weights(file)
    rec["copy"] = copy_probe(tokens, nll["streaming"], nll["bounded"], weights, span, resamples, seed)
    if file.header.get("tokenizer") == "byte":
        rec["compression"] = compression_of(tokens)
    return {**rec, **base}


def copy_prompt(length: int, vocab_size: int, rng: np.random.Generator, eos_id: Optional[int] = None) -> tuple:
    """(tokens, first scored position): a string of `length` tokens, a separator, the string again. For a byte
    vocabulary the string is lowercase words of 2-8 letters separated by spaces and the separator a newline;
    otherwise random ids (never `eos_id`) and the separator one more random id."""
    exclude = () if eos_id is None else (eos_id,)
    if vocab_size == 256:
        s, sep = random_string(length, vocab_size, rng), [ord("\n")]
    else:
        s, sep = random_string(length + 1, vocab_size, rng, exclude)[:length], list(random_string(1, vocab_size, rng,
                                                                                                    exclude))
    return np.concatenate([s, sep, s]).astype(np.int64), length + 1


@torch.no_grad()
def synthetic_copy(model, length: int, trials: int = 8, skip: int = COPY_SKIP, seed: int = 0, chunk_size: int = 2048,
                   device=None, eos_id: Optional[int] = None, level: float = LEVEL) -> dict:
    """Teacher-forced greedy copying of `trials` random strings of `length` tokens (see the module docstring)."""
    if length <= skip:
        raise ValueError(f"length: must exceed skip ({skip}) so that some of the copy is scored, got {length}")
    device = device if device is not None else next(model.parameters()).device
    vocab = model.recipe.model.vocab_size
    rng = np.random.default_rng([seed, length])
    was_training = model.training
    model.eval()
    acc, exact = [], 0
    try:
        for _ in range(trials):
            ids, start = copy_prompt(length, vocab, rng, eos_id)
            x = torch.as_tensor(ids, device=device)[None]
            cache, preds = model.init_cache(1), []
            for s in range(0, len(ids) - 1, chunk_size):
                e = min(s + chunk_size, len(ids) - 1)
                preds.append(model(x[:, s:e], cache=cache).logits[0].argmax(-1).cpu())
            pred = torch.cat(preds).numpy()   # pred[t - 1]: the prediction of token t
            targets = np.arange(start + skip, len(ids))
            right = pred[targets - 1] == ids[targets]
            acc.append(float(right.mean()))
            exact += bool(right.all())
    finally:
        model.train(was_training)
    return {"length": length, "trials": trials, "skip": skip, "token_accuracy": float(np.mean(acc)),
            "token_accuracy_per_trial": acc, "exact": exact, "exact_rate": exact / trials,
            "exact_ci": list(proportion_interval(exact, trials, level)),
            "alphabet": "lowercase words" if vocab == 256 else "random token ids"}


def paired(a: dict, b: dict, resamples: int = RESAMPLES, seed: int = SEED) -> Optional[tuple]:
    """(difference, interval) of two copy-probe rows' bits/byte over the same documents (a - b)."""
    pa, pb = a.get("per_document"), b.get("per_document")
    if not pa or not pb or len(pa["bits"]) != len(pb["bits"]) or pa["bytes"] != pb["bytes"]:
        return None
    iv = difference_interval(np.asarray(pa["bits"]), np.asarray(pa["bytes"]), np.asarray(pb["bits"]),
                             np.asarray(pb["bytes"]), resamples=resamples, seed=seed)
    return a["bits_per_byte"] - b["bits_per_byte"], iv


@torch.no_grad()
def copied_token_bits(model, data, count: int = 4, span=(32, 256), distance=(256, 3840), batches: int = 4,
                      rows: int = 2, length: int = 4096, seed: int = 7, source: str = "text") -> dict:
    """Did a model trained with `train.repeats` learn to copy its training repeats? Training rows of `data` (a
    PreparedData; rows past any a training run would draw first, at steps 10,000 + i) with `count` spans copied
    `distance` tokens later in every row (zoo.data.repeats, generator seeded [seed, i]; `source` "random" or "bytes"
    copies random strings); bits per token on the copies (the second occurrences) and on the rest, each the mean of the
    batches' means. A model that copies predicts the copies almost free."""
    from zoo.data.repeats import insert_repeats
    means = {"copied": [], "other": []}
    for i in range(batches):
        batch = data.train_batch(10_000 + i, 0, rows, length)
        vocab = model.recipe.model.vocab_size if source != "text" else 256   # random strings need the vocabulary
        out, copies = insert_repeats(batch, 1.0, count, span, distance, np.random.default_rng([seed, i]),
                                     source=source, vocab_size=vocab, return_copies=True)
        ids, changed = out["input_ids"], (out["input_ids"] != batch["input_ids"])[:, 1:]
        copied = copies[:, 1:] & changed
        logits = model(ids).logits.float()[:, :-1]
        bits = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] / LN2
        means["copied"].append(bits[copied].mean().item())
        means["other"].append(bits[~changed].mean().item())
    return {k: float(np.mean(v)) for k, v in means.items()}
