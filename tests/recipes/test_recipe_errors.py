"""Bad recipes: every error names the field path, the bad value and what is allowed."""
import textwrap

import pytest

import zoo
from zoo.config import RecipeError

GOOD = """
name: ok
model:
  d_model: 64
  n_layers: 2
  pattern: "AS"
  blocks:
    A: {type: attn, n_heads: 4}
    S: {type: swa, n_heads: 4, window: 16}
train: {seq_len: 64}
"""

# (a change to the good recipe as dotlist overrides or replaced YAML, the words the message must contain)
BAD_OVERRIDES = [
    (["model.blocks.A.type=atn"], ["model.blocks.A.type", "'atn'", "did you mean 'attn'", "known:", "swa"]),
    (["model.blocks.S.window=8192"], ["model.blocks.S.window", "8192", "train.seq_len 64"]),
    (["model.blocks.S.window=0"], ["model.blocks.S.window", "0", ">= 1"]),
    (["model.pattern=AX"], ["model.pattern", "'X'", "layer 1", "model.blocks"]),
    (["model.pattern=ASA"], ["model.pattern", "length 3", "model.n_layers 2"]),
    (["model.d_modl=3"], ["model.d_modl", "unknown key", "d_model"]),
    (["model.blocks.A.n_head=4"], ["model.blocks.A.n_head", "unknown key", "n_heads"]),
    (["model.blocks.A.n_heads=5"], ["model.blocks.A.n_heads", "5", "model.d_model 64"]),
    (["model.blocks.A.n_kv_heads=3"], ["model.blocks.A.n_kv_heads", "3", "n_heads 4"]),
    (["model.d_model=abc"], ["model.d_model", "abc", "Integer"]),
    (["model.n_layers=0"], ["model.n_layers", "0", "> 0"]),
    (["model.vocab_size=1"], ["model.vocab_size", ">= 2"]),
    (["model.ffn.type=gelu"], ["model.ffn.type", "'gelu'", "known: geglu, mlp, moe, none", "swiglu"]),
    (["model.logit_softcap=0"], ["model.logit_softcap", "must be null (no cap) or > 0"]),
    (["model.residual_multiplier=0.5", "model.blocks.A.norm_position=normed"],
     ["norm_position: normed scales its terms by residual_scale", "residual_multiplier must stay 1"]),
    (["model.blocks.A.ffn.type=mpl"], ["model.blocks.A.ffn.type", "did you mean 'mlp'"]),
    (["model.blocks.A.ffn.chunk=0"], ["model.blocks.A.ffn.chunk", "0"]),
    (["train.seq_len=0"], ["train.seq_len", "> 0"]),
    (["train.warmup_steps=99999"], ["train.warmup_steps", "99999", "max_steps"]),
    (["train.lr=-1"], ["train.lr", "-1"]),
    (["trainer.lr=1"], ["trainer", "unknown key", "model, train"]),
    (["model.blocks.A.rope_base=0.5"], ["model.blocks.A.rope_base", "0.5"]),
    (["model.d_model"], ["overrides", "key=value"]),
]


def _write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_recipe_loads(tmp_path):
    recipe = zoo.load_recipe(_write(tmp_path, GOOD))
    assert [layer.type for layer in recipe.layers] == ["attn", "swa"]


@pytest.mark.parametrize("overrides,words", BAD_OVERRIDES, ids=[o[0][0] for o in BAD_OVERRIDES])
def test_bad_recipe_message_names_field(tmp_path, overrides, words):
    with pytest.raises(RecipeError) as err:
        zoo.load_recipe(_write(tmp_path, GOOD), overrides)
    for word in words:
        assert word in str(err.value), f"{word!r} missing from: {err.value}"


def test_missing_block_type(tmp_path):
    path = _write(tmp_path, GOOD.replace("A: {type: attn, n_heads: 4}", "A: {n_heads: 4}"))
    with pytest.raises(RecipeError, match=r"model\.blocks\.A\.type: missing \(known: attn"):
        zoo.load_recipe(path)


def test_block_spec_not_a_mapping(tmp_path):
    path = _write(tmp_path, GOOD.replace("A: {type: attn, n_heads: 4}", "A: attn"))
    with pytest.raises(RecipeError, match=r"model\.blocks\.A: expected a mapping with a 'type' key"):
        zoo.load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        zoo.load_recipe(tmp_path / "nope.yaml")


def test_extends_missing_and_cycle(tmp_path):
    child = _write(tmp_path, "extends: base.yaml\nname: child\n", "child.yaml")
    with pytest.raises(RecipeError, match=r"not found: .*base\.yaml \(extended from .*child\.yaml\)"):
        zoo.load_recipe(child)
    _write(tmp_path, "extends: child.yaml\n", "base.yaml")
    with pytest.raises(RecipeError, match="extends: cycle"):
        zoo.load_recipe(child)


def test_registry_miss_suggests():
    with pytest.raises(KeyError) as err:
        zoo.get_block("mamba3" if "mamba2" in zoo.list_blocks() else "blockwize")
    assert "did you mean" in str(err.value) and "known:" in str(err.value)


@pytest.mark.parametrize("text,words", [
    ("model:\n  d_model: [64, 2\n  n_layers: 2\n", ["line 3, column 11", "YAML syntax error", "expected ',' or ']'",
                                                    "flow sequence at line 2, column 12"]),
    ("model:\n  d_model: 64\n   n_layers: 2\n", ["line 3, column 12", "mapping values are not allowed"]),
    ("model: {d_model: 64}\nmodel: {d_model: 32}\n", ["line 2, column 1", "duplicate key model"]),
], ids=["flow", "indent", "duplicate"])
def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        zoo.load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line ") and "\n" not in message
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "{}\n"])
def test_empty_recipe_file(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError, match=rf"^{path}: empty recipe file \(expected a mapping with keys name, extends"):
        zoo.load_recipe(path)


def test_empty_base_file_is_named(tmp_path):
    _write(tmp_path, "", "base.yaml")
    child = _write(tmp_path, "extends: base.yaml\nname: child\n", "child.yaml")
    with pytest.raises(RecipeError, match=r"base\.yaml: empty recipe file"):
        zoo.load_recipe(child)


# Letters the pattern does not use are validated all the same (a recipe extending this one may use them).
SPARE = [
    ("Z: {type: swq, n_heads: 4}", ["model.blocks.Z.type", "'swq'", "did you mean 'swa'", "known:"]),
    ("Z: {type: swa, n_heads: 4, windw: 8}", ["model.blocks.Z.windw", "unknown key", "window"]),
    ("Z: {type: swa, n_heads: 4, window: 8192}", ["model.blocks.Z.window", "8192", "train.seq_len 64"]),
    ("Z: {type: swa, n_heads: 4, ffn: {type: gelu}}", ["model.blocks.Z.ffn.type", "'gelu'"]),
    ("Z: {n_heads: 4}", ["model.blocks.Z.type: missing", "known:"]),
    ("ZZ: {type: swa, n_heads: 4}", ["model.blocks.ZZ", "one non-space character", "'ZZ'"]),
    ("Z: {type: attn, n_heads: 4, norm_position: normed, residual_scale: [1, 2]}",
     ["model.blocks.Z.residual_scale", "expected four numbers [a, b, a_ffn, b_ffn]"]),
    ("Z: {type: attn, n_heads: 4, residual_scale: [1, 1, 1, 1]}",
     ["model.blocks.Z.residual_scale", "scales the residual of norm_position: normed, not 'pre'"]),
]


@pytest.mark.parametrize("spec,words", SPARE, ids=[s[0].split(":")[0] + str(i) for i, s in enumerate(SPARE)])
def test_unused_block_letter_is_validated(tmp_path, spec, words):
    path = _write(tmp_path, GOOD.replace("    S: {type: swa, n_heads: 4, window: 16}",
                                         "    S: {type: swa, n_heads: 4, window: 16}\n    " + spec))
    with pytest.raises(RecipeError) as err:
        zoo.load_recipe(path)
    for word in words:
        assert word in str(err.value), f"{word!r} missing from: {err.value}"


def test_valid_unused_letter_loads_and_is_left_out_of_the_resolved_recipe(tmp_path):
    path = _write(tmp_path, GOOD.replace("    S: {type: swa, n_heads: 4, window: 16}",
                                         "    S: {type: swa, n_heads: 4, window: 16}\n    Z: {type: mamba2}"))
    recipe = zoo.load_recipe(path)
    assert sorted(recipe.model.blocks) == ["A", "S"]
