"""results.json of a comparison -> report.md tables and PNG plots (issue 7, item 5).

Layout of results.json (written by scripts/compare.py, read here):

    {"meta": {"torch": ..., "device": "cpu", "world_size": 1, ...},
     "recipes": {name: {"params": {...}, "d_model": ..., "checkpoint": ...}},
     "cells": {"<recipe>|<eval>|<scheme>|<context>": {"recipe", "eval", "scheme", "context", ..., "units": {...}}}}

A cell is the unit of work and of resumption: `cell_key` names it. Evals and their schemes:
`train` (scheme `budget`), `ppl` (blocks / sliding / streaming; the streaming context is `doc`),
`compression` (gzip-9 / xz-9, recipe `-`), `memory` (forward / decode / train), `throughput`
(prefill / decode / train), `passkey` (scheme `greedy`, context = prompt length), `decode_memory` (scheme
`chunked`: decode memory after a chunked prefill, evals/context_memory.py), `longest_train` (scheme `W1`,
`W2`, ...: the longest trainable context under a per-rank cap; no context, so its key ends in `doc`),
`extrapolation` (scheme `streaming`, context = the streamed length: bits/byte by position around the
training length, with a verdict; evals/perplexity.py).

Ranking (issue 16): where cells carry an interval (`bits_per_byte_ci`; for throughput the range of the
repeats from median to best), a column's best is bold and every recipe whose interval overlaps the best's
is marked ≈: not ranked against it. report.md opens with findings computed from the cells (evals/findings.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from evals.bootstrap import best_and_ties
from evals.findings import findings
from evals.recall_report import mqar_table, mqar_text, plot_mqar
from evals.ruler import plot_ruler, ruler_table, ruler_text
from evals.render import log2_middle, pyplot as _pyplot, save as _save, table as _table
from evals.results import (bpb_interval, cells, contexts as _contexts, fmt_bytes as _fmt_bytes,
                           lookup as _lookup, passkey_accuracy, pct as _pct, recipes as _recipes, throughput_range,
                           verdict_difference)

MIB = 2**20


def run_peak(c: dict) -> Optional[int]:
    """The memory the measured run itself took (see evals/throughput.py); the process peak above the
    weights where a record has no such figure."""
    r = c.get("result") or {}
    if r.get("run_peak_bytes") is not None:
        return r["run_peak_bytes"]
    return c["peak_bytes"] - r.get("weights_bytes", 0)


def _memory_cell_text(c: Optional[dict], total: bool = False) -> str:
    if c is None:
        return "-"
    if c["status"] != "ok":
        return c["status"]
    return _fmt_bytes(run_peak(c)) + (f" ({_fmt_bytes(c['peak_bytes'])})" if total else "")


def _marks(items: dict, lower_is_better: bool = True) -> dict:
    """name -> "**" (best), "≈" (its interval overlaps the best's) or "" for {name: (value, interval)}."""
    items = {n: v for n, v in items.items() if v[0] is not None}
    if len(items) < 2:
        return {}
    best, ties = best_and_ties(items, lower_is_better)
    return {best: "**", **{n: "≈" for n in ties}}


def _marked(text: str, mark: str) -> str:
    return f"**{text}**" if mark == "**" else f"≈ {text}" if mark == "≈" else text


def _bpb_text(c: Optional[dict], mark: str = "") -> str:
    if c is None:
        return "-"
    iv = bpb_interval(c)
    text = f"{c['bits_per_byte']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")
    return _marked(text, mark)


RANKING_NOTE = ("**bold**: the lowest in its column; ≈: its 95% interval overlaps the lowest's, so the two are "
                "not ranked. Intervals: bootstrap over the scored documents (evals/bootstrap.py).")


# -- tables ------------------------------------------------------------------------------------------------------

def summary_table(results: dict) -> str:
    """One row per recipe: size, training, bits per byte at the longest context, streaming, decode speed,
    decode memory at the longest context, passkey accuracy."""
    ppl_ctx = _contexts(cells(results, "ppl", "blocks"))
    mem_ctx = _contexts(cells(results, "memory", "decode"))
    thr_ctx = _contexts(cells(results, "throughput", "decode"))
    L = ppl_ctx[-1] if ppl_ctx else None
    M = mem_ctx[-1] if mem_ctx else None
    T = thr_ctx[-1] if thr_ctx else None
    D = _summary_decode_context(results)
    header = ["recipe", "params", "train tokens", "train s", "train loss (nats)",
              f"bits/byte blocks@{L}", "bits/byte streaming", f"decode tok/s @{T}",
              f"decode run mem @{M}" if D is None else f"decode mem @{D} (chunked prefill)",
              f"state @{M} (analytic)" if D is None else f"cache @{D}", "passkey acc (each length)"]
    rows = []
    ppl = {s: {n: c for n in _recipes(results) if (c := _lookup(results, n, "ppl", s, L if s == "blocks" else None))}
           for s in ("blocks", "streaming")}
    marks = {s: _marks({n: (c["bits_per_byte"], bpb_interval(c)) for n, c in ppl[s].items()}) for s in ppl}
    marks["decode"] = _marks({n: throughput_range(c) for n in _recipes(results)
                              if (c := _lookup(results, n, "throughput", "decode", T))}, lower_is_better=False)
    for name in _recipes(results):
        info = results["recipes"][name]
        tr = _lookup(results, name, "train", "budget", info.get("seq_len"))
        pb = _lookup(results, name, "ppl", "blocks", L)
        ps = _lookup(results, name, "ppl", "streaming", None)
        th = _lookup(results, name, "throughput", "decode", T)
        me = _lookup(results, name, "memory", "decode", M)
        pk = [c for c in cells(results, "passkey") if c["recipe"] == name]
        # one figure per prompt length: a mean over lengths would mix 1x with 4x the fine-tuning length
        acc = [f"{100 * passkey_accuracy(c)[0]:.0f}%" for c in sorted(pk, key=lambda c: c["context"])]
        state = me.get("result", {}).get("state_bytes") if me and me.get("status") == "ok" else None
        if D is not None:
            dm = _lookup(results, name, "decode_memory", "chunked", D)
            ok = dm is not None and dm["status"] == "ok"
            mem_text = _fmt_bytes(dm["result"]["decode_bytes"]) if ok else (dm["status"] if dm else "-")
            state = dm["result"]["cache_bytes"] if ok else None
        else:
            mem_text = _memory_cell_text(me)
        rows.append([name, f"{info['params']['total']:,}",
                     f"{tr['tokens']:,}" if tr else "-", f"{tr['seconds']:.1f}" if tr else "-",
                     f"{tr['train_loss']:.3f}" if tr else "-",
                     _bpb_text(pb, marks["blocks"].get(name, "")), _bpb_text(ps, marks["streaming"].get(name, "")),
                     _marked(f"{th['tokens_per_s']:.0f}", marks["decode"].get(name, "")) if th else "-", mem_text,
                     _fmt_bytes(state),
                     " / ".join(acc) or "-"])
    return _table(header, rows)


def _summary_decode_context(results: dict) -> Optional[int]:
    """The longest decode-memory context every recipe measured (else the longest any did); None without any."""
    cs = cells(results, "decode_memory")
    names = {c["recipe"] for c in cs}
    ok = [c for c in _contexts(cs) if all((_lookup(results, n, "decode_memory", "chunked", c) or {}).get("status")
                                          == "ok" for n in names)]
    return ok[-1] if ok else (_contexts(cs)[-1] if cs else None)


def perplexity_table(results: dict) -> str:
    schemes = sorted({c["scheme"] for c in cells(results, "ppl")}, key=["blocks", "sliding", "streaming"].index)
    cols = [(s, c) for s in schemes for c in (_contexts(cells(results, "ppl", s)) or [None])]
    header = ["recipe"] + [f"{s}@{'doc' if c is None else c}" for s, c in cols]
    names = _recipes(results)
    grid = {(n, col): _lookup(results, n, "ppl", *col) for n in names for col in cols}
    marks = {col: _marks({n: (grid[n, col]["bits_per_byte"], bpb_interval(grid[n, col]))
                          for n in names if grid[n, col]}) for col in cols}
    rows = [[n] + [_bpb_text(grid[n, col], marks[col].get(n, "")) for col in cols] for n in names]
    table = _table(header, rows) + "\n\n" + RANKING_NOTE
    refs = cells(results, "compression")
    if refs:
        table += ("\n\nReference on the same text: " + ", ".join(f"{c['scheme']} {c['bits_per_byte']:.3f}" for c in refs)
                  + " bits/byte.")
    return table


def memory_table(results: dict) -> str:
    kinds = [k for k in ("forward", "decode", "train") if cells(results, "memory", k)]
    ctx = _contexts(cells(results, "memory"))
    header = ["recipe", "kind"] + [str(c) for c in ctx]
    rows = []
    for name in _recipes(results):
        for k in kinds:
            rows.append([name, k] + [_memory_cell_text(_lookup(results, name, "memory", k, c), total=True)
                                     for c in ctx])
        states = []
        for c in ctx:
            d = _lookup(results, name, "memory", "decode", c)
            states.append(_fmt_bytes(d["result"]["state_bytes"]) if d and d.get("status") == "ok" else "-")
        rows.append([name, "state (analytic)"] + states)
    return _table(header, rows)


def decode_memory_table(results: dict) -> str:
    """Per recipe, by context: the decode steps' peak RSS above the warmed-up model, the cache's tensor bytes
    and the analytic state (when it differs from them), and how much the cache grew from the shortest to the
    longest context measured."""
    cs = cells(results, "decode_memory")
    ctx = _contexts(cs)
    header = ["recipe", "figure"] + [str(c) for c in ctx] + ["cache growth"]
    rows = []
    for name in _recipes(results):
        row = {c: _lookup(results, name, "decode_memory", "chunked", c) for c in ctx}
        if not any(row.values()):
            continue
        ok = {c: r for c, r in row.items() if r and r["status"] == "ok"}

        def line(figure, fn):
            return [name, figure] + [("-" if row[c] is None else row[c]["status"]) if c not in ok
                                     else fn(ok[c]["result"]) for c in ctx]
        caches = [ok[c]["result"]["cache_bytes"] for c in sorted(ok)]
        growth = ("-" if len(caches) < 2 else "flat" if caches[-1] == caches[0]
                  else f"x{caches[-1] / max(caches[0], 1):.1f} over x{max(ok) / min(ok):.0f} context")
        rows.append(line("decode (measured)", lambda r: _fmt_bytes(r["decode_bytes"])) + [""])
        rows.append(line("cache (tensors)", lambda r: _fmt_bytes(r["cache_bytes"])) + [growth])
        if any(r["result"]["state_bytes"] != r["result"]["cache_bytes"] for r in ok.values()):
            rows.append(line("state_bytes (analytic)", lambda r: _fmt_bytes(r["state_bytes"])) + [""])
        rows.append(line("prefill peak (measured)", lambda r: _fmt_bytes(r["prefill_peak_bytes"])) + [""])
    table = _table(header, rows)
    skipped = [f"{c['recipe']}@{c['context']}: {c['reason']}" for c in cs if c["status"] == "skipped"]
    return table + ("\n\nSkipped: " + "; ".join(skipped) + "." if skipped else "")


# What the seed papers claim about training length, beside our measurement (issue 16).
TRAINING_LENGTH_CLAIMS = (
    "Claims of the seed papers, for comparison: Blockwise Parallel Transformer (arXiv 2305.19370) trains "
    "sequences up to 32x longer than vanilla attention and 2-4x longer than memory-efficient attention at the "
    "same memory; Ring Attention (arXiv 2310.01889) grows the trainable length with the number of devices "
    "(W devices of the same memory: about W times the one-device length, less what every rank holds whatever "
    "its share: weights, gradients, optimizer state).")


def longest_train_table(results: dict) -> str:
    """Per recipe, per world size W: the longest context a training step (forward + backward + AdamW step)
    fits in the per-rank cap, and its ratio to W = 1."""
    cs = cells(results, "longest_train")
    if not cs:
        return ""
    worlds = sorted({c["world_size"] for c in cs})
    header = ["recipe"] + [f"W={w}" for w in worlds] + [f"W={w} / W=1" for w in worlds if w > 1 and 1 in worlds]
    rows = []
    for name in _recipes(results):
        row = {c["world_size"]: c for c in cs if c["recipe"] == name}
        if not row:
            continue
        texts, longest = [], {}
        for w in worlds:
            c = row.get(w)
            if c is None:
                texts.append("-")
            elif c.get("longest") is None:
                texts.append(f"< {c['start']} ({c.get('failing_status')})")
            else:
                longest[w] = c["longest"]
                texts.append(f">= {c['longest']} (search limit)" if c.get("first_failing") is None else
                             f"{c['longest']:,}" + ("" if c.get("failing_status") == "OOM"
                                                    else f" ({c.get('failing_status')} at {c['first_failing']:,})"))
        ratios = [f"{longest[w] / longest[1]:.2f}x" if w in longest and 1 in longest else "-"
                  for w in worlds if w > 1 and 1 in worlds]
        rows.append([name] + texts + ratios)
    caps = sorted({c["cap_gb"] for c in cs})
    steps = sorted({c["step"] for c in cs})
    return ("Per-rank cap " + ", ".join(_fmt_bytes(g * 2**30) for g in caps) + " above each rank's warmed-up "
            "baseline (weights excluded; gradients, AdamW moments and activations counted); the search doubles "
            "from " + ", ".join(str(c["start"]) for c in cs[:1]) + " tokens, then bisects on multiples of "
            + ", ".join(map(str, steps)) + "; one fresh set of gloo processes per probe.\n\n"
            + _table(header, rows) + "\n\n" + TRAINING_LENGTH_CLAIMS)


def throughput_table(results: dict, clock: str = "wall") -> str:
    """Per kind, per recipe, by context: tokens/s on `clock` (wall, or cpu: per CPU-second of the process),
    best of the repeats with their median in brackets; per column the best bold, and ≈ where the repeats'
    ranges (median to best) overlap the best's."""
    kinds = [k for k in ("prefill", "decode", "train") if cells(results, "throughput", k)]
    ctx = _contexts(cells(results, "throughput"))
    header = ["kind", "recipe"] + [str(c) for c in ctx]
    rows = []
    for k in kinds:
        grid = {(n, c): _lookup(results, n, "throughput", k, c) for n in _recipes(results) for c in ctx}
        marks = {c: _marks({n: throughput_range(grid[n, c], clock) for n in _recipes(results) if grid[n, c]},
                           lower_is_better=False) for c in ctx}
        for name in _recipes(results):
            row = [k, name]
            for c in ctx:
                cell = grid[name, c]
                best, rng = throughput_range(cell, clock) if cell else (None, None)
                text = "-" if best is None else f"{best:,.0f}" + (f" ({rng[0]:,.0f})" if rng else "")
                row.append(_marked(text, marks[c].get(name, "")))
            rows.append(row)
    return _table(header, rows)


def extrapolation_table(results: dict) -> str:
    """Per recipe: streaming bits/byte [interval] by position bucket, the buckets past the training
    length marked, the same targets with the history cut to the training length where scored, and the
    verdict of evals.perplexity.extrapolation_verdict."""
    cs = [c for c in cells(results, "extrapolation") if c["recipe"] in _recipes(results)]
    if not cs:
        return ""
    spans = sorted({tuple(b["positions"]) for c in cs for b in c.get("buckets", [])})
    labels = {tuple(b["positions"]): b["label"] for c in cs for b in c.get("buckets", [])}
    header = ["recipe", "history", "documents"] + [labels[sp] for sp in spans] + ["past the training length"]
    rows = []
    for c in sorted(cs, key=lambda c: _recipes(results).index(c["recipe"])):
        T = c.get("train_len")
        ref = (c.get("reference") or {}).get("positions")

        def line(buckets, bold):
            by = {tuple(b["positions"]): b for b in buckets}
            return [("-" if sp not in by else ("→ " if T is not None and sp[0] >= T else "")
                     + _bpb_text(by[sp], "**" if bold and list(sp) == ref else "")) for sp in spans]
        verdict = c.get("verdict") or c.get("status", "-")
        shown = next((r for r in c.get("past", []) if r["label"] == c.get("breaks_at")), None) if c.get("breaks_at") \
            else (c.get("past") or [None])[-1]
        if shown:
            d, iv, against = verdict_difference(c, shown)
            verdict += (f" at {shown['label']}" if c.get("breaks_at") else f" ({shown['label']}") + \
                f"{' (' if c.get('breaks_at') else ': '}{d:+.3f} [{iv[0]:+.3f}, {iv[1]:+.3f}] vs {against})"
        rows.append([c["recipe"], "whole (streaming)", c.get("documents", "-")] + line(c.get("buckets", []), True)
                    + [verdict])
        if c.get("bounded"):
            b = c["bounded"]
            rows.append([c["recipe"], f"at most {b['context']} (sliding, stride {b['stride']})", c.get("documents", "-")]
                        + line(b["buckets"], False) + [""])
    margin = next((c["margin"] for c in cs if c.get("margin") is not None), None)
    return (_table(header, rows) + "\n\nBold: the last bucket inside the training length; → : buckets past it. "
            "Each bucket past the training length gets the paired bootstrap interval of a bits/byte difference over "
            "the same documents: against the same targets with the history cut to the training length where that "
            "row exists (what the longer history adds, the text held fixed), else against the bold bucket. "
            f"`breaks`: one lies wholly above +{100 * (margin or 0):g}% of the bold bucket's bits/byte; "
            "`keeps falling`: the furthest lies wholly below minus that; `flat` otherwise. In brackets: that "
            "difference [95% interval] in bits/byte.")


def passkey_intro(results: dict) -> list:
    """The line saying which weights answered: the passkey fine-tunes (`zoo recall passkey`) or the LMs."""
    tuned = [c for c in cells(results, "passkey") if c.get("finetune_len")]
    if not tuned:
        return []
    lens = sorted({c["finetune_len"] for c in tuned})
    return [f"The passkey fine-tunes of the compared models (`zoo recall passkey`, {', '.join(map(str, lens))}-token "
            "prompts, needle at a uniform depth, checkpoints in " + ", ".join(sorted({str(Path(c['checkpoint']).parents[2])
                                                                                   for c in tuned})) +
            "), greedy exact match of the five digits; lengths are multiples of the fine-tuning length."]


def passkey_tables(results: dict) -> str:
    out = []
    for name in _recipes(results):
        pk = sorted((c for c in cells(results, "passkey") if c["recipe"] == name), key=lambda c: c["context"])
        if not pk:
            continue
        depths = pk[0]["depths"]
        rows = [[f"{d:g}"] + [f"{100 * c['accuracy'][j]:.0f}%" for c in pk] for j, d in enumerate(depths)]
        rows.append(["all [95% interval]"] + [_pct(passkey_accuracy(c)) for c in pk])
        out.append(f"**{name}** ({pk[0]['n_trials']} trials per cell, greedy exact match; the interval: Wilson's, "
                   "over the prompts of the column)\n\n"
                   + _table(["depth \\ length"] + [str(c["context"]) for c in pk], rows))
    return "\n\n".join(out)


# -- plots -------------------------------------------------------------------------------------------------------

def _context_panel(ax, ylabel: str, title: str, legend_size: int):
    """A log-log panel against context length (powers of two on x)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_perplexity(results: dict, path: Path, title: str = "") -> Optional[Path]:
    if not cells(results, "ppl"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, name in enumerate(_recipes(results)):
        for scheme, style in (("blocks", "o-"), ("sliding", "s--")):
            cs = sorted((c for c in cells(results, "ppl", scheme) if c["recipe"] == name), key=lambda c: c["context"])
            if cs:
                x, y = [c["context"] for c in cs], [c["bits_per_byte"] for c in cs]
                ivs = [bpb_interval(c) for c in cs]
                err = None if None in ivs else [[v - iv[0] for v, iv in zip(y, ivs)], [iv[1] - v for v, iv in zip(y, ivs)]]
                ax.errorbar(x, y, yerr=err, fmt=style, color=f"C{i}", capsize=3, label=f"{name} ({scheme})")
        s = _lookup(results, name, "ppl", "streaming", None)
        if s:
            ax.axhline(s["bits_per_byte"], color=f"C{i}", linestyle=":", linewidth=1,
                       label=f"{name} (streaming, whole document)")
            if bpb_interval(s):
                ax.axhspan(*bpb_interval(s), color=f"C{i}", alpha=0.08)
    for k, c in enumerate(cells(results, "compression")):
        ax.axhline(c["bits_per_byte"], color="grey", linestyle=("--", "-.")[k % 2], label=c["scheme"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(title or "Held-out bits per byte by context\n(bars, bands: 95% interval over documents)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, path)


def plot_memory(results: dict, path: Path, title: str = "") -> Optional[Path]:
    """Measured peak above the weights vs context, log-log, one panel per kind; the analytic inference state
    (sum of `state_bytes`) drawn as a dashed line of the same colour in the decode panel."""
    kinds = [k for k in ("forward", "decode", "train") if cells(results, "memory", k)]
    if not kinds:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, name in enumerate(_recipes(results)):
            cs = sorted((c for c in cells(results, "memory", kind) if c["recipe"] == name), key=lambda c: c["context"])
            ok = [c for c in cs if c["status"] == "ok"]
            if ok:
                ax.plot([c["context"] for c in ok], [max(run_peak(c), 1) / MIB for c in ok], "o-", color=f"C{i}",
                        label=f"{name} measured")
            if kind == "decode" and ok:
                ax.plot([c["context"] for c in ok], [max(c["result"]["state_bytes"], 1) / MIB for c in ok], "--",
                        color=f"C{i}", label=f"{name} state_bytes (analytic)")
            for c in cs:
                if c["status"] != "ok":
                    ax.annotate(c["status"], (c["context"], ax.get_ylim()[1]), color=f"C{i}", fontsize=7)
        _context_panel(ax, "MiB (log scale)", {"forward": "inference forward (no cache)", "train":
                       "training forward + backward", "decode": "prefill + decode through the cache"}[kind], 6)
    fig.suptitle(title or "Memory the run takes vs context: peak RSS above a warmed-up model (fresh process "
                 "per point); dashed: analytic inference state", fontsize=10)
    return _save(plt, fig, path)


def plot_decode_memory(results: dict, path: Path, title: str = "") -> Optional[Path]:
    """Decode memory vs context, log-log: per recipe the measured decode peak (solid) and the cache's tensor
    bytes (dashed); a constant state is a horizontal line, a KV cache a line of slope 1."""
    cs = cells(results, "decode_memory")
    if not any(c["status"] == "ok" for c in cs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, name in enumerate(_recipes(results)):
        ok = sorted((c for c in cs if c["recipe"] == name and c["status"] == "ok"), key=lambda c: c["context"])
        if not ok:
            continue
        x = [c["context"] for c in ok]
        # floor at 1 KiB: a small state can leave the RSS unchanged (its pages reused from the warm-up)
        ax.plot(x, [max(c["result"]["decode_bytes"], 1024) / MIB for c in ok], "o-", color=f"C{i}",
                label=f"{name} decode peak (measured)")
        ax.plot(x, [max(c["result"]["cache_bytes"], 1024) / MIB for c in ok], "s--", color=f"C{i}",
                label=f"{name} cache tensors")
        for c in cs:
            if c["recipe"] == name and c["status"] != "ok":
                ax.annotate(c["status"], (c["context"], ok[-1]["result"]["cache_bytes"] / MIB), color=f"C{i}",
                            fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("MiB (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title or "Decode memory by context after a chunked prefill: constant state flat, KV cache growing",
                 fontsize=9)
    return _save(plt, fig, path)


def plot_throughput(results: dict, path: Path, title: str = "") -> Optional[Path]:
    kinds = [k for k in ("prefill", "decode", "train") if cells(results, "throughput", k)]
    if not kinds:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, name in enumerate(_recipes(results)):
            cs = sorted((c for c in cells(results, "throughput", kind) if c["recipe"] == name),
                        key=lambda c: c["context"])
            if cs:
                x = [c["context"] for c in cs]
                ax.plot(x, [c["tokens_per_s"] for c in cs], "o-", color=f"C{i}", label=f"{name} wall")
                if all(throughput_range(c)[1] for c in cs):
                    ax.fill_between(x, [throughput_range(c)[1][0] for c in cs], [c["tokens_per_s"] for c in cs],
                                    color=f"C{i}", alpha=0.2)
                if all(c.get("tokens_per_cpu_s") for c in cs):
                    ax.plot(x, [c["tokens_per_cpu_s"] for c in cs], ":", color=f"C{i}", label=f"{name} CPU")
        _context_panel(ax, "tokens / s (higher is better)", {"prefill": "prefill (forward through the cache)",
                       "decode": "decode (1 token per step)", "train": "training forward + backward"}[kind], 6)
    fig.suptitle(title or "Throughput vs context: best of the repeats (solid), band down to their median;\n"
                 "dotted: per CPU-second of the process", fontsize=9)
    return _save(plt, fig, path)


def plot_extrapolation(results: dict, path: Path, title: str = "") -> Optional[Path]:
    """Streaming bits/byte by position bucket (at the bucket's middle, log x), a band for the 95% interval,
    a dotted vertical line at each recipe's training length."""
    cs = [c for c in cells(results, "extrapolation") if c.get("buckets")]
    if not cs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, name in enumerate(_recipes(results)):
        c = next((c for c in cs if c["recipe"] == name), None)
        if c is None:
            continue
        bs = c["buckets"]
        x = [log2_middle(*b["positions"]) for b in bs]
        ax.plot(x, [b["bits_per_byte"] for b in bs], "o-", color=f"C{i}",
                label=f"{name}: {c.get('verdict') or '-'}")
        ivs = [bpb_interval(b) for b in bs]
        if None not in ivs:
            ax.fill_between(x, [iv[0] for iv in ivs], [iv[1] for iv in ivs], color=f"C{i}", alpha=0.15)
        if c.get("train_len"):
            ax.axvline(c["train_len"], color=f"C{i}", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the document (tokens before the target)")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title or "Streaming loss by position; dotted: training length; bands: 95% interval over documents",
                 fontsize=9)
    return _save(plt, fig, path)


def plot_passkey(results: dict, path: Path, title: str = "") -> Optional[Path]:
    names = [n for n in _recipes(results) if any(c["recipe"] == n for c in cells(results, "passkey"))]
    if not names:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(2.9 * len(names) + 1.5, 3.4), squeeze=False, sharey=True,
                             layout="constrained")
    image = None
    for ax, name in zip(axes[0], names):
        pk = sorted((c for c in cells(results, "passkey") if c["recipe"] == name), key=lambda c: c["context"])
        grid = [[100 * c["accuracy"][j] for c in pk] for j in range(len(pk[0]["depths"]))]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(pk)), [str(c["context"]) for c in pk], fontsize=8)
        ax.set_yticks(range(len(pk[0]["depths"])), [f"{d:g}" for d in pk[0]["depths"]], fontsize=8)
        for j, row in enumerate(grid):
            for i, v in enumerate(row):
                ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
        ax.set_xlabel("prompt length (tokens)")
        if ax is axes[0][0]:
            ax.set_ylabel("passkey depth (fraction of the prompt)")
        ax.set_title(name, fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), label="exact-match accuracy (%)")
    fig.suptitle(title or "Passkey retrieval accuracy (greedy decoding)", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def memory_by_context_sections(results: dict) -> list:
    """The report's parts for the decode-memory and longest-trainable-context cells (none when absent)."""
    parts = []
    dm = [c for c in cells(results, "decode_memory") if c["status"] == "ok"]
    if cells(results, "decode_memory"):
        chunk = dm[0]["result"]["prefill_chunk"] if dm else "?"
        steps = dm[0]["result"]["decode_tokens"] if dm else "?"
        parts += ["## Decode memory by context (chunked prefill, fresh process per cell)",
                  f"The prompt goes through the cache in chunks of {chunk} tokens, then {steps} decode steps. "
                  "`decode (measured)`: peak RSS of those steps above the model warmed up on one chunk (float32 "
                  "model, random weights at seed 0): the state decoding holds plus one step's transient; a few "
                  "KiB of state can measure as 0 when its pages are reused from the warm-up. `cache (tensors)`: "
                  "the bytes of the cache's tensors after the steps, what `state_bytes` predicts. A recipe whose "
                  "state is constant in context is flat; a KV cache grows with it. `prefill peak`: the chunked "
                  "prefill's own peak (the cache plus one chunk's activations).", decode_memory_table(results)]
    lt = longest_train_table(results)
    if lt:
        parts += ["## Longest trainable context under a memory cap", lt]
    return parts


# -- the report --------------------------------------------------------------------------------------------------

def write_report(results: dict, out_dir) -> tuple:
    """Write report.md and the PNGs into `out_dir`; returns (report path, [png paths])."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = [p for p in (plot_perplexity(results, out / "perplexity.png"), plot_memory(results, out / "memory.png"),
                        plot_decode_memory(results, out / "decode_memory.png"),
                        plot_extrapolation(results, out / "extrapolation.png"),
                        plot_throughput(results, out / "throughput.png"), plot_passkey(results, out / "passkey.png"),
                        plot_mqar(results, out / "mqar.png"), plot_ruler(results, out / "ruler.png"))
            if p is not None]
    meta = results.get("meta", {})
    sizes = _table(["recipe", "d_model", "params (total)", "non-embedding", "checkpoint"],
                   [[n, r.get("d_model", "-"), f"{r['params']['total']:,}", f"{r['params']['non_embedding']:,}",
                     r.get("checkpoint") or "-"] for n, r in results.get("recipes", {}).items()])
    found = findings(results)
    parts = [
        "# Comparison report",
        *(["## Findings", "\n".join(f"- {f}" for f in found)] if found else []),
        f"device {meta.get('device')}, world size {meta.get('world_size')}, torch {meta.get('torch')}, "
        f"{meta.get('threads')} threads, zoo commit {meta.get('commit')}; float32. "
        f"Command: `{meta.get('command', '?')}`",
        "## Summary", summary_table(results),
        "## Models", sizes,
        "## Bits per byte by context (held-out split; lower is better)",
        "Units: bits per byte of the scored targets' text; compressors on the same text for reference. "
        "See evals/perplexity.py for the schemes.", perplexity_table(results),
        *(["## Context use and length extrapolation (streaming, by position in the document)",
           "The longest documents of the held-out split, each cut to the same length, streamed through the cache; "
           "bits/byte [95% interval over the documents] by the target's position.", extrapolation_table(results)]
          if extrapolation_table(results) else []),
        "## Measured memory (fresh process per cell)",
        "Each cell: the memory the run takes (peak RSS above a model warmed up on a few tokens: activations, "
        "cache, gradients), and in brackets the whole process peak above its baseline as evals.memory measures "
        "it (weights and torch's one-time setup included). `OOM`: the cap was hit. The analytic state is the "
        "sum of the blocks' `state_bytes` in float32 after the prefill and decode.", memory_table(results),
        *memory_by_context_sections(results),
        "## Throughput (tokens/s, batch 1, best of repeats after a warm-up)",
        "Wall clock: the best repeat and, in brackets, their median (with repeats > 1); bold: the fastest in the "
        "column; ≈: the repeats' ranges (median to best) overlap the fastest's, so the two are not ranked.",
        throughput_table(results),
        *(["Per CPU-second of the process (all its threads; waiting for a core on a shared machine costs none):",
           throughput_table(results, "cpu")] if any(c.get("tokens_per_cpu_s") for c in cells(results, "throughput"))
          else []),
        "## Passkey retrieval", *passkey_intro(results), passkey_tables(results) or "(not run)",
        *(["## Multi-query associative recall (MQAR)", mqar_text(results), mqar_table(results)]
          if mqar_table(results) else []),
        *(["## RULER's synthetic tasks", ruler_text(results), ruler_table(results)] if ruler_table(results) else []),
        "## Plots", "\n".join(f"![{p.stem}]({p.name})" for p in pngs),
    ]
    path = out / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path, pngs
