"""scripts/pretrain.py: the shipped checkpoints' command: sized like compare.py, half-precision weights that load
as a checkpoint, a model card from measured numbers, and a rerun that skips what is shipped."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import zoo
from evals.commands import pretrain as pretrain_command
from tests.helpers import CLI_RECIPE, write_prepared


@pytest.fixture(scope="module")
def pretrain():
    return pretrain_command


def test_pretrain_ships_a_half_precision_checkpoint_with_its_card(pretrain, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(CLI_RECIPE), recipe)
    data = write_prepared(tmp_path / "data", train=20000, val=4000)
    out = tmp_path / "pretrained"
    argv = [str(recipe), "--budget", "1024", "--data", str(data), "--out", str(out), "--evals", "2",
            "--no-progress", "--threads", "1"]
    assert pretrain.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: "))
    dest = out / "tiny-cli"
    card = json.loads((dest / "card.json").read_text())
    assert summary["tiny-cli"]["val_bpb"] == card["val_bpb"]
    # 1024 tokens of 2 x 16 per step: 32 steps, evaluated twice along the way
    assert (card["steps"], card["tokens"], card["dtype"]) == (32, 1024, "float16")
    assert [row[0] for row in card["curve"]] == [16, 32]
    assert card["cpu_seconds"] > 0 and card["gzip_bpb"] > 0
    assert abs(card["val_bpb"] - card["val_bpb_float32"]) < 0.01   # rounding the weights costs little
    assert "zoo pretrain" in (dest / "MODEL_CARD.md").read_text()
    ckpt = dest / card["checkpoint"]
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    model = zoo.load_checkpoint(dest)   # what compare.py / eval.py do with a run directory
    assert next(model.parameters()).dtype == torch.float32
    # a rerun keeps what is shipped
    mtime = (dest / "card.json").stat().st_mtime_ns
    assert pretrain.main(argv) == 0
    assert "shipped already" in capsys.readouterr().out
    assert (dest / "card.json").stat().st_mtime_ns == mtime
    # ... and a rerun that asks for something else says so instead of reporting the shipped model as its result
    for extra, said in ((["--set", "train.lr=0.01"], "train.lr: shipped 0.003, asked 0.01"),
                        (["--budget", "2048"], "--budget: shipped 1,024 tokens, asked 2,048")):
        assert pretrain.main(argv + extra) == 2
        err = capsys.readouterr().err
        assert f"tiny-cli: {dest} was shipped with other settings ({said}); --retrain to replace it" in err
    assert (dest / "card.json").stat().st_mtime_ns == mtime


def test_pretrain_unknown_recipe_is_one_error_line(pretrain, tmp_path, capsys):
    assert pretrain.main(["no-such-recipe", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipes: 'no-such-recipe' is not a recipe file") and err.count("\n") == 1


def test_a_resumed_run_adds_its_time_to_the_earlier_sessions(tmp_path):
    from evals.runs import add_time
    assert add_time(tmp_path, 10.0, 30.0) == (10.0, 30.0)
    assert add_time(tmp_path, 2.5, 4.0) == (12.5, 34.0)


def test_a_missing_init_from_is_refused_before_any_recipe_trains(pretrain, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(CLI_RECIPE), recipe)
    data = write_prepared(tmp_path / "data", train=20000, val=4000)
    (tmp_path / "init" / "tiny-cli").mkdir(parents=True)
    (tmp_path / "init" / "tiny-cli" / "card.json").write_text("{}")   # the first recipe has its start, the second none
    argv = [str(recipe), "transformer", "--budget", "1024", "--data", str(data), "--out", str(tmp_path / "out"),
            "--init-from", str(tmp_path / "init"), "--no-progress"]
    assert pretrain.main(argv) == 2
    missing = tmp_path / "init" / "transformer"
    assert f"--init-from: no shipped checkpoint {missing} (card.json)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()   # the first recipe did not train


def test_an_override_for_no_given_recipe_is_refused(pretrain, tmp_path, capsys):
    assert pretrain.main(["transformer", "--out", str(tmp_path), "--set", "sawa:model.blocks.A.window=8"]) == 2
    assert "--set: sawa: names no recipe of this command (recipes: transformer)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_init_from_one_shipped_model_of_another_recipe(pretrain, tmp_path, capsys):
    """--init-from DIR where DIR is itself a shipped model: a recipe of another name whose weights fit (a layer
    re-typed as sliding-window attention) starts from it; the log names the changes, the card the source."""
    data = write_prepared(tmp_path / "data", train=20000, val=4000)
    base, local = tmp_path / "tiny.yaml", tmp_path / "local.yaml"
    OmegaConf.save(OmegaConf.create(CLI_RECIPE), base)
    variant = OmegaConf.merge(CLI_RECIPE, {"name": "tiny-local", "model": {"pattern": "S", "blocks": {
        "S": {"type": "swa", "n_heads": 2, "window": 8}}}})
    OmegaConf.save(variant, local)
    common = ["--budget", "256", "--data", str(data), "--evals", "1", "--no-progress", "--threads", "1"]
    assert pretrain.main([str(base), "--out", str(tmp_path / "a"), *common]) == 0
    capsys.readouterr()
    assert pretrain.main([str(local), "--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a" / "tiny-cli"),
                          *common]) == 0
    out = capsys.readouterr().out
    assert "settings changed: model.pattern: 'A' -> 'S', model.blocks.A: removed, model.blocks.S: added " \
           "(type 'swa')" in out
    card = json.loads((tmp_path / "b" / "tiny-local" / "card.json").read_text())
    assert card["init_from"]["dir"] == str(tmp_path / "a" / "tiny-cli")
