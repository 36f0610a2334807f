"""The bootstrap over documents against known distributions: the interval of a mean matches the normal
theory one, covers the truth about 95% of the time, shrinks as 1/sqrt(documents), is the same for the same
seed; the paired interval cancels what the documents share."""
import numpy as np
import pytest

from evals.bootstrap import (best_and_ties, difference_interval, overlaps, proportion_interval, ratio_interval,
                             resample_indices)


def test_mean_of_normal_matches_normal_theory():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 0.5, 400)
    lo, hi = ratio_interval(x, np.ones_like(x), resamples=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.1 * half)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_ratio_covers_the_truth_about_95_percent():
    # documents of varying size, each with nats = 1.5 x bytes plus noise: the true ratio is 1.5
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(200):
        n_bytes = rng.uniform(50, 150, 40)
        nats = 1.5 * n_bytes + rng.normal(0, 10, 40)
        lo, hi = ratio_interval(nats, n_bytes, resamples=500, seed=int(rng.integers(1 << 30)))
        hits += lo <= 1.5 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_width_shrinks_as_one_over_root_documents():
    rng = np.random.default_rng(3)
    widths = []
    for n in (100, 1600):
        x = rng.exponential(1.0, n)
        lo, hi = ratio_interval(x, np.ones(n))
        widths.append(hi - lo)
    assert widths[0] / widths[1] == pytest.approx(4.0, rel=0.2)


def test_seeded_and_degenerate():
    x, b = np.array([1.0, 5.0, 2.0, 9.0]), np.array([1.0, 2.0, 1.0, 3.0])
    assert ratio_interval(x, b, seed=7) == ratio_interval(x, b, seed=7) != ratio_interval(x, b, seed=8)
    assert (resample_indices(4, 10, 0) == resample_indices(4, 10, 0)).all()
    assert ratio_interval([3.0], [2.0]) == (1.5, 1.5)               # one document: no spread to resample
    assert ratio_interval([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx((2.0, 2.0))  # same ratio each
    with pytest.raises(ValueError, match="n_docs"):
        resample_indices(0)


def test_columns_resample_jointly_and_empty_columns_are_nan():
    nats = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    lo, hi = ratio_interval(nats, np.array([[1.0, 0.0]] * 3))
    assert lo[0] >= 1 and hi[0] <= 3 and np.isnan(lo[1]) and np.isnan(hi[1])


def test_paired_difference_cancels_the_shared_document_effect():
    rng = np.random.default_rng(4)
    hardness = rng.normal(3.0, 1.0, 30)          # what makes a document hard for every model
    a = hardness + rng.normal(0, 0.02, 30)
    b = hardness + 0.1 + rng.normal(0, 0.02, 30)
    ones = np.ones(30)
    ia, ib = ratio_interval(a, ones), ratio_interval(b, ones)
    assert overlaps(ia, ib)                       # side by side the two cannot be told apart
    lo, hi = difference_interval(a, ones, b, ones)
    assert hi < 0 and lo <= -0.1 <= hi            # paired, a is clearly better by about 0.1
    with pytest.raises(ValueError, match="same documents"):
        difference_interval(a, ones, b[:5], ones[:5])


def test_overlaps():
    assert overlaps((0, 1), (1, 2)) and overlaps((0, 3), (1, 2)) and not overlaps((0, 1), (1.5, 2))


def test_best_and_ties():
    items = {"a": (2.0, (1.9, 2.1)), "b": (1.8, (1.7, 1.95)), "c": (2.5, (2.4, 2.6)), "d": (1.99, None)}
    assert best_and_ties(items) == ("b", ["a"])
    assert best_and_ties(items, lower_is_better=False) == ("c", [])
    assert best_and_ties({}) == (None, [])


def test_proportion_interval_is_wilsons_and_covers_the_true_rate():
    # textbook values (Newcombe 1998, table I): 15 of 148 -> [0.0624, 0.1605]; 0 of 20 -> [0, 0.1611]
    assert proportion_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert proportion_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    lo, hi = proportion_interval(24, 24)
    assert hi == 1.0 and 0.85 < lo < 0.87                 # all right is still not certainty
    # coverage: a 95% interval holds the true rate in about 95% of repeated experiments
    rng = np.random.default_rng(0)
    p, n = 0.8, 24
    held = [lo <= p <= hi for lo, hi in (proportion_interval(int(k), n) for k in rng.binomial(n, p, 4000))]
    assert 0.92 < np.mean(held) < 0.99
    for bad, message in (((3, 0), "trials"), ((5, 4), "successes"), ((-1, 4), "successes")):
        with pytest.raises(ValueError, match=message):
            proportion_interval(*bad)
