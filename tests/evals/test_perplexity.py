"""Perplexity schemes against a per-target reference: one forward over exactly the history each scheme
gives a target, its last logit scored by hand. float64 throughout, so agreement is to rounding."""
import math

import numpy as np
import pytest
import torch

import zoo
from evals.perplexity import (VERDICTS, documents_text, evaluate_perplexity, extrapolation, extrapolation_edges,
                               extrapolation_verdict, longest_documents, windows)
from zoo.data import TokenDataset, TokenWriter

DOC_LENGTHS = (1, 2, 23, 40, 17)   # a 1-token document has no target and is skipped


def recipe(pattern="AS", vocab=64):
    blocks = {"A": {"type": "attn", "n_heads": 2}, "S": {"type": "swa", "n_heads": 2, "window": 5},
              "I": {"type": "infini", "n_heads": 2, "segment_len": 6}}
    return zoo.load_recipe({"name": "tiny-ppl", "model": {
        "d_model": 16, "n_layers": len(pattern), "vocab_size": vocab, "pattern": pattern,
        "blocks": {k: v for k, v in blocks.items() if k in pattern}, "ffn": {"type": "swiglu", "mult": 2}},
        "train": {"seq_len": 16}})


def tiny_model(pattern="AS", vocab=64):
    return zoo.build_model(recipe(pattern, vocab)).double().eval()


def write_split(prefix, lengths=DOC_LENGTHS, vocab=64, eos_id=0, tokenizer="byte", seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab, n - (eos_id is not None)) for n in lengths]
    with TokenWriter(prefix, vocab, eos_id, tokenizer=tokenizer) as w:
        for d in docs:
            w.add_document(d, num_bytes=len(d))
    return TokenDataset(prefix)


@pytest.fixture
def split(tmp_path):
    return write_split(tmp_path / "val")


def history_start(t: int, scheme: str, context=None, stride=None) -> int:
    """First token of the history the scheme gives target t of an n-token document (input i = t - 1)."""
    i = t - 1
    if scheme == "streaming":
        return 0
    if scheme == "blocks":
        return (i // context) * context
    if i < context:
        return 0
    return -(-(i - context + 1) // stride) * stride   # k * stride for the first window k whose end passes i


def reference(model, split, scheme, context=None, stride=None):
    """Per-target NLLs (list per document) from one forward per target over its history."""
    out = []
    f = split.file
    for i in range(len(f.offsets) - 1):
        doc = torch.as_tensor(np.asarray(f.document(i), dtype=np.int64))
        if len(doc) < 2:
            continue
        nll = []
        for t in range(1, len(doc)):
            h = history_start(t, scheme, context, stride)
            logits = model(doc[None, h:t]).logits[0, -1]
            nll.append(-torch.log_softmax(logits, -1)[doc[t]].item())
        out.append((doc.numpy(), np.array(nll)))
    return out


def check_against(record, ref, eos_id=0):
    nats = sum(n.sum() for _, n in ref)
    tokens = sum(len(n) for _, n in ref)
    n_bytes = sum(int((d[1:] != eos_id).sum()) for d, _ in ref)
    assert record["tokens_scored"] == tokens and record["bytes_scored"] == n_bytes
    assert record["loss_nats"] == pytest.approx(nats / tokens, rel=1e-12)
    assert record["ppl"] == pytest.approx(math.exp(nats / tokens), rel=1e-12)
    assert record["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-12)


@pytest.mark.parametrize("context", [1, 7, 64])
def test_blocks_matches_reference(split, context):
    model = tiny_model()
    with torch.no_grad():
        ref = reference(model, split, "blocks", context)
    [rec] = evaluate_perplexity(model, split, [context], scheme="blocks", max_tokens=None, batch_size=3)
    assert rec["scheme"] == "blocks" and rec["context"] == context and rec["documents"] == 4
    check_against(rec, ref)


@pytest.mark.parametrize("context,stride", [(7, 3), (5, 1), (8, 5), (13, 13)])
def test_sliding_matches_reference(split, context, stride):
    model = tiny_model()
    with torch.no_grad():
        ref = reference(model, split, "sliding", context, stride)
    [rec] = evaluate_perplexity(model, split, [context], scheme="sliding", stride=stride, max_tokens=None)
    assert rec["stride"] == stride
    check_against(rec, ref)


@pytest.mark.parametrize("chunk_size", [1, 7, 100])
def test_streaming_matches_reference(split, chunk_size):
    model = tiny_model()
    with torch.no_grad():
        ref = reference(model, split, "streaming")
    [rec] = evaluate_perplexity(model, split, scheme="streaming", chunk_size=chunk_size, max_tokens=None)
    assert rec["context"] is None and rec["chunk"] == chunk_size
    check_against(rec, ref)


@pytest.mark.parametrize("context", [4, 9])
def test_sliding_with_stride_context_is_blocks(split, context):
    model = tiny_model()
    [b] = evaluate_perplexity(model, split, [context], scheme="blocks", max_tokens=None)
    [s] = evaluate_perplexity(model, split, [context], scheme="sliding", stride=context, max_tokens=None)
    assert s["tokens_scored"] == b["tokens_scored"]
    assert s["loss_nats"] == pytest.approx(b["loss_nats"], rel=1e-13)


@pytest.mark.parametrize("pattern", ["AS", "I"])
def test_streaming_equals_blocks_when_context_covers_documents(split, pattern):
    model = tiny_model(pattern)
    [b] = evaluate_perplexity(model, split, [max(DOC_LENGTHS)], scheme="blocks", max_tokens=None)
    [s] = evaluate_perplexity(model, split, scheme="streaming", chunk_size=3, max_tokens=None)
    assert s["tokens_scored"] == b["tokens_scored"]
    assert s["loss_nats"] == pytest.approx(b["loss_nats"], rel=1e-12)
    for x, y in zip(s["buckets"], b["buckets"]):
        assert x["loss_nats"] == pytest.approx(y["loss_nats"], rel=1e-12)
    # and a shorter context loses the history, so it differs
    [short] = evaluate_perplexity(model, split, [3], scheme="blocks", max_tokens=None)
    assert abs(short["loss_nats"] - s["loss_nats"]) > 1e-6


@pytest.mark.parametrize("scheme", ["blocks", "sliding", "streaming"])
def test_buckets_sum_to_total(split, scheme):
    [rec] = evaluate_perplexity(tiny_model(), split, [6], scheme=scheme, max_tokens=None,
                                bucket_edges=[4, 8, 16, 32])
    bs = rec["buckets"]
    assert [b["label"] for b in bs] == ["0-4", "4-8", "8-16", "16-32", "32-40"]
    assert [b["tokens_scored"] for b in bs] == [1 + 3 + 3 + 3, 12, 24, 7 + 16 + 1, 8]
    assert sum(b["tokens_scored"] for b in bs) == rec["tokens_scored"]
    assert sum(b["bytes_scored"] for b in bs) == rec["bytes_scored"]
    total = sum(b["loss_nats"] * b["tokens_scored"] for b in bs)
    assert total == pytest.approx(rec["loss_nats"] * rec["tokens_scored"], rel=1e-12)


def test_default_buckets_are_powers_of_two_from_1k(tmp_path):
    split = write_split(tmp_path / "val", lengths=(3000,))
    [rec] = evaluate_perplexity(tiny_model(), split, scheme="streaming", chunk_size=1024, max_tokens=None)
    assert [b["label"] for b in rec["buckets"]] == ["0-1K", "1K-2K", "2K-3000"]
    assert [b["tokens_scored"] for b in rec["buckets"]] == [1023, 1024, 952]


def test_bits_per_byte_is_loss_over_ln2_for_bytes(tmp_path):
    model = tiny_model(vocab=256)
    plain = write_split(tmp_path / "plain", vocab=256, eos_id=None)
    [rec] = evaluate_perplexity(model, plain, [8], max_tokens=None)
    assert rec["bytes_scored"] == rec["tokens_scored"]
    assert rec["bits_per_byte"] == pytest.approx(rec["loss_nats"] / math.log(2), rel=1e-14)
    # with end-of-document tokens: their nats count, their (zero) bytes do not
    eos = write_split(tmp_path / "eos", vocab=256, eos_id=0)
    [rec] = evaluate_perplexity(model, eos, [8], max_tokens=None)
    n_eos = 4   # one per document that has targets
    assert rec["bytes_scored"] == rec["tokens_scored"] - n_eos
    assert rec["bits_per_byte"] == pytest.approx(
        rec["loss_nats"] * rec["tokens_scored"] / rec["bytes_scored"] / math.log(2), rel=1e-14)


def test_other_tokenizers_use_the_split_byte_ratio(tmp_path):
    rng = np.random.default_rng(1)
    with TokenWriter(tmp_path / "bpe", 64, 0, tokenizer="some-bpe") as w:
        for n, b in ((10, 31), (20, 52)):
            w.add_document(rng.integers(1, 64, n), num_bytes=b)
    [rec] = evaluate_perplexity(tiny_model(), TokenDataset(tmp_path / "bpe"), [4], max_tokens=None)
    assert rec["tokens_scored"] == 30 and rec["bytes_method"].startswith("estimated")
    assert rec["bytes_scored"] == pytest.approx(28 * 83 / 30)   # 28 non-EOS targets, 83 bytes / 30 tokens


def test_max_tokens_is_exact_and_shared_by_schemes(split):
    model = tiny_model()
    recs = [evaluate_perplexity(model, split, [5], scheme=s, max_tokens=30)[0]
            for s in ("blocks", "sliding", "streaming")]
    # targets: 1 (2-token document) + 22 (23 tokens) + 7 of the 40-token document cut to 8 tokens
    assert all(r["tokens_scored"] == 30 and r["documents"] == 3 for r in recs)
    assert recs[0]["bytes_scored"] == recs[2]["bytes_scored"] == 0 + 21 + 7   # EOS targets carry no byte
    assert len(documents_text(split, max_tokens=30)) == 1 + 22 + 8
    again = evaluate_perplexity(model, split, [5], scheme="blocks", max_tokens=30)[0]
    assert again["loss_nats"] == recs[0]["loss_nats"]


@pytest.mark.parametrize("scheme", ["blocks", "streaming"])
def test_interval_per_record_and_bucket_from_the_documents(split, scheme):
    model = tiny_model()
    [rec] = evaluate_perplexity(model, split, [6], scheme=scheme, max_tokens=None, bucket_edges=[8, 16])
    per = rec["per_document"]
    assert per["index"] == [1, 2, 3, 4] and sum(per["tokens"]) == rec["tokens_scored"]
    assert sum(per["nats"]) == pytest.approx(rec["loss_nats"] * rec["tokens_scored"], rel=1e-12)
    assert sum(per["bytes"]) == rec["bytes_scored"]
    lo, hi = rec["bits_per_byte_ci"]
    assert lo < rec["bits_per_byte"] < hi and rec["interval"]["resamples"] == 1000
    for b in rec["buckets"]:
        assert len(b["per_document"]["nats"]) == 4
        assert sum(b["per_document"]["bytes"]) == b["bytes_scored"]
        assert b["bits_per_byte_ci"][0] <= b["bits_per_byte"] <= b["bits_per_byte_ci"][1]
    assert [b["documents"] for b in rec["buckets"]] == [4, 3, 3]   # 17, 23 and 40 tokens reach past 16
    [again] = evaluate_perplexity(model, split, [6], scheme=scheme, max_tokens=None, bucket_edges=[8, 16])
    assert again["bits_per_byte_ci"] == rec["bits_per_byte_ci"]   # seeded


def test_max_doc_tokens_spreads_the_budget_over_documents(split):
    [rec] = evaluate_perplexity(tiny_model(), split, [5], max_tokens=30, max_doc_tokens=10)
    # 2-token document: 1 target; then 23 -> 10 tokens (9), 40 -> 10 (9), 17 -> 10 (9), then 2 more of nothing left
    assert rec["tokens_scored"] == 28 and rec["documents"] == 4 and rec["per_document"]["tokens"] == [1, 9, 9, 9]
    assert len(documents_text(split, max_tokens=30, max_doc_tokens=10)) == 1 + 3 * 10   # whole cut documents
    with pytest.raises(ValueError, match="max_doc_tokens"):
        evaluate_perplexity(tiny_model(), split, [5], max_doc_tokens=1)


def test_longest_documents_in_split_order(split):
    f = split.file
    assert longest_documents(f, 2, 17) == [(2, 17), (3, 17)]         # 23 and 40 tokens
    assert longest_documents(f, 5, 17) == [(2, 17), (3, 17), (4, 17)]
    assert longest_documents(f, 5, 41) == []


def test_extrapolation_edges_surround_the_training_length():
    assert extrapolation_edges(256, 16) == [64, 128, 256, 512, 1024, 2048]
    assert extrapolation_edges(4, 4) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="factor"):
        extrapolation_edges(256, 1)


def curve(per_bucket_bpb, n_docs=12, seed=0, noise=0.02):
    """A synthetic streaming record, T = 8, buckets 0-2 2-4 4-8 | 8-16 16-32: each document's bits/byte per
    bucket is the curve plus its own offset (documents differ) plus noise."""
    rng = np.random.default_rng(seed)
    edges = [0, 2, 4, 8, 16, 32]
    offset = rng.normal(0, 0.3, n_docs)
    buckets = []
    for j, v in enumerate(per_bucket_bpb):
        n_bytes = np.full(n_docs, 100.0)
        bpb = v + offset + rng.normal(0, noise, n_docs)
        nats = bpb * n_bytes * math.log(2)
        buckets.append({"positions": [edges[j], edges[j + 1]], "label": f"{edges[j]}-{edges[j + 1]}",
                        "bits_per_byte": float(nats.sum() / math.log(2) / n_bytes.sum()),
                        "per_document": {"nats": nats.tolist(), "bytes": n_bytes.tolist()}})
    return {"buckets": buckets}


@pytest.mark.parametrize("values,verdict,breaks_at", [
    ([3.0, 2.6, 2.4, 2.2, 2.0], "keeps falling", None),
    ([3.0, 2.6, 2.4, 2.41, 2.39], "flat", None),
    ([3.0, 2.6, 2.4, 2.3, 3.5], "breaks", "16-32"),
    ([3.0, 2.6, 2.4, 4.0, 6.0], "breaks", "8-16"),
    ([3.0, 2.6, 2.4, 2.41, 2.42], "flat", None),          # 0.8% up, beyond noise but inside the 2% margin
])
def test_extrapolation_verdict(values, verdict, breaks_at):
    out = extrapolation_verdict(curve(values), train_len=8)
    assert out["verdict"] == verdict and out["breaks_at"] == breaks_at
    assert out["reference"]["label"] == "4-8" and [r["label"] for r in out["past"]] == ["8-16", "16-32"]
    for r in out["past"]:
        lo, hi = r["difference_ci"]
        assert lo <= r["difference"] <= hi
    # a wide spread between documents alone does not hide a shift that all documents share (paired)
    assert extrapolation_verdict(curve(values, noise=0.001), 8)["verdict"] == verdict


@pytest.mark.parametrize("stream,bounded,verdict", [
    # the text gets easier along the documents for both: the history past T adds nothing
    ([3.0, 2.6, 2.4, 2.2, 2.0], [3.0, 2.6, 2.4, 2.2, 2.0], "flat"),
    ([3.0, 2.6, 2.4, 2.1, 1.8], [3.0, 2.6, 2.4, 2.3, 2.2], "keeps falling"),
    ([3.0, 2.6, 2.4, 3.0, 4.0], [3.0, 2.6, 2.4, 2.4, 2.4], "breaks"),
])
def test_extrapolation_verdict_against_bounded_history(stream, bounded, verdict):
    out = extrapolation_verdict(curve(stream), 8, bounded=curve(bounded))
    assert out["verdict"] == verdict and out["basis"] == "bounded history"
    for r in out["past"]:
        assert r["vs_bounded_ci"][0] <= r["vs_bounded"] <= r["vs_bounded_ci"][1]
    # by position alone the first case would read as falling: the content moves too
    assert extrapolation_verdict(curve(stream), 8)["verdict"] == ("keeps falling" if verdict == "flat" else verdict)
    with pytest.raises(ValueError, match="bounded: no bucket"):
        extrapolation_verdict(curve(stream), 8, bounded={"buckets": curve(bounded)["buckets"][:3]})


def test_window_within_the_bounded_history_is_exactly_flat(split):
    # sliding-window attention of 5 keys: every target's history under the control (4 to 8 tokens) already
    # covers its window, so the history past T = 8 cannot change a single NLL
    rec = extrapolation(tiny_model("S"), split, train_len=8, factor=2, max_docs=5, chunk_size=3)
    assert rec["verdict"] == "flat" and rec["basis"] == "bounded history" and rec["bounded"]["stride"] == 4
    [row] = rec["past"]
    assert row["label"] == "8-16" and abs(row["vs_bounded"]) < 1e-12


def test_the_cut_stride_sets_how_much_history_the_control_keeps(split):
    # windows of T = 8 at stride 1 keep 7-8 tokens for every target, more than the 5 keys the layer sees: exactly
    # flat; at stride 6 some targets keep 2, and the whole history (5 keys) differs from the cut
    model = tiny_model("S")
    strict = extrapolation(model, split, train_len=8, factor=2, max_docs=5, chunk_size=3, cut_stride=1)
    assert strict["bounded"]["stride"] == 1 and abs(strict["past"][0]["vs_bounded"]) < 1e-12
    loose = extrapolation(model, split, train_len=8, factor=2, max_docs=5, chunk_size=3, cut_stride=6)
    assert loose["bounded"]["stride"] == 6 and abs(loose["past"][0]["vs_bounded"]) > 1e-6


def test_extrapolation_verdict_needs_both_sides():
    rec = curve([3.0, 2.6, 2.4, 2.3, 2.2])
    assert extrapolation_verdict(rec, train_len=64)["verdict"] is None      # nothing past 64
    assert extrapolation_verdict(rec, train_len=1)["verdict"] is None       # nothing inside 1


def test_extrapolation_streams_the_longest_documents(split):
    model = tiny_model()
    rec = extrapolation(model, split, train_len=4, factor=4, max_docs=5, chunk_size=5)
    assert rec["status"] == "ok" and rec["documents"] == 3 and rec["length"] == 16   # 17, 23, 40 tokens
    assert rec["tokens_scored"] == 3 * 15 and rec["verdict"] in VERDICTS
    assert [b["label"] for b in rec["buckets"]] == ["1-2", "2-4", "4-8", "8-16"]   # [0, 1) holds no target
    assert rec["reference"]["label"] == "2-4" and rec["basis"] == "bounded history"
    assert [b["label"] for b in rec["bounded"]["buckets"]] == [b["label"] for b in rec["buckets"]]
    assert extrapolation(model, split, train_len=4, factor=4, bounded=False)["basis"] == "last bucket inside"
    # the same numbers as streaming those documents cut to 16 tokens
    [plain] = evaluate_perplexity(model, split, scheme="streaming", documents=[(2, 16), (3, 16), (4, 16)])
    assert rec["loss_nats"] == pytest.approx(plain["loss_nats"], rel=1e-12)
    none = extrapolation(model, split, train_len=8, factor=8)
    assert none["documents"] == 0 and none["verdict"] is None and "longest: 40" in none["status"]


def test_min_doc_tokens_picks_long_documents(split):
    [rec] = evaluate_perplexity(tiny_model(), split, [8], max_tokens=None, min_doc_tokens=30)
    assert rec["documents"] == 1 and rec["tokens_scored"] == 39


def test_bf16_model_scores_in_float32(split):
    model = zoo.build_model(recipe()).eval()
    ref = evaluate_perplexity(model, split, [8], max_tokens=None)[0]
    got = evaluate_perplexity(model.to(torch.bfloat16), split, [8], max_tokens=None)[0]
    assert isinstance(got["loss_nats"], float)
    assert got["loss_nats"] == pytest.approx(ref["loss_nats"], rel=2e-2)


def test_windows_cover_every_input_once():
    for n in (1, 2, 9, 31):
        for scheme, c, s in (("blocks", 4, None), ("sliding", 4, 3), ("sliding", 7, 1), ("streaming", None, None)):
            covered = []
            for start, end, score_from in windows(n, scheme, c, s):
                assert start <= score_from < end <= n and (c is None or end - start <= c)
                covered += range(score_from, end)
            assert covered == list(range(n)), (n, scheme, c, s)


@pytest.mark.parametrize("kwargs,match", [
    ({"scheme": "block"}, "scheme: 'block' is not one of blocks, sliding, streaming"),
    ({"scheme": "blocks", "stride": 2}, "stride: only the sliding scheme"),
    ({"scheme": "sliding", "contexts": [4], "stride": 5}, "stride: 5 exceeds the context 4"),
    ({"contexts": [0]}, "contexts: must be a positive integer"),
    ({"max_tokens": 0}, "max_tokens: must be a positive integer or None"),
    ({"min_doc_tokens": 41}, "no document with at least 41 tokens"),
])
def test_errors_name_the_argument(split, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_perplexity(tiny_model(), split, **kwargs)


def test_eval_script_end_to_end(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "eval.py"
    spec = importlib.util.spec_from_file_location("eval_script", script)
    eval_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_script)
    from zoo.train.checkpoint import save_checkpoint

    model = zoo.build_model(recipe(vocab=256))
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints", 1, model.state_dict(), model.recipe)
    for name in ("train", "val", "test"):
        write_split(tmp_path / "data" / name, lengths=(30, 50, 9), vocab=256)
    out = tmp_path / "results.json"
    rc = eval_script.main([str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--contexts", "4,16",
                           "--schemes", "blocks,sliding,streaming", "--max-tokens", "60", "--chunk-size", "8",
                           "--out", str(out), "--plot", str(tmp_path / "ppl.png")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "gzip-9" in printed and "xz-9" in printed and "streaming by position" in printed
    summary = json.loads(printed.strip().splitlines()[-1].removeprefix("summary: "))
    assert set(summary["bits_per_byte"]) == {"blocks@4", "blocks@16", "sliding@4", "sliding@16", "streaming@doc"}
    result = json.loads(out.read_text())
    assert result["checkpoint"] == str(ckpt) and len(result["records"]) == 5
    assert all(r["tokens_scored"] == 60 for r in result["records"])
    direct = evaluate_perplexity(zoo.load_checkpoint(ckpt), TokenDataset(tmp_path / "data" / "val"), [16],
                                 scheme="sliding", max_tokens=60)[0]
    assert result["records"][3]["loss_nats"] == pytest.approx(direct["loss_nats"], rel=1e-6)
    assert result["reference_bits_per_byte"]["text_bytes"] == 29 + 32   # 29 text + EOS, then 31 targets need 32 tokens
    assert (tmp_path / "ppl.png").stat().st_size > 0
    assert eval_script.main([str(tmp_path / "run"), "--data", str(tmp_path / "nope")]) == 2
