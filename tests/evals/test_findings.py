"""The findings report.md opens with, on a fixture results.json whose numbers have known answers
(fixtures/results_issue16.json, made by a script from chosen curves: transformer lowest in bits/byte with
mamba2 inside its interval but behind it paired, swa clearly behind; past the training length, against
the same targets with the history cut to it, mamba2 keeps falling, swa is flat although the text gets
easier along the documents, the transformer breaks; swa and mamba2 decode at overlapping speeds; swa and
mamba2 flat in decode memory),
and on older or partial results (no intervals, no repeats, no decode-memory cells, nothing at all)."""
import copy
import json
from pathlib import Path

import pytest

from evals.findings import findings, memory_finding, perplexity_finding, throughput_finding
from evals.report import perplexity_table, throughput_table, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "results_issue16.json"


@pytest.fixture
def results():
    return json.loads(FIXTURE.read_text())


def test_best_bits_per_byte_with_its_interval_and_the_ties(results):
    text = perplexity_finding(results, "blocks")
    assert text.startswith("Lowest held-out bits/byte in blocks of 2048 tokens: transformer, 2.043 [1.886, 2.177]")
    assert "≈ mamba2 2.090" in text and "the intervals overlap, so not ranked" in text
    assert "paired over the same documents +0.047" in text and ": behind" in text
    assert "Then swa 2.545" in text
    assert perplexity_finding(results, "streaming").startswith("Lowest held-out bits/byte streaming each document")


def test_extrapolation_verdicts(results):
    [text] = [f for f in findings(results) if f.startswith("Past the training length")]
    assert "(256 tokens; streamed to 4096 on the 16 longest held-out documents)" in text
    assert "loss keeps falling for mamba2 (2048-4096: -0.249 [-0.251, -0.248] vs history cut to 256)" in text
    assert "stays flat for swa (2048-4096: +0.001" in text and "breaks for transformer (256-512: +1.351" in text
    # a cell judged by position alone (no bounded scoring) names the bucket it was compared with
    cell = results["cells"]["swa|extrapolation|streaming|4096"]
    cell.update(basis="last bucket inside", verdict="keeps falling")
    assert "keeps falling for swa (2048-4096: -0.200 [-0.206, -0.194] vs 128-256) and mamba2" in findings(results)[2]


def test_throughput_ties_and_memory(results):
    assert throughput_finding(results) == ("Fastest, in tokens per CPU-second of the process, best of 3 repeats: "
                                           "decode at 2048 tokens: swa 1,000 (median 950), not ranked against "
                                           "mamba2 (the repeats overlap), then transformer 400.")
    text = memory_finding(results)
    assert "from 1024 to 4096 tokens: flat for swa (20.0 KiB) and mamba2 (20.0 KiB)" in text
    assert "grows for transformer (x4.0 over x4 context" in text


def test_report_opens_with_the_findings_and_marks_ties(results, tmp_path):
    path, pngs = write_report(results, tmp_path)
    text = path.read_text()
    assert text.startswith("# Comparison report\n\n## Findings\n\n- Lowest held-out bits/byte")
    assert "## Context use and length extrapolation" in text and "extrapolation.png" in {p.name for p in pngs}
    row = {line.split("|")[1].strip(): line for line in perplexity_table(results).splitlines()[2:5]}
    assert "**2.043 [1.886, 2.177]**" in row["transformer"] and "≈ 2.090" in row["mamba2"]
    assert "≈" not in row["swa"] and "**" not in row["swa"]
    cpu = throughput_table(results, "cpu")
    assert "**1,000 (950)**" in cpu and "≈ 980 (900)" in cpu


def test_older_and_partial_results_say_less(results, tmp_path):
    old = copy.deepcopy(results)
    for c in old["cells"].values():
        for key in ("bits_per_byte_ci", "per_document", "tokens_per_cpu_s", "tokens_per_cpu_s_median",
                    "tokens_per_s_median"):
            c.pop(key, None)
        c["repeats"] = 1
    old["cells"] = {k: c for k, c in old["cells"].items() if c["eval"] not in ("extrapolation", "decode_memory")}
    # the memory cells of before issue 16: the analytic state of the decode kind
    for name, state in (("transformer", [4096, 32768]), ("swa", [2048, 2048])):
        for ctx, b in zip((256, 2048), state):
            old["cells"][f"{name}|memory|decode|{ctx}"] = {
                "recipe": name, "eval": "memory", "scheme": "decode", "context": ctx, "status": "ok",
                "peak_bytes": 2**20, "result": {"weights_bytes": 1, "run_peak_bytes": 2**19, "state_bytes": b}}
    found = findings(old)
    assert found[0].startswith("Lowest held-out bits/byte in blocks of 2048 tokens: transformer, 2.043 (one sample")
    assert "Then mamba2 2.090." in found[0]
    assert any("tokens/s of wall time, best of 1 repeats: decode at 2048 tokens: swa" in f for f in found)
    assert any(f.startswith("Inference state (analytic") and "flat for swa" in f and "grows for transformer (x8.0" in f
               for f in found)
    path, _ = write_report(old, tmp_path)
    assert "## Findings" in path.read_text()
    assert findings({"meta": {}, "recipes": {}, "cells": {}}) == []
    # an extrapolation cell that found no long document says so
    none = {"recipe": "swa", "eval": "extrapolation", "scheme": "streaming", "context": 4096, "documents": 0,
            "verdict": None, "buckets": [], "status": "no document of 4096 tokens in val (longest: 900)"}
    old["cells"]["swa|extrapolation|streaming|4096"] = none
    assert "Length extrapolation not judged: no document of 4096 tokens in val (longest: 900)." in findings(old)
