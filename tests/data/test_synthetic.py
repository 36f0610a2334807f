"""Passkey and MQAR generators: deterministic, exact length, needle at the requested depth, answers
recoverable from the prompt, MQAR labels only at answers, keys/values in disjoint ranges."""
import re

import pytest
import torch

from zoo.data.errors import DataError
from zoo.data.synthetic import FILLER, MQARData, mqar_batch, passkey_prompt, passkey_trials
from zoo.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
NEEDLE_RE = re.compile(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.")


@pytest.mark.parametrize("length", [260, 331, 1024, 2053])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_length_answer_and_depth(length, depth):
    p = passkey_prompt(length, depth, seed=7)
    assert len(p.input_ids) == length
    text = TOK.decode(p.input_ids)
    found = NEEDLE_RE.findall(text)
    assert len(found) == 1 and found[0][0] == found[0][1] == p.passkey
    assert TOK.decode(p.answer_ids) == " " + p.passkey and len(p.passkey) == 5
    assert text.endswith("What is the pass key? The pass key is")
    # the needle starts where the prompt says, and sits within one filler sentence of the requested depth
    needle_at = len(TOK.encode(text[:text.index("\nThe pass key is")]))
    assert needle_at == p.needle_start
    head = len(TOK.encode(text[:text.index("\n")]))
    needle_len = len(TOK.encode("\n" + found[0][0].join(["The pass key is ", ". Remember it. ", " is the pass key.\n"])))
    tail = len(TOK.encode("\nWhat is the pass key? The pass key is"))
    budget = length - head - 1 - needle_len - tail
    sentence = max(len(TOK.encode(s + " ")) for s in FILLER)
    assert abs(p.needle_start - (head + 1 + depth * budget)) <= sentence


def test_passkey_deterministic_and_seed_dependent():
    a, b = passkey_prompt(500, 0.5, seed=3), passkey_prompt(500, 0.5, seed=3)
    assert a == b
    keys = {t.passkey for t in passkey_trials(500, 0.5, 20, seed=3)}
    assert len(keys) > 15
    assert passkey_trials(500, 0.5, 4, seed=3) == passkey_trials(500, 0.5, 4, seed=3)


def test_passkey_digits_and_errors():
    assert len(passkey_prompt(300, 0.5, 0, digits=3).passkey) == 3
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(300, 1.5, 0)
    with pytest.raises(ValueError, match="length: 100 tokens is too short"):
        passkey_prompt(100, 0.5, 0)
    with pytest.raises(DataError, match="digits"):
        passkey_prompt(300, 0.5, 0, digits=0)


class CharTokenizer:
    """Two characters per token: a stand-in for a tokenizer whose tokens are not bytes."""
    def encode(self, text):
        return [hash(text[i:i + 2]) % 1000 for i in range(0, len(text), 2)]


def test_passkey_length_in_other_tokenizer():
    for length in (150, 151, 777):
        assert len(passkey_prompt(length, 0.4, 1, tokenizer=CharTokenizer()).input_ids) == length


@pytest.mark.parametrize("seq_len,n,q,vocab", [(16, 4, 4, 32), (37, 5, 3, 64), (101, 8, 8, 256), (9, 1, 1, 8)])
def test_mqar_answers_recoverable_and_labels(seq_len, n, q, vocab):
    b = mqar_batch(3, seq_len, n, vocab, seed=11, num_queries=q)
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape == labels.shape == (3, seq_len) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < vocab
    for r in range(3):
        row, lab = ids[r].tolist(), labels[r].tolist()
        keys, values = row[0:2 * n:2], row[1:2 * n:2]
        assert len(set(keys)) == n and all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        table = dict(zip(keys, values))
        answers = [t for t, l in enumerate(lab) if l != -100]
        assert len(answers) == q and all(t >= 2 * n + 1 for t in answers)
        asked = [row[t - 1] for t in answers]
        assert len(set(asked)) == q
        for t in answers:
            assert lab[t] == row[t] == table[row[t - 1]]   # the query's key occurred earlier with this value
        rest = [row[t] for t in range(2 * n, seq_len) if t not in answers and t + 1 not in answers]
        assert all(tok == 0 for tok in rest)


def test_mqar_data_interface_deterministic_and_held_out():
    d = MQARData(64, 4, seed=5)
    a, b = d.train_batch(3, 0, 4, 20), d.train_batch(3, 0, 4, 20)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], d.train_batch(4, 0, 4, 20)["input_ids"])
    assert not torch.equal(a["input_ids"], d.train_batch(3, 1, 4, 20)["input_ids"])
    val = d.val_batches(2, 4, 20)
    assert len(val) == 2 and not torch.equal(val[0]["input_ids"], d.train_batch(0, 0, 4, 20)["input_ids"])
    test = d.test_batches(2, 4, 20)
    assert torch.equal(test[1]["input_ids"], d.test_batches(2, 4, 20)[1]["input_ids"])
    assert not any(torch.equal(t["input_ids"], v["input_ids"]) for t in test for v in val)
    assert d.bytes_per_token == 1.0


def test_mqar_errors():
    with pytest.raises(DataError, match="seq_len"):
        mqar_batch(1, 10, 4, 64, 0)
    with pytest.raises(DataError, match="vocab_size"):
        mqar_batch(1, 40, 8, 16, 0)
    with pytest.raises(DataError, match="num_queries"):
        mqar_batch(1, 40, 4, 64, 0, num_queries=5)
    with pytest.raises(DataError, match="num_kv_pairs"):
        MQARData(64, 0)


# -- passkey fine-tuning data ----------------------------------------------------------------------------------

def test_passkey_data_rows_end_with_their_answer_and_score_it():
    from zoo.data.packing import IGNORE_INDEX
    from zoo.data.synthetic import PasskeyData
    data = PasskeyData(loss="lm")
    batch = data.train_batch(step=3, micro=0, batch_size=4, seq_len=400)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (4, 400)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        text = TOK.decode(row)
        key = NEEDLE_RE.findall(text)[0][0]
        assert text.endswith("What is the pass key? The pass key is " + key)
        assert lab == row   # loss "lm": every token
    val = data.val_batches(2, 4, 400)
    for b in val:
        scored = b["labels"] != IGNORE_INDEX
        assert scored.sum(1).tolist() == [6] * 4 and scored[:, -6:].all()   # " " and five digits, nothing else
        assert torch.equal(b["labels"][scored], b["input_ids"][scored])
    answer = PasskeyData().train_batch(3, 0, 4, 400)   # loss "answer", the default
    assert torch.equal(answer["input_ids"], ids) and ((answer["labels"] != IGNORE_INDEX).sum(1) == 6).all()


def test_passkey_data_is_deterministic_varied_and_disjoint_from_the_evaluation():
    from zoo.data.synthetic import PasskeyData
    data = PasskeyData(seed=1)
    a, b = data.train_batch(5, 1, 8, 512), data.train_batch(5, 1, 8, 512)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], data.train_batch(6, 1, 8, 512)["input_ids"])
    assert not torch.equal(a["input_ids"], PasskeyData(seed=2).train_batch(5, 1, 8, 512)["input_ids"])
    rows = [TOK.decode(r) for r in a["input_ids"].tolist()]
    starts = {r.index("The pass key is") for r in rows}
    assert len(starts) > 4   # depths differ from row to row
    train_keys = {NEEDLE_RE.findall(TOK.decode(r))[0][0] for s in range(20)
                  for r in data.train_batch(s, 0, 8, 300)["input_ids"].tolist()}
    eval_prompts = {tuple(t.input_ids) for d in (0.0, 0.5, 1.0) for t in passkey_trials(300 - 6, d, 10)}
    train_prompts = {tuple(r[:-6]) for s in range(20) for r in data.train_batch(s, 0, 8, 300)["input_ids"].tolist()}
    assert len(train_keys) > 100 and not eval_prompts & train_prompts


def test_passkey_data_min_len_varies_where_the_answer_sits_and_scores_nothing_after_it():
    from zoo.data.packing import IGNORE_INDEX
    from zoo.data.synthetic import PasskeyData
    varied = PasskeyData(loss="lm", min_len=300)
    batch = varied.train_batch(step=2, micro=0, batch_size=16, seq_len=400)
    ends = []
    for row, lab in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        text = TOK.decode(row)
        key = NEEDLE_RE.findall(text)[0][0]
        end = text.index("What is the pass key? The pass key is " + key) + len("What is the pass key? The pass key is ") + 5
        ends.append(end)
        assert 300 <= end <= 400 and len(row) == 400
        assert lab[:end] == row[:end] and set(lab[end:]) <= {IGNORE_INDEX}   # the filler after it: no loss
        assert text[end:] == TOK.decode(row[end:]) and "pass key" not in text[end:]
    assert len(set(ends)) > 8                                    # the answer's position varies row to row
    # min_len = seq_len is the fixed-length data, row for row (the lengths are drawn after the depths)
    assert torch.equal(PasskeyData(min_len=400).train_batch(2, 0, 16, 400)["input_ids"],
                       PasskeyData().train_batch(2, 0, 16, 400)["input_ids"])
    # validation keeps the full length, and the answer last
    for b in varied.val_batches(1, 4, 400):
        assert (b["labels"][:, -6:] != IGNORE_INDEX).all()
    with pytest.raises(DataError, match=r"min_len: 500 must be in \[1, seq_len=400\]"):
        PasskeyData(min_len=500).train_batch(0, 0, 2, 400)


def test_passkey_data_errors():
    from zoo.data.synthetic import PasskeyData
    with pytest.raises(DataError, match="loss: 'all' is not one of answer, lm"):
        PasskeyData(loss="all")
    with pytest.raises(DataError, match="too short for the passkey prompt"):
        PasskeyData().train_batch(0, 0, 2, 128)
