"""evals.induction's bookkeeping: the rows hold one copy at a variable distance from each alphabet, the copy loss reads
exactly the copy's tokens (a model that predicts them perfectly scores 0, one that predicts the rest perfectly does
not), and bad settings name themselves."""
import numpy as np
import pytest
import torch

import zoo
from evals.induction import copy_curve, copy_loss, copy_rows, shared_share, start_head_bias


@pytest.mark.parametrize("alphabet,vocab,allowed", [("bytes", 256, set(range(33, 127))), ("ids", 64, set(range(64))),
                                                    ("letters", 256, set(range(97, 123)) | {32})])
def test_rows_hold_one_copy_at_a_variable_distance(alphabet, vocab, allowed):
    ids, starts = copy_rows(64, 96, 16, (20, 40), alphabet, vocab, np.random.default_rng(0))
    assert ids.shape == (64, 96) and set(ids.unique().tolist()) <= allowed
    distances = set()
    assert starts.shape == (64, 1)
    for row, (start,) in zip(ids, starts.tolist()):
        copy = row[start:start + 16]
        found = [d for d in range(20, 41) if start - d >= 0 and torch.equal(row[start - d:start - d + 16], copy)]
        assert found, "the copy's source is not 20-40 tokens before it"
        distances.add(found[0])
    assert len(distances) > 10   # not one fixed offset


@pytest.mark.parametrize("alphabet,vocab,allowed", [("bytes", 256, set(range(33, 33 + 20))), ("ids", 256, set(range(20)))])
def test_symbols_limit_the_alphabet_not_the_vocabulary(alphabet, vocab, allowed):
    ids, _ = copy_rows(64, 96, 16, (20, 40), alphabet, vocab, np.random.default_rng(0), symbols=20)
    assert set(ids.unique().tolist()) == allowed


def test_rows_hold_several_disjoint_copies():
    ids, starts = copy_rows(32, 200, 10, (15, 120), "ids", 256, np.random.default_rng(2), copies=5)
    assert starts.shape == (32, 5)
    for row, row_starts in zip(ids, starts.tolist()):
        cover = torch.zeros(200, dtype=torch.int)
        for start in row_starts:
            found = [d for d in range(15, 121) if start - d >= 0 and torch.equal(row[start - d:start - d + 10],
                                                                                  row[start:start + 10])]
            assert found, "a copy's source is not 15-120 tokens before it"
            cover[start:start + 10] += 1
            cover[start - found[-1]:start - found[-1] + 10] += 1   # the farthest match: random ids rarely repeat
        assert cover.max() == 1   # sources and copies never overlap (a later copy cannot overwrite a source)
    with pytest.raises(ValueError, match=r"copies: no room for another span of 10 copied 15-16 back"):
        copy_rows(1, 40, 10, (15, 16), "ids", 256, np.random.default_rng(0), copies=2)


def test_copy_loss_reads_exactly_the_copied_tokens():
    ids, starts = copy_rows(4, 64, 12, (16, 30), "ids", 50, np.random.default_rng(1))
    perfect_on_copy = torch.full((4, 64, 50), -30.0)
    perfect_elsewhere = torch.full((4, 64, 50), -30.0)
    for r in range(4):
        for t in range(63):   # position t predicts token t + 1
            on_copy = starts[r, 0] + 3 <= t + 1 < starts[r, 0] + 12
            (perfect_on_copy if on_copy else perfect_elsewhere)[r, t, ids[r, t + 1]] = 30.0
    assert copy_loss(perfect_on_copy, ids, starts, 12, skip=3) < 1e-6
    assert copy_loss(perfect_elsewhere, ids, starts, 12, skip=3) > 3.0


def test_curve_and_errors():
    torch.manual_seed(0)
    model = zoo.build_model({"name": "t", "model": {"d_model": 16, "n_layers": 1, "vocab_size": 32, "pattern": "A",
                                                    "blocks": {"A": {"type": "attn", "n_heads": 2}}},
                             "train": {"seq_len": 64}})
    curve = copy_curve(model, 4, length=64, span=8, distance=(10, 20), alphabet="ids", batch=2, every=2, skip=2)
    assert [p["step"] for p in curve] == [0, 2, 4] and curve[-1]["copy_nats"] < curve[0]["copy_nats"] + 1
    with pytest.raises(ValueError, match=r"alphabet: 'bytes' needs a byte vocabulary \(256\), the model has 32"):
        copy_curve(model, 1, length=64, span=8, distance=(10, 20), alphabet="bytes", skip=2)
    with pytest.raises(ValueError, match=r"distance: \[10, 60\] must be .* span 8 \+ high <= length 64"):
        copy_curve(model, 1, length=64, span=8, distance=(10, 60), alphabet="ids", skip=2)
    with pytest.raises(ValueError, match=r"symbols: 33; allowed: 2 to 32 with the ids alphabet"):
        copy_curve(model, 1, length=64, span=8, distance=(10, 20), alphabet="ids", skip=2, symbols=33)
    with pytest.raises(ValueError, match=r"symbols: 8; .* \(only bytes and ids take symbols\)"):
        copy_curve(zoo.build_model({"name": "b", "model": {"d_model": 16, "n_layers": 1, "pattern": "A", "blocks": {
            "A": {"type": "attn", "n_heads": 2}}}, "train": {"seq_len": 64}}), 1, length=64, span=8, distance=(10, 20),
            alphabet="letters", skip=2, symbols=8)
    with pytest.raises(ValueError, match=r"copies: 5; allowed: 1 to 4 \(a source and a copy of span 8 each"):
        copy_curve(model, 1, length=64, span=8, distance=(10, 20), alphabet="ids", skip=2, copies=5)
    with pytest.raises(ValueError, match=r"skip: 8 must be in \[0, span 8\)"):
        copy_curve(model, 1, length=64, span=8, distance=(10, 20), alphabet="ids")


def test_head_bias_starts_at_the_rows_alphabet():
    model = zoo.build_model({"name": "hb", "model": {"d_model": 16, "n_layers": 1, "head_bias": True, "pattern": "A",
                                                     "blocks": {"A": {"type": "attn", "n_heads": 2}}},
                             "train": {"seq_len": 64}})
    start_head_bias(model, 64, 8, (10, 20), "bytes", symbols=20)
    p = torch.softmax(model.lm_head.bias, 0)
    drawn = p[33:53]   # the 20 drawn bytes, about uniform; the 236 others each once in 256 rows of 64 (add-one)
    assert drawn.max() / drawn.min() < 1.3 and torch.allclose(p[53:], torch.tensor(1 / (256 * 64 + 256)))


def test_shared_share_reads_one_direction_shared_by_every_position():
    torch.manual_seed(0)
    model = zoo.build_model({"name": "s", "model": {"d_model": 16, "n_layers": 2, "vocab_size": 32, "pattern": "A",
                                                    "blocks": {"A": {"type": "attn", "n_heads": 2}}},
                             "train": {"seq_len": 64}}).double()
    ids = torch.randint(0, 32, (4, 20))
    random = shared_share(model, ids)
    assert len(random) == 2 and all(s < 0.3 for s in random)
    with torch.no_grad():   # one vector in every embedding row: every position starts the same
        model.embed.weight.copy_(torch.randn(16, dtype=torch.float64).expand(32, 16))
    assert shared_share(model, ids)[0] > 0.9
    curve = copy_curve(model, 2, length=64, span=8, distance=(10, 20), alphabet="ids", batch=2, every=2, skip=2,
                       shared=True)
    assert [len(p["shared"]) for p in curve] == [2, 2]


def test_out_ships_a_start_for_pretraining(tmp_path, capsys):
    import json

    from evals.induction import main
    from tests.helpers import ToyData
    from zoo.train.trainer import Trainer
    recipe = tmp_path / "probe.yaml"
    recipe.write_text("name: probe\nmodel: {d_model: 16, n_layers: 1, vocab_size: 64, head_bias: true, pattern: A,\n"
                      "        blocks: {A: {type: attn, n_heads: 2}}}\ntrain: {seq_len: 16, batch_size: 2}\n")
    main(["--recipe", str(recipe), "--alphabet", "ids", "--length", "48", "--span", "12", "--distance", "10,20",
          "--steps", "3", "--every", "3", "--batch", "2", "--out", str(tmp_path / "copy")])
    card = json.loads((tmp_path / "copy" / "probe" / "card.json").read_text())
    assert card["tokens"] == 3 * 2 * 48 and card["steps"] == 3 and card["cpu_seconds"] >= 0
    assert card["command"].startswith("python -m evals.induction --recipe") and len(card["copy_curve"]) == 2
    shipped = zoo.load_checkpoint(tmp_path / "copy" / "probe" / card["checkpoint"])
    trainer = Trainer(shipped.recipe, ToyData(), tmp_path / "run", device="cpu", progress=False, log=lambda s: None,
                      init_from=str(tmp_path / "copy" / "probe"))
    for (name, a), b in zip(shipped.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), name   # the head's bias too: init_from wins over the trainer's unigram start


def test_main_refuses_bad_settings_before_building(tmp_path, capsys):
    from evals.induction import main
    base = ["--set", "model.d_model=16", "model.n_layers=1", "model.head_bias=true", "--steps", "1"]
    with pytest.raises(SystemExit):   # with a head bias the start would count ids past the vocabulary first
        main([*base, "--alphabet", "ids", "--symbols", "999"])
    assert "error: symbols: 999; allowed: 2 to 256 with the ids alphabet" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "file")])
    assert f"error: --out: cannot write {tmp_path / 'file'}" in capsys.readouterr().err


def test_init_from_continues_a_shipped_stage(tmp_path, capsys):
    import json

    from evals.induction import main, start_from
    recipe = tmp_path / "probe.yaml"
    recipe.write_text("name: probe\nmodel: {d_model: 16, n_layers: 1, vocab_size: 64, head_bias: true, pattern: A,\n"
                      "        blocks: {A: {type: attn, n_heads: 2}}}\ntrain: {seq_len: 16, batch_size: 2}\n")
    task = ["--recipe", str(recipe), "--alphabet", "ids", "--span", "12", "--every", "3", "--batch", "2"]
    main([*task, "--length", "48", "--distance", "10,20", "--steps", "3", "--out", str(tmp_path / "one")])
    first = zoo.load_checkpoint(tmp_path / "one" / "probe")
    model = zoo.build_model(first.recipe)
    start_from(model, tmp_path / "one" / "probe")
    for (name, a), b in zip(first.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name   # the trained head bias too, not a fresh unigram start
    # a second stage at a longer range ships its own card, naming where it started
    main([*task, "--length", "96", "--distance", "40,80", "--steps", "3", "--init-from", str(tmp_path / "one"),
          "--out", str(tmp_path / "two")])
    card = json.loads((tmp_path / "two" / "probe" / "card.json").read_text())
    assert card["init_from"] == str(tmp_path / "one") and card["seq_len"] == 96
    assert not torch.equal(zoo.load_checkpoint(tmp_path / "two" / "probe").lm_head.weight, first.lm_head.weight)
    capsys.readouterr()
    with pytest.raises(SystemExit):   # another model: refused before training, naming the field that differs
        main([*task, "--length", "48", "--distance", "10,20", "--steps", "1", "--set", "model.d_model=32",
              "--init-from", str(tmp_path / "one")])
    assert "error: --init-from:" in (err := capsys.readouterr().err) and "model.d_model differs" in err
    with pytest.raises(SystemExit):
        main([*task, "--length", "48", "--distance", "10,20", "--steps", "1", "--init-from", str(tmp_path / "none")])
    assert f"error: --init-from: no shipped checkpoint {tmp_path / 'none' / 'probe'}" in capsys.readouterr().err
    # DIR may be one shipped model of another recipe whose weights fit (a copy stage's induction head, re-typed)
    other = tmp_path / "other.yaml"
    nope = recipe.read_text().replace("{type: attn, n_heads: 2}", "{type: attn, n_heads: 2, rope_base: null}")
    other.write_text(nope.replace("name: probe", "name: other"))
    main(["--recipe", str(other), *task[2:], "--length", "48", "--distance", "10,20", "--steps", "1",
          "--init-from", str(tmp_path / "one" / "probe"), "--out", str(tmp_path / "three")])
    assert json.loads((tmp_path / "three" / "other" / "card.json").read_text())["init_from"] == \
        str(tmp_path / "one" / "probe")


def test_warmup_scales_the_first_steps():
    def first_step_change(warmup):
        torch.manual_seed(0)
        model = zoo.build_model({"name": "t", "model": {"d_model": 16, "n_layers": 1, "vocab_size": 32, "pattern": "A",
                                                        "blocks": {"A": {"type": "attn", "n_heads": 2}}},
                                 "train": {"seq_len": 64}})
        before = model.embed.weight.detach().clone()
        copy_curve(model, 1, length=64, span=8, distance=(10, 20), alphabet="ids", batch=2, every=1, skip=2,
                   lr=1e-2, warmup=warmup)
        return (model.embed.weight - before).abs().max().item()
    # AdamW's first step moves each weight by about lr; with 9 warm-up steps the first runs at lr / 10
    assert first_step_change(9) == pytest.approx(first_step_change(0) / 10, rel=0.05)
