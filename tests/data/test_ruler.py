"""zoo.data.ruler: every task's prompt fits its length and fills it, is a pure function of (task, length, seed),
holds what its answers are derived from (checked by an independent solver that reads only the prompt text), and
refuses a length below its smallest prompt; RULER's scoring."""
import re
from collections import Counter

import pytest

from zoo.data.errors import DataError
from zoo.data.ruler import TASKS, ruler_sample, score
from zoo.data.tokenizer import ByteTokenizer


def solve(task: str, prompt: str) -> list:
    """The answers, derived from the prompt text alone (what a perfect reader would generate)."""
    if task.startswith("niah"):
        query = re.search(r"What (?:is|are all) the special magic numbers? for (.+) mentioned in the provided text\?",
                          prompt).group(1)
        keys = re.split(r", and |, ", query)
        return [v for k in keys for v in re.findall(rf"special magic numbers for {re.escape(k)} is: (\d+)\.", prompt)]
    if task == "vt":
        value = re.search(r"assigned the value (\d+) in the text above", prompt).group(1)
        names = [re.search(rf"VAR ([A-Z]+) = {value}\b", prompt).group(1)]
        while m := re.search(rf"VAR ([A-Z]+) = VAR {names[-1]}\b", prompt):
            names.append(m.group(1))
        return names
    if task == "cwe":
        listing = prompt.split("Memorize the ones that appear most often.\n")[-1].split("\nQuestion")[0]
        counts = Counter(re.findall(r"\d+\. (\S+)", listing))
        return [w for w, _ in counts.most_common(10)]
    if task == "fwe":
        text = prompt.split("Find the three most frequently appeared coded words. ")[1].split("\nQuestion")[0]
        return [w for w, _ in Counter(w for w in text.split() if w != "...").most_common(3)]
    raise KeyError(task)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [2048, 4096])
def test_prompt_fits_fills_and_holds_its_answers(task, length):
    s = ruler_sample(task, length, seed=[3, 1])
    assert len(s.input_ids) <= length and len(s.input_ids) > 0.9 * length, len(s.input_ids)
    assert ByteTokenizer().decode(s.input_ids) == s.prompt
    assert sorted(solve(task, s.prompt)) == sorted(s.answers)
    assert len(s.answers) == {"niah_multivalue": 4, "niah_multiquery": 4, "vt": 5, "cwe": 10, "fwe": 3}.get(task, 1)
    again = ruler_sample(task, length, seed=[3, 1])
    assert again.input_ids == s.input_ids and again.answers == s.answers
    assert ruler_sample(task, length, seed=[3, 2]).answers != s.answers


def test_templates_and_counts_follow_ruler():
    single = ruler_sample("niah_single", 1024, 0).prompt
    assert single.startswith("A special magic number is hidden within the following text. Make sure to memorize it. "
                             "I will quiz you about the number afterwards.\nThe grass is green.")
    assert single.endswith("mentioned in the provided text is") and "special magic numbers for" in single
    multi = ruler_sample("niah_multivalue", 1024, 0).prompt
    assert multi.startswith("Some special magic numbers are hidden") and multi.endswith("are")
    distractors = ruler_sample("niah_multikey", 1024, 0).prompt
    assert "The grass is green" not in distractors and distractors.count("One of the special magic numbers") > 10
    # cwe from 4K: the common words 30 times each, the rest 3 (RULER's counts) where that fits (8K bytes), else, as
    # below 4K, 6 and 1 (4K bytes cannot hold 300 numbered words)
    for length, (common, rare) in ((8192, (30, 3)), (4096, (6, 1)), (2048, (6, 1))):
        s = ruler_sample("cwe", length, 5)
        listing = s.prompt.split("Memorize the ones that appear most often.\n")[-1].split("\nQuestion")[0]
        counts = Counter(re.findall(r"\d+\. (\S+)", listing))
        assert {counts[w] for w in s.answers} == {common} and set(counts.values()) == {common, rare}


def test_lengths_below_a_task_and_unknown_tasks_are_refused():
    with pytest.raises(DataError, match=r"length: 1024 tokens is too short for cwe; its smallest prompt takes \d+"):
        ruler_sample("cwe", 1024, 0)
    with pytest.raises(DataError, match=r"task: \['niah'\] \(known: niah_single, niah_multikey"):
        ruler_sample("niah", 1024, 0)


def test_score_counts_answers_found_case_insensitively():
    assert score(" 1234567 and ABCDE, then abcde", ["1234567", "abcde", "XYZZY"]) == 2
    assert score("", ["1"]) == 0
