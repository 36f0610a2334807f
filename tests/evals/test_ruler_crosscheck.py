"""zoo.data.ruler against lm-evaluation-harness's RULER (the `eval` extra): the prompt texts lm_eval's own
generators write for variable tracking and frequent-words extraction are solved, by the same reader that checks
zoo's prompts (tests/data/test_ruler.py), to the answers lm_eval expects; zoo's templates and answer prefixes are
lm_eval's strings; zoo's scoring is lm_eval's string_match_all. (lm_eval's NIAH and CWE generators need the
`wonderwords` and `nltk` downloads, so only their texts, quoted in zoo.data.ruler, are compared.)"""
import random

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.tasks.ruler import common_utils, fwe_utils, vt_utils  # noqa: E402
from tests.data.test_ruler import solve  # noqa: E402
from zoo.data import ruler  # noqa: E402
from zoo.data.tokenizer import ByteTokenizer  # noqa: E402


class _Tok:
    """lm_eval's generators call tokenizer(text).input_ids: the byte tokenizer behind that interface."""

    def __call__(self, text):
        return type("Encoded", (), {"input_ids": ByteTokenizer().encode(text)})()


def test_templates_are_lm_evals():
    assert ruler.VT == vt_utils.CONFIG["variable_tracking"]["template"]
    assert ruler.VT_ANSWER.format(n=5, query="12345") == vt_utils.CONFIG["variable_tracking"]["answer_prefix"].format(
        num_v=5, query="12345")
    assert ruler.FWE == fwe_utils.CONFIG["template"] and ruler.FWE_ANSWER == fwe_utils.CONFIG["answer_prefix"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lm_evals_variable_tracking_prompts_solve_to_its_answers(seed):
    random.seed(seed)
    np.random.seed(seed)
    text, answers = vt_utils.generate_input_output(20, 1, 4)
    assert solve("vt", text) == answers
    zoo_prompt = ruler.ruler_sample("vt", 2048, seed).prompt   # the same frame around another chain and noise
    for piece in ("Memorize and track the chain(s) of variable assignment", "Question: Find all variables that are "
                  "assigned the value", "variables are assgined the value"):
        assert piece in text and piece in zoo_prompt


@pytest.mark.parametrize("seed", [0, 1])
def test_lm_evals_frequent_words_prompts_solve_to_its_answers(seed):
    random.seed(seed)
    np.random.seed(seed)
    text, answers, _ = fwe_utils.generate_input_output(2048, _Tok(), vocab_size=40, incremental=64)
    assert solve("fwe", text) == answers


def test_scoring_is_string_match_all():
    refs = ["1234567", "ABCDE", "zebra-lion"]
    for pred in (" 1234567, abcde", "nothing", "Zebra-Lion 1234567 ABCDE", ""):
        assert ruler.score(pred, refs) / len(refs) == pytest.approx(common_utils.string_match_all([pred], [refs]))
