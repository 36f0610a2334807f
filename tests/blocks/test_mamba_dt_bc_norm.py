"""Mamba-1 with Jamba's RMSNorms on dt, B and C (`dt_bc_norm`): the block vs the loop-over-time ops with
the norms written out (float64, output and every gradient), vs transformers' JambaMambaMixer on the same
weights, the cache contract, state bytes, and the recipe field's validation."""
import pytest
import torch

import zoo
from tests.helpers import assert_close, check_block_vs_reference, check_cache_contract, make_block
from zoo.config import RecipeError
from zoo.ops.conv import causal_conv1d_ref
from zoo.ops.ssm import selective_scan_ref

D_MODEL = 16
FIELDS = {"d_state": 5, "d_conv": 3, "dt_rank": 3, "dt_bc_norm": True, "dt_bc_norm_eps": 1e-6}


def rms(t, weight, eps):
    return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference(block, x):
    n, eps = block.cfg.d_state, block.cfg.dt_bc_norm_eps
    xs, z = block.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    xs = causal_conv1d_ref(xs, block.conv1d.weight[:, 0], block.conv1d.bias, activation="silu")
    dt, B, C = block.x_proj(xs.transpose(1, 2)).split([block.dt_rank, n, n], dim=-1)
    dt = rms(dt, block.dt_layernorm.weight, eps)
    B, C = rms(B, block.b_layernorm.weight, eps), rms(C, block.c_layernorm.weight, eps)
    delta = (dt @ block.dt_proj.weight.T).transpose(1, 2)
    y = selective_scan_ref(xs, delta, -block.A_log.exp(), B.transpose(1, 2), C.transpose(1, 2), block.D, z,
                           block.dt_proj.bias, delta_softplus=True)
    return block.out_proj(y.transpose(1, 2))


def make(**fields):
    block = make_block("mamba", D_MODEL, std=0.3, **{**FIELDS, **fields})
    with torch.no_grad():
        block.A_log.copy_(torch.log(torch.rand_like(block.A_log) + 0.5))
        for norm in (block.dt_layernorm, block.b_layernorm, block.c_layernorm):
            norm.weight.add_(1.0)
    return block


@pytest.mark.parametrize("length", [1, 11])
def test_block_matches_reference(length):
    block = make()
    grads = check_block_vs_reference(block, reference, torch.randn(2, length, D_MODEL, dtype=torch.float64))
    assert {"dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight"} <= set(grads)


def test_cache_contract_and_state_bytes():
    block = make()
    check_cache_contract(block, torch.randn(2, 13, D_MODEL, dtype=torch.float64))
    cache = block.init_cache(2, dtype=torch.bfloat16)
    assert cache.nbytes() == block.state_bytes(13, 2, torch.bfloat16)
    plain = make_block("mamba", D_MODEL, **{**FIELDS, "dt_bc_norm": False})
    assert not hasattr(plain, "dt_layernorm")
    assert sum(p.numel() for p in block.parameters()) - sum(p.numel() for p in plain.parameters()) == 3 + 2 * 5


def test_matches_transformers_jamba_mixer():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer
    cfg = JambaConfig(hidden_size=D_MODEL, mamba_d_state=5, mamba_d_conv=3, mamba_dt_rank=3, mamba_expand=2,
                      rms_norm_eps=1e-6, num_experts=1)
    torch.manual_seed(0)
    hf = JambaMambaMixer(cfg, layer_idx=0)
    block = make().float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(dict(block.named_parameters())[name])
    x = torch.randn(2, 9, D_MODEL)
    assert_close(block(x), hf(x), 1e-5)


@pytest.mark.parametrize("fields, message", [
    ({"dt_bc_norm_eps": 0}, r"model.blocks.M.dt_bc_norm_eps: must be > 0"),
    ({"dt_bc_norm": "maybe"}, r"model.blocks.M.dt_bc_norm"),
    ({"dt_norm": True}, r"model.blocks.M.dt_norm: unknown key"),
])
def test_recipe_field_is_validated(fields, message):
    recipe = {"model": {"d_model": 16, "n_layers": 1, "vocab_size": 32, "pattern": "M",
                        "blocks": {"M": {"type": "mamba", "d_state": 4, **fields}}}, "train": {"seq_len": 32}}
    with pytest.raises(RecipeError, match=message):
        zoo.load_recipe(recipe)
    ok = {**recipe, "model": {**recipe["model"], "blocks": {"M": {"type": "mamba", "dt_bc_norm": True}}}}
    assert hasattr(zoo.build_model(ok).layers[0].mixer, "c_layernorm")
