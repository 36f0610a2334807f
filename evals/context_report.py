"""The report's context-use part: tables, plots and findings of the `context_use` and `copy` cells (issue 25).

    text, pngs = context_section(results, out_dir)      # appended to report.md by `zoo compare`
    for sentence in context_findings(results): ...      # opens the report with the other findings

Cells (evals/context_use.py): `context_use` (key scheme = the corpus, kept in the cell's `corpus`; context = the
segment length) and `copy` (scheme `synthetic`, context = the string length). Every sentence is read from the
numbers: a recipe is said to use the history past the cut up to the furthest bucket where the paired interval
(over the segments) of streamed minus history-cut bits/byte lies wholly below -MIN_EFFECT, to copy from a distance
where its loss on repeats there is below the same targets' loss under the history cut (by the same rule), and to be
below gzip where its interval lies wholly below gzip -9 on the same segments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from evals.context_use import paired
from evals.render import interval as fmt_ci, log2_middle, pyplot as _pyplot, table as _table

# bits/byte: an effect of the history counts when its whole interval lies below -MIN_EFFECT. Streaming and the
# windows of the cut compute the same float32 sums in another order; for a model that cannot see past the cut
# (swa's 128-token window) their difference measured -0.0000x with an interval that excluded zero.
MIN_EFFECT = 0.001

def _cells(results: dict, eval_name: str) -> list:
    names = list(results.get("recipes", {}))
    found = [c for c in results.get("cells", {}).values() if c["eval"] == eval_name and c["recipe"] in names]
    return sorted(found, key=lambda c: (names.index(c["recipe"]), str(c.get("corpus")), c["context"] or 0))


def readings(results: dict) -> list:
    """[(corpus, segment length)] of the context-use cells: one reading per corpus and --context-length."""
    return sorted({(c["corpus"], c["length"]) for c in _cells(results, "context_use")})


def _by_recipe(results: dict, corpus: str, length: int) -> dict:
    return {c["recipe"]: c for c in _cells(results, "context_use")
            if c["corpus"] == corpus and c["length"] == length and c.get("buckets")}


def _names(names: list) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else (names[0] if names else "")


def _where(c: dict) -> str:
    H = c["history_cut"]
    stride = c.get("cut_stride", max(1, H // 2))   # records from before --history-cut-stride: half the cut
    return (f"{c['documents']} segments of {c['length']:,} tokens from {c['source_documents']} held-out documents; "
            f"history cut to {H:,} as the control (each target keeps {H - stride:,}-{H:,} tokens)")


# -- findings --------------------------------------------------------------------------------------------------

def history_finding(results: dict, corpus: str, length: int) -> Optional[str]:
    """How much history past the cut each recipe uses: the furthest bucket past the cut where the whole history
    beats the cut on the same targets (paired interval wholly below zero), where it breaks (the verdict's rule),
    or that no bucket past the cut shows a difference."""
    cs = {n: c for n, c in _by_recipe(results, corpus, length).items() if c.get("past")}
    if not cs:
        return None
    first = next(iter(cs.values()))
    H = first["history_cut"]

    def diff(row):
        return f"{row['label']}: {row['vs_bounded']:+.3f} {fmt_ci(row['vs_bounded_ci'], True)}"
    users, none = [], []
    for n, c in cs.items():
        used = [r for r in c["past"] if r["vs_bounded_ci"][1] < -MIN_EFFECT]
        broken = next((r for r in c["past"] if r["label"] == c.get("breaks_at")), None)
        clauses = []
        if used:
            clauses.append(f"uses it to {_label_end(used[-1])} ({diff(used[-1])})")
        if broken:
            where = " past its training length" if broken["positions"][0] >= c["model_train_len"] else ""
            clauses.append(f"breaks{where} ({diff(broken)})")
        if clauses:
            users.append(f"{n} " + " and ".join(clauses))
        else:
            none.append(f"{n} ({diff(c['past'][-1])})")
    text = f"History past {H:,} tokens on {corpus} ({_where(first)}): " + "; ".join(users)
    if none:
        text += ("; " if users else "") + f"no measurable use for {_names(none)}"
    return text + (" (bits/byte with the whole history minus with the cut, same targets, paired 95% interval over the "
                   f"segments; a use counts when the whole interval is below -{MIN_EFFECT}).")


def _label_end(row: dict) -> str:
    return row["label"].split("-")[-1]


def copy_finding(results: dict, corpus: str, length: int) -> Optional[str]:
    """Who copies: loss on repeats at the longest distance inside the cut, ranked with paired intervals; and who
    copies from beyond the cut (repeats cheaper with the whole history than with the cut)."""
    cs = {n: c for n, c in _by_recipe(results, corpus, length).items() if c.get("copy", {}).get("buckets")}
    if not cs:
        return None
    first = next(iter(cs.values()))
    H = first["history_cut"]
    inside = [b for b in first["copy"]["buckets"] if b["distances"][1] <= H // 2]
    if not inside:
        return None
    label = inside[-1]["label"]
    rows = {n: next((b for b in c["copy"]["buckets"] if b["label"] == label), None) for n, c in cs.items()}
    rows = {n: r for n, r in rows.items() if r}
    order = sorted(rows, key=lambda n: rows[n]["bits_per_byte"])
    best = order[0]
    text = (f"Copying on {corpus} (the second occurrence of a {first['span']}-token span, by distance to the first): "
            f"at {label} tokens back ({rows[best]['targets']:,} targets), " + ", ".join(
                f"{n} {rows[n]['bits_per_byte']:.2f}" for n in order) + " bits/byte (first occurrences: " + ", ".join(
                f"{n} {cs[n]['copy']['first_occurrence']['bits_per_byte']:.2f}" for n in order) + ")")
    diffs = {n: d for n in order[1:] if (d := paired(rows[n], rows[best]))}
    if diffs:
        apart = [n for n, d in diffs.items() if d[1][0] > 0]
        text += f"; paired against {best} on the same targets: " + ", ".join(
            f"{n} {d[0]:+.3f} {fmt_ci(d[1], True)}" for n, d in diffs.items())
        text += (f": {best} copies better than {_names(apart)}" if apart else ": no recipe separated from it")
    far = []
    for n, c in cs.items():
        beyond = [b for b in c["copy"]["buckets"] if b["distances"][0] >= H and "vs_bounded_ci" in b]
        gains = [b for b in beyond if b["vs_bounded_ci"][1] < -MIN_EFFECT]
        if gains:
            b = max(gains, key=lambda b: b["distances"][0])
            far.append(f"{n} (up to {b['label']}: {b['vs_bounded']:+.3f} {fmt_ci(b['vs_bounded_ci'], True)} "
                       f"vs history cut to {H:,})")
    if far:
        text += f". Copies from beyond {H:,} tokens back: {_names(far)}"
    else:
        text += f". No recipe copies from beyond {H:,} tokens back (no repeat bucket past the cut is cheaper with " \
                "the whole history)"
    return text + "."


def gzip_finding(results: dict, corpus: str, length: int) -> Optional[str]:
    cs = {n: c for n, c in _by_recipe(results, corpus, length).items() if c.get("compression")}
    if not cs:
        return None
    comp = next(iter(cs.values()))["compression"]
    order = sorted(cs, key=lambda n: cs[n]["bits_per_byte"])
    below = [n for n in order if cs[n]["bits_per_byte_ci"][1] < comp["gzip-9"]]
    text = (f"Against compressors on the same {corpus} segments (gzip -9 {comp['gzip-9']:.3f}, "
            f"xz -9 {comp['xz-9']:.3f} bits/byte): "
            + ", ".join(f"{n} {cs[n]['bits_per_byte']:.3f} {fmt_ci(cs[n]['bits_per_byte_ci'])}" for n in order))
    return text + (f"; below gzip: {_names(below)}." if below else "; none below gzip.")


def synthetic_finding(results: dict) -> Optional[str]:
    cs = _cells(results, "copy")
    if not cs:
        return None
    lengths = sorted({c["context"] for c in cs})
    by = {(c["recipe"], c["context"]): c for c in cs}
    names = list(dict.fromkeys(c["recipe"] for c in cs))
    parts = []
    for n in names:
        accs = [f"{100 * by[n, L]['token_accuracy']:.0f}%" if (n, L) in by else "-" for L in lengths]
        parts.append(f"{n} {' / '.join(accs)}")
    trials = cs[0]["trials"]
    return (f"Synthetic copy (a string of random words repeated once, teacher-forced greedy; token accuracy at "
            f"{' / '.join(f'{L:,}' for L in lengths)} tokens, {trials} strings each): " + "; ".join(parts) + ".")


def context_findings(results: dict) -> list:
    out = []
    for reading in readings(results):
        out += [history_finding(results, *reading), copy_finding(results, *reading), gzip_finding(results, *reading)]
    out.append(synthetic_finding(results))
    return [s for s in out if s]


# -- tables and plots --------------------------------------------------------------------------------------------

def _bpb(b: dict) -> str:
    iv = b.get("bits_per_byte_ci")
    return f"{b['bits_per_byte']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")


def position_table(results: dict, corpus: str, length: int) -> str:
    cs = _by_recipe(results, corpus, length)
    spans = sorted({tuple(b["positions"]) for c in cs.values() for b in c["buckets"]})
    labels = {tuple(b["positions"]): b["label"] for c in cs.values() for b in c["buckets"]}
    rows = []
    for n, c in cs.items():
        by = {tuple(b["positions"]): b for b in c["buckets"]}
        cut = {tuple(b["positions"]): b for b in c.get("bounded", {}).get("buckets", [])}
        rows.append([n, "whole"] + [_bpb(by[sp]) if sp in by else "-" for sp in spans] + [c.get("verdict") or "-"])
        rows.append([n, f"cut to {c['history_cut']:,}"] + [_bpb(cut[sp]) if sp in cut else "-" for sp in spans] + [""])
    return _table(["recipe", "history"] + [labels[sp] for sp in spans] + ["past the cut"], rows)


def copy_table(results: dict, corpus: str, length: int) -> str:
    cs = {n: c for n, c in _by_recipe(results, corpus, length).items() if c.get("copy")}
    spans = sorted({tuple(b["distances"]) for c in cs.values() for b in c["copy"]["buckets"]})
    labels = {tuple(b["distances"]): b["label"] for c in cs.values() for b in c["copy"]["buckets"]}
    rows = []
    for n, c in cs.items():
        by = {tuple(b["distances"]): b for b in c["copy"]["buckets"]}
        first = c["copy"]["first_occurrence"]
        rows.append([n, "whole"] + [f"{by[sp]['bits_per_byte']:.3f}" if sp in by else "-" for sp in spans]
                    + [f"{first['bits_per_byte']:.3f}" if first else "-"])
        rows.append([n, f"cut to {c['history_cut']:,}"] + [f"{by[sp]['bounded_bits_per_byte']:.3f}" if sp in by and
                     "bounded_bits_per_byte" in by[sp] else "-" for sp in spans]
                    + [f"{first['bounded_bits_per_byte']:.3f}" if first and "bounded_bits_per_byte" in first else "-"])
    # the targets depend on the text alone: every recipe's row counts the same ones
    targets = {tuple(b["distances"]): b["targets"] for b in next(iter(cs.values()))["copy"]["buckets"]}
    counts = ["targets", ""] + [str(targets[sp]) if sp in targets else "-" for sp in spans]
    return _table(["recipe", "history"] + [labels[sp] for sp in spans] + ["first occurrence"], rows + [counts + [""]])


def synthetic_table(results: dict) -> str:
    cs = _cells(results, "copy")
    lengths = sorted({c["context"] for c in cs})
    by = {(c["recipe"], c["context"]): c for c in cs}
    names = list(dict.fromkeys(c["recipe"] for c in cs))
    rows = [[n] + [f"{100 * by[n, L]['token_accuracy']:.1f}% ({by[n, L]['exact']}/{by[n, L]['trials']})"
                   if (n, L) in by else "-" for L in lengths] for n in names]
    return _table(["recipe"] + [f"{L:,}" for L in lengths], rows)


def plot_context_use(results: dict, path: Path) -> Optional[Path]:
    """Per reading (corpus and segment length): bits/byte by position, whole history (solid) and cut (dashed);
    and on repeats by distance."""
    names = list(results.get("recipes", {}))
    shown = [r for r in readings(results) if _by_recipe(results, *r)]
    if not shown:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(shown), figsize=(6.5 * len(shown), 8), squeeze=False)
    for j, (corpus, length) in enumerate(shown):
        cs = _by_recipe(results, corpus, length)
        ax, bx = axes[0][j], axes[1][j]
        for n, c in cs.items():
            color = f"C{names.index(n)}"
            x = [log2_middle(*b["positions"]) for b in c["buckets"]]
            ax.plot(x, [b["bits_per_byte"] for b in c["buckets"]], "o-", color=color, label=f"{n}: {c.get('verdict')}")
            cut = c.get("bounded", {}).get("buckets", [])
            ax.plot([log2_middle(*b["positions"]) for b in cut], [b["bits_per_byte"] for b in cut], "--",
                    color=color, alpha=0.6)
            rows = c.get("copy", {}).get("buckets", [])
            bx.plot([log2_middle(*b["distances"]) for b in rows], [b["bits_per_byte"] for b in rows], "o-",
                    color=color, label=n)
            bx.plot([log2_middle(*b["distances"]) for b in rows if "bounded_bits_per_byte" in b],
                    [b["bounded_bits_per_byte"] for b in rows if "bounded_bits_per_byte" in b], "--", color=color,
                    alpha=0.6)
        some = next(iter(cs.values()))
        for a in (ax, bx):
            a.axvline(some["history_cut"], color="gray", linestyle=":", linewidth=1)
            a.set_xscale("log", base=2)
            a.grid(True, which="both", alpha=0.3)
            a.set_ylabel("bits per byte")
        if some.get("compression"):
            ax.axhline(some["compression"]["gzip-9"], color="black", linewidth=0.8, linestyle="-.", label="gzip -9")
        ax.set_xlabel("position in the segment (tokens before the target)")
        bx.set_xlabel(f"distance to the first occurrence of the {some['span']}-token span")
        ax.set_title(f"{corpus}, segments of {length:,}: solid whole history, dashed cut to "
                     f"{some['history_cut']:,}", fontsize=9)
        bx.set_title(f"{corpus}, segments of {length:,}: loss on repeated spans", fontsize=9)
        ax.legend(fontsize=7)
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_synthetic_copy(results: dict, path: Path) -> Optional[Path]:
    cs = _cells(results, "copy")
    if not cs:
        return None
    names = list(results.get("recipes", {}))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n in dict.fromkeys(c["recipe"] for c in cs):
        mine = sorted((c for c in cs if c["recipe"] == n), key=lambda c: c["context"])
        ax.plot([c["context"] for c in mine], [100 * c["token_accuracy"] for c in mine], "o-",
                color=f"C{names.index(n)}", label=n)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("string length (tokens)")
    ax.set_ylabel("token accuracy on the copy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Synthetic copy: random words repeated once (teacher-forced greedy)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def context_section(results: dict, out_dir) -> tuple:
    """(markdown, [png paths]) of the context-use part; ("", []) when no such cell exists."""
    shown = [r for r in readings(results) if _by_recipe(results, *r)]
    synthetic = bool(_cells(results, "copy"))
    if not shown and not synthetic:
        return "", []
    out = Path(out_dir)
    parts = ["## Context use on long held-out documents (issue 25)",
             "Segments of held-out documents streamed from their start; every target scored twice: with the whole "
             "history (`whole`) and with at most the history cut (`cut`: sliding windows of the cut advancing by "
             "--history-cut-stride, half the cut by default: a target keeps between the cut less the stride and the "
             "cut). bits/byte [95% interval over the segments]. The `past the cut` column is the verdict of "
             "evals.perplexity.extrapolation_verdict (keeps falling / breaks: beyond a margin of 2% of the last bucket "
             f"inside the cut); the findings above name any effect whose paired interval lies below -{MIN_EFFECT} "
             "bits/byte."]
    for corpus, length in shown:
        some = next(iter(_by_recipe(results, corpus, length).values()))
        comp = some.get("compression")
        parts += [f"### {corpus}: {_where(some)}" + (f"; gzip -9 {comp['gzip-9']:.3f}, xz -9 {comp['xz-9']:.3f} "
                                                     "bits/byte on the same segments" if comp else ""),
                  "By position in the segment:", position_table(results, corpus, length),
                  f"On the second occurrence of a repeated {some['span']}-token span, by distance to the first "
                  f"(bits/byte; {100 * some['copy']['repeat_fraction']:.1f}% of the targets are repeats):",
                  copy_table(results, corpus, length)]
    if synthetic:
        parts += ["### Synthetic copy", "A string of random lowercase words, a newline, the same string again; "
                  "token accuracy of teacher-forced greedy predictions on the second copy after its first "
                  f"{_cells(results, 'copy')[0]['skip']} tokens (in brackets: strings copied without an error).",
                  synthetic_table(results)]
    pngs = [p for p in (plot_context_use(results, out / "context_use.png"),
                        plot_synthetic_copy(results, out / "synthetic_copy.png")) if p]
    parts += [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n\n".join(parts) + "\n", pngs
