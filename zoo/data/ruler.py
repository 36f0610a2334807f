"""RULER's synthetic long-context tasks (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654), generated from seeds with no download.

    s = ruler_sample("niah_multikey", length=1024, seed=[0, 3])    # byte tokenizer by default
    s.input_ids (at most 1024 ids: the prompt up to its answer prefix), s.answers (the strings to produce),
    s.max_new_tokens (the generation budget)

Each task fills a haystack until the prompt holds as many tokens of the given tokenizer as fit in `length`:

| zoo task | what | RULER (lm_eval) |
|---|---|---|
| niah_single | one needle "One of the special magic numbers for <key> is: <7 digits>." in the repeated-sentence haystack | niah_single_1 |
| niah_multikey | one needle among needle-shaped distractors (other keys, other numbers) | niah_multikey_2 |
| niah_multivalue | four needles of one key, all four values asked | niah_multivalue (essay haystack) |
| niah_multiquery | four needles of four keys, all four asked | niah_multiquery (essay haystack) |
| vt | variable tracking: a chain "VAR A = 12345", "VAR B = VAR A", ... (4 hops) hidden in the noise; name every variable holding the value | vt (without its one-shot example) |
| cwe | common-words extraction: a numbered list where 10 words recur (30 times from 4K tokens where that fits, else 6) among others (3 times, else 1); name the 10, after one worked example | cwe |
| fwe | frequent-words extraction: coded words of 6 letters with Zipf counts (alpha 2); name the three most frequent after the dots | fwe |

The prompts, needle sentences, answer prefixes and scoring are RULER's; what differs is only where RULER needs a
download or a package: its essay haystack (Paul Graham's essays) is replaced by the repeated sentences, its English
word lists (the `wonderwords` package) by random lowercase words, so a prompt is a pure function of (task, length,
seed, tokenizer). Scoring (`score`): RULER's string_match_all, the fraction of the answers found in the
generation, case-insensitive.
"""
from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from zoo.data.errors import DataError
from zoo.data.synthetic import default_tokenizer

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} mentioned in the "
        "provided text?")
VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: "
      "Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assgined "
             "the value {query}, they are: ")   # RULER's prompt, its spelling included
CWE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
       "appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
       "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
       "What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass
class RulerSample:
    task: str
    input_ids: list          # the prompt through its answer prefix, at most `length` ids
    answers: list            # strings the generation must contain
    max_new_tokens: int
    prompt: str


def _word(rng, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(lo, hi + 1))))


def _distinct(make: Callable[[], str], n: int) -> list:
    out, seen = [], set()
    while len(out) < n:
        w = make()
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _number(rng) -> str:
    return str(int(rng.integers(10 ** 6, 10 ** 7)))


def _key(rng) -> str:
    return f"{_word(rng)}-{_word(rng)}"   # RULER's keys are adjective-noun pairs


def _insert(sentences: list, items: list, rng) -> list:
    """`items` at random distinct positions of `sentences`, in order."""
    at = sorted(rng.choice(len(sentences) + 1, size=len(items), replace=len(items) > len(sentences) + 1).tolist())
    out, prev = [], 0
    for pos, item in zip(at, items):
        out += sentences[prev:pos] + [item]
        prev = pos
    return out + sentences[prev:]


def _niah(n_keys: int, n_values: int, n_queries: int, haystack: str):
    def build(rng, size: int):
        keys = _distinct(lambda: _key(rng), n_keys)
        values = [[_number(rng) for _ in range(n_values)] for _ in keys]
        needles = [NEEDLE.format(kind="numbers", key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        needles = [needles[i] for i in rng.permutation(len(needles))]
        if haystack == "repeat":
            sentences = [NOISE] * size
        else:   # distractors shaped like the needles, with keys and values of their own
            sentences = [NEEDLE.format(kind="numbers", key=_key(rng), value=_number(rng)) for _ in range(size)]
        context = "\n".join(_insert(sentences, needles, rng))
        asked = sorted(rng.choice(n_keys, size=n_queries, replace=False).tolist())
        query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if n_queries > 1 \
            else keys[asked[0]]
        answers = [v for i in asked for v in values[i]]
        if len(answers) == 1:   # RULER's singular form of the template (the needles keep the plural)
            template = NIAH.replace("Some", "A").replace("are all", "is").replace("are", "is")
            prompt = template.format(kind="number", context=context, query=query)
            return prompt + f" The special magic number for {query} mentioned in the provided text is", answers
        prompt = NIAH.format(kind="numbers", context=context, query=query)
        return prompt + f" The special magic numbers for {query} mentioned in the provided text are", answers
    return build


def _vt(rng, size: int):
    names = _distinct(lambda: "".join(rng.choice(list(string.ascii_uppercase), size=5)), 5)
    value = str(int(rng.integers(10000, 100000)))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
    context = " ".join(_insert([NOISE + "\n"] * size, chain, rng)).replace(". \n", ".\n")
    return VT.format(context=context, query=value) + VT_ANSWER.format(n=len(names), query=value), names


def _numbered(words) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe_list(rng, pool, n_words: int, common: int, uncommon: int):
    words = [pool[i] for i in rng.choice(len(pool), size=n_words, replace=False)]
    listed = words[:10] * common + words[10:] * uncommon
    return _numbered([listed[i] for i in rng.permutation(len(listed))]), words[:10]


def _cwe_counts(rich: bool):
    """RULER's counts from 4K tokens (common words 30 times, the rest 3; a worked example of 40 words, 10 and 3) or
    below (6 and 1; 20 words, 3 and 1)."""
    common, uncommon, shown, shot_counts = (30, 3, 40, (10, 3)) if rich else (6, 1, 20, (3, 1))

    def build(rng, size: int):
        pool = _distinct(lambda: _word(rng), size + shown)
        example, example_answer = _cwe_list(rng, pool, shown, *shot_counts)
        context, answers = _cwe_list(rng, pool, size + 10, common, uncommon)
        shot = CWE.format(context=example) + CWE_ANSWER + " " + _numbered(example_answer)
        return shot + "\n" + CWE.format(context=context) + CWE_ANSWER, answers
    return build


def _cwe(length: int):
    # from 4K the rich counts where they fit; in a byte tokenizer's 4K they do not (about 7K bytes at the least)
    return (_cwe_counts(True), _cwe_counts(False)) if length >= 4096 else (_cwe_counts(False),)


def _fwe(length: int):
    def build(rng, size: int):
        vocab = ["..."] + _distinct(lambda: "".join(rng.choice(list(string.ascii_lowercase), size=6)),
                                    max(4, length // 50) - 1)   # the top-ranked "word" is the dots: noise
        ranks = np.arange(1, len(vocab) + 1)
        counts = (size * ranks ** -2.0 / (math.pi ** 2 / 6)).astype(int)   # Zipf, alpha 2 (zeta(2) = pi^2/6)
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        text = " ".join(words[i] for i in rng.permutation(len(words)))
        return FWE.format(context=text) + FWE_ANSWER, vocab[1:4]
    return build


# task -> (builders(length) -> fns(rng, size) -> (prompt, answers), the first whose smallest prompt fits is used;
# smallest size; generation budget in tokens: RULER's, with room for the answers in bytes where it has less)
TASKS = {
    "niah_single": (lambda length: (_niah(1, 1, 1, "repeat"),), 1, 128),
    "niah_multikey": (lambda length: (_niah(1, 1, 1, "needle"),), 1, 128),
    "niah_multivalue": (lambda length: (_niah(1, 4, 1, "repeat"),), 4, 128),
    "niah_multiquery": (lambda length: (_niah(4, 1, 4, "repeat"),), 4, 128),
    "vt": (lambda length: (_vt,), 1, 64),
    "cwe": (_cwe, 10, 160),
    "fwe": (lambda length: (_fwe(length),), 20, 64),
}


def check_tasks(tasks: Sequence[str], field: str = "tasks") -> list:
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise DataError(f"{field}: {bad or 'none'} (known: {', '.join(TASKS)})")
    return list(tasks)


def ruler_sample(task: str, length: int, seed, tokenizer=None) -> RulerSample:
    """The prompt of `task` with the largest haystack that keeps it within `length` tokens; a pure function of
    its arguments (seed: a non-negative int or a sequence of them)."""
    check_tasks([task], "task")
    tok = default_tokenizer(tokenizer)
    make, smallest, budget = TASKS[task]
    key = [*np.atleast_1d(seed).astype(np.int64).tolist(), int(length), list(TASKS).index(task)]

    def prompt(size: int, build):
        text, answers = build(np.random.default_rng(key), size)
        return text, answers, tok.encode(text)

    builders = make(length)
    fits = [b for b in builders if len(prompt(smallest, b)[2]) <= length]
    if not fits:
        raise DataError(f"length: {length} tokens is too short for {task}; its smallest prompt takes "
                        f"{len(prompt(smallest, builders[-1])[2])} tokens of this tokenizer")
    build = fits[0]
    prompt = functools.partial(prompt, build=build)
    lo, hi = smallest, smallest * 2       # lo fits; grow hi until it does not, then bisect
    while len(prompt(hi)[2]) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(prompt(mid)[2]) <= length else (lo, mid)
    text, answers, ids = prompt(lo)
    return RulerSample(task, ids, answers, budget, text)


def score(prediction: str, answers: Sequence[str]) -> int:
    """How many of `answers` the generated text contains (case-insensitive, RULER's string_match_all before its
    division by the number of answers)."""
    low = prediction.lower()
    return sum(a.lower() in low for a in answers)
