"""Memory by context (evals/context_memory.py): a chunked prefill through the cache is the one-shot prefill,
a constant state keeps its bytes while a KV cache grows, the longest-context search finds the exact boundary
in a logarithmic number of probes, and the report's tables and plot on a small fixture."""
import math

import pytest
import torch

import zoo
from evals.context_memory import chunked_prefill, longest_context, longest_trainable, predicted_seconds
from evals.memory import measure
from evals.report import (decode_memory_table, longest_train_table, plot_decode_memory, summary_table,
                          write_report)
from tests.helpers import assert_close

BLOCKS = {"attn": {"type": "attn", "n_heads": 2},
          "mamba2": {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 8, "ffn": "none"},
          "swa": {"type": "swa", "n_heads": 2, "window": 8, "block_size": 8}}


def tiny(block: str) -> dict:
    return {"name": f"tiny-{block}", "model": {"d_model": 32, "n_layers": 2, "vocab_size": 64, "pattern": "X",
                                                "blocks": {"X": BLOCKS[block]}, "ffn": {"type": "swiglu", "mult": 2}},
            "train": {"seq_len": 64, "batch_size": 2}}


def model_of(block: str):
    torch.manual_seed(0)
    return zoo.build_model(tiny(block)).double().eval()


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("chunk", [1, 7, 16])
@torch.no_grad()
def test_chunked_prefill_is_the_one_shot_prefill(block, chunk):
    model = model_of(block)
    ids = torch.randint(0, 64, (2, 37))
    whole, pieces = model.init_cache(2), model.init_cache(2)
    want = model(ids, cache=whole).logits[:, -1]
    got = chunked_prefill(model, ids, pieces, chunk)[:, -1]
    assert_close(got, want, 1e-10, "last logits")
    step = torch.randint(0, 64, (2, 1))  # the caches continue alike
    assert_close(model(step, cache=pieces).logits, model(step, cache=whole).logits, 1e-10, "next step")
    assert pieces.nbytes() == whole.nbytes()


@torch.no_grad()
def test_cache_bytes_constant_for_a_state_and_growing_for_attention():
    def nbytes(block, context):
        model = model_of(block)
        cache = model.init_cache(1)
        chunked_prefill(model, torch.randint(0, 64, (1, context)), cache, 16)
        state = sum(layer.mixer.state_bytes(context, 1, dtype=torch.float64) for layer in model.layers)
        assert cache.nbytes() == state, (block, context)
        return cache.nbytes()
    assert nbytes("mamba2", 32) == nbytes("mamba2", 128) > 0
    assert nbytes("swa", 32) == nbytes("swa", 128)  # bounded by the window once the context exceeds it
    assert nbytes("attn", 128) == 4 * nbytes("attn", 32)


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="prefill_chunk"):
        chunked_prefill(model_of("mamba2"), torch.zeros(1, 4, dtype=torch.long), None, 0)


@pytest.mark.slow
def test_decode_memory_in_a_fresh_process_flat_for_a_state():
    """~3 s per fresh process: the measured record, and cache bytes flat for Mamba-2, growing for attention."""
    recs = {(b, c): measure("evals.context_memory:decode_memory",
                            {"recipe": tiny(b), "context": c, "prefill_chunk": 64, "decode_tokens": 2}, threads=1)
            for b in ("mamba2", "attn") for c in (256, 1024)}
    assert all(r["status"] == "ok" for r in recs.values()), recs
    res = {k: r["result"] for k, r in recs.items()}
    assert res["mamba2", 256]["cache_bytes"] == res["mamba2", 1024]["cache_bytes"] == res["mamba2", 256]["state_bytes"]
    assert res["attn", 1024]["cache_bytes"] == res["attn", 1024]["state_bytes"]
    assert res["attn", 1024]["cache_bytes"] > 3.9 * res["attn", 256]["cache_bytes"]  # 1027 vs 259 tokens
    # the decode steps hold the state, not the prefill's activations (a few MiB at most for this model)
    assert res["mamba2", 1024]["decode_bytes"] < 4 * 2**20


# -- the longest-context search ----------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [256, 257, 511, 512, 768, 1000, 4096, 6400, 65535, 65536])
def test_longest_context_finds_the_exact_boundary_in_log_probes(threshold):
    calls = []

    def fits(c):
        calls.append(c)
        return c <= threshold
    found = longest_context(fits, start=256, step=256, limit=65536)
    assert found["longest"] == threshold // 256 * 256
    assert found["first_failing"] == (None if threshold >= 65536 else found["longest"] + 256)
    assert [c for c, _ in found["probes"]] == calls and len(set(calls)) == len(calls)
    # doubling to the boundary, then halving the gap down to one step
    assert len(calls) <= 2 * math.log2(65536 / 256) + 2
    assert len(calls) <= math.log2(max(threshold, 256) / 256) + math.log2(max(threshold, 256) / 256) + 3


def test_longest_context_when_nothing_fits_and_at_the_limit():
    assert longest_context(lambda c: False, 512, 256, 4096) == {"longest": None, "first_failing": 512,
                                                                  "probes": [[512, False]]}
    found = longest_context(lambda c: True, 256, 256, 1280)  # the last doubling is clipped to the limit
    assert found["longest"] == 1280 and found["first_failing"] is None
    assert [c for c, _ in found["probes"]] == [256, 512, 1024, 1280]
    with pytest.raises(ValueError, match="multiples of step"):
        longest_context(lambda c: True, 300, 256, 4096)


def test_predicted_seconds():
    assert predicted_seconds([], 1024) is None
    assert predicted_seconds([(1024, 2.0)], 4096) == pytest.approx(8.0)  # linear from one point
    assert predicted_seconds([(1024, 1.0), (2048, 4.0)], 8192) == pytest.approx(64.0)  # quadratic
    assert predicted_seconds([(1024, 1.0), (2048, 1.0)], 4096) == pytest.approx(2.0)  # never below linear


@pytest.mark.slow
def test_longest_trainable_reaches_the_limit_or_stops_at_the_cap():
    """A real search on one process (~5 s a probe): a roomy cap reaches the limit, a 1 MiB one OOMs at once."""
    roomy = longest_trainable(tiny("mamba2"), 1, cap_gb=1.0, start=256, step=256, limit=512)
    assert (roomy["longest"], roomy["first_failing"], roomy["error"]) == (512, None, None), roomy
    assert [p["context"] for p in roomy["probes"]] == [256, 512] and 0 < roomy["peak_bytes"] < 2**30
    # 1 MiB: the first probe already overflows it (at 256 tokens the leaner Mamba-2 mixer of issue 18 fits)
    tight = longest_trainable(tiny("mamba2"), 1, cap_gb=1 / 1024, start=1024, step=256, limit=2048)
    assert (tight["longest"], tight["first_failing"], tight["failing_status"]) == (None, 1024, "OOM"), tight


# -- the report ---------------------------------------------------------------------------------------------

def _dm(recipe, context, cache, decode, status="ok"):
    c = {"recipe": recipe, "eval": "decode_memory", "scheme": "chunked", "context": context, "status": status}
    if status == "ok":
        c["result"] = {"cache_bytes": cache, "state_bytes": cache, "decode_bytes": decode,
                       "prefill_peak_bytes": decode + 2**20, "prefill_chunk": 512, "decode_tokens": 8}
    else:
        c["reason"] = "predicted 300 s > --decode-memory-time-cap 120 s"
    return c


def _lt(recipe, w, longest, first_failing, status="OOM"):
    return {"recipe": recipe, "eval": "longest_train", "scheme": f"W{w}", "context": None, "world_size": w,
            "longest": longest, "first_failing": first_failing, "failing_status": status, "cap_gb": 0.25,
            "start": 256, "step": 256}


@pytest.fixture
def results():
    cs = [_dm("mamba2", 1024, 548 * 1024, 800 * 1024), _dm("mamba2", 65536, 548 * 1024, 810 * 1024),
          _dm("transformer", 1024, 5 * 2**20, 6 * 2**20), _dm("transformer", 65536, None, None, "skipped"),
          _lt("mamba2", 1, 1792, 2048), _lt("mamba2", 2, 3584, 3840), _lt("transformer", 1, 3072, 3328),
          _lt("transformer", 2, 4096, 4352, "timeout")]
    from evals.results import cell_key
    return {"meta": {}, "cells": {cell_key(c["recipe"], c["eval"], c["scheme"], c["context"]): c for c in cs},
            "recipes": {n: {"params": {"total": 1000, "non_embedding": 900}, "seq_len": 256}
                        for n in ("mamba2", "transformer")}}


def test_decode_memory_table(results):
    table = decode_memory_table(results)
    lines = table.splitlines()
    assert lines[0] == "| recipe | figure | 1024 | 65536 | cache growth |"
    assert "| mamba2 | cache (tensors) | 548.0 KiB | 548.0 KiB | flat |" in lines
    assert "| mamba2 | decode (measured) | 800.0 KiB | 810.0 KiB |  |" in lines
    assert "| transformer | cache (tensors) | 5.0 MiB | skipped | - |" in lines
    assert "Skipped: transformer@65536: predicted 300 s" in table
    # the summary's decode column is the longest context every recipe measured
    assert "decode mem @1024 (chunked prefill)" in summary_table(results)


def test_longest_train_table(results):
    table = longest_train_table(results)
    assert "| recipe | W=1 | W=2 | W=2 / W=1 |" in table
    assert "| mamba2 | 1,792 | 3,584 | 2.00x |" in table
    assert "| transformer | 3,072 | 4,096 (timeout at 4,352) | 1.33x |" in table
    assert "32x" in table and "Ring Attention" in table and "256.0 MiB" in table
    assert longest_train_table({"cells": {}}) == ""


def test_report_sections_and_plot(results, tmp_path):
    assert plot_decode_memory(results, tmp_path / "d.png").is_file()
    report, pngs = write_report(results, tmp_path)
    text = report.read_text()
    assert "## Decode memory by context" in text and "## Longest trainable context under a memory cap" in text
    assert any(p.name == "decode_memory.png" for p in pngs)
