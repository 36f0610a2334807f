"""train.seq_len_schedule: short to long at the same tokens per step; validated by field; resumed exactly."""
import json

import pytest
import torch

import zoo
from tests.helpers import toy_recipe, train_toy

SCHEDULE = "train.seq_len_schedule=[{seq_len: 4, until: 0.25}, {seq_len: 8, until: 0.5}]"


def test_stages_keep_tokens_per_step():
    t = zoo.load_recipe("recipes/mamba2.yaml", ["train.seq_len=4096", "train.batch_size=2", "train.max_steps=10",
                        "train.warmup_steps=1",
                        "train.seq_len_schedule=[{seq_len: 1024, until: 0.3}, {seq_len: 2048, until: 0.6}]"]).train
    assert t.shapes() == [(8, 1024), (4, 2048), (2, 4096)]
    assert [t.shape_at(s) for s in range(10)] == [(8, 1024)] * 3 + [(4, 2048)] * 3 + [(2, 4096)] * 4
    # until x max_steps is rounded: 0.3 x 1000 is 300.00000000000006 in floating point
    t1000 = zoo.load_recipe("recipes/mamba2.yaml", ["train.seq_len=4096", "train.max_steps=1000",
                            "train.seq_len_schedule=[{seq_len: 1024, until: 0.3}]"]).train
    assert t1000.shape_at(299)[1] == 1024 and t1000.shape_at(300)[1] == 4096
    plain = zoo.load_recipe("recipes/mamba2.yaml").train
    assert plain.shapes() == [(plain.batch_size, plain.seq_len)] and plain.shape_at(0) == plain.shapes()[0]


@pytest.mark.parametrize("stages,message", [
    ("[{seq_len: 3, until: 0.5}]", r"seq_len_schedule\[0\].seq_len: 3 does not divide train.seq_len 16"),
    ("[{seq_len: 16, until: 0.5}]", r"seq_len_schedule\[0\].seq_len: must be an integer above .* below train.seq_len 16"),
    ("[{seq_len: 8, until: 0.5}, {seq_len: 4, until: 0.7}]", r"seq_len_schedule\[1\].seq_len: must be .* above the "
     r"previous stage's 8"),
    ("[{seq_len: 4, until: 0.5}, {seq_len: 8, until: 0.5}]", r"seq_len_schedule\[1\].until: must be a fraction of "
     r"max_steps in \(0.5, 1\)"),
    ("[{seq_len: 4, until: 1.0}]", r"seq_len_schedule\[0\].until: must be a fraction"),
    ("[{seq_len: 4, steps: 3}]", r"steps"),
    ("[{seq_len:4,until:0.5}]", r"seq_len:4: unknown key .*; in an inline mapping write a space after the colon "
                                r"\(seq_len: 4\)"),
])
def test_bad_schedules_name_the_field(stages, message):
    with pytest.raises(zoo.RecipeError, match=message):
        toy_recipe(**{"seq_len_schedule": stages})


def test_training_follows_the_schedule_and_resumes_exactly(tmp_path):
    over = {"max_steps": 8, "save_every": 3}
    straight, res = train_toy(tmp_path / "a", **over, seq_len_schedule=SCHEDULE.split("=", 1)[1])
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in rows] == [4, 4, 8, 8, 16, 16, 16, 16]
    assert [r["tokens"] for r in rows] == [64 * (i + 1) for i in range(8)]   # 4 rows x 16 tokens every step
    # resume from step 3 (inside the second stage) in a directory holding only that checkpoint
    train_toy(tmp_path / "b", **over, keep_last=3, seq_len_schedule=SCHEDULE.split("=", 1)[1])
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "step-00000003").rename(tmp_path / "c" / "checkpoints" / "step-00000003")
    resumed, res2 = train_toy(tmp_path / "c", resume="auto", **over, seq_len_schedule=SCHEDULE.split("=", 1)[1])
    assert resumed.step == 8 and res2.train_loss == res.train_loss
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_rows_of_every_stage_must_split_over_data_parallel_ranks():
    from zoo.train.trainer import Trainer, TrainingError
    recipe = toy_recipe(batch_size=3, seq_len_schedule="[{seq_len: 8, until: 0.5}]")
    trainer = Trainer.__new__(Trainer)   # only the check, on a data-parallel world that is not there
    trainer.cfg, trainer.dp_world = recipe.train, 2
    with pytest.raises(TrainingError, match=r"train.batch_size: 3 rows are not divisible by the data-parallel world "
                                            r"size 2"):
        trainer._check_shapes()
    trainer.cfg = toy_recipe(batch_size=2, seq_len_schedule="[{seq_len: 8, until: 0.5}]").train
    trainer.dp_world = 3   # the 4 rows of the 8-token stage come first
    with pytest.raises(TrainingError, match=r"train.seq_len_schedule \(at 8\): 4 rows"):
        trainer._check_shapes()


def test_packing_at_long_length(tmp_path):
    """cross_doc false at 2,051 tokens (odd: not a multiple of any chunk or block size): every stage's rows carry
    the documents, and a model of the compared recipes' blocks (attention, sliding window, Mamba-2, Taipan) scores
    each packed document as it scores that document alone."""
    import numpy as np

    from zoo.data import PreparedData, TokenWriter
    rng = np.random.default_rng(0)
    for split, n_docs in (("train", 12), ("val", 4), ("test", 2)):
        with TokenWriter(tmp_path / split, vocab_size=256, tokenizer="byte", tokenizer_fingerprint="byte",
                         corpus="t", corpus_fingerprint="t") as w:
            for _ in range(n_docs):
                n = int(rng.integers(150, 900))
                w.add_document(rng.integers(0, 255, n), num_bytes=n)
    data = PreparedData(tmp_path, seed=0, cross_doc=False)
    recipe = zoo.load_recipe({
        "name": "long-pack", "model": {"d_model": 16, "n_layers": 4, "vocab_size": 256, "pattern": "ASMT",
                                       "blocks": {"A": {"type": "attn", "n_heads": 2},
                                                  "S": {"type": "swa", "n_heads": 2, "window": 100},
                                                  "M": {"type": "mamba2", "d_state": 8, "head_dim": 8,
                                                        "chunk_size": 64, "ffn": "none"},
                                                  "T": {"type": "taipan", "n_heads": 2, "window": 100}}},
        "train": {"seq_len": 2051, "batch_size": 1, "cross_doc": False, "max_steps": 4, "warmup_steps": 1}})
    torch.manual_seed(0)
    model = zoo.build_model(recipe).double().eval()
    batch = data.train_batch(3, 0, 1, 2051)
    seq_idx = batch["seq_idx"]
    starts = [0] + (torch.nonzero(seq_idx[0, 1:] != seq_idx[0, :-1])[:, 0] + 1).tolist() + [2051]
    assert len(starts) > 3, "the window should hold several documents"
    assert (batch["labels"][0, starts[1:-1]] == -100).all() and (batch["labels"][0, 1:starts[1]] != -100).all()
    with torch.no_grad():
        packed = model(batch["input_ids"], seq_idx=seq_idx).logits
        for s, e in zip(starts[:-1], starts[1:]):
            alone = model(batch["input_ids"][:, s:e]).logits
            assert (packed[:, s:e] - alone).abs().max() < 1e-9, (s, e)


def test_a_run_that_would_not_fit_is_refused_before_it_starts(tmp_path):
    from zoo.train.trainer import Trainer
    from tests.helpers import ToyData
    recipe = toy_recipe(batch_size=2, seq_len=4096, max_steps=4, seq_len_schedule="[{seq_len: 1024, until: 0.5}]")
    with pytest.raises(zoo.RecipeError, match=r"^train.batch_size: 2 x train.seq_len 4096 needs an estimated .* more "
                                              r"than the 1.0 MiB max_memory cap"):
        Trainer(recipe, ToyData(), tmp_path / "run", device="cpu", progress=False, log=lambda s: None,
                max_memory="1MiB")
    assert not (tmp_path / "run").exists()   # nothing claimed, nothing written
