"""lm-evaluation-harness on zoo models: a model class registered as `zoo`, and tasks made from zoo's corpora.

    zoo lm-eval pretrained/mamba2 --tasks niah_single_1 --metadata '{"max_seq_lengths": [1024]}'
    zoo lm-eval pretrained/long/mamba2 --corpus-task stdlib:test --max-docs 20      # lm_eval's perplexity

`ZooHarnessLM` (lm_eval's HFLM with a zoo model inside): `pretrained` is a zoo checkpoint or run directory, or a
model directory written by `zoo export`; its tokenizer is the recipe's own (the byte tokenizer as the tokenizer.json
`zoo export` writes), its context the recipe's training length unless `max_length` says otherwise, and the token
that precedes a document in lm_eval's rolling log-likelihood is zoo's end-of-document id. Importing this module
registers it with lm_eval; lm_eval's own `lm_eval` command cannot find it (lm_eval has no plugin entry point), so
`zoo lm-eval` imports it and then runs lm_eval's command with `--model zoo`.

`corpus_task` writes a task for lm_eval's `loglikelihood_rolling` from a split of a zoo corpus: each document as
zoo's tokenizer produced it (its end-of-document token included, as the byte "\\x00" for the byte tokenizer), so
that lm_eval's total log-likelihood equals `zoo eval`'s perplexity with `eos_prefix` (every token scored, the first
given the end-of-document id, in disjoint windows of the context: exactly lm_eval's rolling windows) on the same
documents. lm_eval's bits per byte count the end-of-document byte, zoo's do not (it has no text).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import zoo
from evals.perplexity import select_documents
from zoo.data import load_corpus, load_tokenizer, prepare
from zoo.data.memmap import TokenFile

__all__ = ["ZooHarnessLM", "corpus_task", "hf_tokenizer"]


def hf_tokenizer(recipe, model_dir: Optional[Path] = None):
    """A transformers tokenizer with the recipe's ids: the model directory's own tokenizer.json when it has one, the
    byte tokenizer's written out (zoo.data.ByteTokenizer.save_pretrained), or the BPE directory the recipe names."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(model_dir))
    if recipe.train.tokenizer == "byte":
        with tempfile.TemporaryDirectory() as tmp:
            load_tokenizer("byte").save_pretrained(tmp)
            return PreTrainedTokenizerFast.from_pretrained(tmp)
    return AutoTokenizer.from_pretrained(recipe.train.tokenizer)


@register_model("zoo")
class ZooHarnessLM(HFLM):
    """lm_eval's HFLM around a zoo model loaded from `pretrained` (a checkpoint, run or model directory)."""

    def __init__(self, pretrained: str, max_length: Optional[int] = None, device: str = "cpu", batch_size=1,
                 **kwargs):
        from zoo.hf import ZooForCausalLM
        model = zoo.load_checkpoint(pretrained).eval()
        tok = hf_tokenizer(model.recipe, Path(pretrained))
        eos = load_tokenizer(model.recipe.train.tokenizer).eos_id
        self._zoo_eos = eos
        super().__init__(pretrained=ZooForCausalLM.from_zoo(model), tokenizer=tok, backend="causal", device=device,
                         batch_size=batch_size, max_length=int(max_length or model.recipe.train.seq_len),
                         prefix_token_id=eos, **kwargs)
        self.zoo_model = model

    @property
    def eot_token_id(self):
        """zoo's end-of-document id (the byte tokenizer's tokenizer.json declares no special token: its id 0 is the
        byte 0, HFLM would otherwise find no end-of-text id to stop generation at)."""
        return self._zoo_eos if self.tokenizer.eos_token_id is None else self.tokenizer.eos_token_id


TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
  source: "zoo corpus {corpus}, split {split}, {docs} documents (evals.harness.corpus_task)"
"""


def corpus_task(corpus: str, split: str, out_dir, tokenizer: str = "byte", max_tokens: Optional[int] = None,
                max_docs: Optional[int] = None, data_root="data") -> str:
    """Write `zoo_<corpus>_<split>` (a task YAML and its JSONL) into `out_dir` and return the task's name: the
    documents `zoo eval` scores with the same budget (`max_tokens` targets in split order, at most `max_docs`)."""
    load_corpus(corpus)   # a bad name fails here, before any preparation
    prepared = prepare(corpus, tokenizer, root=data_root)
    file = TokenFile(prepared / split)
    tok = load_tokenizer(tokenizer)
    chosen = select_documents(file, max_tokens)[:max_docs]
    name = "zoo_" + "".join(c if c.isalnum() else "_" for c in f"{corpus}_{split}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    with open(data, "w") as f:
        for index, n in chosen:
            ids = np.asarray(file.document(index)[:n]).tolist()
            f.write(json.dumps({"text": tok.decode(ids), "zoo_document": int(index)}) + "\n")
    (out / f"{name}.yaml").write_text(TASK.format(name=name, data=json.dumps(str(data)), corpus=corpus, split=split,
                                                  docs=len(chosen)))
    return name
