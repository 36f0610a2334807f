"""Bad input a new user meets, refused before any work, in one line naming the flag or field (issue 28)."""
import json

import pytest

from evals.commands import compare, eval as eval_command, recall
from zoo.commands import export as export_command
from zoo.data import DataError
from zoo.data.tokenizer import HFTokenizer


def test_compare_max_tokens_is_checked_first(capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["transformer", "--max-tokens", "0"])
    assert "--max-tokens: at least 2 targets per scheme and context, got 0" in capsys.readouterr().err


def test_passkey_depths_are_checked_first(capsys):
    with pytest.raises(SystemExit):
        recall.parse_args(["passkey", "mamba2", "--depths", "0,1.5"])
    assert "--depths: fractions of the prompt in [0, 1], got [0.0, 1.5]" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_eval_output_into_a_missing_directory_is_refused_first(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_command.main([str(tmp_path / "no-checkpoint"), flag, str(tmp_path / "missing" / "x.json")])
    assert f"{flag}: the directory of {tmp_path / 'missing' / 'x.json'} does not exist" in capsys.readouterr().err


def test_export_never_writes_over_its_own_checkpoint(tmp_path):
    from tests.helpers import train_toy
    train_toy(tmp_path / "run", max_steps=2, save_every=2)
    with pytest.raises(export_command.ExportError, match=r"out: .*run is the checkpoint being exported"):
        export_command.export(tmp_path / "run", tmp_path / "run", "bfloat16", force=True)


def test_a_tokenizer_that_names_remote_code_is_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    (tmp_path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(DataError, match="tokenizer: AutoTokenizer cannot load"):
        HFTokenizer(tmp_path)


def test_eval_contexts_longer_than_every_document_are_refused(tmp_path, capsys):
    import zoo
    from tests.helpers import CLI_RECIPE, write_prepared
    from zoo.train.checkpoint import save_checkpoint
    recipe = zoo.load_recipe(CLI_RECIPE)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, zoo.build_model(recipe).state_dict(), recipe)
    data = write_prepared(tmp_path / "data", train=3000, val=900, test=300)
    argv = [str(tmp_path / "run"), "--data", str(data), "--schemes", "blocks", "--max-tokens", "500"]
    assert eval_command.main(argv + ["--contexts", "16,600"]) == 2
    assert "--contexts: 600 is longer than every scored document (the longest is 501 tokens" in capsys.readouterr().err
    assert eval_command.main(argv + ["--contexts", "16,500"]) == 0


def test_a_failed_resume_leaves_no_empty_run_directory(tmp_path):
    from tests.helpers import train_toy
    from zoo.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="does not exist"):
        train_toy(tmp_path / "new", resume=str(tmp_path / "nowhere"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("content,message", [
    (b"\x00" * 100, r"is not text \(it holds NUL bytes, at byte 0\)"),
    (b"\xff\xfe" * 50, r"is not UTF-8 text"),
    (b"x" * 100, r"has no documents in split 'val' \(too small to hold out val and test\?\)")])
def test_a_failed_prepare_leaves_nothing_behind(tmp_path, content, message):
    from zoo.data import prepare
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare(str(corpus), "byte", root=tmp_path / "data")
    assert not (tmp_path / "data").exists()   # neither an empty directory nor a train split alone
    (tmp_path / "kept").mkdir()
    with pytest.raises(DataError):
        prepare(str(corpus), "byte", root=tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []   # a root that was there stays, and holds no partial split


def test_a_checkpoint_of_another_model_is_one_line_naming_the_field(tmp_path):
    """Starting from (or loading into) weights of another recipe: the first differing model field, not a
    load_state_dict traceback."""
    from tests.helpers import ToyData, toy_recipe, train_toy
    from zoo.train.checkpoint import CheckpointError
    from zoo.train.trainer import Trainer
    import zoo
    train_toy(tmp_path / "a", max_steps=2)
    wider = zoo.load_recipe(toy_recipe(max_steps=2).to_dict(), ["model.d_model=48"])
    with pytest.raises(CheckpointError, match=r"was trained with another model \(recipe 'tiny-train'\); "
                                              r"model.d_model differs: checkpoint 32 vs recipe 48$"):
        Trainer(wider, ToyData(), tmp_path / "b", device="cpu", progress=False, log=lambda s: None,
                init_from=str(tmp_path / "a"))
