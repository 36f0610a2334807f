"""Taipan selective attention (arXiv 2410.18572; the op vs its dense twin: tests/ops/test_taipan_op.py): the block vs a dense
reference of the same math (evaluation and training, outputs and all gradients), the cache contract,
state bytes, selection determinism / straight-through gradients, the aux loss, config errors."""
import math
from pathlib import Path

import pytest
import torch

import zoo.blocks.taipan  # noqa: F401  (registers `taipan` before zoo.blocks imports it)
from tests.helpers import assert_close, cache_bytes, check_cache_contract, run_chunks
from zoo.blocks.taipan import TaipanBlock, TaipanConfig
from zoo.blocks.base import split_aux
from zoo.ops.rope import apply_rope, rope_cos_sin
from zoo.ops.taipan import selective_window_attention_ref
from zoo.registry import get_block, list_blocks

D_MODEL = 24
CASES = {
    "nope": {"n_heads": 4, "window": 6, "block_size": 4, "capacity": 0.3},
    "rope": {"n_heads": 2, "window": 5, "block_size": 3, "rope_base": 100.0, "capacity": 0.2},
    "w1": {"n_heads": 3, "window": 1, "block_size": 5},
    "wide": {"n_heads": 2, "window": 40, "block_size": 7, "tau": 0.5},
}


def make(case, **extra):
    block = TaipanBlock(D_MODEL, TaipanConfig(**{**CASES[case], **extra}), layer_idx=0).double()
    for p in block.parameters():  # gate spread so that roughly half the tokens are selected
        torch.nn.init.normal_(p, std=0.3)
    return block


def dense_forward(block, x, seed=None):
    """The block written out densely: every query over all positions, `selective_window_attention_ref`.
    In training it redraws the block's Gumbel noise from the same seed, the same way the block does."""
    b, t, _ = x.shape
    logits = block.gate(x)
    gap = logits[..., 1] - logits[..., 0]
    if block.training:
        torch.manual_seed(seed)
        g = -torch.empty_like(logits).exponential_().log()
        noisy = (gap + g[..., 1] - g[..., 0]) / block.cfg.tau
        soft = torch.sigmoid(noisy)
        mask = (noisy > 0).double() + soft - soft.detach()
    else:
        mask = (gap > 0).double()
    hd = block.head_dim
    q, k, v = (p(x).view(b, t, -1, hd) for p in (block.q_proj, block.k_proj, block.v_proj))
    if block.cfg.rope_base is not None:
        cos, sin = rope_cos_sin(torch.arange(t), hd, block.cfg.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = selective_window_attention_ref(q, k, v, mask > 0.5, block.cfg.window)
    y = block.out_proj(o.reshape(b, t, -1))
    aux = block.cfg.aux_loss_weight * (block.cfg.capacity - mask.mean(1)).pow(2).mean()
    return (mask * torch.sigmoid(gap))[..., None] * (y - x), aux


# --- the block vs a dense reference -------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [1, 13, 29])
@pytest.mark.parametrize("training", [False, True])
def test_block_matches_dense_reference(case, length, training):
    block = make(case).train(training)
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    got, got_aux = split_aux(block(x))
    loss = got.pow(2).sum() + (got_aux if training else 0)
    loss.backward()
    got_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    got_dx = x.grad.clone()
    block.zero_grad()
    x.grad = None
    want, want_aux = dense_forward(block, x, seed=7)
    (want.pow(2).sum() + (want_aux if training else 0)).backward()
    assert_close(got, want, 1e-10)
    assert_close(got_dx, x.grad, 1e-10, "grad x")
    for n, p in block.named_parameters():
        assert_close(got_grads[n], p.grad, 1e-10, f"grad {n}", floor=1.0)
    if training:
        assert_close(got_aux, want_aux, 1e-12, "aux_loss")
    else:
        assert got_aux is None


# --- selection: deterministic at evaluation, stochastic and differentiable in training ---------

def test_eval_is_deterministic_and_clears_aux_loss():
    block = make("nope")
    x = torch.randn(2, 31, D_MODEL, dtype=torch.float64)
    block.train()
    _, aux = split_aux(block(x))
    assert aux is not None
    block.eval()
    torch.manual_seed(1)
    a, aux = split_aux(block(x))
    assert aux is None, "aux_loss left over from the training forward"
    torch.manual_seed(2)
    assert torch.equal(a, block(x))


def test_eval_selection_is_the_noise_free_argmax():
    block = make("nope").eval()
    x = torch.randn(2, 31, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        logits = block.gate(x)
    selected = logits[..., 1] > logits[..., 0]
    assert 0 < selected.sum() < selected.numel()
    assert torch.equal(out.abs().sum(-1) > 0, selected), "exactly the selected tokens are updated"


def test_training_selection_is_sampled():
    block = make("nope").train()
    x = torch.randn(2, 31, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        a = split_aux(block(x))[0].abs().sum(-1) > 0
        torch.manual_seed(2)
        b = split_aux(block(x))[0].abs().sum(-1) > 0
    assert not torch.equal(a, b), "two Gumbel draws picked the same 62 tokens"


def test_training_is_differentiable_through_the_selection():
    # Unselected tokens output exactly zero, yet their loss reaches the gate through the
    # straight-through mask (and only through it: alpha multiplies a zero mask there).
    block = make("nope").train()
    x = torch.randn(2, 31, D_MODEL, dtype=torch.float64)
    torch.manual_seed(3)
    out, _ = split_aux(block(x))
    unselected = out.detach().abs().sum(-1) == 0
    assert unselected.any() and not unselected.all()
    (out[unselected] * torch.randn_like(out[unselected])).sum().backward()
    assert block.gate.weight.grad.abs().max() > 1e-6
    # o_i of an unselected token enters only the gate's gradient (the mask multiplying it is 0)
    assert block.q_proj.weight.grad is None or block.q_proj.weight.grad.abs().max() == 0


def test_aux_loss_is_the_budget_constraint():
    block = make("nope", aux_loss_weight=0.5).train()
    x = torch.randn(3, 40, D_MODEL, dtype=torch.float64)
    out, aux = split_aux(block(x))
    frac = (out.detach().abs().sum(-1) > 0).double().mean(1)
    assert aux.dim() == 0
    assert math.isclose(aux.item(), 0.5 * (0.3 - frac).pow(2).mean().item(), rel_tol=1e-12)
    aux.backward()
    assert block.gate.weight.grad.abs().max() > 0
    assert block.q_proj.weight.grad is None, "the budget loss should reach only the gate"


def test_gate_starts_at_the_capacity():
    block = TaipanBlock(D_MODEL, TaipanConfig(capacity=0.15), 0)
    torch.nn.init.zeros_(block.gate.weight)
    p = torch.softmax(block.gate.bias, 0)[1].item()
    assert math.isclose(p, 0.15, rel_tol=1e-6)


def test_outputs_are_causal():
    block = make("rope").eval()
    x = torch.randn(2, 30, D_MODEL, dtype=torch.float64)
    y = x.clone()
    y[:, 17:] = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(block(x)[:, :17], block(y)[:, :17])


# --- cache contract and state -----------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_cache_contract(case):
    block = make(case)
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    whole = check_cache_contract(block, x, splits=((1,), (4, 7), (5,), (23,)))
    assert whole.abs().sum() > 0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [1, 5, 17])
def test_state_bytes_equals_cache_bytes(case, length):
    block = make(case).eval()
    x = torch.randn(1, length, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [3])
    assert cache_bytes(cache) == block.state_bytes(length, batch_size=1, dtype=torch.float64)


def test_state_is_bounded_by_the_window():
    block = make("nope").eval()
    x = torch.randn(2, 40, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, cache = run_chunks(block, x, [1])
    assert cache.k.shape[1] == CASES["nope"]["window"] - 1
    assert cache_bytes(cache) == block.state_bytes(40, batch_size=2, dtype=torch.float64)
    assert block.state_bytes(40) == block.state_bytes(100_000)


def test_low_precision_keeps_dtype():
    block = make("nope").to(torch.bfloat16).eval()
    x = torch.randn(2, 19, D_MODEL, dtype=torch.bfloat16)
    with torch.no_grad():
        out = block(x)
        ref = block.double()(x.double())
    assert out.dtype == torch.bfloat16
    # a gate gap within bf16 rounding of 0 may select differently; compare where both selected
    both = (out.abs().sum(-1) > 0) & (ref.abs().sum(-1) > 0)
    assert both.float().mean() > 0.3
    assert_close(out[both], ref[both], 5e-2)


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("n_heads", 0), ("window", 0), ("capacity", 0.0), ("capacity", 1.0), ("tau", 0.0),
    ("aux_loss_weight", -1.0), ("rope_base", 1.0), ("block_size", 0), ("head_dim", 0),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TaipanConfig(**{field: value})


def test_config_checks_against_model():
    with pytest.raises(ValueError, match="^window: 256 exceeds train.seq_len 128"):
        TaipanConfig(window=256).check(d_model=64, seq_len=128)
    with pytest.raises(ValueError, match="^n_heads:"):
        TaipanConfig(n_heads=5).check(d_model=64, seq_len=512)
    TaipanConfig(n_heads=4, window=128).check(d_model=64, seq_len=128)


# --- in a model ---------------------------------------------------------------------------------

def test_model_sums_aux_loss_in_training_only():
    import zoo

    assert get_block("taipan").cls is TaipanBlock
    recipe = {"name": "t", "model": {"d_model": 32, "n_layers": 2, "vocab_size": 50, "pattern": "AT",
                                     "blocks": {"A": {"type": "attn", "n_heads": 2},
                                                "T": {"type": "taipan", "n_heads": 2, "window": 16}}},
              "train": {"seq_len": 32}}
    model = zoo.build_model(recipe)
    ids = torch.randint(0, 50, (2, 32))
    model.train()
    block_aux = []
    model.layers[1].mixer.register_forward_hook(lambda module, args, result: block_aux.append(split_aux(result)[1]))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.dim() == 0
    assert torch.equal(out.aux_loss, block_aux[0])
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    model.eval()
    with torch.no_grad():
        assert model(ids).aux_loss is None


def test_taipan_recipe():
    if "mamba2" not in list_blocks():
        pytest.skip("mamba2 block not registered yet (zoo/blocks/mamba.py)")
    import zoo

    path = Path(__file__).resolve().parents[2] / "recipes" / "taipan.yaml"
    recipe = zoo.load_recipe(path)
    types = [layer.type for layer in recipe.layers]
    assert types == ["mamba2"] * 6 + ["taipan"]
    assert [layer.ffn.type for layer in recipe.layers] == ["none"] * 6 + ["swiglu"]
    model = zoo.build_model(recipe)
    assert 1e6 <= model.num_params()["total"] <= 1e7
