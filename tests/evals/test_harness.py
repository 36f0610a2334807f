"""evals.harness (the `eval` extra): lm-evaluation-harness runs a zoo checkpoint as `--model zoo`, and its rolling
log-likelihood on a task made from a zoo corpus split equals zoo's own perplexity of those documents with
eos_prefix (the same nats: every token, the first given the end-of-document id, in windows of the context);
`zoo lm-eval` runs lm_eval's command and refuses bad input in one line."""
import json
import math

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

import zoo  # noqa: E402
from evals.harness import ZooHarnessLM, corpus_task  # noqa: E402
from evals.perplexity import evaluate_perplexity  # noqa: E402
from tests.helpers import CLI_RECIPE  # noqa: E402
from zoo.data import prepare  # noqa: E402
from zoo.data.memmap import TokenFile  # noqa: E402

LN2 = math.log(2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny model saved as a model directory, and a JSONL corpus of documents of a few hundred bytes."""
    root = tmp_path_factory.mktemp("harness")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "élan", "if", "print(x)", ":\n"]
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(20, 80))))}) + "\n")
    torch.manual_seed(0)
    model = zoo.build_model(zoo.load_recipe(CLI_RECIPE, ["train.seq_len=64"]))
    from zoo.hf import ZooForCausalLM
    ZooForCausalLM.from_zoo(model).save_pretrained(root / "ckpt")   # a model directory, as zoo export writes
    return root


def test_rolling_loglikelihood_equals_zoo_eval_with_eos_prefix(setup):
    name = corpus_task(str(setup / "docs.jsonl"), "test", setup / "tasks", "byte", max_tokens=1500,
                       data_root=setup / "data")
    docs = [json.loads(line)["text"] for line in open(setup / "tasks" / f"{name}.jsonl")]
    assert len(docs) >= 3 and all(d.endswith("\x00") for d in docs[:-1])   # zoo's end-of-document id, as a byte
    lm = ZooHarnessLM(pretrained=str(setup / "ckpt"), max_length=48)    # windows shorter than the documents
    assert lm.max_length == 48 and lm.prefix_token_id == 0
    got = sum(lm.loglikelihood_rolling([_Request(d) for d in docs], disable_tqdm=True))

    model = zoo.load_checkpoint(setup / "ckpt").eval()
    split = TokenFile(prepare(str(setup / "docs.jsonl"), "byte", root=setup / "data") / "test")
    rec = evaluate_perplexity(model, split, contexts=[48], scheme="blocks", max_tokens=1500, eos_prefix=True)[0]
    want = -sum(rec["per_document"]["nats"])
    assert rec["documents"] == len(docs) and rec["tokens_scored"] == sum(len(d.encode()) for d in docs)
    assert got == pytest.approx(want, rel=1e-5)
    plain = evaluate_perplexity(model, split, contexts=[48], scheme="blocks", max_tokens=1500)[0]
    assert plain["tokens_scored"] == rec["tokens_scored"] - len(docs)   # without the prefix: first tokens unscored


class _Request:
    def __init__(self, text):
        self.args = (text,)


def test_zoo_is_a_registered_lm_eval_model():
    from lm_eval.api.registry import get_model
    assert get_model("zoo") is ZooHarnessLM


def test_zoo_lm_eval_runs_lm_evals_command_on_a_corpus_task(setup, tmp_path, capsys, monkeypatch):
    from evals.commands import harness
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert harness.main([str(setup / "ckpt"), "--corpus-task", f"{setup / 'docs.jsonl'}:val", "--max-tokens", "400",
                         "--output_path", str(out), "--model_args", "max_length=32"]) == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    (task, metrics), = results["results"].items()
    assert task.startswith("zoo_") and metrics["bits_per_byte,none"] > 0
    # one of RULER's tasks in lm_eval's own implementation, offline, sized with the model's tokenizer
    assert harness.main([str(setup / "ckpt"), "--tasks", "niah_single_1", "--metadata", '{"max_seq_lengths": [512]}',
                         "--limit", "1", "--output_path", str(tmp_path / "ruler"), "--model_args", "max_length=640"]) == 0
    ruler = json.loads(next((tmp_path / "ruler").rglob("results_*.json")).read_text())["results"]["niah_single_1"]
    assert 0 <= ruler["512,none"] <= 1
    assert harness.main([str(setup / "ckpt"), "--tasks", "nosuchtask"]) == 2
    assert "error: --tasks: Tasks not found: nosuchtask" in capsys.readouterr().err
    assert harness.main(["missing-dir", "--tasks", "x"]) == 2
    assert "error: checkpoint" in capsys.readouterr().err
    assert harness.main([str(setup / "ckpt"), "--corpus-task", "stdlib"]) == 2
    assert "--corpus-task: 'stdlib'; expected CORPUS:SPLIT" in capsys.readouterr().err
