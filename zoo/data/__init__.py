"""Data: tokenizers, corpora, the memory-mapped token format, packed batches.

    from zoo.data import prepare, PreparedData, check_vocab
    data = PreparedData(prepare(recipe.train.corpus, recipe.train.tokenizer, root="data"),
                        seed=recipe.train.seed, cross_doc=recipe.train.cross_doc)
    check_vocab(data, recipe.model.vocab_size)
    batch = data.train_batch(step, micro, batch_size, seq_len)

Modules: `tokenizer` (byte / AutoTokenizer / BPE training), `corpus` (stdlib, text file, directory,
jsonl; the train/val/test split), `memmap` (the .bin/.docs.npy/.json format), `prepare` (tokenize once,
cached), `packing` (labels and seq_idx for packed documents), `dataset` (deterministic batches).
Every bad input raises `DataError` (a ValueError) naming the argument or file.
"""
from zoo.data.corpus import (SPLITS, ArrowDatasetCorpus, DirectoryCorpus, JsonlCorpus, ParquetCorpus, StdlibCorpus,
                             TextFileCorpus, load_corpus)
from zoo.data.dataset import BatchStream, PreparedData, TokenDataset
from zoo.data.errors import DataError
from zoo.data.memmap import TokenFile, TokenWriter
from zoo.data.packing import IGNORE_INDEX, pack_batch
from zoo.data.prepare import prepare, prepared_data
from zoo.data.tokenizer import ByteTokenizer, HFTokenizer, check_vocab, count_bytes, load_tokenizer, train_bpe

__all__ = ["SPLITS", "ArrowDatasetCorpus", "BatchStream", "ByteTokenizer", "DataError", "DirectoryCorpus",
           "HFTokenizer", "IGNORE_INDEX", "JsonlCorpus", "ParquetCorpus", "PreparedData", "StdlibCorpus",
           "TextFileCorpus", "TokenDataset", "TokenFile", "TokenWriter", "check_vocab", "count_bytes", "load_corpus", "load_tokenizer",
           "pack_batch", "prepare", "prepared_data", "train_bpe"]
