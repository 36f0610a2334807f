"""recipes/falcon-h1.yaml: Falcon-H1's layout (Mamba-2 and attention in parallel in every layer, SwiGLU after)
builds at its own size and trains a few steps through the Trainer."""
import json
import math
from pathlib import Path

import zoo
from tests.helpers import ToyData
from zoo.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "falcon-h1.yaml"


def test_layout():
    model = zoo.build_model(RECIPE)
    assert [(l.block_type, l.ffn.cfg.type) for l in model.layers] == [("parallel(mamba2+attn)", "swiglu")] * 6
    mixer = model.layers[0].mixer
    assert mixer.out_scales == [0.25, 0.9] and mixer.branches[0].d_inner == 256 and mixer.branches[0].norm is None


def test_trains_a_few_steps(tmp_path):
    rec = zoo.load_recipe(RECIPE, ["model.d_model=64", "train.seq_len=32", "train.batch_size=2", "train.max_steps=3",
                                   "train.warmup_steps=1", "train.log_every=1", "train.eval_every=3",
                                   "train.eval_batches=1", "train.save_every=3"])
    Trainer(rec, ToyData(), tmp_path, device="cpu", progress=False, log=lambda s: None).train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r and "step" in r]
    assert len(steps) >= 3 and all(math.isfinite(r["loss"]) and r["loss"] < 6 for r in steps)
