"""Mamba blocks: wiring vs the loop-over-time ops, cache contract, state bytes, gradients, init, recipes."""
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.blocks.mamba import MambaBlock  # registers `mamba`, `mamba2` until zoo.blocks imports it
from tests.helpers import assert_block_matches, assert_close, cache_bytes, check_cache_contract, run_chunks
from zoo.config import RecipeError
from zoo.ops.conv import causal_conv1d_ref
from zoo.ops.ssd import ssd_scan_ref
from zoo.ops.ssm import selective_scan_ref
from zoo.registry import get_block

D_MODEL = 16
CASES = {
    "mamba": ("mamba", {"d_state": 4, "d_conv": 4}),
    "mamba_rank3_bias": ("mamba", {"d_state": 3, "d_conv": 2, "expand": 1, "dt_rank": 3, "bias": True}),
    "mamba_conv1": ("mamba", {"d_state": 5, "d_conv": 1, "conv_bias": False}),
    "mamba2": ("mamba2", {"d_state": 6, "head_dim": 8, "chunk_size": 5}),
    "mamba2_groups": ("mamba2", {"d_state": 4, "head_dim": 4, "n_groups": 4, "chunk_size": 3, "bias": True}),
    "mamba2_conv2": ("mamba2", {"d_state": 5, "d_conv": 2, "expand": 1, "head_dim": 8, "n_groups": 2,
                                "chunk_size": 64, "conv_bias": False}),
}


def make(case, dtype=torch.float64, perturb=True):
    kind, fields = CASES[case]
    entry = get_block(kind)
    block = entry.cls(D_MODEL, entry.config(**fields), layer_idx=0).to(dtype)
    if perturb:  # as a trained model would be: every parameter away from its structured init
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return block


def mamba_ref(block, x):
    """Mamba-1 mixer from the loop-over-time ops."""
    n = block.cfg.d_state
    xs, z = block.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    xs = causal_conv1d_ref(xs, block.conv1d.weight[:, 0], block.conv1d.bias, activation="silu")
    dt, B, C = block.x_proj(xs.transpose(1, 2)).split([block.dt_rank, n, n], dim=-1)
    delta = (dt @ block.dt_proj.weight.T).transpose(1, 2)
    y = selective_scan_ref(xs, delta, -block.A_log.exp(), B.transpose(1, 2), C.transpose(1, 2), block.D, z,
                           block.dt_proj.bias, delta_softplus=True)
    return block.out_proj(y.transpose(1, 2))


def mamba2_ref(block, x):
    """Mamba-2 mixer from the loop-over-time ops, with the gated group RMSNorm written out."""
    b, length, _ = x.shape
    cfg, d_inner = block.cfg, block.d_inner
    g, n = cfg.n_groups, cfg.d_state
    z, xBC, dt = block.in_proj(x).split([d_inner, block.conv_dim, block.n_heads], dim=-1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), block.conv1d.weight[:, 0], block.conv1d.bias,
                            activation="silu").transpose(1, 2)
    xs, B, C = xBC.split([d_inner, g * n, g * n], dim=-1)
    y = ssd_scan_ref(xs.reshape(b, length, -1, cfg.head_dim), dt, -block.A_log.exp(), B.reshape(b, length, g, n),
                     C.reshape(b, length, g, n), D=block.D, dt_bias=block.dt_bias, dt_softplus=True)
    gated = (y.reshape(b, length, d_inner) * F.silu(z)).reshape(b, length, g, -1)
    normed = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)
    return block.out_proj(normed.reshape(b, length, d_inner) * block.norm.weight)


def reference(block, x):
    return mamba_ref(block, x) if isinstance(block, MambaBlock) else mamba2_ref(block, x)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [1, 13, 37])
def test_block_matches_reference(case, length):
    """Output and the gradient of the input and of every parameter, against the loop-over-time ops."""
    block = make(case)
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64, requires_grad=True)
    assert_block_matches(block, x, reference, 1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_every_parameter_gets_a_gradient(case):
    block = make(case, perturb=False)   # the initialisation itself must not block any path
    block(torch.randn(2, 9, D_MODEL, dtype=torch.float64)).pow(2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name}: no gradient"


@pytest.mark.parametrize("case", list(CASES))
def test_cache_contract(case):
    """Whole == chunks of 1 (the decoding step), of 3 and 5, of 7 (across mamba2 chunk boundaries)."""
    block = make(case)
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    check_cache_contract(block, x, tol=1e-10, splits=((1,), (3, 5), (7,), (23,)))


@pytest.mark.parametrize("case", ["mamba", "mamba2_groups"])
def test_cache_continues_after_prefill_in_float32(case):
    """A float32 block with a float32 cache: prefill 17 tokens, decode 6, vs the whole sequence."""
    block = make(case, dtype=torch.float32)
    x = torch.randn(3, 23, D_MODEL)
    with torch.no_grad():
        whole = block(x)
        got, cache = run_chunks(block, x, [17, 1, 1, 1, 1, 1, 1])
    assert got.dtype == torch.float32 and all(t.dtype == torch.float32 for t in cache.tensors().values())
    assert_close(got, whole, 1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 3])
def test_state_bytes_is_the_cache_size(case, dtype, batch):
    block = make(case, dtype=torch.float64, perturb=False)
    cache = block.init_cache(batch, torch.device("cpu"), dtype)
    assert block.state_bytes(10, batch, dtype) == cache_bytes(cache)
    with torch.no_grad():
        for length in (5, 1, 12):   # the state does not grow with the tokens seen
            block(torch.randn(batch, length, D_MODEL, dtype=torch.float64), cache=cache)
            assert cache_bytes(cache) == block.state_bytes(10, batch, dtype)
            assert all(t.dtype == dtype for t in cache.tensors().values())
    assert block.state_bytes(1, batch, dtype) == block.state_bytes(1 << 20, batch, dtype)


def test_mamba_initialisation():
    block = make("mamba", dtype=torch.float32, perturb=False)
    cfg = block.cfg
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= cfg.dt_init_floor - 1e-7 and cfg.dt_min * 0.999 <= dt.min() and dt.max() <= cfg.dt_max * 1.001
    assert torch.equal(-block.A_log.exp(), -torch.arange(1.0, cfg.d_state + 1).repeat(block.d_inner, 1))
    assert block.dt_proj.weight.abs().max() <= block.dt_rank ** -0.5
    assert block.dt_rank == math.ceil(D_MODEL / 16) and torch.equal(block.D, torch.ones(block.d_inner))


def test_mamba2_initialisation():
    block = make("mamba2", dtype=torch.float32, perturb=False)
    cfg = block.cfg
    dt = F.softplus(block.dt_bias)
    assert cfg.dt_min * 0.999 <= dt.min() and dt.max() <= cfg.dt_max * 1.001
    assert cfg.a_init_min <= block.A_log.exp().min() and block.A_log.exp().max() <= cfg.a_init_max
    assert block.n_heads == 2 * D_MODEL // 8 and block.A_log.shape == block.D.shape == (block.n_heads,)


RECIPE = {
    "name": "hybrid",
    "model": {"d_model": 32, "n_layers": 3, "vocab_size": 40, "pattern": "MNA",
              "blocks": {"M": {"type": "mamba", "d_state": 4},
                         "N": {"type": "mamba2", "d_state": 8, "head_dim": 16, "chunk_size": 8, "ffn": "none"},
                         "A": {"type": "attn", "n_heads": 2}},
              "ffn": {"type": "swiglu", "mult": 2}},
    "train": {"seq_len": 32},
}


def test_model_keeps_the_blocks_own_init_and_streams():
    """ZooLM re-initialises linears; dt biases, dt_proj weights, A_log and D keep the block's init."""
    torch.manual_seed(0)
    model = zoo.build_model(zoo.load_recipe(RECIPE)).double()
    mamba, mamba2 = model.layers[0].mixer, model.layers[1].mixer
    assert mamba.dt_proj.weight.abs().max() > 0.1                       # not N(0, 0.02)
    assert F.softplus(mamba.dt_proj.bias).max() <= 0.1 * 1.001 and F.softplus(mamba2.dt_bias).max() <= 0.1 * 1.001
    assert abs(mamba.A_log.exp().max() - 4) < 1e-6 and torch.equal(mamba2.D, torch.ones_like(mamba2.D))
    assert mamba.in_proj.weight.std() < 0.03 and mamba2.out_proj.weight.std() < 0.03
    ids = torch.randint(0, 40, (2, 19))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        cache = model.init_cache(2)
        pieces = [model(ids[:, :11], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                           for t in range(11, 19)]
    assert_close(torch.cat(pieces, dim=1), out.logits, 1e-9)


@pytest.mark.parametrize("fields,message", [
    ({"type": "mamba", "d_state": 0}, "model.blocks.M.d_state: must be >= 1, got 0"),
    ({"type": "mamba", "dt_rank": "big"}, "model.blocks.M.dt_rank: must be 'auto' or an integer >= 1"),
    ({"type": "mamba", "dt_min": 0.2}, "model.blocks.M.dt_min: must satisfy 0 < dt_min <= dt_max"),
    ({"type": "mamba", "dt_init_floor": -1.0}, "model.blocks.M.dt_init_floor: must be >= 0"),
    ({"type": "mamba2", "expand": 0}, "model.blocks.M.expand: must be >= 1, got 0"),
    ({"type": "mamba2", "head_dim": 24}, "model.blocks.M.head_dim: 24 does not divide expand * model.d_model = 64"),
    ({"type": "mamba2", "head_dim": 16, "n_groups": 3}, "model.blocks.M.n_groups: 3 does not divide the 4 heads"),
    ({"type": "mamba2", "a_init_min": 20.0}, "model.blocks.M.a_init_min: must satisfy 0 < a_init_min <= a_init_max"),
    ({"type": "mamba2", "chunk": 8}, "model.blocks.M.chunk: unknown key"),
])
def test_recipe_errors_name_the_field(fields, message):
    raw = {"model": {"d_model": 32, "n_layers": 1, "pattern": "M", "blocks": {"M": fields}}}
    with pytest.raises(RecipeError) as err:
        zoo.load_recipe(raw)
    assert str(err.value).startswith(message), str(err.value)
