"""evals/context_use.py: the copy probe's bookkeeping against a brute-force twin and on a fixture, segments,
synthetic copy with an ideal copier and a model that cannot copy, and the findings read from the numbers."""
import numpy as np
import pytest
import torch

from evals import context_report
from evals.context_use import (compression_of, copy_probe, copy_prompt, distance_edges, repeat_distances,
                               synthetic_copy)
from evals.perplexity import document_tokens, segments
from zoo.data.memmap import TokenFile, TokenWriter


def repeat_distances_ref(ids, span):
    """The obviously-correct twin: for each target, scan back for the most recent disjoint occurrence."""
    out = np.zeros(len(ids) - 1, dtype=np.int64)
    for t in range(span - 1, len(ids)):
        gram = list(ids[t - span + 1:t + 1])
        for end in range(t - span, span - 2, -1):
            if list(ids[end - span + 1:end + 1]) == gram:
                out[t - 1] = t - end
                break
    return out


def test_repeat_distances_fixture():
    ids = np.array([1, 2, 3, 4, 9, 1, 2, 3, 4, 7, 7, 1, 2, 3, 4])
    # the span [1, 2, 3, 4] ends at 3, 8 and 14: target 8 repeats it 5 back, target 14 repeats the one at 8
    assert repeat_distances(ids, 4).tolist() == [0] * 7 + [5] + [0] * 5 + [6]
    # overlapping occurrences do not count: in a run of one token a span only repeats span tokens back
    assert repeat_distances(np.zeros(10, dtype=np.int64), 3).tolist() == [0, 0, 0, 0, 3, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="span: must be at least 2"):
        repeat_distances(ids, 1)


@pytest.mark.parametrize("seed,n,alphabet,span", [(0, 301, 2, 3), (1, 257, 3, 4), (2, 199, 2, 7), (3, 50, 4, 2)])
def test_repeat_distances_match_the_brute_force_twin(seed, n, alphabet, span):
    ids = np.random.default_rng(seed).integers(0, alphabet, n)
    assert repeat_distances(ids, span).tolist() == repeat_distances_ref(ids, span).tolist()


def test_copy_probe_buckets_by_distance():
    rng = np.random.default_rng(0)
    doc = rng.integers(0, 256, 600)
    doc[400:440] = doc[100:140]            # a 40-token repeat 300 tokens back
    docs = [doc, rng.integers(0, 256, 600)]
    dist = [repeat_distances(d, 16) for d in docs]
    # losses: 0.1 nats on repeats, 2 on the rest; the history-cut control pays 2 everywhere
    streamed = [np.where(d > 0, 0.1, 2.0) for d in dist]
    bounded = [np.full(len(d), 2.0) for d in dist]
    probe = copy_probe(docs, streamed, bounded, np.ones(256), span=16, resamples=200)
    [row] = probe["buckets"]
    assert row["label"] == "256-512" and row["targets"] == 25 and row["documents"] == 1   # targets 415 .. 439
    assert row["bits_per_byte"] == pytest.approx(0.1 / np.log(2))
    assert row["bounded_bits_per_byte"] == pytest.approx(2 / np.log(2))
    assert row["vs_bounded_ci"][1] < 0
    assert probe["first_occurrence"]["bits_per_byte"] == pytest.approx(2 / np.log(2))
    assert probe["repeat_fraction"] == pytest.approx(25 / 1198)
    assert distance_edges(16, 300) == [16, 64, 128, 256, 512]


@pytest.fixture
def token_file(tmp_path):
    with TokenWriter(tmp_path / "val", vocab_size=256, tokenizer="byte", tokenizer_fingerprint="byte", corpus="t",
                     corpus_fingerprint="t") as w:
        for n in (100, 35, 250, 64):
            w.add_document(np.arange(n) % 200, num_bytes=n)
    return TokenFile(tmp_path / "val")


def test_segments_spread_over_documents(token_file):
    # documents of 100, 35, 250 and 64 tokens in segments of 50: first segments of docs 0 and 2 and 3 first
    assert segments(token_file, 3, 50) == [(0, 0, 50), (2, 0, 50), (3, 0, 50)]
    assert segments(token_file, 10, 50) == [(0, 0, 50), (2, 0, 50), (3, 0, 50), (0, 50, 50), (2, 50, 50),
                                            (2, 100, 50), (2, 150, 50), (2, 200, 50)]
    assert segments(token_file, 4, 300) == []
    assert document_tokens(token_file, (2, 100, 50)).tolist() == list(range(100, 150))
    assert compression_of([np.arange(100) % 7])["bytes"] == 100


class _Copier(torch.nn.Module):
    """An ideal copier for copy prompts: predicts the token `length + 1` back, once the prompt has passed its
    separator; `blind` predicts 'a' always (a model that cannot copy)."""

    def __init__(self, length, blind=False):
        super().__init__()
        self.length, self.blind = length, blind
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.recipe = type("R", (), {"model": type("M", (), {"vocab_size": 256})})

    def init_cache(self, batch_size):
        return {"seen": []}

    def forward(self, ids, cache=None):
        cache["seen"] += ids[0].tolist()
        logits = torch.zeros(1, ids.shape[1], 256)
        for j in range(ids.shape[1]):
            pos = len(cache["seen"]) - ids.shape[1] + j      # predicting token pos + 1
            back = pos + 1 - (self.length + 1)
            token = ord("a") if self.blind or back < 0 else cache["seen"][back]
            logits[0, j, token] = 1.0
        return type("O", (), {"logits": logits})


def test_synthetic_copy_scores_the_second_copy():
    perfect = synthetic_copy(_Copier(40), 40, trials=3, chunk_size=17)
    assert perfect["token_accuracy"] == 1.0 and perfect["exact"] == 3 and perfect["exact_ci"][0] > 0.3
    blind = synthetic_copy(_Copier(40, blind=True), 40, trials=3)
    assert blind["exact"] == 0 and 0 < blind["token_accuracy"] < 0.3   # 'a' is right where the string has an 'a'
    ids, start = copy_prompt(40, 256, np.random.default_rng(0))
    assert len(ids) == 81 and ids[40] == ord("\n") and (ids[:40] == ids[41:]).all() and start == 41
    ids, _ = copy_prompt(30, 1000, np.random.default_rng(0), eos_id=3)
    assert 3 not in ids.tolist() and (ids[:30] == ids[31:]).all()
    with pytest.raises(ValueError, match="length: must exceed skip"):
        synthetic_copy(_Copier(8), 8)


class _Rows:
    """Training rows of random bytes, a pure function of the step (PreparedData's train_batch)."""

    def train_batch(self, step, micro, rows, length):
        from zoo.data.packing import pack_batch
        return pack_batch(np.random.default_rng([step, micro]).integers(0, 256, size=(rows, length)))


class _LooksBack:
    """Predicts, almost surely, the token `d` back from the one it predicts (a copier at that one distance), or
    with `uniform` every token alike."""

    def __init__(self, d, uniform=False):
        self.d, self.uniform = d, uniform

    def __call__(self, ids):
        logits = torch.zeros(*ids.shape, 256)
        if not self.uniform:   # position t predicts t + 1, whose source is t + 1 - d
            logits[:, self.d - 1:].scatter_(-1, ids[:, :ids.shape[1] - self.d + 1, None], 40.0)
        return type("Out", (), {"logits": logits})()


def test_copied_token_bits_separates_a_copier_from_a_blind_model():
    from evals.context_use import copied_token_bits
    # one copy a row, so that no later copy overwrites an earlier one's source
    kw = dict(count=1, span=(20, 40), distance=(50, 50), batches=3, rows=2, length=300)
    blind = copied_token_bits(_LooksBack(50, uniform=True), _Rows(), **kw)
    assert blind["copied"] == pytest.approx(8.0) and blind["other"] == pytest.approx(8.0)   # log2 256 each
    copier = copied_token_bits(_LooksBack(50), _Rows(), **kw)
    assert copier["copied"] < 0.01 and copier["other"] > 30   # sure of the copy, surely wrong elsewhere


def _cell(recipe, corpus, verdict, past, copy_rows, bpb=1.0, ci=(0.9, 1.1)):
    return {"recipe": recipe, "eval": "context_use", "scheme": corpus, "corpus": corpus, "context": 8192,
            "length": 8192, "history_cut": 1024, "model_train_len": 2048, "documents": 4, "source_documents": 3,
            "span": 16, "verdict": verdict, "breaks_at": past[0]["label"] if verdict == "breaks" else None,
            "buckets": [{"positions": [0, 256], "label": "0-256", "bits_per_byte": bpb}], "past": past,
            "bits_per_byte": bpb, "bits_per_byte_ci": list(ci), "compression": {"gzip-9": 1.5, "xz-9": 1.4},
            "copy": {"span": 16, "repeat_fraction": 0.1, "buckets": copy_rows,
                     "first_occurrence": {"bits_per_byte": 2.0, "bounded_bits_per_byte": 2.0}}}


def _past(label, lo, diff, ci):
    return {"label": label, "positions": [lo, 2 * lo], "vs_bounded": diff, "vs_bounded_ci": list(ci)}


def _copy(label, lo, bpb, vs, ci, docs=(1.0, 1.0)):
    return {"label": label, "distances": [lo, 2 * lo], "targets": 50, "bits_per_byte": bpb,
            "bounded_bits_per_byte": bpb - vs, "vs_bounded": vs, "vs_bounded_ci": list(ci),
            "per_document": {"bits": [bpb * d for d in docs], "bytes": list(docs)}}


def _results():
    return {"recipes": {"tf": {}, "ssm": {}, "win": {}}, "cells": {
        "tf|context_use|books|8192": _cell("tf", "books", "breaks", [_past("2K-4K", 2048, 1.2, (0.9, 1.5))],
                                          [_copy("256-512", 256, 0.3, 0.0, (-0.01, 0.01)),
                                           _copy("2K-4K", 2048, 3.0, 1.0, (0.8, 1.2))], bpb=2.0, ci=(1.8, 2.2)),
        "ssm|context_use|books|8192": _cell("ssm", "books", "keeps falling",
                                           [_past("1K-2K", 1024, -0.02, (-0.03, -0.01)),
                                            _past("4K-8K", 4096, -0.05, (-0.08, -0.02))],
                                           [_copy("256-512", 256, 1.1, 0.0, (-0.01, 0.01)),
                                            _copy("2K-4K", 2048, 1.0, -0.2, (-0.3, -0.1))], bpb=1.2, ci=(1.1, 1.3)),
        "win|context_use|books|8192": _cell("win", "books", "flat", [_past("8K-16K", 8192, -0.0001, (-0.0002, -0.00005))],
                                           [_copy("256-512", 256, 1.5, 0.0, (-0.01, 0.01)),
                                            _copy("2K-4K", 2048, 1.6, -0.0001, (-0.0002, -0.00005))]),
        "tf|copy|synthetic|64": {"recipe": "tf", "eval": "copy", "scheme": "synthetic", "context": 64,
                                 "token_accuracy": 0.95, "exact": 3, "trials": 4, "skip": 8},
        "ssm|copy|synthetic|64": {"recipe": "ssm", "eval": "copy", "scheme": "synthetic", "context": 64,
                                  "token_accuracy": 0.2, "exact": 0, "trials": 4, "skip": 8}}}


def test_findings_read_the_numbers():
    found = context_report.context_findings(_results())
    history, copying, gzip, synthetic = found
    assert "tf breaks past its training length (2K-4K: +1.200 [+0.900, +1.500])" in history
    assert "ssm uses it to 8K (4K-8K: -0.050 [-0.080, -0.020])" in history
    # float32 rounding between streaming and windows is no use of the history, however tight its interval
    assert "no measurable use for win (8K-16K: -0.000 [-0.000, -0.000])" in history
    assert "at 256-512 tokens back (50 targets), tf 0.30, ssm 1.10, win 1.50 bits/byte" in copying
    assert "paired against tf on the same targets: ssm +0.800 [+0.800, +0.800], win +1.200 [+1.200, +1.200]: tf " \
        "copies better than ssm and win." in copying
    assert "Copies from beyond 1,024 tokens back: ssm (up to 2K-4K: -0.200 [-0.300, -0.100] vs history cut to " \
        "1,024)." in copying
    assert "win 1.000 [0.900, 1.100], ssm 1.200 [1.100, 1.300], tf 2.000 [1.800, 2.200]; below gzip: win and ssm." \
        in gzip
    assert "tf 95%; ssm 20%" in synthetic and "win" not in synthetic


def test_section_tables_and_plots(tmp_path):
    text, pngs = context_report.context_section(_results(), tmp_path)
    assert "### books: 4 segments of 8,192 tokens from 3 held-out documents; history cut to 1,024" in text
    assert "| tf | whole | 0.300 | 3.000 | 2.000 |" in text and "| targets |  | 50 | 50 |" in text
    assert "| tf | 95.0% (3/4) |" in text
    assert [p.name for p in pngs] == ["context_use.png", "synthetic_copy.png"]
    assert context_report.context_section({"recipes": {}, "cells": {}}, tmp_path) == ("", [])


def test_each_reading_has_its_own_findings_and_section(tmp_path):
    """Two readings of one corpus (segments of 8,192 cut to 1,024, and of 4,096 cut to 2,048): sentences, tables
    and plot columns for each, none mixing the two."""
    results = _results()
    strict = _cell("ssm", "books", "keeps falling", [_past("2K-4K", 2048, -0.03, (-0.04, -0.02))],
                   [_copy("512-1K", 512, 1.0, 0.0, (-0.01, 0.01)), _copy("2K-4K", 2048, 0.9, -0.3, (-0.4, -0.2))])
    strict.update(context=4096, length=4096, history_cut=2048, cut_stride=256, documents=24)
    results["cells"]["ssm|context_use|books|4096"] = strict
    assert context_report.readings(results) == [("books", 4096), ("books", 8192)]
    found = context_report.context_findings(results)
    assert len(found) == 7   # history, copy and gzip for each reading, then the synthetic copy
    assert found[0].startswith("History past 2,048 tokens on books (24 segments of 4,096 tokens from 3 held-out "
                               "documents; history cut to 2,048 as the control (each target keeps 1,792-2,048")
    assert "ssm uses it to 4K (2K-4K: -0.030 [-0.040, -0.020])" in found[0] and "tf" not in found[0]
    assert "Copies from beyond 2,048 tokens back: ssm (up to 2K-4K: -0.300" in found[1]
    assert found[3].startswith("History past 1,024 tokens on books (4 segments of 8,192")
    text, pngs = context_report.context_section(results, tmp_path)
    assert text.index("### books: 24 segments of 4,096") < text.index("### books: 4 segments of 8,192")
    assert len(pngs) == 2
