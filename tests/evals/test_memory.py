"""The memory measurement finds a known allocation within 10% and turns a runaway one into OOM."""
import pytest

from evals.memory import measure


@pytest.mark.parametrize("mib", [64, 256])
def test_detects_known_allocation(mib):
    rec = measure("evals.memory:allocate", {"n_bytes": mib * 2**20})
    assert rec["status"] == "ok"
    assert abs(rec["peak_bytes"] - mib * 2**20) <= 0.1 * mib * 2**20, rec


def test_cap_records_oom():
    rec = measure("evals.memory:allocate", {"n_bytes": 512 * 2**20, "hold_s": 1.0}, cap_gb=0.125)
    assert rec["status"] == "OOM"


def test_error_is_reported():
    rec = measure("evals.memory:allocate", {"n_bytes": "not a number"})
    assert rec["status"] == "error"
