"""Recipes stay inside what a recipe is: extends reaches YAML recipe files only and never echoes a foreign file,
no OmegaConf resolver reads the environment, a run name is a name and not a path, every float is finite (issue 28)."""
import pytest

import zoo

BASE = "recipes/transformer.yaml"


def _write(path, text):
    path.write_text(text)
    return path


def test_extends_reaches_recipe_files_only(tmp_path):
    secret = _write(tmp_path / "secret.txt", "token: hunter2\n")
    recipe = _write(tmp_path / "r.yaml", f"extends: {secret}\n")
    with pytest.raises(zoo.RecipeError, match=r"^extends: .*secret.txt \(in .*r.yaml\) is not a recipe file; "
                                              r"allowed: a file ending in .yaml or .yml") as err:
        zoo.load_recipe(recipe)
    assert "hunter2" not in str(err.value)
    binary = tmp_path / "b.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(zoo.RecipeError, match=r"b.yaml: not a UTF-8 YAML text file"):
        zoo.load_recipe(_write(tmp_path / "x.yaml", f"extends: {binary}\n"))


def test_a_long_unknown_key_is_not_echoed_whole(tmp_path):
    text = "x" * 300
    with pytest.raises(zoo.RecipeError, match=r"^'x{40}\.\.\.': unknown key \(allowed: name, model, train\)$"):
        zoo.load_recipe({text: 1})


@pytest.mark.parametrize("where", ["file", "override"])
def test_resolvers_are_refused(tmp_path, where, monkeypatch):
    monkeypatch.setenv("ZOO_SECRET", "abc")
    if where == "file":
        recipe, overrides = _write(tmp_path / "r.yaml", "name: ${oc.env:ZOO_SECRET}\nmodel: {d_model: 64}\n"), []
    else:
        recipe, overrides = BASE, ["name=${oc.env:ZOO_SECRET}"]
    with pytest.raises(zoo.RecipeError, match=r"name: '\$\{oc.env:ZOO_SECRET\}' calls an OmegaConf resolver; recipes "
                                              r"do not read the environment"):
        zoo.load_recipe(recipe, overrides)


@pytest.mark.parametrize("name", ["/tmp/anywhere", "../x", "a/b", "..", ".hidden", "a b"])
def test_a_run_name_is_not_a_path(name):
    with pytest.raises(zoo.RecipeError, match=r"^name: .* is not a run name; allowed: letters, digits"):
        zoo.load_recipe(BASE, [f"name={name}"])


@pytest.mark.parametrize("name", ["mamba2", "Taipan-1.3B", "stdlib+shakespeare_v2"])
def test_run_names_that_are_names(name):
    assert zoo.load_recipe(BASE, [f"name={name}"]).name == name


@pytest.mark.parametrize("override,field", [
    ("model.logits_divisor=inf", "model.logits_divisor"), ("model.embedding_multiplier=.inf", "model.embedding_multiplier"),
    ("model.blocks.A.scale=inf", "model.blocks.A.scale"), ("train.lr=nan", "train.lr"),
    ("model.ffn.mult=-inf", "model.ffn.mult"),
    ("train.seq_len_schedule=[{seq_len: 256, until: .nan}]", r"train.seq_len_schedule\[0\].until")])
def test_non_finite_floats_name_the_field(override, field):
    with pytest.raises(zoo.RecipeError, match=rf"^{field}: must be a finite number, got"):
        zoo.load_recipe(BASE, [override])


def test_an_infinite_bound_where_it_means_none():
    recipe = zoo.load_recipe("recipes/mamba2.yaml", ["model.blocks.M.dt_limit=[0.001, .inf]"])
    assert recipe.model.blocks["M"]["dt_limit"][1] == float("inf")
    with pytest.raises(zoo.RecipeError, match=r"dt_limit\[1\]: must be a finite number, got nan"):
        zoo.load_recipe("recipes/mamba2.yaml", ["model.blocks.M.dt_limit=[0.001, .nan]"])


def test_a_bad_block_ffn_override_names_its_path():
    with pytest.raises(zoo.RecipeError, match=r"^model.blocks.A.ffn.mult: Value 'oops'"):
        zoo.load_recipe(BASE, ["model.blocks.A.ffn={type: swiglu, mult: oops}"])
