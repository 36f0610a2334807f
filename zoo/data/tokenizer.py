"""Tokenizers: UTF-8 bytes (the default, vocabulary 256), anything `transformers.AutoTokenizer` loads
from a local directory, and training a byte-level BPE (Sennrich et al., arXiv 1508.07909, on bytes as in
GPT-2) with the `tokenizers` package so that AutoTokenizer loads the result.

    tok = load_tokenizer("byte")            # or load_tokenizer("tok/") for a saved tokenizer
    ids = tok.encode("def f(): ...")        # list[int]; no special tokens added
    tok.decode(ids)                         # the text back (lossless for both kinds)
    tok.vocab_size, tok.eos_id, tok.name    # eos_id ends every document in prepared data (None: none)
    check_vocab(tok, recipe.model.vocab_size)   # DataError when the ids would not fit the embedding

Bits per byte need the byte count of the text (`count_bytes`), not the token count: a BPE token covers
several bytes, a byte token exactly one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from zoo.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"


def count_bytes(text: str) -> int:
    """UTF-8 bytes of `text`: the denominator of bits per byte, whatever the tokenizer."""
    return len(text.encode("utf-8"))


class ByteTokenizer:
    """Token id = UTF-8 byte value. Byte 0 (NUL) doubles as the end-of-document token: text never
    contains it in practice, and a separate id would push the vocabulary past 256."""

    name = "byte"
    spec = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # a window cut from the middle of the data can start or end inside a multi-byte character
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"

    def save_pretrained(self, out: Union[str, Path]) -> None:
        """tokenizer.json (+ tokenizer_config.json) that transformers' AutoTokenizer loads as these same ids:
        the bytes of the UTF-8 text, id = byte value, through the `tokenizers` ByteLevel pre-tokenizer and
        decoder without regex splitting or a prefix space, a vocabulary of the 256 byte symbols and no merges.
        No special token is declared: the end-of-document id 0 is byte 0 (the model's config carries it as
        eos_token_id), and declaring a text form for it would turn that text inside a prompt into id 0."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(vocab={_byte_symbol(b): b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False).save_pretrained(out)

    def __repr__(self):
        return "ByteTokenizer(vocab_size=256, eos_id=0)"


def _byte_symbol(b: int) -> str:
    """GPT-2's printable stand-in for byte b (what the ByteLevel pre-tokenizer turns that byte into)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    if b in printable:
        return chr(b)
    return chr(256 + sum(1 for c in range(b) if c not in printable))


class HFTokenizer:
    """A `transformers` tokenizer loaded from a local directory, seen through the same small interface."""

    def __init__(self, path: Union[str, Path]):
        from transformers import AutoTokenizer

        self.spec = str(path)
        self.name = Path(path).resolve().name
        try:
            # trust_remote_code=False: a directory whose config names code (auto_map) is refused, never prompted for
            self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as err:  # transformers raises OSError, ValueError or KeyError by case
            raise DataError(f"tokenizer: AutoTokenizer cannot load {str(path)!r}: {err}") from err
        # len() counts added special tokens; hf.vocab_size does not, and those ids are emitted too
        self.vocab_size = len(self.hf)
        self.eos_id: Optional[int] = self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self.hf(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)

    def fingerprint(self) -> str:
        backend = getattr(self.hf, "backend_tokenizer", None)
        state = backend.to_str() if backend is not None else json.dumps(sorted(self.hf.get_vocab().items()))
        return hashlib.sha256(state.encode("utf-8")).hexdigest()[:16]

    def __repr__(self):
        return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(spec: Union[str, Path, Tokenizer] = "byte") -> Tokenizer:
    """"byte", or a local directory that `AutoTokenizer.from_pretrained` loads (tokenizer.json etc.)."""
    if isinstance(spec, (ByteTokenizer, HFTokenizer)):
        return spec
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise DataError(f"tokenizer: {str(spec)!r} is neither 'byte' nor an existing directory holding a "
                        "tokenizer saved by save_pretrained (e.g. by scripts/train_tokenizer.py)")
    return HFTokenizer(path)


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Raise DataError if `tokenizer` (or prepared data: anything with .vocab_size) emits ids that
    a model with `vocab_size` embeddings cannot look up."""
    have = tokenizer.vocab_size
    if have > vocab_size:
        # a tokenizer names itself by .spec; prepared data by the .tokenizer spec it was made with
        name = getattr(tokenizer, "spec", None) or getattr(tokenizer, "tokenizer", None) or type(tokenizer).__name__
        raise DataError(f"tokenizer {name!r} has a vocabulary of {have} tokens, more than model.vocab_size "
                        f"{vocab_size}; set model.vocab_size >= {have}")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Union[str, Path]) -> HFTokenizer:
    """Train a byte-level BPE on `texts` and save it to `out_dir` (tokenizer.json + config) so that
    `AutoTokenizer.from_pretrained(out_dir)` loads it. The vocabulary holds the 256 byte symbols, the
    end-of-document token and up to vocab_size - 257 merges (fewer when the corpus runs out of pairs)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise DataError(f"vocab_size: must be >= 257 (256 byte symbols + {EOS_TOKEN}), got {vocab_size}")
    raw = RawTokenizer(models.BPE())
    # add_prefix_space=False: the decoder must give back exactly the text, not one with a leading space
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer)
    if raw.get_vocab_size() <= 257:
        raise DataError("corpus: too little text to learn a single BPE merge")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN,
                            model_max_length=int(1e30)).save_pretrained(str(out_dir))
    # transformers 5 records its class as "TokenizersBackend", a name 4.x does not know; both load
    # "PreTrainedTokenizerFast" (an alias of TokenizersBackend in 5.x)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return HFTokenizer(out_dir)
