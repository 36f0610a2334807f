"""benchmarks/bench_memory_estimate.py and bench_revisions.py's decode child, on small inputs."""
import json

import pytest

from benchmarks import bench_memory_estimate, bench_revisions
from benchmarks.harness import ROOT


def test_memory_estimate_bench_reads_the_estimate_above_what_is_kept(capsys):
    bench_memory_estimate.main(["--recipes", "transformer", "mamba2", "--length", "320", "--batch", "1"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: "))
    assert set(summary["ratios"]) == {"transformer", "mamba2"}
    assert all(1.0 <= r <= 1.2 for r in summary["ratios"].values()), summary


@pytest.mark.parametrize("kind", ["train", "decode"])
def test_revisions_children_time_this_tree(kind):
    overrides = ["model.d_model=32", "model.n_layers=2", "model.vocab_size=64"]
    seconds = bench_revisions.measure(ROOT, "mamba2", overrides, 40, 1, kind=kind)
    assert 0 < seconds < 30


@pytest.mark.parametrize("argv,message", [(["--recipes", "nope"], "--recipes: no recipes/<name>.yaml for nope"),
                                          (["--length", "0"], "--length: must be >= 1, got 0")])
def test_memory_estimate_bench_refuses_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_memory_estimate.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
