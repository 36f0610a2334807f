"""`zoo recall`: the passkey fine-tune ships a half-precision checkpoint with a card holding the accuracy it
measured; the MQAR sweep writes a row per run as it goes and resumes; compare carries both into its report."""
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors import safe_open

import zoo
from evals.commands import compare, pretrain, recall
from evals.results import attach_mqar
from evals.runs import passkey_checkpoint
from evals.recall_report import mqar_finding, mqar_points, mqar_table, passkey_finding, plot_mqar
from tests.helpers import CLI_RECIPE, write_prepared

TINY_HYBRID = {"name": "tiny-hybrid", "model": {"d_model": 32, "n_layers": 3, "vocab_size": 256, "pattern": "MMA",
               "blocks": {"M": {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 8},
                          "A": {"type": "attn", "n_heads": 2}}, "ffn": {"type": "swiglu", "mult": 2}},
               "train": {"seq_len": 32, "batch_size": 4}}


@pytest.fixture(scope="module")
def shipped_lm(tmp_path_factory):
    """A tiny LM shipped by `zoo pretrain`, the starting point of a passkey fine-tune."""
    root = tmp_path_factory.mktemp("recall")
    recipe = root / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(CLI_RECIPE), recipe)
    data = write_prepared(root / "data", train=20000, val=4000)
    assert pretrain.main([str(recipe), "--budget", "256", "--data", str(data), "--out", str(root / "pretrained"),
                          "--evals", "1", "--no-progress", "--threads", "1"]) == 0
    return root / "pretrained"


def test_passkey_finetune_ships_its_checkpoint_and_measured_card(shipped_lm, tmp_path, capsys):
    out = tmp_path / "passkey"
    argv = ["passkey", "tiny-cli", "--from", str(shipped_lm), "--out", str(out), "--steps", "3", "--seq-len", "280",
            "--batch-size", "2", "--factors", "1,2", "--depths", "0,1", "--trials", "2", "--no-progress",
            "--threads", "1"]
    assert recall.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: "))
    card = json.loads((out / "tiny-cli" / "card.json").read_text())
    assert summary == {"tiny-cli": {"lengths": [280, 560], "mean_accuracy": card["eval"]["mean"]}}
    assert (card["steps"], card["seq_len"], card["loss"], card["dtype"]) == (3, 280, "lm", "float16")
    assert card["from"].startswith(str(shipped_lm / "tiny-cli"))
    assert len(card["eval"]["accuracy"]) == 2 and all(len(row) == 2 for row in card["eval"]["accuracy"])
    assert card["cpu_seconds"] > 0 and 0 < card["val_loss"] < 20
    ckpt = out / "tiny-cli" / card["checkpoint"]
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    tuned, base = zoo.load_checkpoint(ckpt), zoo.load_checkpoint(shipped_lm / "tiny-cli")
    assert any((a - b).abs().max() > 0 for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))
    text = (out / "tiny-cli" / "MODEL_CARD.md").read_text()
    assert "zoo recall passkey" in text and "| mean |" in text and "560 (2x)" in text
    # a rerun keeps what is shipped; compare finds it
    assert recall.main(argv) == 0
    assert "fine-tuned already" in capsys.readouterr().out
    found = passkey_checkpoint(out, "tiny-cli")
    assert found["finetune_len"] == 280 and found["finetune_steps"] == 3 and found["checkpoint"].endswith(
        card["checkpoint"])
    assert passkey_checkpoint(out, "other") is None
    # a curriculum that starts with the shipped stage resumes it and trains only the new one
    staged = argv[:argv.index("--steps")] + ["--steps", "3,2", "--seq-len", "280,300", "--batch-size", "2",
                                             "--loss", "lm,answer", "--lr", "3e-3,1e-3"] + \
        argv[argv.index("--batch-size") + 2:]
    assert recall.main(staged) == 0
    log = capsys.readouterr().out
    assert "stage 2, 2 steps of 2 x 300 tokens" in log and "fine-tuned already" not in log
    card = json.loads((out / "tiny-cli" / "card.json").read_text())
    assert card["stages"] == [{"seq_len": 280, "steps": 3, "batch_size": 2, "lr": 3e-3, "loss": "lm"},
                              {"seq_len": 300, "steps": 2, "batch_size": 2, "lr": 1e-3, "loss": "answer"}]
    assert (card["seq_len"], card["steps"], card["eval"]["lengths"]) == (300, 5, [300, 600])
    assert ("3 steps of 2 x 280 tokens (loss lm, lr 0.003), then 2 steps of 2 x 300 tokens (loss answer, lr 0.001)"
            in (out / "tiny-cli" / "MODEL_CARD.md").read_text())
    assert (out / "runs" / "tiny-cli-stage2" / "checkpoints").is_dir()
    # the shipment replaced the one-stage one: named by the total steps, the only checkpoint left
    assert card["checkpoint"] == "checkpoints/step-00000005"
    assert [p.name for p in (out / "tiny-cli" / "checkpoints").iterdir()] == ["step-00000005"]


def test_passkey_stages_of_older_cards_and_per_stage_options():
    # cards written before curricula, and before per-stage losses, compare equal to the same stages asked today
    one = {"seq_len": 320, "steps": 800, "batch_size": 16, "lr": 2e-3, "loss": "lm"}
    assert recall.stages(dict(one)) == [one | {"min_seq_len": None}]
    two = {"stages": [{"seq_len": 320, "steps": 800, "batch_size": 16}, {"seq_len": 1024, "steps": 200, "batch_size": 8}],
           "lr": 2e-3, "loss": "lm"}
    args = recall.parse_args(["passkey", "m", "--steps", "800,200", "--seq-len", "320,1024", "--batch-size", "16,8",
                              "--lr", "2e-3"])
    assert recall.stages(two) == recall.asked_stages(args)
    args = recall.parse_args(["passkey", "m", "--steps", "1,2,3", "--seq-len", "4,5,6", "--loss", "lm,lm,answer"])
    assert [st["loss"] for st in recall.asked_stages(args)] == ["lm", "lm", "answer"]
    args = recall.parse_args(["passkey", "m", "--steps", "1,2", "--seq-len", "300,600", "--min-seq-len", "280"])
    assert [st["min_seq_len"] for st in recall.asked_stages(args)] == [280, 280]
    assert recall.stages(two) != recall.asked_stages(recall.parse_args(
        ["passkey", "m", "--steps", "800,200", "--seq-len", "320,1024", "--batch-size", "16,8", "--lr", "2e-3",
         "--min-seq-len", "300"]))                       # varied rows are another curriculum: not skipped
    assert "16 x 300-320 tokens (loss lm" in recall._stage_text(recall.asked_stages(args)[0] | {"batch_size": 16,
                                                                                               "seq_len": 320,
                                                                                               "min_seq_len": 300})


def test_shipped_passkey_cards_match_make_recalls_curriculum():
    # `make recall` skips a shipped fine-tune only when its card's stages are the ones asked: the Makefile's
    # PASSKEY_ARGS and every shipped card must agree, or a rerun would fine-tune it again
    import re
    root = Path(__file__).resolve().parents[2]
    text = (root / "Makefile").read_text()
    passkey_args = re.search(r"PASSKEY_ARGS \?= (.*?)\n(\S|\n)", text, re.S).group(1).replace("\\\n", " ").split()
    asked = recall.asked_stages(recall.parse_args(["passkey", "m", *passkey_args]))
    cards = sorted((root / "pretrained" / "passkey").glob("*/card.json"))
    assert cards
    for card in cards:
        assert recall.stages(json.loads(card.read_text())) == asked, card


@pytest.mark.parametrize("extra, message", [(["--loss", "lm,nope"], "'nope' is not one of answer, lm"),
                                            (["--loss", "lm,answer,lm"], "one value per stage"),
                                            (["--lr", "1e-3,2e-3,3e-3"], "one value per stage"),
                                            (["--min-seq-len", "6"], "--min-seq-len: 6 must be in [1, --seq-len of "
                                                                     "its stage = 4]")])
def test_passkey_per_stage_options_are_checked(extra, message, capsys):
    with pytest.raises(SystemExit):
        recall.parse_args(["passkey", "m", "--steps", "1,2", "--seq-len", "4,5", *extra])
    assert message in capsys.readouterr().err


def test_passkey_errors_are_one_line(shipped_lm, tmp_path, capsys):
    assert recall.main(["passkey", "nothing", "--from", str(shipped_lm), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint:") and "nothing" in err and "\n" not in err
    assert recall.main(["passkey", "tiny-cli", "--from", str(shipped_lm), "--out", str(tmp_path), "--steps", "1",
                        "--seq-len", "100", "--no-progress"]) == 2
    assert "too short for the passkey prompt" in capsys.readouterr().err


def test_mqar_sweep_writes_each_run_and_resumes(tmp_path, capsys):
    recipe = tmp_path / "hybrid.yaml"
    OmegaConf.save(OmegaConf.create(TINY_HYBRID), recipe)
    out = tmp_path / "mqar"
    argv = ["mqar", str(recipe), "--widths", "16,32", "--kv-pairs", "2,4", "--seeds", "0,1", "--steps", "2",
            "--seq-len", "24", "--vocab", "32", "--batch-size", "4", "--layers", "2", "--threads", "1", "--out", str(out),
            "--set", "tiny-hybrid:model.blocks.A.n_heads=1", "other:model.blocks.A.n_heads=3"]
    assert recall.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted((r["d_model"], r["seed"]) for r in runs) == [(16, 0), (16, 1), (32, 0), (32, 1)]
    assert all(set(r["by_kv_pairs"]) == {"2", "4"} and r["steps"] == 2 for r in runs)
    assert all(r["recipe"] == "tiny-hybrid" and r["cpu_seconds"] >= 0 for r in runs)
    assert results["meta"]["layers"] == 2 and results["meta"]["vocab_size"] == 32
    # the 2-layer miniature of pattern MMA keeps its first and last block types; the named override applied
    built = recall.mqar_recipe(str(recipe), 16, recall.parse_args(argv))
    assert built.model.pattern == "MA" and built.model.blocks["A"]["n_heads"] == 1
    capsys.readouterr()
    assert recall.main(argv) == 0   # every run is done: nothing trains again
    assert "tiny-hybrid d_model" not in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    # compare carries the runs into its results, and the report reads them
    res = {"meta": {}, "recipes": {}, "cells": {}}
    attach_mqar(res, out / "results.json")
    assert len(mqar_points(res)) == 4 and all(len(a) == 2 for a in mqar_points(res).values())
    assert "tiny-hybrid" in mqar_table(res) and plot_mqar(res, tmp_path / "mqar.png").is_file()
    # a learning-rate grid: the same runs again at another rate, the earlier rows kept and marked with theirs
    assert all(r["lr"] == 3e-3 for r in runs)
    assert recall.main(argv[:-3] + ["--lr", "3e-3,1e-2", "--seeds", "0"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["d_model"], r["seed"], r["lr"]) for r in runs) == [
        (16, 0, 3e-3), (16, 0, 1e-2), (16, 1, 3e-3), (32, 0, 3e-3), (32, 0, 1e-2), (32, 1, 3e-3)]


def test_mqar_rows_before_the_lr_grid_and_concurrent_sweeps(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": {"lr": 0.01}, "runs": [_run("a", 16, 0, {4: 0.5}) | {"seq_len": 64, "steps": 9}]}))
    assert recall._read_results(path)["runs"][0]["lr"] == 0.01
    # another process added a row since this one read the file: recording keeps both
    mine = _run("b", 16, 0, {4: 0.7}) | {"seq_len": 64, "steps": 9, "lr": 0.001}
    theirs = _run("c", 16, 0, {4: 0.2}) | {"seq_len": 64, "steps": 9, "lr": 0.001}
    recall._record(path, theirs, {"lr": [0.001]})
    recall._record(path, mine, {"lr": [0.001]})
    recall._record(path, mine, {"lr": [0.001]})   # recorded once
    got = json.loads(path.read_text())
    assert [r["recipe"] for r in got["runs"]] == ["a", "c", "b"] and got["meta"] == {"lr": [0.001]}
    assert got["runs"][0]["lr"] == 0.01


def test_miniature_pattern_and_named_overrides():
    assert recall.miniature_pattern("MMMMMMT", 2) == "MT"
    assert recall.miniature_pattern("MS", 2) == "MS" and recall.miniature_pattern("A", 2) == "A"
    assert recall.miniature_pattern("MMM", 2) == "M"
    with pytest.raises(ValueError, match="--layers: 3 is not a multiple"):
        recall.miniature_pattern("MMMT", 3)
    assert recall.split_overrides(["a.b=1", "swa:c.d=2", "x:e=3"], "swa") == ["a.b=1", "c.d=2"]


def test_attach_mqar_refuses_another_file(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"cells": {}}))
    with pytest.raises(ValueError, match="holds no list of runs"):
        attach_mqar({}, bad)
    with pytest.raises(ValueError, match="not a readable results.json"):
        attach_mqar({}, tmp_path / "missing.json")


def _run(recipe, width, seed, accs):
    return {"recipe": recipe, "d_model": width, "seed": seed, "num_kv_pairs": list(accs),
            "by_kv_pairs": {str(k): {"accuracy": a} for k, a in accs.items()}}


def test_mqar_table_and_finding_rank_only_separated_recipes():
    runs = ([_run("ssm", 64, s, {4: a, 16: b}) for s, (a, b) in enumerate([(0.9, 0.5), (0.95, 0.6)])]
            + [_run("attn", 64, s, {4: a, 16: b}) for s, (a, b) in enumerate([(0.3, 0.55), (0.4, 0.7)])]
            + [_run("ssm", 32, 0, {4: 0.5, 16: 0.2})])
    res = {"mqar": {"runs": runs, "meta": {"command": "zoo recall mqar ...", "vocab_size": 64}}}
    table = mqar_table(res)
    assert "| ssm | 64 | **92%** [90, 95] | 55% [50, 60] ≈ |" in table
    assert "| attn | 64 | 35% [30, 40] | **62%** [55, 70] |" in table
    assert "| attn | 32 | - | - |" in table
    finding = mqar_finding(res)
    assert finding.startswith("MQAR at d_model 64")
    assert "4 pairs: ssm 92%, above attn 35%" in finding
    assert "16 pairs: attn 62% (not separated from ssm)" in finding
    # a partial sweep: the widest width only one recipe reached is passed over for the widest two reached
    res["mqar"]["runs"].append(_run("ssm", 128, 0, {4: 1.0, 16: 1.0}))
    assert mqar_finding(res).startswith("MQAR at d_model 64")


def test_mqar_report_keeps_each_recipes_best_learning_rate():
    runs = ([_run("ssm", 64, s, {4: 0.9}) | {"lr": 1e-2} for s in (0, 1)]
            + [_run("ssm", 64, s, {4: 0.2}) | {"lr": 1e-3} for s in (0, 1)]
            + [_run("attn", 64, s, {4: a}) | {"lr": 1e-2} for s, a in ((0, 0.3), (1, 0.1))]
            + [_run("attn", 64, s, {4: a}) | {"lr": 1e-3} for s, a in ((0, 0.6), (1, 0.4))])
    res = {"mqar": {"runs": runs, "meta": {"command": "zoo recall mqar ...", "vocab_size": 64}}}
    assert mqar_points(res) == {("ssm", 64, 4): [0.9, 0.9], ("attn", 64, 4): [0.6, 0.4]}
    table = mqar_table(res)
    assert "| ssm | 64 | 0.01 | **90%** [90, 90] |" in table and "| attn | 64 | 0.001 | 50% [40, 60] |" in table
    from evals.recall_report import mqar_text
    assert "at each learning rate of 0.001, 0.01 (each recipe and width shown at the one that scores best" in \
        mqar_text(res)


def test_passkey_finding_names_the_fine_tune_and_the_best_at_4x():
    def cell(recipe, context, acc, tuned=512):
        return {"recipe": recipe, "eval": "passkey", "scheme": "greedy", "context": context, "accuracy": acc,
                "finetune_len": tuned}
    res = {"cells": {str(i): c for i, c in enumerate([
        cell("a", 512, [1, 1]), cell("a", 2048, [1, 0.5]), cell("a", 8192, [0, 0]),
        cell("b", 1024, [1, 0], 1024), cell("b", 4096, [1, 1], 1024)])}}
    assert passkey_finding(res) == ("Passkey after a fine-tune, accuracy at 1x/4x/16x its length: a (fine-tuned at "
                                    "512) 100%/75%/0%; b (fine-tuned at 1,024) 50%/100%/-; best at 4x: b 100%.")
    for c in res["cells"].values():
        c["accuracy"] = [0, 0]
        c.pop("finetune_len")
    found = passkey_finding(res)
    assert found.startswith("Passkey (no fine-tune), accuracy at 512/1024/2048/4096/8192 tokens")
    assert found.endswith("none retrieves at 8192.")


def test_passkey_finding_says_which_recipes_its_best_is_not_separated_from():
    def cell(recipe, context, acc, n=8):
        return {"recipe": recipe, "eval": "passkey", "scheme": "greedy", "context": context, "accuracy": acc,
                "depths": [0.0, 0.5, 1.0], "n_trials": n, "finetune_len": 1024}
    res = {"cells": {str(i): c for i, c in enumerate([
        cell("ssm", 4096, [0.875, 1.0, 1.0]), cell("hybrid", 4096, [1.0, 1.0, 1.0]), cell("attn", 4096, [0, 0, 0.25])])}}
    # 24 of 24 against 23 of 24: the intervals overlap, so no ranking between the two; 2 of 24 is below both
    assert passkey_finding(res).endswith("best at 4x: hybrid 100% [86, 100] (95% interval over the prompts; not "
                                         "separated from ssm 96% [80, 99]).")
    res["cells"]["0"]["accuracy"] = [0.0, 0.0, 0.125]
    assert passkey_finding(res).endswith("best at 4x: hybrid 100% [86, 100] (95% interval over the prompts).")
    from evals.report import passkey_tables
    res["recipes"] = {n: {"params": {"total": 1000}} for n in ("ssm", "hybrid", "attn")}
    assert "| all [95% interval] | 100% [86, 100] |" in passkey_tables(res)
    res["cells"]["3"] = cell("attn", 1024, [1.0, 1.0, 1.0])
    from evals.report import summary_table
    assert summary_table(res).splitlines()[-1].endswith("| 100% / 8% |")      # each length, not their mean


def test_a_stopped_mqar_run_is_not_recorded(tmp_path, monkeypatch, capsys):
    from zoo.train import trainer as trainer_module
    real = trainer_module.Trainer.train

    def stopped(self):
        result = real(self)
        result.stopped = "SIGTERM"
        return result
    monkeypatch.setattr(trainer_module.Trainer, "train", stopped)
    recipe = tmp_path / "hybrid.yaml"
    OmegaConf.save(OmegaConf.create(TINY_HYBRID), recipe)
    assert recall.main(["mqar", str(recipe), "--widths", "16", "--kv-pairs", "2", "--seeds", "0", "--steps", "2",
                        "--seq-len", "24", "--vocab", "32", "--batch-size", "4", "--out", str(tmp_path / "m")]) == 2
    assert "stopped by SIGTERM at step 2 of 2; the run is not recorded" in capsys.readouterr().err
    assert not (tmp_path / "m" / "results.json").exists() or not json.loads(
        (tmp_path / "m" / "results.json").read_text())["runs"]
