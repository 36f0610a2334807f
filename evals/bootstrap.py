"""Confidence intervals by bootstrap over documents (issue 16).

A held-out score is a ratio of sums, total nats / total bytes, over a few dozen documents. Tokens are not
independent samples of it: one file of data tables and one of prose differ far more than two tokens of
one file. So the unit of resampling is the document: draw as many documents as were scored, with
replacement, recompute sum(nats) / sum(bytes) over the draw, repeat, and take the percentiles of the
draws (the percentile bootstrap; Efron & Tibshirani 1993, ch. 13). Seeded, so a rerun of the report
gives the same intervals.

Paired intervals: every recipe and every position bucket is scored on the same documents, so a
difference of two scores is resampled with the same draw for both. What makes one document hard for
one model makes it hard for the other too, and that shared part cancels in the difference: the paired
interval of a difference is much narrower than the two marginal intervals side by side.

    lo, hi = ratio_interval(nats_per_doc / LN2, bytes_per_doc)            # bits/byte, 95%
    lo, hi = difference_interval(nats_a / LN2, bytes_a, nats_b / LN2, bytes_b)   # a - b, paired
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def resample_indices(n_docs: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples, n_docs] document indices drawn with replacement, the same for the same arguments."""
    if n_docs < 1:
        raise ValueError(f"n_docs: need at least one document, got {n_docs}")
    if resamples < 1:
        raise ValueError(f"resamples: must be a positive integer, got {resamples}")
    return np.random.default_rng(seed).integers(0, n_docs, (resamples, n_docs))


def _ratios(num, den, draws: np.ndarray) -> np.ndarray:
    """sum(num) / sum(den) over each draw: [resamples] or [resamples, k] for [docs, k] inputs. A draw
    with no denominator (no drawn document reaches a position bucket) is nan."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    n, d = num[draws].sum(axis=1), den[draws].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(d > 0, n / np.where(d > 0, d, 1.0), np.nan)


def _percentiles(samples: np.ndarray, level: float) -> tuple:
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    tail = 100 * (1 - level) / 2
    # a column no draw has a denominator for (every document has zero bytes there) is (nan, nan)
    filled = np.where(np.isnan(samples).all(axis=0), 0.0, samples)
    lo, hi = np.nanpercentile(filled, [tail, 100 - tail], axis=0)
    empty = np.isnan(samples).all(axis=0)
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


def ratio_interval(num, den, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple:
    """(lo, hi) of sum(num) / sum(den) under resampling of documents (the first axis); floats for
    [docs] inputs, arrays for [docs, k] (k ratios resampled jointly, e.g. position buckets)."""
    draws = resample_indices(len(num), resamples, seed)
    lo, hi = _percentiles(_ratios(num, den, draws), level)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def difference_interval(num_a, den_a, num_b, den_b, resamples: int = RESAMPLES, seed: int = SEED,
                        level: float = LEVEL) -> tuple:
    """(lo, hi) of ratio_a - ratio_b, both over the same documents (the same row of each input is the
    same document) and resampled with the same draws: the paired interval."""
    if len(num_a) != len(num_b):
        raise ValueError(f"paired inputs must hold the same documents: {len(num_a)} vs {len(num_b)}")
    draws = resample_indices(len(num_a), resamples, seed)
    lo, hi = _percentiles(_ratios(num_a, den_a, draws) - _ratios(num_b, den_b, draws), level)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def overlaps(a, b) -> bool:
    """Whether two intervals (lo, hi) share a point."""
    return a[0] <= b[1] and b[0] <= a[1]


def best_and_ties(items: dict, lower_is_better: bool = True) -> tuple:
    """(best name, [names not ranked against it]) for {name: (value, (lo, hi) or None)}: the ties are the
    names whose interval overlaps the best's, in the order given. Without an interval on either side
    nothing is known about the spread, and the name is ranked by its value alone."""
    if not items:
        return None, []
    sign = 1 if lower_is_better else -1
    best = min(items, key=lambda n: sign * items[n][0])
    ref = items[best][1]
    ties = [n for n, (_, iv) in items.items() if n != best and ref is not None and iv is not None
            and overlaps(iv, ref)]
    return best, ties


def proportion_interval(successes: int, trials: int, level: float = LEVEL) -> tuple:
    """(lo, hi) of a success rate from `successes` of `trials` independent tries (passkey prompts): the Wilson
    score interval. Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0% or
    100%, the cells a passkey table is full of (24 of 24 right is still [86%, 100%] at 95%)."""
    if trials < 1:
        raise ValueError(f"trials: need at least one, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes: must be in [0, {trials}], got {successes}")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p, z2 = successes / trials, z * z / trials
    centre = (p + z2 / 2) / (1 + z2)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials)) / (1 + z2)
    return max(0.0, centre - half), min(1.0, centre + half)
