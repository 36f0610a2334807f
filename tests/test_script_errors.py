"""Bad command-line input to scripts/export.py, generate.py and eval.py: one `error:` line on stderr naming the
option, the value and what is allowed, and exit status 2; nothing is loaded or written first."""
import json

import pytest

import zoo
from tests.helpers import load_script
from zoo.train.checkpoint import save_checkpoint

RECIPE = {"name": "tiny-cli", "model": {"d_model": 32, "n_layers": 2, "vocab_size": 256, "pattern": "A",
                                        "blocks": {"A": {"type": "attn", "n_heads": 2}}}, "train": {"seq_len": 16}}


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in ("export", "generate", "eval")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    recipe = zoo.load_recipe(RECIPE)
    return save_checkpoint(root / "checkpoints", 1, zoo.build_model(recipe).state_dict(), recipe)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, f"not one error line: {err!r}"
    return err.strip()


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: "))


def test_export_refuses_a_non_empty_directory_unless_forced(scripts, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert scripts["export"].main([str(checkpoint), str(out)]) == 2
    assert _error_line(capsys) == (f"error: out: {out} is not empty (notes.txt); allowed: a new or empty directory, "
                                   f"or --force to write into it (files of the same name are replaced)")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert scripts["export"].main([str(checkpoint), str(out), "--force"]) == 0
    assert {"config.json", "model.safetensors", "notes.txt"} <= set(_summary(capsys)["files"])


def test_export_into_a_file_or_an_empty_directory(scripts, checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert scripts["export"].main([str(checkpoint), str(tmp_path / "file")]) == 2
    assert _error_line(capsys) == f"error: out: {tmp_path / 'file'} is a file; allowed: a new or empty directory"
    (tmp_path / "empty").mkdir()
    assert scripts["export"].main([str(checkpoint), str(tmp_path / "empty")]) == 0


BAD_SAMPLING = [
    (["--temperature", "-0.5"], "--temperature: must be >= 0 (0 is greedy decoding, as --greedy), got -0.5"),
    (["--temperature", "nan"], "--temperature: must be >= 0 (0 is greedy decoding, as --greedy), got nan"),
    (["--top-p", "0"], "--top-p: must be in (0, 1] (1 turns top-p off), got 0.0"),
    (["--top-p", "1.5"], "--top-p: must be in (0, 1] (1 turns top-p off), got 1.5"),
    (["--top-k", "-1"], "--top-k: must be >= 0 (0 turns top-k off), got -1"),
    (["--repetition-penalty", "0"], "--repetition-penalty: must be > 0 (1 turns it off), got 0.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    (["--max-memory", "lots"], "--max-memory: expected bytes or a size such as 64GiB, 512MB or inf, got 'lots'"),
]


@pytest.mark.parametrize("args,message", BAD_SAMPLING, ids=[" ".join(a) for a, _ in BAD_SAMPLING])
def test_generate_bad_sampling_options(scripts, tmp_path, capsys, args, message):
    # checked before the model is looked for: the path does not exist
    assert scripts["generate"].main([str(tmp_path / "none"), "--prompt", "a", *args]) == 2
    assert _error_line(capsys) == f"error: {message}"


def test_generate_temperature_zero_is_greedy(scripts, checkpoint, capsys):
    argv = [str(checkpoint), "--prompt", "ab", "--max-new-tokens", "6", "--no-stop", "--device", "cpu"]
    assert scripts["generate"].main(argv + ["--greedy"]) == 0
    greedy = capsys.readouterr().out.split("summary: ")[0]   # the streamed text (random bytes may hold line breaks)
    assert scripts["generate"].main(argv + ["--temperature", "0", "--seed", "3"]) == 0
    text, summary = capsys.readouterr().out.split("summary: ")
    assert text == greedy and json.loads(summary)["greedy"]


def test_generate_and_export_refuse_a_model_above_max_memory(scripts, checkpoint, tmp_path, capsys):
    assert scripts["generate"].main([str(checkpoint), "--prompt", "a", "--max-memory", "1KiB", "--device", "cpu"]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: model.d_model: 32 (with model.n_layers 2, model.vocab_size 256) needs an estimated ")
    assert "more than the 1.0 KiB max_memory cap" in line
    assert scripts["export"].main([str(checkpoint), str(tmp_path / "out"), "--max-memory", "1KiB"]) == 2
    assert "max_memory cap" in _error_line(capsys)
    assert scripts["eval"].main([str(checkpoint), "--max-memory", "1KiB"]) == 2
    assert "max_memory cap" in _error_line(capsys)


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


def _cli_recipe(tmp_path):
    from omegaconf import OmegaConf
    from tests.helpers import CLI_RECIPE
    path = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(CLI_RECIPE), path)
    return path


@pytest.mark.parametrize("overrides, cap, start", [
    # the weights alone exceed any machine: refused before a byte is allocated
    (["model.d_model=1000000"], None, "error: model.d_model: 1000000 (with model.n_layers 1, model.vocab_size 256) "
                                      "needs an estimated"),
    # a small model whose training activations exceed the cap: the batch is named
    (["train.batch_size=4096", "train.seq_len=4096"], "1GiB", "error: train.batch_size: 4096 x train.seq_len 4096 "
                                                              "needs an estimated"),
])
def test_train_refuses_a_model_too_large_for_memory(train_script, tmp_path, capsys, overrides, cap, start):
    from tests.helpers import write_prepared
    data = write_prepared(tmp_path / "data", val=5000)
    argv = [str(_cli_recipe(tmp_path)), *overrides, "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    assert train_script.main(argv + (["--max-memory", cap] if cap else [])) == 2
    line = _error_line(capsys)
    assert line.startswith(start), line
    assert "allowed: at most that, or a higher max_memory" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_max_memory_must_be_a_size(train_script, tmp_path, capsys):
    argv = [str(_cli_recipe(tmp_path)), "--out", str(tmp_path / "run"), "--max-memory", "lots"]
    assert train_script.main(argv) == 2
    assert _error_line(capsys) == ("error: --max-memory: expected bytes or a size such as 64GiB, 512MB or inf, "
                                   "got 'lots'")
