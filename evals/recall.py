"""Synthetic recall: passkey retrieval over a grid of lengths x depths, and MQAR after a small training budget.

Passkey (filler-text protocol of Landmark Attention, arXiv 2305.16300, as used by Infini-attention, arXiv
2404.07143; prompts from `zoo.data.synthetic`): the answer is decoded greedily through the model's cache -
the prompt is prefilled with `model(prompt, cache=cache)`, then each argmax token is fed back one at a
time - and a trial counts only if every answer token (" " + the digits) matches. Greedy decoding rather
than teacher forcing: a model that gets the first digit wrong is not handed the rest.

MQAR (Zoology, arXiv 2312.04927): `mqar_eval` trains a fresh model of a recipe with the Trainer for a
fixed step budget and reports the argmax accuracy at every query on held-out batches.

    grid = passkey_grid(model, lengths=[256, 1024], depths=[0, 0.5, 1], n_trials=10)
    print(format_grid(grid))
    res = mqar_eval("recipes/transformer.yaml", budget_steps=200, seq_len=128, num_kv_pairs=8)
"""
from __future__ import annotations

import tempfile
import time
from typing import Optional, Sequence

import torch

from zoo.config import Recipe, load_recipe
from zoo.data.synthetic import MQARData, passkey_trials
from zoo.data.packing import IGNORE_INDEX
from zoo.train.trainer import Trainer, TrainingError


@torch.no_grad()
def greedy_answer(model, prompts: torch.Tensor, n_tokens: int, prefill_chunk: int = 1024) -> torch.Tensor:
    """[batch, n_tokens] argmax continuation of `prompts` [batch, length], streamed through the cache; the
    prompt goes in chunks of `prefill_chunk` tokens, so a long prompt's activations (attention's scores
    above all) stay bounded by the chunk."""
    cache = model.init_cache(prompts.shape[0])
    for start in range(0, prompts.shape[1], prefill_chunk):
        logits = model(prompts[:, start:start + prefill_chunk], cache=cache).logits
    out = [logits[:, -1].argmax(-1)]
    for _ in range(n_tokens - 1):
        logits = model(out[-1][:, None], cache=cache).logits
        out.append(logits[:, -1].argmax(-1))
    return torch.stack(out, dim=1)


def passkey_grid(model, lengths: Sequence[int], depths: Sequence[float], n_trials: int, tokenizer=None,
                 device=None, seed: int = 0, batch_size: Optional[int] = None, digits: int = 5) -> dict:
    """Exact-match accuracy per (length, depth): accuracy[i][j] for lengths[i], depths[j], in [0, 1].
    Trials of one cell share a length, so they run as one batch (or chunks of `batch_size`)."""
    if n_trials < 1:
        raise ValueError(f"n_trials: {n_trials} must be >= 1")
    if not lengths or not depths:
        raise ValueError(f"lengths / depths: both must be non-empty, got {list(lengths)} and {list(depths)}")
    device = torch.device(device) if device is not None else next(model.parameters(), torch.empty(0)).device
    batch_size = batch_size or n_trials
    was_training = model.training
    model.eval()
    accuracy = []
    try:
        for length in lengths:
            row = []
            for depth in depths:
                trials = passkey_trials(length, depth, n_trials, seed, tokenizer, digits)
                correct = 0
                for start in range(0, n_trials, batch_size):
                    chunk = trials[start:start + batch_size]
                    prompts = torch.tensor([t.input_ids for t in chunk], device=device)
                    answers = torch.tensor([t.answer_ids for t in chunk], device=device)
                    got = greedy_answer(model, prompts, answers.shape[1])
                    correct += (got == answers).all(dim=1).sum().item()
                row.append(correct / n_trials)
            accuracy.append(row)
    finally:
        model.train(was_training)
    return {"task": "passkey", "lengths": list(lengths), "depths": list(depths), "n_trials": n_trials,
            "seed": seed, "scoring": "greedy exact match", "accuracy": accuracy}


def format_grid(grid: dict) -> str:
    """A markdown table: one row per depth, one column per length, accuracy in percent."""
    head = "| depth \\ length | " + " | ".join(str(l) for l in grid["lengths"]) + " |"
    rule = "|---|" + "---:|" * len(grid["lengths"])
    rows = [f"| {d:g} | " + " | ".join(f"{100 * grid['accuracy'][i][j]:.0f}%" for i in range(len(grid["lengths"])))
            + " |" for j, d in enumerate(grid["depths"])]
    return "\n".join([head, rule, *rows])


@torch.no_grad()
def mqar_accuracy(model, batches) -> tuple[float, float]:
    """(fraction of queries answered right, fraction of sequences with every query right) by argmax."""
    model.eval()
    hits = total = exact = rows = 0
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        pred = model(ids.to(next(model.parameters()).device)).logits[:, :-1].argmax(-1).cpu()
        target = labels[:, 1:]
        mask = target != IGNORE_INDEX
        right = (pred == target) & mask
        hits, total = hits + right.sum().item(), total + mask.sum().item()
        exact, rows = exact + (right.sum(1) == mask.sum(1)).sum().item(), rows + ids.shape[0]
    return hits / total, exact / rows


def mqar_eval(recipe, budget_steps: int, seq_len: int, num_kv_pairs, num_queries: Optional[int] = None,
              batch_size: Optional[int] = None, lr: Optional[float] = None, eval_batches: int = 4,
              seed: int = 0, device=None, out_dir=None, overrides: Sequence[str] = ()) -> dict:
    """Train a fresh model of `recipe` (a Recipe, path or mapping) on MQAR for `budget_steps` optimizer steps
    and score it on held-out batches. The recipe's train section is kept except seq_len, max_steps,
    warmup (capped at a tenth of the budget), and batch_size / lr when given. Keys and values fill the
    model's vocabulary; chance is one over the number of values. num_kv_pairs a list: one model trains on
    the mix (Zoology's training setup) and is scored at each count: `by_kv_pairs` {count: {accuracy,
    exact_match}}, and `accuracy` / `exact_match` their means."""
    if budget_steps < 1:
        raise ValueError(f"budget_steps: {budget_steps} must be >= 1")
    base = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
    first = load_recipe(base, list(overrides))
    warmup = min(first.train.warmup_steps, budget_steps // 10)
    ov = [*overrides, f"train.max_steps={budget_steps}", f"train.seq_len={seq_len}", f"train.warmup_steps={warmup}",
          f"train.eval_every={budget_steps}", f"train.save_every={budget_steps}", f"train.eval_batches={eval_batches}",
          f"train.seed={seed}", "train.grad_accum=1"]
    ov += [f"train.batch_size={batch_size}"] if batch_size else []
    ov += [f"train.lr={lr}"] if lr else []
    rec = load_recipe(base, ov)
    vocab = rec.model.vocab_size
    data = MQARData(vocab, num_kv_pairs, num_queries, seed=seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(rec, data, out_dir or tmp, device=device, progress=False, log=lambda s: None)
        result = trainer.train()
    if result.stopped:   # a SIGTERM / Ctrl-C mid-run: a model short of its budget is not a result
        raise TrainingError(f"mqar: stopped by {result.stopped} at step {result.step} of {budget_steps}; the run is "
                            "not recorded (rerun to continue the sweep)")
    seconds = time.perf_counter() - start
    by_kv = {}
    for kv in data.counts:
        acc, exact = mqar_accuracy(trainer.model, data.test_batches(eval_batches, rec.train.batch_size, seq_len, kv))
        by_kv[kv] = {"accuracy": acc, "exact_match": exact}
    acc = sum(r["accuracy"] for r in by_kv.values()) / len(by_kv)
    exact = sum(r["exact_match"] for r in by_kv.values()) / len(by_kv)
    return {"task": "mqar", "recipe": rec.name, "steps": budget_steps, "seq_len": seq_len,
            "num_kv_pairs": num_kv_pairs, "num_queries": num_queries, "vocab_size": vocab, "by_kv_pairs": by_kv,
            "batch_size": rec.train.batch_size, "lr": rec.train.lr, "accuracy": acc, "exact_match": exact,
            "chance": 1 / (vocab - vocab // 2), "train_loss": result.train_loss, "val_loss": result.val_loss,
            "train_seconds": seconds}


def format_mqar(results: Sequence[dict]) -> str:
    """A markdown table of `mqar_eval` results, one row each."""
    lines = ["| recipe | kv pairs | seq_len | steps | accuracy | exact match | chance |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['recipe']} | {r['num_kv_pairs']} | {r['seq_len']} | {r['steps']} | "
                     f"{100 * r['accuracy']:.1f}% | {100 * r['exact_match']:.1f}% | {100 * r['chance']:.1f}% |")
    return "\n".join(lines)
