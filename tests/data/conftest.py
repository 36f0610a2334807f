"""Fixtures for the data tests: small corpora written to tmp_path."""
import json

import pytest

# text with multi-byte characters, tabs, trailing spaces and blank lines: what a lossless tokenizer keeps
SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "naïve café — ∑ᵢ xᵢ² 🐍\n\ttabbed  line   \n\n",
    "class A:\n    pass\n" * 7,
    "x",
    "import os\nprint(os.getcwd())\n",
    "long " * 53 + "\n",
    "ünïcödé\r\nwindows line\r\n",
    "# comment only\n",
]


@pytest.fixture
def text_dir(tmp_path):
    """A directory of 12 small text files (one nested, one hidden that must be skipped)."""
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    for i in range(11):
        (root / f"doc{i:02d}.txt").write_text(SAMPLES[i % len(SAMPLES)] * (i + 1), encoding="utf-8")
    (root / "sub" / "nested.md").write_text("# nested\n" * 5, encoding="utf-8")
    (root / ".hidden").write_text("never read", encoding="utf-8")
    return root


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": SAMPLES[i % len(SAMPLES)] * (i % 3 + 1), "id": i}) for i in range(40)]
    lines.insert(5, "")   # a blank line is skipped, not an error
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
