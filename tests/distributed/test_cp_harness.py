"""The harness with context parallel: evals.context_parallel cells on W gloo processes (the loss is the same
for every W, a per-rank cap gives OOM) and zoo compare --world-sizes end to end."""
import json

import pytest
import yaml

from evals.context_parallel import cp_cell, cp_section, longest_fitting

RECIPE = {"name": "tiny-cp", "model": {"d_model": 32, "n_layers": 2, "vocab_size": 256, "pattern": "RN",
                                      "blocks": {"R": {"type": "ring", "n_heads": 2, "block_size": 16},
                                                 "N": {"type": "mamba2", "d_state": 8, "head_dim": 8,
                                                       "chunk_size": 8, "ffn": "none"}},
                                      "ffn": {"type": "swiglu", "mult": 2}},
          "train": {"seq_len": 64, "batch_size": 2, "warmup_steps": 1, "eval_batches": 1}}


def test_cp_cells_give_one_loss_for_every_world_size_and_oom_at_the_cap():
    one = cp_cell(RECIPE, 96, 1)
    two = cp_cell(RECIPE, 96, 2, layout="contiguous")
    for rec in (one, two):
        assert rec["status"] == "ok" and rec["peak_bytes"] > 0, rec
    assert len(two["per_rank_peak_bytes"]) == 2
    assert abs(two["loss_nats"] - one["loss_nats"]) <= 1e-5 * one["loss_nats"]
    capped = cp_cell(RECIPE, 4096, 2, cap_gb=1 / 1024)  # 1 MiB per rank: the step outgrows it
    assert capped["status"] == "OOM", capped


def test_longest_fitting_and_the_report_section(tmp_path):
    cells = {}
    for w, contexts in ((1, {256: "ok", 512: "ok", 1024: "OOM"}), (4, {256: "ok", 512: "ok", 1024: "ok"})):
        for ctx, status in contexts.items():
            c = {"recipe": "r", "eval": "cp", "scheme": f"W{w}", "context": ctx, "world_size": w, "status": status,
                 "cap_gb": 0.5}
            if status == "ok":
                c.update(peak_bytes=ctx * 2**20 // w, ppl=3.0)
            cells[f"r|cp|W{w}|{ctx}"] = c
    assert longest_fitting([c for c in cells.values() if c["world_size"] == 1]) == 512
    assert longest_fitting([{"context": 8, "status": "OOM"}]) is None
    text, pngs = cp_section({"cells": cells}, tmp_path)
    assert "| r | 1 | 256.0 MiB, ppl 3.000 | 512.0 MiB, ppl 3.000 | OOM | 512 |" in text
    assert "| r | 4 |" in text and ">= 1024 (no OOM up to it)" in text
    assert all(p.stat().st_size > 1000 for p in pngs)


@pytest.mark.slow
def test_compare_with_world_sizes(tmp_path, capsys):
    from evals.commands import compare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(40)))
    recipe = tmp_path / "tiny-cp.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "corpus": str(corpus)}}))
    out = tmp_path / "out"
    argv = [str(recipe), "--out", str(out), "--data-root", str(tmp_path / "data"), "--budget", "256",
            "--schemes", "", "--memory", "", "--throughput", "", "--no-passkey", "--no-progress",
            "--world-sizes", "1,2", "--cp-contexts", "64,128"]
    assert compare.main(argv) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    cp = {k: c for k, c in cells.items() if c["eval"] == "cp"}
    assert set(cp) == {f"tiny-cp|cp|W{w}|{n}" for w in (1, 2) for n in (64, 128)}
    for n in (64, 128):
        a, b = cp[f"tiny-cp|cp|W1|{n}"], cp[f"tiny-cp|cp|W2|{n}"]
        assert a["status"] == b["status"] == "ok" and b["world_size"] == 2 and a["world_size"] == 1
        assert abs(a["loss_nats"] - b["loss_nats"]) <= 1e-5 * a["loss_nats"]  # validation text, same model
    assert "## Context parallel" in (out / "report.md").read_text() and (out / "cp_memory.png").is_file()
