"""transformers integration (zoo.hf): generate through every block's cache, left padding, save/load."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import zoo
import zoo.convert
from zoo.hf import ZooConfig, ZooForCausalLM, ZooLoadError, output_cache

V = 61   # vocabulary: odd, so no size lines up by accident

# One tiny layer stack per block type, with windows, segments and chunks short enough that the
# prompts and generations below cross them.
BLOCKS = {
    "attn": {"type": "attn", "n_heads": 2, "n_kv_heads": 1},
    "blockwise": {"type": "blockwise", "n_heads": 2, "block_size": 3},
    "ring": {"type": "ring", "n_heads": 2, "block_size": 4},
    "swa": {"type": "swa", "n_heads": 2, "window": 5, "block_size": 3},
    "infini": {"type": "infini", "n_heads": 2, "segment_len": 4},
    "selective": {"type": "selective", "n_heads": 2},
    "taipan": {"type": "taipan", "n_heads": 2, "window": 5, "capacity": 0.5, "block_size": 3},
    "mamba": {"type": "mamba", "d_state": 4, "d_conv": 4, "expand": 2},
    "mamba2": {"type": "mamba2", "d_state": 8, "d_conv": 4, "expand": 2, "head_dim": 8, "chunk_size": 4},
}
# variants that only decoding through the cache can show (the whole-sequence forward never prunes)
CACHE_ONLY = {
    "selective_budget": {"type": "selective", "n_heads": 2, "kv_budget": 6},
    "taipan_rope": {"type": "taipan", "n_heads": 2, "window": 5, "capacity": 0.5, "rope_base": 10000.0},
}
SMALL = ["model.d_model=32", "model.vocab_size=61", "model.init_std=0.3"]
HYBRIDS = {
    "taipan": SMALL + ["model.blocks.M.head_dim=8", "model.blocks.M.d_state=8", "model.blocks.M.chunk_size=4",
                       "model.blocks.T.window=5", "model.blocks.T.capacity=0.5", "model.blocks.T.n_heads=2"],
    "samba": SMALL + ["model.n_layers=4", "model.blocks.S.window=5", "model.blocks.S.block_size=4",
                      "model.blocks.S.n_heads=2", "model.blocks.M.d_state=4"],
    "jamba": SMALL + ["model.blocks.A.n_heads=2", "model.blocks.A.n_kv_heads=1", "model.blocks.M.d_state=4"],
}


def tiny_recipe(block: dict, n_layers: int = 2):
    return {"name": f"tiny-{block['type']}",
            "model": {"d_model": 32, "n_layers": n_layers, "vocab_size": V, "pattern": "B", "blocks": {"B": block},
                      "ffn": {"type": "swiglu", "mult": 2}, "init_std": 0.3},
            "train": {"seq_len": 64}}


def hf_model(recipe, overrides=()) -> ZooForCausalLM:
    lm = zoo.build_model(recipe, overrides).double().eval()
    return ZooForCausalLM.from_zoo(lm)


def greedy_by_full_forward(lm, ids, n):
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = lm(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


def generate(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def record_calls(model: ZooForCausalLM) -> list:
    """(new tokens per row, positions the given cache had seen) for each call of the ZooLM."""
    calls = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache")
        calls.append((args[0].shape[-1], None if cache is None else cache.seen))
    model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", ["attn", "mamba2", "hybrid:samba"])
def test_generate_runs_on_the_models_own_cache(name, padded):
    """Every step continues the cache the step before filled: the prompt once, then one token per call on a
    cache that has seen everything before it (transformers 5.24 hands the cache over as `cache`, earlier
    releases as `past_key_values`; a forward that drops it restarts every step from an empty cache)."""
    if name.startswith("hybrid:"):
        model = hf_model(f"recipes/{name[7:]}.yaml", HYBRIDS[name[7:]])
    else:
        model = hf_model(tiny_recipe(BLOCKS[name]))
    calls = record_calls(model)
    if padded:
        ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]])
        generate(model, ids, 10, attention_mask=mask)
        # prefill: an attention stack takes the padded batch at once (Block.init_left_padded_cache); one with
        # an SSM runs each row's own tokens alone on an empty cache; then the batch on the shared timeline
        prefill = [(7, 0)] if name == "attn" else [(3, 0), (7, 0)]
        assert calls == prefill + [(1, 7 + i) for i in range(9)]
    else:
        generate(model, torch.randint(1, V, (2, 7)), 10)
        assert calls == [(7, 0)] + [(1, 7 + i) for i in range(9)]


@pytest.mark.parametrize("name", list(BLOCKS) + [f"hybrid:{h}" for h in HYBRIDS])
def test_greedy_generate_equals_argmax_of_full_forward(name):
    if name.startswith("hybrid:"):
        h = name.split(":")[1]
        model = hf_model(f"recipes/{h}.yaml", HYBRIDS[h])
    else:
        model = hf_model(tiny_recipe(BLOCKS[name]))
    ids = torch.randint(1, V, (2, 9))
    out = generate(model, ids, 12)
    assert torch.equal(out, greedy_by_full_forward(model.model, ids, 12))


def left_pad(prompts, pad=0):
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, n - len(p):] = torch.tensor(p)
        mask[r, n - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("name", list(BLOCKS) + list(CACHE_ONLY) + [f"hybrid:{h}" for h in HYBRIDS])
def test_left_padded_batch_equals_each_row_alone(name):
    if name.startswith("hybrid:"):
        h = name.split(":")[1]
        model = hf_model(f"recipes/{h}.yaml", HYBRIDS[h])
    else:
        model = hf_model(tiny_recipe({**BLOCKS, **CACHE_ONLY}[name]))
    g = torch.Generator().manual_seed(1)
    # lengths: shorter than a conv width (4) and than an infini segment (4), across a window (5), longer
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (2, 11, 5, 1, 7)]
    ids, mask = left_pad(prompts)
    batch = generate(model, ids, 10, attention_mask=mask)
    for r, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), 10)
        assert batch[r, ids.shape[1]:].tolist() == alone[0, len(p):].tolist(), f"row {r} (prompt length {len(p)})"


@pytest.mark.parametrize("name", ["attn", "ring", "swa"])
def test_left_padded_prefill_runs_the_batch_at_once(name):
    """An attention stack prefills the padded batch in one forward (padding keys masked, RoPE at each row's
    own positions): each row's logits are those of the row alone, zeros at its padding."""
    model = hf_model(tiny_recipe(BLOCKS[name]))
    calls = record_calls(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (2, 11, 5, 1, 7)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        assert calls == [(ids.shape[1], 0)]
        for r, p in enumerate(prompts):
            pad = ids.shape[1] - len(p)
            alone = model.model(torch.tensor([p])).logits[0]
            assert (out.logits[r, pad:] - alone).abs().max() < 1e-10, f"row {r}"
            assert (out.logits[r, :pad] == 0).all()


def test_sampling_processors_and_stopping_run():
    model = hf_model(f"recipes/samba.yaml", HYBRIDS["samba"])
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12]])
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, do_sample=True, top_k=10, top_p=0.9, temperature=0.8,
                         repetition_penalty=1.3, max_new_tokens=8, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 8) and (out[:, ids.shape[1]:] < V).all()
    # stopping: an eos that greedy decoding produces ends the generation there
    greedy = generate(model, ids[1:, 0:], 6)   # row 1 has no padding
    eos = int(greedy[0, ids.shape[1] + 2])
    stopped = model.generate(ids[1:], do_sample=False, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert stopped.shape[1] <= ids.shape[1] + 3 and int(stopped[0, -1]) == eos


def test_beam_search_reorders_every_cache():
    model = hf_model(f"recipes/jamba.yaml", HYBRIDS["jamba"])
    ids = torch.randint(1, V, (1, 6))
    out = model.generate(ids, num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    # the winning beam's score is its log-probability under the full forward
    seq = out.sequences[0:1]
    with torch.no_grad():
        logp = torch.log_softmax(model.model(seq).logits[0, :-1], -1)
    total = sum(float(logp[t - 1, seq[0, t]]) for t in range(ids.shape[1], seq.shape[1]))
    # generate keeps beam scores in float32
    assert abs(total / (seq.shape[1] - ids.shape[1]) - float(out.sequences_scores[0])) < 1e-6


def test_bad_attention_masks_are_named():
    model = hf_model(tiny_recipe(BLOCKS["attn"]))
    ids = torch.randint(1, V, (2, 4))
    with pytest.raises(ValueError, match="attention_mask: row 1 has a 0 after a 1"):
        model(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask: row 0 is all padding"):
        model(ids, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


# -- decode memory -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BLOCKS) + list(CACHE_ONLY))
def test_cache_bytes_equal_state_bytes(name):
    model = hf_model(tiny_recipe({**BLOCKS, **CACHE_ONLY}[name], n_layers=1)).float()
    block = model.model.layers[0].mixer
    cache = model.init_cache(1)
    ids = torch.randint(1, V, (1, 30))
    measured = []
    with torch.no_grad():
        model(ids[:, :3], past_key_values=cache)
        for t in range(3, 30):
            measured.append(cache.zoo.layers[0].nbytes())
            assert measured[-1] == block.state_bytes(t, dtype=torch.float32), f"after {t} tokens"
            model(ids[:, t:t + 1], past_key_values=cache)
    assert cache.nbytes() == block.state_bytes(30, dtype=torch.float32)
    if name in ("swa", "mamba", "mamba2", "taipan"):
        # constant past the window (swa, taipan: 5 - 1 cached positions) or from the start (SSMs)
        assert len(set(measured[4 - 3:])) == 1


def test_left_padded_cache_bytes_are_the_padded_batch():
    model = hf_model(f"recipes/samba.yaml", HYBRIDS["samba"]).float()
    ids, mask = left_pad([[3] * 2, [4] * 9])
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    cache = output_cache(out)
    for layer, c in zip(model.model.layers, cache.zoo.layers):
        # the batch holds both rows at the longest row's length (swa: its window)
        assert c.nbytes() == layer.mixer.state_bytes(9, batch_size=2, dtype=torch.float32)


# -- save / load ----------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    model = hf_model(f"recipes/taipan.yaml", HYBRIDS["taipan"]).float()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "recipe.yaml"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "zoo"
    loaded = ZooForCausalLM.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(1, V, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # zoo's own tools read the recipe next to the weights
    assert zoo.load_recipe(tmp_path / "recipe.yaml").to_dict() == model.model.recipe.to_dict()


def test_auto_classes_after_import_zoo(tmp_path):
    hf_model(tiny_recipe(BLOCKS["mamba2"])).save_pretrained(tmp_path)
    code = ("import zoo, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "print(type(m).__name__, m.model.recipe.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ZooForCausalLM", "tiny-mamba2"]


def test_tied_embeddings_round_trip(tmp_path):
    model = hf_model(tiny_recipe(BLOCKS["attn"]) | {"model": {**tiny_recipe(BLOCKS["attn"])["model"],
                                                             "tie_embeddings": True}})
    assert model.model.lm_head.weight is model.model.embed.weight
    model.save_pretrained(tmp_path)
    loaded = ZooForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.model.lm_head.weight is loaded.model.embed.weight
    assert torch.equal(loaded.model.embed.weight, model.model.embed.weight)


def test_head_bias_round_trip(tmp_path):
    model = hf_model(tiny_recipe(BLOCKS["attn"]) | {"model": {**tiny_recipe(BLOCKS["attn"])["model"],
                                                             "head_bias": True}})
    model.model.init_head_bias(torch.arange(model.model.lm_head.out_features))
    model.save_pretrained(tmp_path)
    loaded = ZooForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert torch.equal(loaded.model.lm_head.bias, model.model.lm_head.bias.double())
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model.double()(ids).logits)


def test_loading_another_recipes_weights_names_the_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    hf_model(tiny_recipe(BLOCKS["attn"])).save_pretrained(a)
    hf_model(tiny_recipe({**BLOCKS["attn"], "n_heads": 4, "head_dim": 16})).save_pretrained(b)
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(ZooLoadError, match=r"model\.safetensors: weights for another model: .*q_proj.* has shape"):
        ZooForCausalLM.from_pretrained(a)
    c = tmp_path / "c"
    hf_model(tiny_recipe(BLOCKS["mamba"])).save_pretrained(c)
    (a / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes())
    with pytest.raises(ZooLoadError, match=r"weights for another model: model\.layers\.0\.mixer\.q_proj\.weight .* is missing"):
        ZooForCausalLM.from_pretrained(a)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    hf_model(tiny_recipe(BLOCKS["mamba"])).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x07" * 64 + data[64:])
    with pytest.raises(ZooLoadError, match=r"model\.safetensors: (truncated|unreadable or corrupt)"):
        ZooForCausalLM.from_pretrained(tmp_path)


def test_config_rejects_a_bad_recipe():
    with pytest.raises(zoo.RecipeError, match="model.blocks.B.type: unknown block 'atn'"):
        ZooConfig(recipe=tiny_recipe({"type": "atn"}))


def _tiny_transformers_models():
    import transformers

    yield "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, tie_word_embeddings=True))
    yield "mamba", transformers.MambaForCausalLM(transformers.MambaConfig(
        hidden_size=32, state_size=4, num_hidden_layers=2, vocab_size=V, expand=2, conv_kernel=4, time_step_rank=4))
    yield "mamba2", transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=V, expand=2, head_dim=8, num_heads=8,
        n_groups=2, chunk_size=8, conv_kernel=4))


def test_from_transformers_save_load_round_trip(tmp_path):
    for kind, hf in _tiny_transformers_models():
        model = ZooForCausalLM.from_zoo(zoo.convert.from_transformers(hf.eval()).eval())
        model.save_pretrained(tmp_path / kind)
        loaded = ZooForCausalLM.from_pretrained(tmp_path / kind)
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
        ids = torch.randint(0, V, (2, 19))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits), kind
            # and still the transformers model's logits (float32 agreement, as tests/test_convert.py)
            want = hf(ids).logits
            assert ((loaded(ids).logits - want).abs().max() / want.abs().max()) < 1e-4, kind


def _script(name):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"{name}_script", Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1].removeprefix("summary: "))


def test_export_then_generate_scripts(tmp_path, capsys):
    from zoo.train.checkpoint import save_checkpoint

    recipe = zoo.load_recipe("recipes/samba.yaml", HYBRIDS["samba"] + ["model.vocab_size=256"])
    lm = zoo.build_model(recipe)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints", 10, lm.state_dict(), recipe)
    _script("export").main([str(tmp_path / "run"), str(tmp_path / "out")])
    summary = _summary(capsys.readouterr().out)
    assert summary["checkpoint"] == str(ckpt) and {"config.json", "model.safetensors", "recipe.yaml"} <= set(summary["files"])
    exported = ZooForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(exported.model.state_dict()[k], v) for k, v in lm.state_dict().items())
    gen = _script("generate")
    # one prompt streams; the byte tokenizer is the recipe's; from the exported dir and the checkpoint alike
    for source in ("out", "run"):
        gen.main([str(tmp_path / source), "--prompt", "héllo", "--max-new-tokens", "7", "--greedy", "--no-stop"])
        out = capsys.readouterr().out
        s = _summary(out)
        assert out.startswith("héllo") and s["new_tokens"] == 7 and s["cache_tokens"] == len("héllo".encode()) + 6
        assert s["cache_bytes"] == s["state_bytes"] > 0
    gen.main([str(tmp_path / "out"), "--prompt", "a", "--prompt", "three", "--max-new-tokens", "4", "--top-k", "5"])
    s = _summary(capsys.readouterr().out)
    assert s["batch"] == 2 and s["new_tokens"] == 4


def test_an_exported_byte_model_loads_with_its_tokenizer(tmp_path, capsys):
    """issue 27: the byte tokenizer exported as tokenizer.json: AutoTokenizer gives the byte ids back and forth
    (non-ASCII, NUL and the symbol that stands for byte 0 included), and transformers' pipeline generates what
    zoo's generate does."""
    from transformers import AutoTokenizer, pipeline

    from zoo.train.checkpoint import save_checkpoint
    recipe = zoo.load_recipe(tiny_recipe(BLOCKS["mamba2"]) | {"train": {"seq_len": 64}}, ["model.vocab_size=256"])
    torch.manual_seed(0)
    lm = zoo.build_model(recipe)
    save_checkpoint(tmp_path / "ckpt", 1, lm.state_dict(), recipe)
    _script("export").main([str(tmp_path / "ckpt"), str(tmp_path / "out")])
    assert "tokenizer.json" in _summary(capsys.readouterr().out)["files"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in ["def f(x):\n    return x", "héllo wörld 漢字 🦁", " space first", "\u0100 and \x00"]:
        ids = tok(text)["input_ids"]
        assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text, text
    generator = pipeline("text-generation", model=str(tmp_path / "out"), tokenizer=tok)
    got = generator("héllo", max_new_tokens=6, min_new_tokens=6, do_sample=False)[0]["generated_text"]
    model = ZooForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([list("héllo".encode())])
    want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0].tolist()
    assert got == bytes(want).decode("utf-8", errors="replace") and len(want) == len("héllo".encode()) + 6


def test_export_and_generate_with_a_transformers_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    from zoo.data.tokenizer import train_bpe
    from zoo.train.checkpoint import save_checkpoint

    tok = train_bpe(["the cat sat on the mat. " * 20, "a dog ran to the cat. " * 20], 300, tmp_path / "tok")
    recipe = zoo.load_recipe(tiny_recipe(BLOCKS["mamba2"]) | {"train": {"seq_len": 64, "tokenizer": str(tmp_path / "tok")}},
                             [f"model.vocab_size={tok.vocab_size}"])
    save_checkpoint(tmp_path / "ckpt", 1, zoo.build_model(recipe).state_dict(), recipe)
    _script("export").main([str(tmp_path / "ckpt"), str(tmp_path / "out")])
    capsys.readouterr()
    # the exported directory carries the tokenizer and its end-of-text id
    assert AutoTokenizer.from_pretrained(tmp_path / "out").eos_token_id == tok.eos_id
    assert ZooForCausalLM.from_pretrained(tmp_path / "out").generation_config.eos_token_id == tok.eos_id
    _script("generate").main([str(tmp_path / "out"), "--prompt", "the cat", "--max-new-tokens", "5", "--greedy",
                              "--no-stop"])
    out = capsys.readouterr().out
    assert out.startswith("the cat") and _summary(out)["new_tokens"] == 5


@pytest.mark.parametrize("layout", ["parallel", "shared"])
def test_row_cached_sees_a_branch_decoded_row_by_row(layout):
    """A layer whose cache holds a RowGroups inside (an infini branch of a parallel block, or infini under a
    shared block's use) counts as decoded in groups; generation stays each row's own."""
    recipe = tiny_recipe(BLOCKS["infini"], n_layers=2)
    recipe["model"]["pattern"] = "BM"
    if layout == "parallel":
        branches = [{**BLOCKS["infini"], "out_scale": 0.5}, {**BLOCKS["mamba2"], "out_scale": 1.5}]
        recipe["model"]["blocks"] = {"B": {"type": "parallel", "branches": branches}, "M": BLOCKS["mamba2"]}
    else:
        recipe["model"]["shared_blocks"] = {"S": {"n_heads": 2}}
        recipe["model"]["blocks"] = {"B": {**BLOCKS["infini"], "shared": "S"}, "M": BLOCKS["mamba2"]}
    model = hf_model(recipe)
    prompts = [[7, 3], [9, 9, 1, 4, 4, 2, 8, 5, 5], [6, 6, 6, 6, 6]]
    ids, mask = left_pad(prompts)
    assert output_cache(model(ids, attention_mask=mask)).row_cached == [True, False]
    out = generate(model, ids, 6, attention_mask=mask)
    for r, p in enumerate(prompts):
        assert out[r, ids.shape[1]:].tolist() == generate(model, torch.tensor([p]), 6)[0, len(p):].tolist()

def test_left_padded_mixed_row_and_batched_layers():
    """infini layers decode row by row between batched layers (mamba2, selective): the stack stays exact."""
    recipe = tiny_recipe(BLOCKS["infini"], n_layers=3)
    recipe["model"]["pattern"] = "IMS"
    recipe["model"]["blocks"] = {"I": BLOCKS["infini"], "M": BLOCKS["mamba2"], "S": CACHE_ONLY["selective_budget"]}
    model = hf_model(recipe)
    prompts = [[7, 3], [9, 9, 1, 4, 4, 2, 8, 5, 5], [6, 6, 6, 6, 6]]
    ids, mask = left_pad(prompts)
    out = generate(model, ids, 9, attention_mask=mask)
    cache = output_cache(model(ids, attention_mask=mask))
    assert cache.row_cached == [True, False, False]
    for r, p in enumerate(prompts):
        assert out[r, ids.shape[1]:].tolist() == generate(model, torch.tensor([p]), 9)[0, len(p):].tolist()


def test_padded_logits_without_cache_are_each_rows_own():
    model = hf_model(f"recipes/samba.yaml", HYBRIDS["samba"])
    prompts = [[4, 5], [6, 7, 8, 9, 10, 11]]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False)
        assert output_cache(out) is None
        for r, p in enumerate(prompts):
            alone = model.model(torch.tensor([p])).logits[0]
            assert (out.logits[r, ids.shape[1] - len(p):] - alone).abs().max() < 1e-12


def test_left_padded_beam_search_equals_each_row_alone():
    """Beam reordering through every cache form: stacked (mamba2), left-padded (attn, selective) and
    grouped by phase (infini)."""
    recipe = tiny_recipe(BLOCKS["infini"], n_layers=4)
    recipe["model"]["pattern"] = "IMAS"
    recipe["model"]["blocks"] = {"I": BLOCKS["infini"], "M": BLOCKS["mamba2"], "A": BLOCKS["attn"],
                                 "S": BLOCKS["selective"]}
    model = hf_model(recipe)
    prompts = [[7, 3], [9, 9, 1, 4, 4, 2], [6, 6, 6, 6, 6, 1, 2, 3, 4, 5]]
    ids, mask = left_pad(prompts)
    kw = dict(num_beams=3, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for r, p in enumerate(prompts):
        assert batch[r, ids.shape[1]:].tolist() == model.generate(torch.tensor([p]), **kw)[0, len(p):].tolist()
