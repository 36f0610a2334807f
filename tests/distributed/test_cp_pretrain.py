"""`zoo pretrain --cp W` (what torchrun runs) trains the same model as one process: a short-to-long schedule of odd
lengths, float64, gloo, W = 2 and 3, the weights (and the MoE's balancing bias) compared with a single process's."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from evals.commands import pretrain
from zoo.train import checkpoint as ckpt
from tests.helpers import assert_close, write_prepared

RECIPE = {
    "name": "tiny-cp-pretrain",
    "model": {"d_model": 16, "n_layers": 3, "vocab_size": 256, "pattern": "RMS",
              # the ring's FFN a sigmoid-routed MoE whose correction bias moves by the load of every rank's tokens
              "blocks": {"R": {"type": "ring", "n_heads": 2, "block_size": 4,
                               "ffn": {"type": "moe", "experts": 4, "top_k": 2, "hidden": 8, "router": "sigmoid",
                                       "aux_loss_weight": 0.0, "bias_update_rate": 0.01}},
                         "M": {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 4, "ffn": "none"},
                         "S": {"type": "swa", "n_heads": 2, "window": 5}},
              "ffn": {"type": "swiglu", "mult": 2}},
    "train": {"seq_len": 30, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_batches": 2},
}
# 4 steps of 60 tokens: 2 at 15 tokens x 4 rows, then 2 at 30 x 2 (15 splits unevenly over W = 2 and 3)
ARGS = ["--budget", "240", "--evals", "2", "--dtype", "float32", "--no-progress", "--set",
        "train.seq_len_schedule=[{seq_len: 15, until: 0.5}]"]


def _pretrain(root: str, cp: int) -> dict:
    root = Path(root)
    torch.set_default_dtype(torch.float64)
    try:
        code = pretrain.main([str(root / "recipe.yaml"), "--out", str(root / f"cp{cp}"), "--data", str(root / "data"),
                              "--cp", str(cp), *ARGS])
    finally:
        torch.set_default_dtype(torch.float32)
    assert code == 0
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {}
    run = root / f"cp{cp}" / "runs" / RECIPE["name"]
    state = ckpt.read_model_state(ckpt.resolve_checkpoint(run))   # as saved: float64
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    card = json.loads((root / f"cp{cp}" / RECIPE["name"] / "card.json").read_text())
    return {"state": state, "seq_lens": [r["seq_len"] for r in rows], "card": card}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp-pretrain")
    write_prepared(root / "data", train=4000, val=600, test=300)
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    return root


@pytest.fixture(scope="module")
def single(workdir):
    return _pretrain(str(workdir), 1)


@pytest.mark.parametrize("w", [2, 3])
def test_pretraining_on_a_ring_matches_one_process(ranks, workdir, single, w):
    got = ranks.run(w, _pretrain, str(workdir), w)[0]
    assert got["seq_lens"] == single["seq_lens"] == [15, 15, 30, 30]
    assert {v.dtype for v in single["state"].values()} == {torch.float64}
    for name, want in single["state"].items():
        assert_close(got["state"][name].double(), want.double(), 1e-9, name)
    assert single["state"]["layers.0.ffn.correction_bias"].abs().sum() > 0
    card = got["card"]
    assert (card["world_size"], card["cp"], card["cp_layout"]) == (w, w, "zigzag")
    assert card["command"].startswith(f"torchrun --nproc-per-node {w} -m evals.commands.pretrain ")
    assert card["seq_len_schedule"] == [[15, 0.5]] and card["tokens"] == 240
    assert "world_size" not in single["card"]
