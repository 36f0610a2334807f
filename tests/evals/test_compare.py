"""zoo compare (evals/commands/compare.py) end to end on tiny recipes and a tiny corpus: results.json with units, report.md,
the PNGs; a second run skips every cell and trains nothing; --match-params lands within 2%."""
import json
from pathlib import Path

import pytest
import yaml


from evals.commands import compare
from evals.options import count

TINY = {"d_model": 32, "n_layers": 2, "vocab_size": 256, "ffn": {"type": "swiglu", "mult": 2}}
BLOCKS = {"tiny-attn": {"pattern": "A", "blocks": {"A": {"type": "attn", "n_heads": 2}}},
          "tiny-swa": {"pattern": "S", "blocks": {"S": {"type": "swa", "n_heads": 2, "window": 16}}}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(24):
        text = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12 + i))
        (corpus / f"mod{i:02d}.py").write_text(text)
    paths = []
    for name, model in BLOCKS.items():
        spec = {"name": name, "model": {**TINY, **model},
                "train": {"seq_len": 32, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_batches": 1,
                          "corpus": str(corpus)}}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        paths.append(str(path))
    return root, paths


def args(root, paths, *extra):
    return [*paths, "--out", str(root / "out"), "--data-root", str(root / "data"), "--budget", "512",
            "--contexts", "16,32", "--max-tokens", "128", "--memory", "decode", "--memory-contexts", "32",
            "--decode-tokens", "4", "--repeats", "1", "--passkey-lengths", "256", "--passkey-depths", "0,1",
            "--passkey-trials", "2", "--no-progress", *extra]


def summary(capsys) -> dict:
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("summary: ")][-1]
    return json.loads(line[len("summary: "):])


@pytest.mark.slow
def test_end_to_end_then_resume(setup, capsys):
    root, paths = setup
    assert compare.main(args(root, paths)) == 0
    first = summary(capsys)
    out = root / "out"
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    # per recipe: train, ppl 2 blocks + 2 sliding + streaming, extrapolation, memory 1, throughput 3 x 2, passkey 1
    per_recipe = 1 + 5 + 1 + 1 + 6 + 1
    assert first["cells_run"] == 2 * per_recipe + 1 and first["cells_skipped"] == 0
    assert len([k for k in cells if not k.startswith("-|")]) == 2 * per_recipe
    assert {c["scheme"] for c in cells.values() if c["eval"] == "compression"} == {"gzip-9", "xz-9"}
    for c in cells.values():
        assert c["units"], c
        if c["recipe"] != "-":
            assert c["device"] == "cpu" and c["world_size"] == 1 and c["params"] > 0 and c["torch"]
            assert c["kernels"]["ssd"] == "torch" and set(c["kernels"]) >= {"selective_attention", "infini"}
    mem = cells["tiny-attn|memory|decode|32"]
    assert mem["status"] == "ok" and mem["peak_bytes"] > 0 and mem["result"]["state_bytes"] > 0
    train = cells["tiny-swa|train|budget|32"]
    assert train["tokens"] == 512 and train["steps"] == 4 and Path(train["checkpoint"]).is_dir()
    assert 0 < cells["tiny-attn|ppl|streaming|doc"]["bits_per_byte"] < 20
    lo, hi = cells["tiny-attn|ppl|blocks|32"]["bits_per_byte_ci"]
    assert lo <= cells["tiny-attn|ppl|blocks|32"]["bits_per_byte"] <= hi
    extra = cells["tiny-swa|extrapolation|streaming|512"]   # 16 x train.seq_len 32
    assert extra["train_len"] == 32 and (extra["verdict"] is None) == (extra["documents"] == 0)
    assert len(cells["tiny-attn|throughput|decode|16"]["cpu_seconds"]) == 1
    assert all(0 <= a <= 1 for a in cells["tiny-swa|passkey|greedy|256"]["accuracy"])
    report = (out / "report.md").read_text()
    assert "tiny-attn" in report and "## Summary" in report and report.startswith("# Comparison report\n\n## Findings")
    for png in ("perplexity.png", "memory.png", "throughput.png", "passkey.png"):
        assert (out / png).stat().st_size > 1000, png
    assert results["meta"]["world_size"] == 1 and results["meta"]["torch"]

    before = (out / "results.json").read_text()
    mtime = (Path(train["checkpoint"]) / "model.safetensors").stat().st_mtime_ns \
        if (Path(train["checkpoint"]) / "model.safetensors").exists() else None
    assert compare.main(args(root, paths)) == 0
    second = summary(capsys)
    assert second["cells_run"] == 0 and second["cells_skipped"] == 2 * per_recipe
    after = json.loads((out / "results.json").read_text())
    assert after["cells"] == json.loads(before)["cells"]  # nothing was measured again
    if mtime is not None:
        assert (Path(train["checkpoint"]) / "model.safetensors").stat().st_mtime_ns == mtime


def test_bad_recipe_is_a_clear_error(setup, capsys):
    root, _ = setup
    assert compare.main(["no-such-recipe", "--out", str(root / "bad"), "--no-progress"]) == 2
    assert "no-such-recipe" in capsys.readouterr().err


def test_overrides_for_one_recipe_by_name(setup, capsys):
    """`--set NAME:KEY=VALUE` reaches recipe NAME only (resolve, shared by compare, pretrain and the probe); a NAME
    that is none of the command's recipes is refused before anything runs, naming it."""
    from evals.runs import resolve
    sets = ["swa:model.blocks.A.window=64", "model.n_layers=3", "train.corpus=a:b"]
    swa, transformer = resolve("swa", sets)[0], resolve("transformer", sets)[0]
    assert swa.to_dict()["model"]["blocks"]["A"]["window"] == 64
    assert swa.model.n_layers == transformer.model.n_layers == 3 and transformer.train.corpus == "a:b"
    assert "window" not in transformer.to_dict()["model"]["blocks"]["A"]
    root, _ = setup
    assert compare.main(["transformer", "--out", str(root / "typo"), "--no-progress",
                         "--set", "swq:model.blocks.A.window=64"]) == 2
    assert "--set: swq: names no recipe of this command (recipes: transformer)" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--history-cut-stride", "0"], ["--history-cut", "64", "--history-cut-stride", "65"]])
def test_the_cut_stride_is_checked(flag, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["transformer", *flag])
    assert "--history-cut-stride" in capsys.readouterr().err


def test_count_parses_suffixes():
    assert count("300K") == 300_000 and count("1.5M") == 1_500_000 and count("7") == 7


@pytest.mark.parametrize("flag", [["--extrapolation-factor", "1"], ["--max-doc-tokens", "1"], ["--resamples", "0"]])
def test_issue16_flags_are_checked(flag, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["transformer", *flag])
    assert flag[0] in capsys.readouterr().err
    defaults = compare.parse_args(["transformer"])
    assert (defaults.max_doc_tokens, defaults.resamples, defaults.extrapolation_factor,
            defaults.extrapolation_docs) == (None, 1000, 16, 16)


@pytest.mark.slow
def test_passkey_from_fine_tunes_and_mqar_results(setup, capsys, tmp_path):
    """--passkey-from: the passkey cells of a recipe with a fine-tune are answered by it (and say so), a recipe
    without one has none, and cells answered by other weights are dropped; --mqar-results: the sweep's runs
    go into results.json and the report."""
    import shutil
    root, paths = setup
    out = tmp_path / "out"
    quick = ["--out", str(out), "--schemes", "blocks", "--extrapolation-factor", "0", "--memory", "",
             "--throughput", ""]
    assert compare.main(args(root, paths) + quick) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["cells"]["tiny-attn|passkey|greedy|256"].get("checkpoint") is None   # the LM itself answered
    # a "fine-tune" of tiny-attn: its trained checkpoint under a card, as `zoo recall passkey` ships one
    tuned = tmp_path / "passkey" / "tiny-attn"
    shutil.copytree(Path(results["cells"]["tiny-attn|train|budget|32"]["checkpoint"]),
                    tuned / "checkpoints" / "step-00000004")
    (tuned / "card.json").write_text(json.dumps({"seq_len": 280, "steps": 4}))
    sweep = tmp_path / "mqar.json"
    sweep.write_text(json.dumps({"meta": {"command": "zoo recall mqar x", "vocab_size": 64}, "runs": [
        {"recipe": r, "d_model": 32, "seed": s, "num_kv_pairs": [4], "by_kv_pairs": {"4": {"accuracy": a}}}
        for r, s, a in [("tiny-attn", 0, 0.5), ("tiny-attn", 1, 0.6), ("tiny-swa", 0, 0.1), ("tiny-swa", 1, 0.2)]]}))
    capsys.readouterr()
    assert compare.main(args(root, paths) + quick + ["--passkey-from", str(tmp_path / "passkey"),
                                                     "--mqar-results", str(sweep)]) == 0
    results = json.loads((out / "results.json").read_text())
    pk = [c for c in results["cells"].values() if c["eval"] == "passkey"]
    assert [c["recipe"] for c in pk] == ["tiny-attn"]
    assert pk[0]["finetune_len"] == 280 and pk[0]["checkpoint"].endswith("step-00000004")
    assert len(results["mqar"]["runs"]) == 4 and results["mqar"]["source"] == str(sweep)
    report = (out / "report.md").read_text()
    assert "## Multi-query associative recall (MQAR)" in report and "The passkey fine-tunes" in report
    assert "MQAR at d_model 32" in report and "tiny-attn (fine-tuned at 280)" in report
    assert (out / "mqar.png").stat().st_size > 1000
    assert compare.main(args(root, paths) + quick + ["--passkey-from", str(tmp_path / "nowhere")]) == 2
    assert "--passkey-from:" in capsys.readouterr().err


def test_context_use_on_a_named_corpus(setup, capsys, tmp_path):
    """--eval-corpora: segments of the shakespeare corpus streamed against a history cut, the copy probe and
    gzip on the same segments, synthetic copy; their report section and findings; another cut reruns them."""
    root, paths = setup
    out = tmp_path / "out"
    quick = ["--out", str(out), "--schemes", "blocks", "--extrapolation-factor", "0", "--memory", "",
             "--throughput", "", "--no-passkey", "--eval-corpora", "shakespeare", "--context-length", "128",
             "--history-cut", "32", "--context-segments", "3", "--copy-lengths", "20", "--copy-trials", "2"]
    assert compare.main(args(root, paths) + quick) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    use = cells["tiny-swa|context_use|shakespeare|128"]
    assert use["corpus"] == "shakespeare" and use["documents"] == 3 and use["history_cut"] == 32
    assert use["source_documents"] == 3 and use["verdict"] in ("keeps falling", "flat", "breaks")
    assert use["compression"]["bytes"] == 3 * 128 and {"first_occurrence", "buckets", "span"} <= set(use["copy"])
    assert cells["tiny-attn|copy|synthetic|20"]["trials"] == 2
    report = (out / "report.md").read_text()
    assert "History past 32 tokens on shakespeare (3 segments of 128 tokens" in report and "Synthetic copy" in report
    assert (out / "context_use.png").stat().st_size > 1000
    capsys.readouterr()
    assert compare.main(args(root, paths) + quick[:-8] + ["--history-cut", "64", "--context-segments", "3"]) == 0
    again = summary(capsys)
    assert again["cells_run"] == 2   # the two context_use cells, measured against another cut
    # two readings: the one just measured is kept, the second (another length, cut and stride) runs beside it
    two = ["--context-length", "128,64", "--history-cut", "64,16", "--history-cut-stride", "32,4",
           "--context-segments", "3"]
    assert compare.main(args(root, paths) + quick[:-10] + two) == 0
    assert summary(capsys)["cells_run"] == 2
    cells = json.loads((out / "results.json").read_text())["cells"]
    short = cells["tiny-swa|context_use|shakespeare|64"]
    assert (short["history_cut"], short["cut_stride"], short["length"]) == (16, 4, 64)
    assert cells["tiny-swa|context_use|shakespeare|128"]["history_cut"] == 64
    report = (out / "report.md").read_text()
    assert "History past 16 tokens on shakespeare (3 segments of 64 tokens" in report
    assert "History past 64 tokens on shakespeare (3 segments of 128 tokens" in report
    # back to one reading: the other's cells are dropped, not reported beside it
    assert compare.main(args(root, paths) + quick[:-10] + two[:1] + ["64", "--history-cut", "16",
                                                                     "--history-cut-stride", "4"]) == 0
    assert summary(capsys)["cells_run"] == 0
    assert not [k for k in json.loads((out / "results.json").read_text())["cells"] if k.endswith("|128")]


def test_a_history_cut_the_default_segments_do_not_fit_is_refused_first(setup, capsys, tmp_path):
    root, paths = setup
    argv = args(root, paths) + ["--out", str(tmp_path / "out"), "--eval-corpora", "shakespeare", "--history-cut", "48"]
    assert compare.main(argv) == 2
    assert "--context-length: 128 must be a multiple of --history-cut 48, at least twice it (recipe tiny-attn" in \
        capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()   # nothing trained
    # two readings with one length (the default, 4 x train.seq_len) would share their cells
    assert compare.main(argv[:-2] + ["--history-cut", "16,32"]) == 2
    assert "--context-length: each reading needs a length of its own (its cells are keyed by it); 128 twice for " \
        "recipe tiny-attn" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("flag,message", [
    (["--eval-corpora", "books"], "--eval-corpora: unknown corpus 'books'; allowed: stdlib, shakespeare"),
    (["--context-length", "100", "--history-cut", "64"], "--context-length: a multiple of --history-cut"),
    (["--history-cut", "2"], "--history-cut: at least 4 tokens, got 2"),
    (["--context-length", "128,64", "--history-cut", "32,16,8"], "--context-length: 2 values for 3 readings"),
    (["--context-length", "128,64", "--history-cut", "32,64"], "(got 64 and 64)"),
    (["--history-cut", "32,64", "--history-cut-stride", "48"],
     "--history-cut-stride: 48 must be in [1, --history-cut]"),
    (["--copy-lengths", "8"], "--copy-lengths: each must exceed the 8 tokens")])
def test_context_use_flags_are_checked(flag, message, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["tiny", *flag])
    assert message in capsys.readouterr().err


def test_a_reused_out_is_this_comparison_or_refused(setup, capsys, tmp_path):
    """--out that holds a comparison of other recipes or sizes is refused (it used to run 0 cells and report the
    old numbers beside the new sizes), --overwrite moves it aside, and a second comparison running into the same
    --out is kept out by the lock."""
    from zoo.train.run_dir import RunLock
    root, paths = setup
    out = tmp_path / "out"
    quick = ["--out", str(out), "--schemes", "blocks", "--contexts", "16", "--extrapolation-factor", "0",
             "--memory", "", "--throughput", "", "--no-passkey"]
    assert compare.main(args(root, paths) + quick) == 0
    capsys.readouterr()
    assert compare.main(args(root, paths[:1]) + quick) == 2
    assert "holds a comparison of other recipes or settings (tiny-swa: not in this comparison)" in capsys.readouterr().err
    assert compare.main(args(root, paths) + quick + ["--set", "model.d_model=48"]) == 2
    err = capsys.readouterr().err
    assert "(tiny-attn: recipe.model.d_model was 32, now 48); rerun the same comparison to resume it" in err
    assert compare.main(args(root, paths[:1]) + quick + ["--overwrite"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["recipes"]) == ["tiny-attn"] and len(list(out.glob("replaced-*/results.json"))) == 1
    capsys.readouterr()
    held = RunLock(out, name="compare.lock")
    try:
        assert compare.main(args(root, paths[:1]) + quick) == 2
        assert "is in use by" in capsys.readouterr().err
    finally:
        held.release()


def test_recipe_names_are_found_in_the_working_directory_or_zoo_recipes(tmp_path, monkeypatch):
    """No path from the package's location: names resolve in ./recipes (where the README's commands run) or in the
    directory ZOO_RECIPES names; a miss lists what both hold."""
    from evals.runs import resolve
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tiny.yaml").write_text(yaml.safe_dump({"name": "tiny", "model": {**TINY, **BLOCKS["tiny-attn"]}}))
    monkeypatch.chdir(tmp_path)   # no recipes/ here
    with pytest.raises(ValueError, match=r"recipes: 'transformer' is not a recipe file, a run directory or a recipe "
                                         r"name in .*recipes \(known: none; ZOO_RECIPES names"):
        resolve("transformer", [])
    monkeypatch.setenv("ZOO_RECIPES", str(mine))
    recipe, ckpt = resolve("tiny", ["model.n_layers=3"])
    assert recipe.name == "tiny" and recipe.model.n_layers == 3 and ckpt is None
    with pytest.raises(ValueError, match=r"known: tiny;"):
        resolve("tiny2", [])


def test_a_given_checkpoint_under_settings_without_weights(tmp_path):
    """`--set NAME:KEY=VALUE` reaches a given checkpoint of recipe NAME (unprefixed overrides never do): its weights
    are evaluated with layers re-typed as sliding-window attention, the log names the change, and a change the
    weights do not fit is refused naming the field."""
    from argparse import Namespace

    import torch
    import zoo
    from evals.runs import RecipeRun, resolve
    from zoo.train.checkpoint import CheckpointError, save_checkpoint
    torch.manual_seed(0)
    recipe = zoo.load_recipe("recipes/transformer.yaml", ["model.d_model=32", "model.n_layers=2"])
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, zoo.build_model(recipe).state_dict(), recipe)
    same, ckpt = resolve(str(tmp_path / "run"), ["model.n_layers=3"])
    assert same.model.n_layers == 2
    local, _ = resolve(str(tmp_path / "run"), [f"transformer:{s}" for s in (
        "model.pattern=SA", "model.blocks.S.type=swa", "model.blocks.S.n_heads=4", "model.blocks.S.window=8")])
    said = []
    run = RecipeRun(local, ckpt, Namespace(device="cpu"), tmp_path / "out", said.append)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        a, b = run.model()(ids).logits, zoo.load_checkpoint(ckpt)(ids).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert (a[:, 8:] - b[:, 8:]).abs().amax() > 1e-4
    assert said == [f"transformer: {ckpt} evaluated with model.pattern: 'A' -> 'SA', "
                    "model.blocks.S: added (type 'swa')"]
    wider, _ = resolve(str(tmp_path / "run"), ["transformer:model.d_model=48"])
    with pytest.raises(CheckpointError, match="model.d_model differs: checkpoint 32 vs recipe 48"):
        RecipeRun(wider, ckpt, Namespace(device="cpu"), tmp_path / "out", said.append).model()
