"""Training with context parallel (Trainer cp=N, what `scripts/train.py --cp N` runs under torchrun) on gloo
processes spawned without torchrun: the per-step losses equal a single-process run's."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import zoo
from zoo.train.trainer import Trainer, TrainingError

RECIPE = {
    "name": "tiny-cp-train",
    "model": {"d_model": 32, "n_layers": 3, "vocab_size": 64, "pattern": "RNT",
              "blocks": {"R": {"type": "ring", "n_heads": 2, "block_size": 4},
                         "N": {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 4, "ffn": "none"},
                         "T": {"type": "taipan", "n_heads": 2, "window": 6, "capacity": 0.5}},
              "ffn": {"type": "swiglu", "mult": 2}},
    "train": {"seq_len": 21, "batch_size": 4, "lr": 3e-3, "max_steps": 4, "warmup_steps": 1, "eval_every": 2,
              "eval_batches": 2, "save_every": 100, "log_every": 1},
}


class ToyData:
    """Batches that are a pure function of (step, micro): a learnable pattern."""
    bytes_per_token = 1.0

    def _batch(self, seed, batch_size, seq_len):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 64, (batch_size, 1), generator=g)
        ids = (start + torch.arange(seq_len)[None] * 3 + torch.randint(0, 2, (batch_size, seq_len), generator=g)) % 64
        return {"input_ids": ids, "labels": ids.clone()}

    def train_batch(self, step, micro, batch_size, seq_len):
        return self._batch(1000 * step + micro, batch_size, seq_len)

    def val_batches(self, n, batch_size, seq_len):
        return [self._batch(10**9 + i, batch_size, seq_len) for i in range(n)]


def _train(cp, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        recipe = zoo.load_recipe(RECIPE, overrides)
        trainer = Trainer(recipe, ToyData(), tmp, device="cpu", progress=False, log=lambda s: None, cp=cp)
        trainer.train()
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("w,cp,overrides", [
    (2, 2, ["train.cp_layout=zigzag"]),
    # dp 2 x cp 2 on a 2-D mesh, DDP over all 4; without Taipan, whose Gumbel draws depend on the rows a
    # data-parallel rank holds (as under plain DDP)
    (4, 2, ["train.cp_layout=contiguous", "model.pattern=RN", "model.n_layers=2"]),
    (4, 2, ["model.pattern=RN", "model.n_layers=2", "train.fsdp=true"]),
    (4, 4, ["train.grad_accum=2"]),
])
def test_context_parallel_training_matches_one_process(ranks, w, cp, overrides):
    want = _train(1, overrides)
    got = ranks.run(w, _train, cp, overrides)[0]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, r in zip(got, want):
        for key in ("loss", "val_loss"):
            if key in r:
                # float32, different summation order across ranks
                assert abs(g[key] - r[key]) <= 1e-5 * abs(r[key]), (key, g, r)


def _bad_cp():
    try:
        Trainer(zoo.load_recipe(RECIPE), ToyData(), tempfile.mkdtemp(), device="cpu", progress=False,
                log=lambda s: None, cp=3)
    except TrainingError as e:
        return str(e)
    return ""


def test_cp_must_divide_the_world(ranks):
    assert "cp: must be a positive integer dividing the world size 2, got 3" in ranks.run(2, _bad_cp)[0]
