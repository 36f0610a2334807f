import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]   # tests.helpers imports through pyproject's pytest pythonpath
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the interpreter on CPU
# The tests' tensors are tiny: one thread avoids OpenMP start-up and oversubscription costs that make a
# small matmul 1000x slower on a loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def recipes_dir():
    return ROOT / "recipes"
