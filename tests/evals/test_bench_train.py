"""benchmarks/bench_train.py: the validation slice's bits per byte against a per-token loop, the Llama twin has
the recipe's exact shape and function, and a budgeted run writes an annealed curve beside gzip."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import zoo
import zoo.convert
from benchmarks import bench_train
from zoo.data import PreparedData, prepare

ROOT = Path(__file__).resolve().parents[2]

TINY = {"d_model": 32, "n_layers": 2, "vocab_size": 256, "pattern": "A",
        "blocks": {"A": {"type": "attn", "n_heads": 2}}, "ffn": {"type": "swiglu", "mult": 2}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_train")
    src = root / "corpus"
    src.mkdir()
    for i in range(30):
        (src / f"mod{i:02d}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # é\n"
                                                    for j in range(10 + i)))
    return root, src


def tiny_recipe(root, src, **train):
    spec = {"name": "tiny", "model": TINY,
            "train": {"seq_len": 16, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "corpus": str(src), **train}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_val_slice_bits_per_byte_matches_a_token_loop(corpus):
    root, src = corpus
    data = PreparedData(prepare(str(src), "byte", root=root / "data"))
    val = bench_train.ValSlice(data, n=3, length=48)
    torch.manual_seed(0)
    model = zoo.build_model(zoo.load_recipe(tiny_recipe(root, src))).double()
    got = val.bits_per_byte(model, seq_len=16, batch=5)
    # the twin: every window on its own, every target's -log2 p summed one at a time
    bits, nbytes = 0.0, 0
    for row in val.tokens:
        for lo in range(0, 48, 16):
            logp = torch.log_softmax(model(row[None, lo:lo + 16]).logits[0].double(), -1)
            for t in range(16):
                target = int(row[lo + t + 1])
                bits -= logp[t, target].item() / math.log(2)
                nbytes += target != 0   # a byte token is one byte; byte 0 ends a document and is none
    assert val.num_bytes == nbytes == len(val.text)
    assert val.num_targets == 3 * 48
    assert got == pytest.approx(bits / nbytes, rel=1e-10)
    with pytest.raises(SystemExit, match="not a multiple of train.seq_len"):
        val.bits_per_byte(model, seq_len=20)


def test_llama_twin_has_the_recipes_shape_and_function():
    recipe = zoo.load_recipe(ROOT / "recipes" / "transformer-small.yaml",
                             ["model.d_model=48", "model.n_layers=2", "train.seq_len=32"])
    llama = bench_train.llama_like(recipe).double()
    ours = zoo.build_model(recipe)
    imported = zoo.convert.from_transformers(llama)
    assert {k: v.shape for k, v in imported.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ids = torch.randint(0, 256, (2, 32))
    ref = llama(input_ids=ids, labels=ids)
    out = imported.double()(ids, labels=ids)
    # transformers builds RoPE's angles in float32, zoo in float64: ~1e-7 apart even in float64
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-6, atol=1e-6)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)   # transformers: float32 loss
    with pytest.raises(SystemExit, match="attn \\+ swiglu"):
        bench_train.llama_like(zoo.load_recipe(ROOT / "recipes" / "mamba2.yaml"))


def test_profile_pair_counts_every_op_of_both_steps():
    recipe = zoo.load_recipe(ROOT / "recipes" / "transformer-small.yaml",
                             ["model.d_model=32", "model.n_layers=1", "train.seq_len=16"])
    models = {"zoo": zoo.build_model(recipe), "llama": bench_train.llama_like(recipe)}
    optims = {k: torch.optim.AdamW(m.parameters()) for k, m in models.items()}
    ids = torch.randint(0, 256, (2, 16))
    prof = bench_train.profile_pair(models, optims, [{"input_ids": ids, "labels": ids}] * 2, grad_clip=1.0)
    for side in prof.values():
        # per step: the forward's and backward's matmuls, one optimizer step
        assert side["aten::mm"][1] >= 6 and side["aten::mm"][0] > 0
        assert all(ms > 0 and calls > 0 for ms, calls in side.values())
    table = bench_train.profile_table(prof, top=3).splitlines()
    assert table[0].startswith("| op (self CPU) | zoo ms") and len(table) == 2 + 3 + 2
    total = float(table[-1].split("|")[2].strip(" *"))
    assert total == pytest.approx(sum(ms for ms, _ in prof["zoo"].values()), abs=0.1)


def test_budgeted_run_writes_an_annealed_curve(corpus, monkeypatch):
    root, src = corpus
    monkeypatch.chdir(root)   # prepared data lands in ./data
    out = root / "out"
    path = tiny_recipe(root, src, min_lr_ratio=0.1)
    code = bench_train.main([str(path), "--budget", "1.5", "--eval-every", "0.5", "--eval-segments", "2",
                             "--eval-segment", "64", "--full-val", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "tiny.json").read_text())
    assert res["complete"] and res["stopped_by"] == "budget"
    pts = res["points"]
    assert len(pts) >= 2 and pts[-1]["cpu_s"] >= 1.5
    assert [p["step"] for p in pts] == sorted(p["step"] for p in pts) and pts[0]["step"] > 0
    assert pts[-1]["lr"] < 3e-3 * 0.15   # the cosine ends where the budget does (lr * min_lr_ratio)
    data = PreparedData(root / "data" / f"{src.name}-byte")
    text = np.asarray(data.val.file.tokens)
    assert res["gzip9_bpb"] > 0 and res["val_bytes"] <= len(text)
    assert math.isfinite(res["full_val"]["bpb"]) and res["full_val"]["bytes"] > res["val_bytes"] // 2
    assert (out / "curves.png").stat().st_size > 0
    assert Path(res["checkpoint"]).is_dir()
