"""evals.recall: the passkey grid's shape and scoring (an oracle scores 1, a near-oracle 0, a tiny model
something in [0, 1]), cache-streamed greedy decoding, and MQAR training learning above chance."""
import re

import pytest
import torch
import torch.nn as nn

import zoo
from evals.recall import format_grid, format_mqar, greedy_answer, mqar_eval, passkey_grid
from zoo.data.tokenizer import ByteTokenizer
from zoo.model import ZooOutput

TINY = {"name": "tiny-recall", "model": {"d_model": 32, "n_layers": 2, "vocab_size": 256, "pattern": "AS",
        "blocks": {"A": {"type": "attn", "n_heads": 2}, "S": {"type": "swa", "n_heads": 2, "window": 16}},
        "ffn": {"type": "swiglu", "mult": 2}},
        "train": {"seq_len": 64, "batch_size": 4}}


class PasskeyOracle(nn.Module):
    """Reads the pass key out of its prompt and puts all logit mass on the true next token of
    prompt + " " + key (+ `corrupt` added to the last digit), streaming through a cache like ZooLM."""

    def __init__(self, corrupt: int = 0):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.corrupt = corrupt

    def init_cache(self, batch_size):
        return {"targets": None, "seen": 0}

    def forward(self, input_ids, labels=None, cache=None):
        assert cache is not None, "passkey_grid must decode through the cache"
        if cache["seen"] == 0:
            targets = []
            for row in input_ids.tolist():
                key = re.search(r"The pass key is (\d+)\.", ByteTokenizer().decode(row)).group(1)
                key = key[:-1] + str((int(key[-1]) + self.corrupt) % 10)
                targets.append(row + ByteTokenizer().encode(" " + key))
            cache["targets"] = torch.tensor(targets)
        else:
            seen = cache["seen"]
            assert torch.equal(input_ids, cache["targets"][:, seen:seen + input_ids.shape[1]]), "fed back a non-argmax token"
        b, n = input_ids.shape
        seen = cache["seen"]
        nxt = cache["targets"][:, seen + 1:seen + n + 1]
        logits = torch.zeros(b, n, 256)
        logits[:, :nxt.shape[1]].scatter_(2, nxt[..., None], 10.0)
        cache["seen"] += n
        return ZooOutput(logits=logits, cache=cache)


def test_oracle_scores_one_and_grid_shape():
    grid = passkey_grid(PasskeyOracle(), lengths=[260, 397], depths=[0.0, 0.5, 1.0], n_trials=3, batch_size=2)
    assert grid["accuracy"] == [[1.0] * 3] * 2
    assert grid["lengths"] == [260, 397] and grid["depths"] == [0.0, 0.5, 1.0]


def test_one_wrong_digit_scores_zero():
    grid = passkey_grid(PasskeyOracle(corrupt=1), lengths=[300], depths=[0.3], n_trials=4)
    assert grid["accuracy"] == [[0.0]]


def test_tiny_model_grid():
    model = zoo.build_model(TINY)
    grid = passkey_grid(model, lengths=[259, 300, 331], depths=[0.0, 0.7], n_trials=2)
    assert len(grid["accuracy"]) == 3 and all(len(r) == 2 for r in grid["accuracy"])
    assert all(0.0 <= a <= 1.0 for r in grid["accuracy"] for a in r)
    table = format_grid(grid)
    lines = table.splitlines()
    assert len(lines) == 2 + 2 and lines[0].count("|") == 3 + 2
    assert model.training  # restored


def test_greedy_through_cache_matches_full_recompute():
    model = zoo.build_model(TINY).eval()
    prompts = torch.randint(1, 256, (2, 23))
    got = greedy_answer(model, prompts, 5)
    seq = prompts
    for _ in range(5):
        nxt = model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(got, seq[:, 23:])
    assert torch.equal(greedy_answer(model, prompts, 5, prefill_chunk=7), got)   # the prompt in chunks of 7


def test_errors():
    with pytest.raises(ValueError, match="n_trials"):
        passkey_grid(PasskeyOracle(), [300], [0.5], n_trials=0)
    with pytest.raises(ValueError, match="lengths"):
        passkey_grid(PasskeyOracle(), [], [0.5], n_trials=1)
    with pytest.raises(ValueError, match="budget_steps"):
        mqar_eval(TINY, 0, 32, 4)


MQAR_RECIPE = {"name": "tiny-mqar", "model": {"d_model": 64, "n_layers": 2, "vocab_size": 32, "pattern": "A",
               "blocks": {"A": {"type": "attn", "n_heads": 2}}, "ffn": {"type": "none"}},
               "train": {"seq_len": 32, "batch_size": 32, "lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0}}


@pytest.mark.slow
def test_mqar_learns_above_chance():
    # measured: 30 steps give ~0.25 query accuracy against a chance of 1/16 (values in [16, 32))
    res = mqar_eval(MQAR_RECIPE, budget_steps=30, seq_len=24, num_kv_pairs=4, seed=0, device="cpu")
    assert res["chance"] == 1 / 16 and res["steps"] == 30
    assert res["accuracy"] > 2 * res["chance"], res
    assert "| tiny-mqar | 4 | 24 | 30 |" in format_mqar([res])
