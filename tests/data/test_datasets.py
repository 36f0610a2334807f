import numpy as np
import pytest
import torch

from zoo.data import (BatchStream, ByteTokenizer, DataError, PreparedData, TokenDataset, TokenWriter, check_vocab,
                      prepare)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def split(tmp_path):
    """A split of documents of lengths 1, a prime, and others, ids 1..255 so eos (0) marks the ends."""
    rng = np.random.default_rng(0)
    with TokenWriter(tmp_path / "train", 256, eos_id=0) as w:
        for n in (1, 13, 40, 2, 97, 5, 61, 1, 30):
            w.add_document(rng.integers(1, 256, size=n), n)
    return tmp_path / "train"


@pytest.mark.parametrize("cross_doc", [True, False])
@pytest.mark.parametrize("batch_size, seq_len", [(1, 1), (3, 7), (5, 31), (2, 259)])
def test_sampled_windows(split, cross_doc, batch_size, seq_len):
    ds = TokenDataset(split, cross_doc=cross_doc)
    tokens = np.asarray(ds.file.tokens)
    bounds = zip(ds.file.offsets[:-1], ds.file.offsets[1:])
    doc_of = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(bounds)])
    batch = ds.sample(batch_size, seq_len, 3, 7)
    assert _equal(batch, ds.sample(batch_size, seq_len, 3, 7))
    assert batch["input_ids"].shape == (batch_size, seq_len)
    for row in range(batch_size):
        ids = batch["input_ids"][row].numpy()
        starts = [s for s in range(len(tokens) - seq_len + 1) if np.array_equal(tokens[s:s + seq_len], ids)]
        assert starts, "a sampled row is not a window of the data"
        if cross_doc:
            assert "seq_idx" not in batch and torch.equal(batch["labels"][row], batch["input_ids"][row])
        else:
            s = starts[0]
            docs = doc_of[s:s + seq_len]
            assert batch["seq_idx"][row].tolist() == (docs - docs[0]).tolist()
            new_doc = np.r_[False, docs[1:] != docs[:-1]]
            assert np.array_equal(batch["labels"][row].numpy() == -100, new_doc)
            # a masked label always follows an end-of-document token
            assert (ids[:-1][new_doc[1:]] == 0).all()


def test_keys_give_different_batches(split):
    ds = TokenDataset(split)
    batches = [ds.sample(4, 16, seed, *key) for seed, key in [(0, (0, 0)), (0, (0, 1)), (0, (1, 0)), (1, (0, 0))]]
    assert not any(_equal(a, b) for i, a in enumerate(batches) for b in batches[i + 1:])


def test_seq_len_equal_to_the_data_and_longer(split):
    ds = TokenDataset(split)
    n = len(ds)
    assert ds.sample(2, n, 0, 0)["input_ids"][1].tolist() == np.asarray(ds.file.tokens).tolist()
    with pytest.raises(DataError, match=rf"seq_len: {n + 1} is longer than the data: .*train holds {n} tokens"):
        ds.sample(1, n + 1, 0, 0)
    with pytest.raises(DataError, match=rf"seq_len: {n + 1} is longer than the data"):
        ds.eval_batches(1, 1, n + 1)


@pytest.mark.parametrize("args, message", [((0, 4), "batch_size: must be a positive integer, got 0"),
                                           ((2, -1), "seq_len: must be a positive integer, got -1"),
                                           ((2, 2.5), "seq_len: must be a positive integer, got 2.5")])
def test_bad_sizes(split, args, message):
    with pytest.raises(DataError, match=message):
        TokenDataset(split).sample(*args, 0, 0)


def test_stream_position_save_and_restore(split):
    stream = BatchStream(TokenDataset(split, cross_doc=False), 3, 11, seed=5)
    for _ in range(4):
        next(stream)
    state = stream.state_dict()
    want = [next(stream) for _ in range(3)]
    resumed = BatchStream(TokenDataset(split, cross_doc=False), 3, 11, seed=0)
    resumed.load_state_dict(state)
    assert all(_equal(a, next(resumed)) for a in want)
    assert resumed.state_dict() == {"seed": 5, "position": 7}


def test_eval_batches_are_fixed_and_span_the_split(split):
    ds = TokenDataset(split)
    batches = ds.eval_batches(3, 2, 10)
    assert all(_equal(a, b) for a, b in zip(batches, ds.eval_batches(3, 2, 10)))
    tokens = np.asarray(ds.file.tokens)
    assert batches[0]["input_ids"][0].tolist() == tokens[:10].tolist()
    assert batches[-1]["input_ids"][-1].tolist() == tokens[-10:].tolist()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tests.data.conftest import SAMPLES
    root = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (root / f"{i:02d}.py").write_text(SAMPLES[i % len(SAMPLES)] * (i + 2))
    return prepare(str(root), "byte", root=tmp_path_factory.mktemp("data"))


def test_prepared_data_is_a_pure_function_of_seed_step_micro(prepared):
    data = PreparedData(prepared, seed=1, cross_doc=False)
    again = PreparedData(prepared, seed=1, cross_doc=False)
    a = data.train_batch(7, 1, 4, 33)
    assert _equal(a, again.train_batch(7, 1, 4, 33))
    assert set(a) == {"input_ids", "labels", "seq_idx"}
    assert not _equal(a, data.train_batch(7, 0, 4, 33))
    assert not _equal(a, PreparedData(prepared, seed=2, cross_doc=False).train_batch(7, 1, 4, 33))
    assert all(_equal(x, y) for x, y in zip(data.val_batches(2, 4, 33), again.val_batches(2, 4, 33)))


def test_prepared_data_sizes_and_vocab(prepared):
    data = PreparedData(prepared)
    val = data.val.file.header
    assert data.bytes_per_token == val["num_bytes"] / val["num_tokens"]
    assert val["num_tokens"] == val["num_bytes"] + val["num_docs"]    # one byte token each, plus eos
    assert data.vocab_size == ByteTokenizer.vocab_size and "tokenizer byte" in data.describe()
    check_vocab(data, 256)
    with pytest.raises(DataError, match=r"tokenizer 'byte' has a vocabulary of 256 tokens, more than "
                                        r"model.vocab_size 200"):
        check_vocab(data, 200)


def test_prepared_data_missing(tmp_path):
    with pytest.raises(DataError, match=r"data: .*nope is not a directory of prepared data"):
        PreparedData(tmp_path / "nope")
    with pytest.raises(DataError, match=r"train.json not found"):
        PreparedData(tmp_path)


@pytest.mark.slow   # ~8 s alone, nearly all of it the first import of torch's optimizer machinery
def test_trainer_runs_on_prepared_data(prepared, tmp_path):
    """PreparedData meets the trainer's data interface: two steps, a validation pass, a finite bpb."""
    import zoo
    from zoo.train.trainer import Trainer

    recipe = zoo.load_recipe({
        "name": "tiny-data",
        "model": {"d_model": 16, "n_layers": 1, "vocab_size": 256, "pattern": "A",
                  "blocks": {"A": {"type": "attn", "n_heads": 2}}, "ffn": {"type": "swiglu", "mult": 2}},
        "train": {"seq_len": 24, "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "eval_every": 2,
                  "eval_batches": 2, "save_every": 2, "log_every": 1}})
    data = PreparedData(prepared, seed=recipe.train.seed, cross_doc=recipe.train.cross_doc)
    check_vocab(data, recipe.model.vocab_size)
    result = Trainer(recipe, data, tmp_path, device="cpu", progress=False, log=lambda s: None).train()
    assert result.step == 2 and np.isfinite(result.val_bpb)
    assert result.val_bpb == pytest.approx(result.val_loss / np.log(2) / data.bytes_per_token)
