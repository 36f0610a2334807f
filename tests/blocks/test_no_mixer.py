"""Layers without a mixer (`none`, Nemotron-H's MLP layers) and the `relu2` feed-forward (issue 19)."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import assert_close, cache_bytes, check_cache_contract, make_block
from tests.test_hf import generate, left_pad
from zoo.blocks.ffn import FfnConfig, build_ffn
from zoo.config import RecipeError
from zoo.hf import ZooForCausalLM

V = 61
RECIPE = {"name": "mlp-layers",
          "model": {"d_model": 32, "n_layers": 4, "vocab_size": V, "pattern": "FMFA", "init_std": 0.3,
                    "blocks": {"F": {"type": "none", "ffn": {"type": "relu2", "mult": 3}},
                               "M": {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 4, "ffn": "none"},
                               "A": {"type": "attn", "n_heads": 2, "n_kv_heads": 1, "ffn": "none"}}},
          "train": {"seq_len": 64}}


def test_relu2_is_squared_relu_not_gated():
    torch.manual_seed(0)
    ffn = build_ffn(16, FfnConfig(type="relu2", mult=3, bias=True)).double()
    assert ffn.gate_proj is None and ffn.up_proj.out_features == 48   # mult x d_model, no 2/3
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want = ffn.out_proj(torch.relu(ffn.up_proj(x)) ** 2)
    assert_close(ffn(x), want, 1e-12)
    chunked = build_ffn(16, FfnConfig(type="relu2", hidden=7, chunk=2)).double()
    assert_close(chunked(x), chunked.out_proj(F.relu(chunked.up_proj(x)).square()), 1e-12)


def test_unknown_ffn_type_lists_relu2():
    with pytest.raises(RecipeError, match="relu2"):
        zoo.load_recipe({"model": {"ffn": {"type": "relu3"}}})


def test_none_block_holds_nothing_and_keeps_the_contract():
    block = make_block("none", 16)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    assert torch.equal(block(x), torch.zeros_like(x)) and not list(block.parameters())
    check_cache_contract(block, x, tol=0)
    cache = block.init_cache(3, dtype=torch.float32)
    assert cache_bytes(cache) == block.state_bytes(100, 3) == 0 and cache.batch_size == 3
    assert cache.index_rows(torch.tensor([2, 0])).batch_size == 2


def test_a_none_layer_is_its_ffn_alone():
    torch.manual_seed(0)
    model = zoo.build_model(RECIPE).double()
    names = [n for n, _ in model.layers[0].named_parameters()]
    assert sorted(names) == ["ffn.out_proj.weight", "ffn.up_proj.weight", "ffn_norm.weight"], names
    ids = torch.randint(0, V, (2, 13))
    x = model.embed(ids)
    layer = model.layers[0]
    assert_close(layer(x)[0], x + layer.ffn(layer.ffn_norm(x)), 1e-12)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "none" in model.describe() and model.layers[0].mixer.state_bytes(4096) == 0


def test_streaming_and_left_padded_generation_through_none_layers():
    torch.manual_seed(0)
    lm = zoo.build_model(RECIPE).double().eval()
    ids = torch.randint(1, V, (2, 11))
    with torch.no_grad():
        whole = lm(ids).logits
        cache = lm.init_cache(2)
        steps = torch.cat([lm(ids[:, :4], cache=cache).logits] +
                          [lm(ids[:, t:t + 1], cache=cache).logits for t in range(4, 11)], 1)
    assert_close(steps, whole, 1e-9)
    model = ZooForCausalLM.from_zoo(lm)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (2, 7, 5)]
    pad_ids, mask = left_pad(prompts)
    batch = generate(model, pad_ids, 6, attention_mask=mask)
    for r, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), 6)
        assert batch[r, pad_ids.shape[1]:].tolist() == alone[0, len(p):].tolist(), f"row {r}"


def test_none_block_takes_no_fields():
    with pytest.raises(RecipeError, match="model.blocks.F.window: unknown key"):
        zoo.load_recipe({"model": {"pattern": "F", "n_layers": 1, "blocks": {"F": {"type": "none", "window": 3}}}})
