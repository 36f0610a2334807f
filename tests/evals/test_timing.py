"""The one timing helper (evals.timing) and the bench harness on it (benchmarks.harness): warm-up calls are
not timed, both clocks are kept, interleaved rounds alternate, the peak of the timed calls is measured,
tables and the summary line print as the bench scripts print them, and a bench target runs in a fresh process."""
import json
import time

import pytest
import torch

from benchmarks.harness import PeakMemory, Stopwatch, Table, command_line, measure, print_summary, write_json
from evals.timing import time_call, time_interleaved


def test_time_call_warms_up_then_times_each_repeat_on_both_clocks():
    calls = []

    def sleep():
        calls.append(1)
        time.sleep(0.02)
    t = time_call(sleep, 3, warmup=2)
    assert len(calls) == 5 and len(t.wall) == len(t.cpu) == 3
    assert t.best >= 0.02 and t.best <= t.median and t.cpu_best < 0.01   # sleeping costs no CPU time
    assert t.to_dict()["wall_best"] == round(t.best, 4) and t.peak_bytes is None
    seen = []
    time_call(seen.append, 2, setup=lambda: len(seen))   # setup's result is the argument, every call
    assert seen == [0, 1, 2]


def test_time_call_measures_the_peak_of_the_timed_calls_only():
    # 64 MiB: above glibc's largest mmap threshold (32 MiB), so the pages are new, not reused from the heap
    size = 64 * 2**20
    held = []
    t = time_call(lambda: held.append(torch.ones(size // 4)), 1, warmup=0, memory=True)
    assert size * 0.9 <= t.peak_bytes <= size * 2
    held.clear()
    with PeakMemory() as peak:
        x = torch.ones(size // 4)
        assert peak.now() >= size * 0.9
        del x
    assert peak.bytes >= size * 0.9


def test_time_interleaved_rounds_alternate_and_skip_the_warm_up():
    order, progress = [], []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    ts = time_interleaved(fns, 3, warmup=1, alternate=True, each=lambda k, r, clock: progress.append((k, r)))
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert progress == [("b", 0), ("a", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 2)]
    assert all(len(t.wall) == 3 for t in ts.values())


def test_stopwatch_sums_its_blocks():
    clock = Stopwatch()
    for _ in range(2):
        with clock:
            time.sleep(0.01)
    assert clock.wall >= 0.02 and clock.last_wall >= 0.01 and clock.wall >= clock.last_wall


def test_table_summary_json_and_command(tmp_path, capsys):
    table = Table(["block", "2048 s", "MiB"], align="lr", stream=True)
    table.add(["swa", "0.186", 65])
    assert capsys.readouterr().out == "| block | 2048 s | MiB |\n|---|---:|---|\n| swa | 0.186 | 65 |\n"
    assert str(table).splitlines()[-1] == "| swa | 0.186 | 65 |"
    print_summary({"a": 1})
    assert capsys.readouterr().out == 'summary: {"a": 1}\n'
    assert json.loads(write_json(tmp_path / "r.json", {"rows": [1]}).read_text()) == {"rows": [1]}
    assert command_line(["benchmarks/bench_ssm.py", "--quick"]) == "python benchmarks/bench_ssm.py --quick"


@pytest.mark.slow
def test_a_bench_target_runs_in_a_fresh_process():
    """benchmarks is installed: `measure` finds a bench script's cell by module name, in a new interpreter."""
    rec = measure("benchmarks.bench_attention:memory_cell", {"method": "blockwise", "length": 64, "block_size": 16,
                                                             "window": 16}, cap_gb=1, threads=1)
    assert rec["status"] == "ok" and rec["result"]["status"] == "ok" and rec["result"]["peak_bytes"] >= 0
