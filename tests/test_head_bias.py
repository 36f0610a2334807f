"""model.head_bias: an LM head bias started at the training data's log unigram frequencies (smoothed), set by the
trainer on a fresh run from the train split's counts, counted by the memory estimate, and refused where it cannot be
set."""
import math

import numpy as np
import pytest
import torch

import zoo
from tests.helpers import TOY_RECIPE, ToyData, every_block_recipe
from zoo.memory import estimate_memory
from zoo.train.trainer import Trainer

TINY = {"name": "tiny", "model": {"d_model": 16, "n_layers": 2, "vocab_size": 40, "pattern": "A", "head_bias": True,
                                  "blocks": {"A": {"type": "attn", "n_heads": 2}}}, "train": {"seq_len": 16}}


def test_bias_starts_as_the_smoothed_unigram_model():
    model = zoo.build_model(TINY).double()
    assert model.lm_head.bias is not None and torch.equal(model.lm_head.bias, torch.zeros(40, dtype=torch.float64))
    counts = np.zeros(40, dtype=np.int64)
    counts[[3, 5, 7]] = [600, 300, 100]           # 37 ids never seen
    model.init_head_bias(counts)
    want = (torch.from_numpy(counts).double() + 1) / (1000 + 40)
    assert torch.allclose(torch.softmax(model.lm_head.bias, 0), want, atol=1e-12)
    with torch.no_grad():   # a head whose weights are zero predicts exactly the unigram model
        model.lm_head.weight.zero_()
    logp = torch.log_softmax(model(torch.tensor([[3, 5, 7, 1]])).logits, -1)
    assert torch.allclose(logp[0, 2], want.log(), atol=1e-12)


def test_init_errors_name_the_field():
    with pytest.raises(ValueError, match=r"counts: expected 40 non-negative token counts \(model.vocab_size\), got 39"):
        zoo.build_model(TINY).init_head_bias(np.ones(39))
    with pytest.raises(ValueError, match=r"counts: expected 40 non-negative"):
        zoo.build_model(TINY).init_head_bias(-np.ones(40))
    without = zoo.build_model(zoo.load_recipe(TINY, ["model.head_bias=false"]))
    assert without.lm_head.bias is None
    with pytest.raises(ValueError, match=r"model.head_bias: false; the LM head has no bias"):
        without.init_head_bias(np.ones(40))


@pytest.mark.parametrize("tie", [False, True])
def test_memory_estimate_counts_the_bias(tie):
    recipe = zoo.load_recipe(every_block_recipe("every", 32, 64, 16, tie_embeddings=tie, head_bias=True))
    assert estimate_memory(recipe).params == zoo.build_model(recipe).num_params()["total"]


class _CountedToyData(ToyData):
    """ToyData that can count its train split (as PreparedData does): only ids 0-9, id 0 most often."""

    def token_counts(self):
        return np.array([50] + [5] * 9 + [0] * 54)


def test_trainer_starts_the_bias_at_the_data_and_resume_keeps_the_trained_one(tmp_path):
    recipe = zoo.load_recipe(TOY_RECIPE, ["model.head_bias=true", "train.max_steps=3", "train.save_every=3"])
    quiet = dict(device="cpu", progress=False, log=lambda s: None)
    counted = Trainer(recipe, _CountedToyData(), tmp_path / "counted", **quiet)
    assert counted.model.lm_head.bias[0].item() == pytest.approx(math.log(51 / (95 + 64)), rel=1e-6)
    assert counted.model.lm_head.bias[20].item() == pytest.approx(math.log(1 / (95 + 64)), rel=1e-6)
    # data without token_counts: step 0's rows are counted (ToyData uses every one of its 64 ids)
    fresh = Trainer(recipe, ToyData(), tmp_path / "run", **quiet)
    rows = ToyData().train_batch(0, 0, 4, 16)["input_ids"]
    counts = np.bincount(rows.flatten().numpy(), minlength=64)
    assert torch.allclose(fresh.model.lm_head.bias, torch.log((torch.from_numpy(counts) + 1.0) / (64 + 64)).float())
    fresh.train()
    trained = fresh.model.lm_head.bias.detach().clone()
    resumed = Trainer(zoo.load_recipe(TOY_RECIPE, ["model.head_bias=true", "train.max_steps=3"]), _CountedToyData(),
                      tmp_path / "run", resume="auto", **quiet)
    assert torch.equal(resumed.model.lm_head.bias, trained)


def test_prepared_data_counts_its_train_split(tmp_path):
    from zoo.data import PreparedData, TokenWriter
    rng = np.random.default_rng(0)
    docs = {}
    for split in ("train", "val", "test"):
        docs[split] = [rng.integers(0, 200, int(rng.integers(50, 300))) for _ in range(5)]
        with TokenWriter(tmp_path / split, vocab_size=256, tokenizer="byte", tokenizer_fingerprint="byte",
                         corpus="t", corpus_fingerprint="t") as w:
            for d in docs[split]:
                w.add_document(d, num_bytes=len(d))
    data = PreparedData(tmp_path)
    want = np.bincount(np.asarray(data.train.file.tokens), minlength=256)
    got = data.token_counts()
    assert got.shape == (256,) and np.array_equal(got, want)
    assert got.sum() == len(data.train)
