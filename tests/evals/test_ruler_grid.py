"""evals.ruler: a model that reads each prompt and answers as a perfect reader would (the answers derived by
tests/data/test_ruler.py's solver from the prompt text alone) scores 100% on every task through the cached greedy
decoding; one that leaves out an answer scores the fraction RULER gives; the command writes results.json, skips
what it holds, refuses lengths below a task's minimum in one line; compare's report carries the table."""
import json

import pytest
import torch
import torch.nn as nn

from evals.commands import recall
from evals.report import write_report
from evals.results import attach_ruler
from evals.ruler import ruler_finding, ruler_grid, ruler_table
from tests.data.test_ruler import solve
from zoo.data.ruler import TASKS
from zoo.data.tokenizer import ByteTokenizer
from zoo.model import ZooOutput


class Reader(nn.Module):
    """Reads its prompt (prefilled in chunks), solves the task from all the text read at each chunk (`drop` answers
    left out), and puts all logit mass on " " + the answers, one token a step through its cache."""

    def __init__(self, task, drop: int = 0):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.task, self.drop = task, drop

    def init_cache(self, batch_size):
        return {"seen": [], "target": None}

    def forward(self, input_ids, labels=None, cache=None):
        tok = ByteTokenizer()
        cache["seen"] += input_ids[0].tolist()
        if cache["target"] is None or input_ids.shape[1] > 1:   # a prefill chunk: solve again from all read so far
            try:
                answers = solve(self.task, tok.decode(cache["seen"]))[self.drop:]
                cache["target"] = cache["seen"] + tok.encode(" " + ", ".join(answers) + "\n" * 200)
            except (AttributeError, IndexError):   # the question is not in yet: a chunk of the prefill
                pass
        logits = torch.zeros(1, input_ids.shape[1], 256)
        if cache["target"] is not None:
            logits[0, -1, cache["target"][len(cache["seen"])]] = 10.0
        return ZooOutput(logits=logits, cache=cache)


@pytest.mark.parametrize("task", list(TASKS))
def test_a_perfect_reader_scores_everything(task):
    cells = ruler_grid(Reader(task), [task], [2048], n_trials=2, seed=4)
    assert [(c["task"], c["length"], c["score"]) for c in cells] == [(task, 2048, 1.0)]
    assert cells[0]["hits"] == cells[0]["refs"] and cells[0]["interval"][1] == 1.0


def test_a_reader_missing_one_answer_scores_ruler_fraction():
    cell = ruler_grid(Reader("vt", drop=1), ["vt"], [1024], n_trials=3)[0]
    assert (cell["hits"], cell["refs"]) == (12, 15) and cell["score"] == pytest.approx(0.8)


def test_recall_ruler_command_report_and_errors(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setattr(recall, "ruler_grid", lambda model, tasks, lengths, n, seed, tok: [
        {"task": t, "length": n_, "trials": n, "hits": 1, "refs": 2, "score": 0.5, "interval": [0.1, 0.9],
         "example": None} for t in tasks for n_ in lengths])
    argv = ["ruler", "mamba2", "--from", "pretrained", "--tasks", "niah_single,vt", "--factors", "2,4",
            "--trials", "2", "--out", str(runs)]
    assert recall.main(argv) == 0
    saved = json.loads((runs / "results.json").read_text())
    assert [(c["task"], c["length"]) for c in saved["runs"][0]["cells"]] == [
        ("niah_single", 512), ("niah_single", 1024), ("vt", 512), ("vt", 1024)]
    assert recall.main(argv) == 0 and "done already" in capsys.readouterr().out
    results = {}
    attach_ruler(results, runs / "results.json")
    assert "| mamba2 | vt | 50% [10, 90] | 50% [10, 90] |" in ruler_table(results)
    assert ruler_finding(results).startswith("RULER (all tasks pooled) at 512/1,024 tokens: mamba2 50%/50%")
    report, pngs = write_report({"meta": {}, **results}, tmp_path / "report")
    assert "## RULER's synthetic tasks" in report.read_text() and "ruler.png" in [p.name for p in pngs]
    assert recall.main(["ruler", "mamba2", "--from", "pretrained", "--tasks", "cwe", "--factors", "1",
                        "--out", str(runs)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --lengths / --factors: length: 256 tokens is too short "
                                                       "for cwe")
    with pytest.raises(SystemExit):
        recall.main(["ruler", "mamba2", "--tasks", "niah"])
    assert "--tasks: ['niah'] (known: niah_single" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ruler-results: .* is not a readable results.json"):
        attach_ruler({}, tmp_path / "missing.json")
