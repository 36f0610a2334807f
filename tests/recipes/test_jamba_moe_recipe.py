"""recipes/jamba-moe.yaml: Jamba's layout (MoE every other layer, dt/B/C norms, attention without RoPE)
builds at its own size and trains a few steps through the Trainer, the balance loss logged."""
import json
from pathlib import Path

import zoo
from tests.helpers import ToyData
from zoo.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "jamba-moe.yaml"


def test_layout():
    model = zoo.build_model(RECIPE)
    rows = [(layer.block_type, layer.ffn.cfg.type) for layer in model.layers]
    assert rows == [("mamba", "swiglu"), ("mamba", "moe")] * 2 + [("attn", "swiglu"), ("mamba", "moe")] + \
        [("mamba", "swiglu"), ("mamba", "moe")]
    assert model.layers[4].mixer.cfg.rope_base is None and model.layers[0].mixer.cfg.dt_bc_norm


def test_trains_a_few_steps(tmp_path):
    rec = zoo.load_recipe(RECIPE, ["train.seq_len=32", "train.batch_size=2", "train.max_steps=3",
                                   "train.warmup_steps=1", "train.log_every=1", "train.eval_every=3",
                                   "train.eval_batches=1", "train.save_every=3"])
    Trainer(rec, ToyData(), tmp_path, device="cpu", progress=False, log=lambda s: None).train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "aux_loss" in r]
    assert len(steps) == 3 and all(0 < r["aux_loss"] < 4 * 0.01 * 8 * 2 for r in steps)
    assert all(r["loss"] < 6 for r in steps)
