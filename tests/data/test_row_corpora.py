"""Parquet files, directories of Parquet shards and `datasets` saved to disk as corpora (zoo.data.corpus): every
non-empty row once, split by row deterministically, the text column chosen by `field`, read a batch at a time;
errors name the field and the columns; `zoo prepare-data --field` and a recipe's train.corpus_field prepare them,
and a Parquet corpus trains."""
import json

import pytest

from zoo.data import SPLITS, ArrowDatasetCorpus, DataError, ParquetCorpus, load_corpus, prepare

pa = pytest.importorskip("pyarrow")
import pyarrow.ipc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

TEXTS = [f"document {i}: " + "word " * (i % 13) for i in range(300)] + ["", ""]   # two empty rows: skipped


def table(texts=TEXTS):
    return pa.table({"id": list(range(len(texts))), "content": texts})


def all_documents(corpus) -> list:
    return [d for split in SPLITS for d in corpus.documents(split)]


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "shards"
    (root / "part").mkdir(parents=True)
    t = table()
    for i, lo in enumerate((0, 100, 200)):   # a nested shard, and batches smaller than a shard
        pq.write_table(t.slice(lo, 100 if lo < 200 else 102), root / ("part" if i == 1 else "") / f"{i:05d}.parquet",
                       row_group_size=37)
    return root


def test_parquet_shards_hold_every_row_once_split_by_row(shards):
    corpus = load_corpus(shards, holdout=0.1, field="content")
    assert isinstance(corpus, ParquetCorpus) and corpus.name == "shards-content"
    docs = all_documents(corpus)
    assert sorted(docs) == sorted(t for t in TEXTS if t)
    again = load_corpus(shards, holdout=0.1, field="content")
    assert {s: list(corpus.documents(s)) for s in SPLITS} == {s: list(again.documents(s)) for s in SPLITS}
    sizes = {s: sum(len(d.encode()) for d in corpus.documents(s)) for s in SPLITS}
    assert sizes["val"] > 0 and sizes["test"] > 0 and sizes["train"] > 5 * sizes["val"]
    assert corpus.describe() == f"parquet {shards} (300 documents)"


def test_a_parquet_file_is_streamed_by_batches_never_read_whole(tmp_path, monkeypatch):
    path = tmp_path / "one.parquet"
    pq.write_table(table(), path, row_group_size=50)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read the whole table"))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole file"))
    assert len(all_documents(load_corpus(path, field="content"))) == 300


@pytest.mark.parametrize("field,message", [
    ("text", r"field: .*one.parquet has no column 'text' \(columns: id, content\); choose one with --field"),
    ("id", r"field: column 'id' of .*one.parquet holds int64, not text"),
])
def test_a_missing_or_non_text_column_names_the_field(tmp_path, field, message):
    pq.write_table(table(), tmp_path / "one.parquet")
    with pytest.raises(DataError, match=message):
        load_corpus(tmp_path / "one.parquet", field=field)


def test_field_is_refused_where_documents_are_whole_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"field: 'content' applies to .jsonl, Parquet and `datasets` corpora"):
        load_corpus(tmp_path / "a.txt", field="content")


def test_without_pyarrow_the_error_names_the_extra(tmp_path, monkeypatch):
    import builtins
    pq.write_table(table(), tmp_path / "one.parquet")
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
        (_ for _ in ()).throw(ImportError(name)) if name.startswith("pyarrow") else real(name, *a, **k)))
    with pytest.raises(DataError, match=r"pip install -e '.\[data\]'"):
        load_corpus(tmp_path / "one.parquet", field="content")


def save_like_datasets(root, t, n_files=2):
    """What `datasets.Dataset.save_to_disk` writes: Arrow stream files listed in state.json."""
    root.mkdir(parents=True)
    names, step = [], -(-t.num_rows // n_files)
    for i in range(n_files):
        name = f"data-{i:05d}-of-{n_files:05d}.arrow"
        with pa.OSFile(str(root / name), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as writer:
            for batch in t.slice(i * step, step).to_batches(max_chunksize=40):
                writer.write_batch(batch)
        names.append({"filename": name})
    (root / "state.json").write_text(json.dumps({"_data_files": names, "_split": None}))
    (root / "dataset_info.json").write_text("{}")


def test_a_saved_dataset_and_dataset_dict(tmp_path):
    save_like_datasets(tmp_path / "ds", table())
    corpus = load_corpus(tmp_path / "ds", field="content")
    assert isinstance(corpus, ArrowDatasetCorpus)
    assert sorted(all_documents(corpus)) == sorted(t for t in TEXTS if t)
    save_like_datasets(tmp_path / "dd" / "train", table())
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert sorted(all_documents(load_corpus(tmp_path / "dd", field="content"))) == sorted(t for t in TEXTS if t)
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    with pytest.raises(DataError, match=r"no 'train' split \(splits: \['validation'\]\)"):
        load_corpus(tmp_path / "dd", field="content")


def test_real_datasets_save_to_disk_reads_the_same(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": TEXTS}).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert sorted(all_documents(load_corpus(tmp_path / "ds", field="content"))) == sorted(t for t in TEXTS if t)


def test_prepare_data_command_and_a_parquet_corpus_that_trains(shards, tmp_path, capsys):
    import zoo
    from tests.helpers import TOY_RECIPE
    from zoo.commands import prepare_data
    from zoo.train.trainer import Trainer
    assert prepare_data.main(["--corpus", str(shards), "--field", "content", "--out", str(tmp_path / "data"),
                              "--holdout", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "MB/s" in out and '"mb_per_s"' in out
    summary = json.loads(out.splitlines()[-1].removeprefix("summary: "))
    assert summary["dir"].endswith("shards-content-byte") and sum(summary[s]["num_docs"] for s in SPLITS) == 300
    recipe = zoo.load_recipe(TOY_RECIPE, ["model.vocab_size=256", f"train.corpus={shards}",
                                          "train.corpus_field=content", "train.max_steps=3"])
    from zoo.data import prepared_data
    data = prepared_data(recipe, root=tmp_path / "data2", log=lambda s: None)
    result = Trainer(recipe, data, tmp_path / "run", device="cpu", progress=False, log=lambda s: None).train()
    assert result is not None and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert prepare(str(shards), root=tmp_path / "data2", field="content") == tmp_path / "data2" / "shards-content-byte"
