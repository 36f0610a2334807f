"""Shared blocks (zoo.blocks.shared; Zamba2's shared attention + MLP with per-use adapters): the model against the
layers written out by hand with a dense masked softmax (float64, logits and every gradient), one copy of the shared
weights in the model, its parameter count, memory estimate and checkpoints, the cache contract and state bytes,
left-padded generation and beams, packed documents, activation checkpointing, and the recipe errors. Context
parallel: tests/distributed/test_cp_shared.py; Zamba2's import: tests/convert/test_zamba2_import.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import assert_close, check_left_padded_generation
from tests.test_hf import generate, left_pad
from zoo.config import RecipeError
from zoo.hf import ZooForCausalLM
from zoo.memory import estimate_memory
from zoo.ops.rope import rope_cos_sin_half
from zoo.train.checkpoint import load_checkpoint, save_checkpoint

V = 37
MAMBA = {"type": "mamba2", "d_state": 4, "head_dim": 8, "chunk_size": 3, "ffn": "none"}


def recipe(rope=True, n_kv_heads=None, tie=False):
    """Five layers, two shared blocks: S (q/k/v and FFN adapters, exact-GELU GeGLU, RoPE) used twice, T (FFN
    adapter only, SwiGLU, no concat) once."""
    return {"name": "shared-test",
            "model": {"d_model": 16, "n_layers": 5, "vocab_size": V, "pattern": "HMHMG", "init_std": 0.3,
                      "tie_embeddings": tie,
                      "shared_blocks": {
                          "S": {"n_heads": 4, "n_kv_heads": n_kv_heads, "adapter_rank": 3, "ffn_adapter_rank": 2,
                                "rope_base": 100.0 if rope else None, "scale": 0.3,
                                "ffn": {"type": "geglu", "hidden": 24, "gelu": "exact", "bias": True}},
                          "T": {"n_heads": 2, "concat_embeddings": False, "ffn_adapter_rank": 2,
                                "ffn": {"type": "swiglu", "hidden": 20}}},
                      "blocks": {"M": MAMBA, "H": {**MAMBA, "shared": "S"}, "G": {**MAMBA, "shared": "T"}}},
            "train": {"seq_len": 32}}


def build(**kw):
    torch.manual_seed(0)
    model = zoo.build_model(recipe(**kw)).double()
    with torch.no_grad():   # every path visible: norms away from 1, adapters as large as the shared weights
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith("bias") and "mixer" not in name:
                p.normal_(0.0, 0.3)
    return model


# -- the reference: the layers written out --------------------------------------------------------------------

def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, base):
    """Half-split RoPE of x [b, t, heads, d] at positions 0..t-1 (zoo's float32 tables, as attention's: the rotation
    itself is tested in tests/ops)."""
    t, d = x.shape[1], x.shape[-1]
    cos, sin = rope_cos_sin_half(torch.arange(t), d, base)
    cos, sin = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def lora(adapter, x):
    return 0 if adapter is None else x @ adapter.down.weight.T @ adapter.up.weight.T


def shared_block(block, use, u):
    cfg, att = block.cfg, block.attention
    h = rms(u, block.in_norm.weight, block.in_norm.eps)
    b, t, _ = h.shape
    heads, kv, d = att.n_heads, att.n_kv_heads, att.head_dim
    q = (h @ att.q_proj.weight.T + lora(use.q, h)).view(b, t, heads, d)
    k = (h @ att.k_proj.weight.T + lora(use.k, h)).view(b, t, kv, d)
    v = (h @ att.v_proj.weight.T + lora(use.v, h)).view(b, t, kv, d)
    if cfg.rope_base is not None:
        q, k = rotate(q, cfg.rope_base), rotate(k, cfg.rope_base)
    k, v = k.repeat_interleave(heads // kv, 2), v.repeat_interleave(heads // kv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (cfg.scale or 1 / math.sqrt(d))
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    a = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, heads * d) @ att.out_proj.weight.T
    n = rms(a, block.ffn_norm.weight, block.ffn_norm.eps)
    ffn = block.ffn
    gate, up = F.linear(n, ffn.gate_proj.weight, ffn.gate_proj.bias), F.linear(n, ffn.up_proj.weight, ffn.up_proj.bias)
    delta = lora(use.ffn_adapter, n)
    gate, up = gate + delta[..., :gate.shape[-1]], up + delta[..., gate.shape[-1]:]
    act = F.gelu(gate) * up if block.ffn_cfg.type == "geglu" else F.silu(gate) * up
    return F.linear(act, ffn.out_proj.weight, ffn.out_proj.bias)


def written_out(model, ids):
    e = model.embed(ids)
    x = e
    for layer in model.layers:
        inp = x
        if layer.shared_use is not None:
            block = layer._shared[0]
            u = torch.cat([x, e], -1) if block.cfg.concat_embeddings else x
            inp = x + shared_block(block, layer.shared_use, u) @ layer.shared_use.proj.weight.T
        x = x + layer.mixer(rms(inp, layer.mixer_norm.weight, layer.mixer_norm.eps))
    return model.lm_head(rms(x, model.norm.weight, model.norm.eps))


@pytest.mark.parametrize("kw", [{}, {"rope": False, "n_kv_heads": 2}])
def test_model_equals_the_layers_written_out(kw):
    model = build(**kw)
    ids = torch.randint(0, V, (2, 11))
    got = model(ids).logits
    got.pow(2).sum().backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for n, g in got_grads.items() if "shared" in n), "a shared weight got no gradient"
    model.zero_grad()
    want = written_out(model, ids)
    want.pow(2).sum().backward()
    assert_close(got, want, 1e-10, "logits")
    for n, p in model.named_parameters():
        assert_close(got_grads[n], p.grad, 1e-10, f"grad {n}", floor=1.0)


def test_one_copy_of_the_shared_weights_counted_estimated_and_saved(tmp_path):
    model = build()
    state = model.state_dict()
    assert [k for k in state if k.endswith("attention.q_proj.weight")] == ["shared.S.attention.q_proj.weight",
                                                                         "shared.T.attention.q_proj.weight"]
    assert not any(k.startswith("layers.") and "attention" in k for k in state)
    n = model.num_params()["total"]
    assert n == sum(p.numel() for p in state.values())
    recipe_ = zoo.load_recipe(recipe())
    assert estimate_memory(recipe_, training=False, batch_size=1, seq_len=8).params == n
    path = save_checkpoint(tmp_path, 1, model.float().state_dict(), recipe_)
    loaded = load_checkpoint(path)
    ids = torch.randint(0, V, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # loaded weights are tied again: one parameter, every use reads it
    assert loaded.layers[0]._shared[0] is loaded.layers[2]._shared[0] is loaded.shared["S"]


def test_whole_equals_chunks_equals_tokens_through_the_cache():
    model = build().eval()
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        whole = model(ids).logits
        for sizes in ((1,), (4, 2), (13,)):
            cache = model.init_cache(2, dtype=torch.float64)
            outs, start, i = [], 0, 0
            while start < 13:
                step = sizes[i % len(sizes)]
                outs.append(model(ids[:, start:start + step], cache=cache).logits)
                start, i = start + step, i + 1
            assert_close(torch.cat(outs, 1), whole, 1e-10, f"chunks {sizes}")
        assert cache.nbytes() == sum(layer.state_bytes(13, batch_size=2, dtype=torch.float64) for layer in model.layers)
        # each use keeps its own keys: the two uses of S hold different K
        first, second = cache.layers[0].attention, cache.layers[2].attention
        assert not torch.equal(first.k, second.k)


def test_left_padded_generation_and_beams():
    check_left_padded_generation(recipe(), seed=2)
    torch.manual_seed(3)
    hf = ZooForCausalLM.from_zoo(build().eval())
    ids, mask = left_pad([[5, 3, 9], [1, 2, 3, 4, 8]])
    beams = generate(hf, ids, 4, attention_mask=mask, num_beams=3)
    alone = generate(hf, ids[1:, :], 4, attention_mask=mask[1:], num_beams=3)
    assert beams[1].tolist() == alone[0].tolist()


def test_packed_documents_equal_each_alone_and_activation_checkpointing():
    model = build()
    ids = torch.randint(0, V, (1, 12))
    packed = model(ids, seq_idx=torch.tensor([[0] * 5 + [1] * 7])).logits
    alone = torch.cat([model(ids[:, :5]).logits, model(ids[:, 5:]).logits], 1)
    assert_close(packed, alone, 1e-10, "packed")
    model.train()
    ref = model(ids, labels=ids).loss
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.checkpoint_layers = True
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert_close(loss, ref, 1e-12, "loss")
    for n, p in model.named_parameters():
        assert_close(p.grad, want[n], 1e-10, f"grad {n}", floor=1.0)


def test_describe_lists_the_shared_blocks_and_their_users():
    text = build().describe(64)
    assert "mamba2+shared(S)" in text and "shared S  attn (layers 0,2)" in text


@pytest.mark.parametrize("change,message", [
    (lambda r: r["model"]["blocks"]["H"].update(shared="X"),
     r"model.blocks.H.shared: 'X' is not in model.shared_blocks \(defined: S, T\)"),
    (lambda r: r["model"]["blocks"]["H"].update(norm_position="post"),
     r"model.blocks.H.shared: a shared block feeds the input of a mixer .* not 'post'"),
    (lambda r: r["model"]["shared_blocks"]["S"].update(ffn={"type": "moe", "experts": 2}),
     r"model.shared_blocks.S.ffn.type: 'moe'; a shared block's FFN is dense"),
    (lambda r: r["model"]["shared_blocks"]["S"].update(adapter_rank=-1),
     r"model.shared_blocks.S.adapter_rank: must be an integer >= 0"),
    (lambda r: r["model"]["shared_blocks"]["S"].update(n_heads=5),
     r"model.shared_blocks.S.n_heads: 5 does not divide model.d_model 32"),
    (lambda r: r["model"]["shared_blocks"]["S"].update(gate=1),
     r"model.shared_blocks.S.gate: unknown key"),
    (lambda r: r["model"]["shared_blocks"]["S"]["ffn"].update(gelu="erf"),
     r"model.shared_blocks.S.ffn.gelu: 'erf'; allowed: exact, tanh"),
])
def test_bad_fields_name_the_field(change, message):
    r = recipe()
    change(r)
    with pytest.raises(RecipeError, match=message):
        zoo.build_model(r)


def test_recipe_round_trips_and_sizes():
    from zoo.sizing import match_params
    r = zoo.load_recipe("recipes/zamba2.yaml")
    again = zoo.load_recipe(r.to_dict())
    assert again.to_dict() == r.to_dict() and again.layers[1].shared == r.layers[1].shared
    overrides, n = match_params(r, 1_000_000)
    assert abs(n - 1_000_000) < 30_000, (overrides, n)
