"""The sentences report.md opens with, computed from results.json (issue 16, item 7).

Each is a reading of cells the report's tables show too; none names a recipe by hand. Ranking follows the
report's rule: a recipe whose interval overlaps the best's is named beside it as not ranked, never below
it. Where both cells carry per-document sums over the same documents, the sentence adds the paired
interval of the difference (evals/bootstrap.py), which can separate two recipes whose marginal intervals
overlap. Every part tolerates missing evals and older cells (no interval, one repeat, no decode-memory
cells): it then says less, or nothing.

    for sentence in findings(json.load(open("runs/compare/results.json"))): print(sentence)
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from evals.bootstrap import best_and_ties, difference_interval
from evals.context_report import context_findings
from evals.recall_report import mqar_finding, passkey_finding
from evals.ruler import ruler_finding
from evals.render import interval as _iv
from evals.results import (bpb_interval, cells, contexts as _contexts, fmt_bytes as _fmt_bytes,
                           lookup as _lookup, recipes as _recipes, throughput_range, verdict_difference)

LN2 = math.log(2)
FLAT_GROWTH = 1.1   # memory counts as flat when the longest context needs at most 10% more than the shortest


def findings(results: dict) -> list:
    """Sentences, best recipe per measure first; empty when results.json holds nothing to read."""
    parts = (perplexity_finding(results, "blocks"), perplexity_finding(results, "streaming"),
             extrapolation_finding(results), throughput_finding(results), memory_finding(results),
             passkey_finding(results), mqar_finding(results), ruler_finding(results))
    return [p for p in parts if p] + context_findings(results)


def _names(names: list) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def paired_difference(a: dict, b: dict) -> Optional[tuple]:
    """(difference, interval) of bits/byte a - b paired over the same documents; None unless both cells
    hold per-document sums of the same documents."""
    pa, pb = a.get("per_document"), b.get("per_document")
    if not pa or not pb or pa.get("index") != pb.get("index"):
        return None
    args = [np.asarray(p[k], dtype=float) / (LN2 if k == "nats" else 1) for p in (pa, pb) for k in ("nats", "bytes")]
    return a["bits_per_byte"] - b["bits_per_byte"], difference_interval(*args)


def perplexity_finding(results: dict, scheme: str) -> Optional[str]:
    """The lowest bits/byte under `scheme` (blocks: at the longest context), with its interval and the
    recipes not ranked against it."""
    ctx = _contexts(cells(results, "ppl", scheme))
    context = ctx[-1] if scheme != "streaming" and ctx else None
    if scheme != "streaming" and context is None:
        return None
    got = {n: c for n in _recipes(results) if (c := _lookup(results, n, "ppl", scheme, context))}
    if not got:
        return None
    best, ties = best_and_ties({n: (c["bits_per_byte"], bpb_interval(c)) for n, c in got.items()})
    where = f"in blocks of {context} tokens" if context else "streaming each document whole"
    b = got[best]
    text = f"Lowest held-out bits/byte {where}: {best}, {b['bits_per_byte']:.3f}"
    if bpb_interval(b) is None:
        text += " (one sample of documents: no interval)"
    else:
        text += f" {_iv(bpb_interval(b))} (95% interval over {b.get('documents', '?')} documents)"
    if len(got) == 1:
        return text + "."
    text += "."
    for n in ties:
        text += f" ≈ {n} {got[n]['bits_per_byte']:.3f} {_iv(bpb_interval(got[n]))}: the intervals overlap, so not ranked"
        pd = paired_difference(got[n], b)
        if pd:
            side = "behind" if pd[1][0] > 0 else "ahead" if pd[1][1] < 0 else "no difference either way"
            text += f"; paired over the same documents {pd[0]:+.3f} {_iv(pd[1], True)}: {side}"
        text += "."
    rest = sorted((n for n in got if n != best and n not in ties), key=lambda n: got[n]["bits_per_byte"])
    if rest:
        text += f" Then {rest[0]} {got[rest[0]]['bits_per_byte']:.3f}" + (
            f" {_iv(bpb_interval(got[rest[0]]))}" if bpb_interval(got[rest[0]]) else "") + "."
    return text


def extrapolation_finding(results: dict) -> Optional[str]:
    """Which recipes keep improving past the training length, stay flat, or break there."""
    cs = {c["recipe"]: c for c in cells(results, "extrapolation") if c["recipe"] in _recipes(results)}
    judged = {n: c for n, c in cs.items() if c.get("verdict")}
    if not judged:
        missing = [c.get("status") for c in cs.values() if c.get("status") not in (None, "ok")]
        return f"Length extrapolation not judged: {missing[0]}." if missing else None
    first = next(iter(judged.values()))
    same = all(c.get("train_len") == first.get("train_len") and c.get("length") == first.get("length")
               for c in judged.values())
    text = "Past the training length" + (
        f" ({first.get('train_len')} tokens; streamed to {first.get('length')} on the {first.get('documents')} "
        "longest held-out documents)" if same else "")
    clauses = []
    for verdict, phrase in (("keeps falling", "loss keeps falling for"), ("flat", "stays flat for"),
                            ("breaks", "breaks for")):
        names = [n for n in _recipes(results) if n in judged and judged[n]["verdict"] == verdict]
        if not names:
            continue
        details = []
        for n in names:
            c = judged[n]
            row = next((r for r in c.get("past", []) if r["label"] == c.get("breaks_at")), None) if verdict == "breaks" \
                else (c.get("past") or [None])[-1]
            if row:
                d, iv, against = verdict_difference(c, row)
                details.append(f"{n} ({row['label']}: {d:+.3f} {_iv(iv, True)} vs {against})")
            else:
                details.append(n)
        clauses.append(f"{phrase} {_names(details)}")
    return text + ", " + "; ".join(clauses) + " (bits/byte difference, paired 95% interval over the documents)."


def throughput_finding(results: dict) -> Optional[str]:
    """The fastest recipe per throughput kind at the longest context, on the CPU clock where the cells have
    it (steadier on a shared machine), with those whose repeats overlap it."""
    clauses, clocks = [], set()
    for kind in ("prefill", "decode", "train"):
        ctx = _contexts(cells(results, "throughput", kind))
        if not ctx:
            continue
        got = {n: c for n in _recipes(results) if (c := _lookup(results, n, "throughput", kind, ctx[-1]))}
        clock = "cpu" if got and all(c.get("tokens_per_cpu_s") for c in got.values()) else "wall"
        items = {n: throughput_range(c, clock) for n, c in got.items()}
        best, ties = best_and_ties({n: v for n, v in items.items() if v[0] is not None}, lower_is_better=False)
        if best is None:
            continue
        clocks.add(clock)
        value, rng = items[best]
        clause = f"{kind} at {ctx[-1]} tokens: {best} {value:,.0f}" + (f" (median {rng[0]:,.0f})" if rng else "")
        if ties:
            clause += f", not ranked against {_names(ties)} (the repeats overlap)"
        rest = sorted((n for n in items if n != best and n not in ties and items[n][0] is not None),
                      key=lambda n: -items[n][0])
        if rest:
            clause += f", then {rest[0]} {items[rest[0]][0]:,.0f}"
        clauses.append(clause)
    if not clauses:
        return None
    unit = "tokens per CPU-second of the process" if clocks == {"cpu"} else \
        "tokens/s of wall time" if clocks == {"wall"} else "tokens per second (CPU clock where measured)"
    repeats = sorted({c.get("repeats", 1) for c in cells(results, "throughput")})
    return (f"Fastest, in {unit}, best of {'/'.join(map(str, repeats))} repeats: " + "; ".join(clauses) + ".")


def _growth(points: list) -> tuple:
    """(first, last, growth factor, context factor) of [(context, bytes)] sorted by context."""
    (c0, b0), (c1, b1) = points[0], points[-1]
    return b0, b1, b1 / max(b0, 1), c1 / c0


def memory_finding(results: dict) -> Optional[str]:
    """Where memory is flat in context: the decode cache after a chunked prefill (decode_memory cells) where
    measured, else the analytic state of the memory cells; and the longest trainable context if searched."""
    sentences = []
    series, what = {}, None
    for n in _recipes(results):
        ok = sorted((c["context"], c["result"]["cache_bytes"]) for c in cells(results, "decode_memory")
                    if c["recipe"] == n and c.get("status") == "ok" and isinstance(c.get("context"), int)
                    and (c.get("result") or {}).get("cache_bytes") is not None)
        if len(ok) >= 2:
            series[n] = ok
    if series:
        what = "Decode cache (tensor bytes after a chunked prefill)"
    else:
        for n in _recipes(results):
            ok = sorted((c["context"], c["result"]["state_bytes"]) for c in cells(results, "memory", "decode")
                        if c["recipe"] == n and c.get("status") == "ok" and isinstance(c.get("context"), int)
                        and (c.get("result") or {}).get("state_bytes") is not None)
            if len(ok) >= 2:
                series[n] = ok
        what = "Inference state (analytic state_bytes, from the decode memory cells)" if series else None
    if series:
        lo = min(p[0][0] for p in series.values())
        hi = max(p[-1][0] for p in series.values())
        flat, grows = [], []
        for n, pts in series.items():
            b0, b1, g, cg = _growth(pts)
            if g <= FLAT_GROWTH:
                flat.append(f"{n} ({_fmt_bytes(b1)})")
            else:
                grows.append(f"{n} (x{g:.1f} over x{cg:.0f} context, {_fmt_bytes(b1)} at {pts[-1][0]})")
        text = f"{what} from {lo} to {hi} tokens: " + "; ".join(
            p for p in (f"flat for {_names(flat)}" if flat else "", f"grows for {_names(grows)}" if grows else "") if p)
        sentences.append(text + ".")
    lt = [c for c in cells(results, "longest_train") if c["recipe"] in _recipes(results)]
    if lt:
        w = min(c.get("world_size", 1) for c in lt)
        got = {c["recipe"]: c.get("longest") for c in lt if c.get("world_size", 1) == w and c.get("longest")}
        if got:
            top = max(got.values())
            best = [n for n in _recipes(results) if got.get(n) == top]
            sentences.append(f"Longest trainable context under the per-rank cap at W={w}: {_names(best)} "
                             f"({top:,} tokens).")
    return " ".join(sentences) or None
