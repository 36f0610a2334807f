"""Synthetic recall tasks: passkey retrieval in filler text, and multi-query associative recall (MQAR).

Passkey retrieval follows the filler-text protocol of Landmark Attention (Mohtashami & Jaggi, arXiv
2305.16300), reused by Infini-attention (Munkhdalai et al., arXiv 2404.07143): a task description, the
filler "The grass is green. The sky is blue. ..." repeated, a needle "The pass key is N. Remember it. N is
the pass key." at some depth, more filler, and "What is the pass key? The pass key is". Two deliberate
differences from Landmark's script: the length is counted in tokens of the given tokenizer and hit
exactly (filler is added or cut at token level), and the depth is set by the caller instead of drawn at
random, so accuracy can be tabulated by (length, depth).

    p = passkey_prompt(length=1024, depth=0.5, seed=3)            # byte tokenizer by default
    p.input_ids (exactly 1024 ids), p.answer_ids (" 41367" as ids), p.passkey, p.needle_start

MQAR follows Zoology (Arora et al., arXiv 2312.04927, section 3): key-value pairs, then queries of a subset
of the keys whose answers are the values. Keys and values come from disjoint token ranges and token 0 is
the filler between queries. Here each answer also appears in `input_ids` right after its query (the LM
convention of labels aligned with inputs: the model reads the value only after predicting it); queries
never repeat a key, so an earlier answer never gives away a later one. Zoology places queries with
power-law gaps; here query slots are uniform over the query region.

    data = MQARData(vocab_size=256, num_kv_pairs=8)    # the Trainer's data interface
    batch = data.train_batch(step, micro, batch_size, seq_len)   # labels -100 except the answers
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from zoo.data.errors import DataError
from zoo.data.packing import IGNORE_INDEX

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def default_tokenizer(tokenizer):
    """`tokenizer`, or zoo's byte tokenizer when None."""
    if tokenizer is None:
        from zoo.data.tokenizer import ByteTokenizer
        return ByteTokenizer()
    return tokenizer


@dataclass
class PasskeyPrompt:
    input_ids: list          # the prompt, exactly `length` token ids
    answer_ids: list         # the ids of " " + passkey: what must follow the prompt
    passkey: str
    needle_start: int        # index in input_ids where the needle sentence begins
    depth: float


def _filler_tokens(tokenizer, n: int, snap: bool) -> list:
    """The first n tokens of the endless filler. snap=True: the longest whole-sentence prefix of at
    most n tokens plus at most one more sentence, whichever ends closer to n (the needle then sits on a
    sentence boundary, within one sentence of the requested depth)."""
    out, ends = [], [0]
    i = 0
    while len(out) < n:
        out += tokenizer.encode(FILLER[i % len(FILLER)] + " ")
        ends.append(len(out))
        i += 1
    if not snap:
        return out[:n]
    below = max(e for e in ends if e <= n)
    above = min((e for e in ends if e >= n), default=below)
    return out[:below] if n - below <= above - n else out[:above]


def passkey_prompt(length: int, depth: float, seed, tokenizer=None, digits: int = 5) -> PasskeyPrompt:
    """A passkey prompt of exactly `length` tokens with the needle at relative `depth` of the filler
    (0: right after the task description, 1: right before the question). A pure function of its arguments
    (seed: a non-negative int, or a sequence of them for a separate stream)."""
    tok = default_tokenizer(tokenizer)
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"depth: {depth} is outside [0, 1] (0 = needle first, 1 = needle last)")
    if digits < 1:
        raise DataError(f"digits: {digits} must be >= 1")
    rng = np.random.default_rng([*np.atleast_1d(seed).astype(np.int64).tolist(), int(length), int(round(depth * 1e6))])
    passkey = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
    head = tok.encode(TASK + "\n")
    needle = tok.encode("\n" + NEEDLE.format(key=passkey) + "\n")
    tail = tok.encode("\n" + QUESTION)
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise DataError(f"length: {length} tokens is too short for the passkey prompt; it needs at least "
                        f"{length - budget} tokens of this tokenizer")
    prefix = _filler_tokens(tok, round(depth * budget), snap=True)
    prefix = prefix[:budget]
    suffix = _filler_tokens(tok, budget - len(prefix), snap=False)
    ids = head + prefix + needle + suffix + tail
    assert len(ids) == length
    return PasskeyPrompt(ids, tok.encode(" " + passkey), passkey, len(head) + len(prefix), depth)


def passkey_trials(length: int, depth: float, n_trials: int, seed: int = 0, tokenizer=None,
                   digits: int = 5) -> list:
    """n_trials prompts for one (length, depth) cell; trial i uses seed (seed, i)."""
    return [passkey_prompt(length, depth, seed * 1_000_003 + i, tokenizer, digits) for i in range(n_trials)]


class PasskeyData:
    """Passkey fine-tuning rows with the Trainer's data interface: each row is a prompt of seq_len minus the
    answer's length, at a depth drawn uniformly in [0, 1], followed by the answer " <digits>". Rows are a pure
    function of (seed, stream, step, micro, row); the streams never take the single-int seeds of
    `passkey_trials`, so no evaluation prompt is trained on.

    loss="answer" trains on the answer tokens only; loss="lm" on every token, which adds the needle's own
    repetition of the key ("N. Remember it. N is") as a copy at short range, a curriculum towards the long
    one. Validation rows always score the answer only: their loss is the answer's.

    min_len: rows of one length let a small model learn the answer's absolute position instead of the task (a
    sliding-window model fine-tuned on 314-token prompts answered all of them and none of 316 tokens). With
    min_len each training row's prompt and answer take a length drawn uniformly in [min_len, seq_len], and the
    rest of the row is filler that no label scores (a causal model never sees it before answering).
    Validation rows keep the full length."""

    bytes_per_token = 1.0  # validation covers only answer tokens: bits/byte is then bits per answer token
    LOSSES = ("answer", "lm")

    def __init__(self, tokenizer=None, digits: int = 5, seed: int = 0, loss: str = "answer",
                 min_len: Optional[int] = None):
        if loss not in self.LOSSES:
            raise DataError(f"loss: {loss!r} is not one of {', '.join(self.LOSSES)}")
        self.tok, self.digits, self.seed, self.loss = default_tokenizer(tokenizer), digits, seed, loss
        self.answer_len = len(self.tok.encode(" " + "9" * digits))
        self.min_len = min_len

    def _lengths(self, rng, batch_size: int, seq_len: int, vary: bool) -> list:
        """Each row's prompt + answer length: seq_len, or drawn in [min_len, seq_len] (after the depths, so rows
        of one length are the same with and without this option)."""
        if not vary or self.min_len is None:
            return [seq_len] * batch_size
        if not 0 < self.min_len <= seq_len:
            raise DataError(f"min_len: {self.min_len} must be in [1, seq_len={seq_len}]")
        return rng.integers(self.min_len, seq_len + 1, batch_size).tolist()

    def _batch(self, stream: list, batch_size: int, seq_len: int, lm: bool = False, vary: bool = False) -> dict:
        rng = np.random.default_rng([self.seed, *stream, batch_size, seq_len])
        depths = rng.random(batch_size)
        ids, labels = [], []
        for row, (depth, n) in enumerate(zip(depths, self._lengths(rng, batch_size, seq_len, vary))):
            p = passkey_prompt(n - self.answer_len, float(depth), [self.seed, *stream, row], self.tok, self.digits)
            if len(p.answer_ids) != self.answer_len:   # a tokenizer that merges digits differently
                raise DataError(f"tokenizer: the answer {p.passkey!r} takes {len(p.answer_ids)} tokens, "
                                f"expected {self.answer_len}; passkey fine-tuning needs a fixed answer length")
            pad = _filler_tokens(self.tok, seq_len - n, snap=False) if n < seq_len else []
            ids.append(p.input_ids + p.answer_ids + pad)
            labels.append((p.input_ids if lm else [IGNORE_INDEX] * len(p.input_ids)) + p.answer_ids
                          + [IGNORE_INDEX] * len(pad))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    def train_batch(self, step: int, micro: int, batch_size: int, seq_len: int) -> dict:
        return self._batch([0, step, micro], batch_size, seq_len, lm=self.loss == "lm", vary=True)

    def val_batches(self, n: int, batch_size: int, seq_len: int) -> list:
        return [self._batch([1, i], batch_size, seq_len) for i in range(n)]


# -- MQAR ------------------------------------------------------------------------------------------------

def mqar_batch(batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int, seed,
               num_queries: Optional[int] = None) -> dict:
    """One MQAR batch, a pure function of its arguments (seed: a non-negative int or a sequence of them).

    Layout of a row: k_1 v_1 ... k_n v_n | query region of seq_len - 2n tokens, filler 0 except `num_queries`
    slots (pairs of positions) holding k_j v_j for distinct j. Keys are drawn without replacement from
    [1, vocab_size // 2), values with replacement from [vocab_size // 2, vocab_size). labels[t] = input_ids[t]
    at the query values, -100 elsewhere (the model shifts: the logits at the query key predict the value)."""
    n, q = num_kv_pairs, num_kv_pairs if num_queries is None else num_queries
    if n < 1:
        raise DataError(f"num_kv_pairs: {n} must be >= 1")
    if not 1 <= q <= n:
        raise DataError(f"num_queries: {q} must be in [1, num_kv_pairs={n}]")
    key_hi = vocab_size // 2
    if key_hi - 1 < n:
        raise DataError(f"vocab_size: {vocab_size} gives {key_hi - 1} distinct keys in [1, {key_hi}); "
                        f"num_kv_pairs={n} needs vocab_size >= {2 * (n + 1)}")
    slots = (seq_len - 2 * n) // 2
    if slots < q:
        raise DataError(f"seq_len: {seq_len} holds {slots} query slots after {n} key-value pairs; "
                        f"num_queries={q} needs seq_len >= {2 * (n + q)}")
    rng = np.random.default_rng([*np.atleast_1d(seed).astype(np.int64).tolist(), batch_size, seq_len, n, vocab_size, q])
    keys = np.stack([rng.choice(np.arange(1, key_hi), size=n, replace=False) for _ in range(batch_size)])
    values = rng.integers(key_hi, vocab_size, size=(batch_size, n))
    ids = np.zeros((batch_size, seq_len), dtype=np.int64)
    labels = np.full((batch_size, seq_len), IGNORE_INDEX, dtype=np.int64)
    ids[:, 0:2 * n:2], ids[:, 1:2 * n:2] = keys, values
    rows = np.arange(batch_size)[:, None]
    which = np.stack([rng.permutation(n)[:q] for _ in range(batch_size)])           # which keys are queried
    slot = np.sort(np.stack([rng.permutation(slots)[:q] for _ in range(batch_size)]), axis=1)
    pos = 2 * n + 2 * slot
    ids[rows, pos], ids[rows, pos + 1] = keys[rows, which], values[rows, which]
    labels[rows, pos + 1] = values[rows, which]
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


class MQARData:
    """MQAR batches with the Trainer's data interface. Train batches are a pure function of (seed, step,
    micro); validation batches use a disjoint seed range, so they are held out in the sense of distinct
    random draws (with a small vocabulary an identical row can recur by chance).

    num_kv_pairs may be a list: as in Zoology's training mix, consecutive train and validation batches cycle
    through the counts (a batch shares one count), and `test_batches` takes the count to score."""

    bytes_per_token = 1.0  # no text behind the tokens: the Trainer's bits/byte is then bits/token

    def __init__(self, vocab_size: int, num_kv_pairs, num_queries: Optional[int] = None, seed: int = 0):
        counts = [num_kv_pairs] if isinstance(num_kv_pairs, int) else list(num_kv_pairs)
        if not counts:
            raise DataError("num_kv_pairs: expected a count or a non-empty list of counts")
        self.vocab_size, self.counts, self.num_queries, self.seed = vocab_size, counts, num_queries, seed
        self.num_kv_pairs = num_kv_pairs
        for n in counts:
            mqar_batch(1, 2 * (n + (num_queries or n)), n, vocab_size, 0, num_queries)

    def _batch(self, seed, batch_size, seq_len, n):
        return mqar_batch(batch_size, seq_len, n, self.vocab_size, seed, self.num_queries)

    def train_batch(self, step: int, micro: int, batch_size: int, seq_len: int) -> dict:
        n = self.counts[(step + micro) % len(self.counts)]
        return self._batch([self.seed, 0, step, micro], batch_size, seq_len, n)

    def val_batches(self, n: int, batch_size: int, seq_len: int) -> list:
        return [self._batch([self.seed, 1, i], batch_size, seq_len, self.counts[i % len(self.counts)])
                for i in range(n)]

    def test_batches(self, n: int, batch_size: int, seq_len: int, num_kv_pairs: Optional[int] = None) -> list:
        """A third seed stream, disjoint from train and validation: for scoring after training; all at
        `num_kv_pairs` (default: the first count)."""
        kv = self.counts[0] if num_kv_pairs is None else num_kv_pairs
        return [self._batch([self.seed, 2, kv, i], batch_size, seq_len, kv) for i in range(n)]
