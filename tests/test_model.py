"""The layer stack: loss shifting and ignore index, tied head, init scaling, caches, describe()."""
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import assert_close

TINY = {
    "name": "tiny",
    "model": {"d_model": 32, "n_layers": 2, "vocab_size": 50, "pattern": "AS",
              "blocks": {"A": {"type": "attn", "n_heads": 2}, "S": {"type": "swa", "n_heads": 2, "window": 5,
                                                                      "block_size": 4}},
              "ffn": {"type": "swiglu", "mult": 2}},
    "train": {"seq_len": 32},
}


def tiny(**model_overrides):
    overrides = [f"model.{k}={v}" for k, v in model_overrides.items()]
    return zoo.build_model(zoo.load_recipe(TINY, overrides)).double()


def test_loss_is_shifted_with_ignore_index():
    model = tiny()
    ids = torch.randint(0, 50, (2, 11))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 50)
    want = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, want)
    assert out.aux_loss is None and out.logits.shape == (2, 11, 50)


def test_tied_and_untied_head():
    tied, untied = tiny(tie_embeddings=True), tiny()
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    n_tied, n_untied = tied.num_params(), untied.num_params()
    assert n_untied["embedding"] == 2 * n_tied["embedding"] == 2 * 50 * 32
    assert n_tied["non_embedding"] == n_untied["non_embedding"]
    assert n_tied["total"] == sum(p.numel() for p in tied.parameters())


def test_residual_projections_scaled_by_depth():
    torch.manual_seed(0)
    model = zoo.build_model(zoo.load_recipe(TINY, ["model.d_model=256", "model.n_layers=8",
                                                   "model.blocks.A.n_heads=4", "model.blocks.S.n_heads=4"]))
    std = model.recipe.model.init_std
    q_std = model.layers[0].mixer.q_proj.weight.std().item()
    o_std = model.layers[0].mixer.out_proj.weight.std().item()
    assert q_std == pytest.approx(std, rel=0.05)
    assert o_std == pytest.approx(std / math.sqrt(2 * 8), rel=0.05)


def test_loss_at_init_near_uniform():
    model = tiny()
    ids = torch.randint(0, 50, (4, 32))
    assert abs(model(ids, labels=ids).loss.item() - math.log(50)) < 0.2


def test_model_cache_streaming_equals_whole():
    model = tiny().eval()
    ids = torch.randint(0, 50, (2, 19))
    with torch.no_grad():
        whole = model(ids).logits
        cache = model.init_cache(2)
        parts = [model(ids[:, s:e], cache=cache).logits for s, e in ((0, 6), (6, 7), (7, 19))]
    assert cache.seen == 19
    assert_close(torch.cat(parts, 1), whole, 1e-10)


def test_describe_lists_every_layer():
    text = tiny().describe()
    assert "attn" in text and "swa" in text and "non-embedding" in text
    assert len([line for line in text.splitlines() if line[:1].isdigit()]) == 2
