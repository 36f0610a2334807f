import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.data.conftest import SAMPLES
from zoo.data import ByteTokenizer, DataError, check_vocab, count_bytes, load_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text", SAMPLES + [""])
def test_byte_tokenizer_round_trip(text):
    tok = load_tokenizer("byte")
    ids = tok.encode(text)
    assert len(ids) == count_bytes(text) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert [a.tolist() for a in tok.encode_batch([text, text])] == [ids, ids]
    assert tok.vocab_size == 256 and tok.eos_id == 0


def test_byte_decode_of_a_cut_character_does_not_raise():
    ids = ByteTokenizer().encode("é")          # two bytes; a window may hold only the first
    assert ByteTokenizer().decode(ids[:1]) == "\ufffd"


def test_missing_tokenizer_path(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer: '.*nope' is neither 'byte' nor an existing directory"):
        load_tokenizer(tmp_path / "nope")


def test_directory_without_a_tokenizer(tmp_path):
    with pytest.raises(DataError, match="tokenizer: AutoTokenizer cannot load"):
        load_tokenizer(tmp_path)


def test_check_vocab():
    check_vocab(ByteTokenizer(), 256)
    check_vocab(ByteTokenizer(), 1000)
    with pytest.raises(DataError, match=r"tokenizer 'byte' has a vocabulary of 256 tokens, more than "
                                        r"model.vocab_size 128; set model.vocab_size >= 256"):
        check_vocab(ByteTokenizer(), 128)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = [s * 3 for s in SAMPLES] * 20     # a few KB
    return train_bpe(corpus, 300, out), out


def test_bpe_loads_with_auto_tokenizer_and_round_trips(bpe):
    tok, out = bpe
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == tok.vocab_size == 300
    assert hf.convert_ids_to_tokens(hf.eos_token_id) == "<|endoftext|>" and tok.eos_id == hf.eos_token_id
    for text in SAMPLES + ["unseen: Ωμέγα 中文 \x00 \t\t end"]:
        ids = hf.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == text
        assert tok.encode(text) == ids and tok.decode(ids) == text
    # merges were learned: the training text takes fewer tokens than bytes
    assert len(tok.encode(SAMPLES[2])) < count_bytes(SAMPLES[2]) / 2


def test_bpe_vocab_larger_than_model(bpe):
    tok, out = bpe
    with pytest.raises(DataError, match=rf"tokenizer '{out}' has a vocabulary of 300 tokens, more than "
                                        r"model.vocab_size 256"):
        check_vocab(load_tokenizer(out), 256)


def test_bpe_too_small_vocab(tmp_path):
    with pytest.raises(DataError, match=r"vocab_size: must be >= 257"):
        train_bpe(["abc"], 256, tmp_path)


def test_train_tokenizer_script(text_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    assert _script("train_tokenizer").main(["--corpus", str(text_dir), "--vocab-size", "280", "--out", str(out),
                                            "--holdout", "0.1"]) == 0
    assert '"vocab_size": 280' in capsys.readouterr().out.splitlines()[-1]
    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf.decode(hf.encode(SAMPLES[1], add_special_tokens=False)) == SAMPLES[1]


def test_train_tokenizer_script_bad_corpus(tmp_path, capsys):
    assert _script("train_tokenizer").main(["--corpus", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "corpus: " in capsys.readouterr().err
