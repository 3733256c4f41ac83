"""Drift figures on quantile bins (myelin/drift.py) against independent computations on
the same bins. Oracles: scipy.spatial.distance.jensenshannon (JS, base 2),
scipy.stats.wasserstein_distance (W1, mass at the bins' reference means, over the
reference std), scipy.stats.ks_2samp (KS statistic on samples placed at the bins' means),
and Evidently's PSI definition written with scipy.special.rel_entr."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import ks_2samp, wasserstein_distance

from myelin.drift import (
    PSI_FLOOR,
    DriftPolicy,
    build_bins,
    build_reference,
    compare,
    compare_all,
)


def _counts(bins_edges: list[float], values: np.ndarray) -> list[int]:
    idx = np.searchsorted(np.asarray(bins_edges), values, side="left")
    return np.bincount(idx, minlength=len(bins_edges) + 1).tolist()  # type: ignore[no-any-return]


CASES = [
    ("normal, shifted", lambda r: r.normal(0, 1, 5000), lambda r: r.normal(0.4, 1.2, 1500)),
    ("same distribution", lambda r: r.normal(5, 2, 5000), lambda r: r.normal(5, 2, 3000)),
    (
        "counts, mostly zero",
        lambda r: r.poisson(0.3, 4000).astype(float),
        lambda r: r.poisson(1.5, 900).astype(float),
    ),
    ("rates in [0, 1]", lambda r: r.beta(2, 8, 4000), lambda r: r.beta(3, 5, 700)),
    (
        "new values beyond the reference",
        lambda r: r.uniform(0, 1, 3000),
        lambda r: r.uniform(0.5, 3, 600),
    ),
]


@pytest.mark.parametrize(("case", "ref_gen", "cur_gen"), CASES, ids=[c[0] for c in CASES])
def test_figures_equal_scipy_on_the_same_bins(case: str, ref_gen, cur_gen) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(len(case))
    ref_values, cur_values = ref_gen(rng), cur_gen(rng)
    b = build_bins(ref_values, 10)
    cur = _counts(b.edges, cur_values)
    got = compare("f", b, cur, DriftPolicy(min_samples=1))

    p = np.asarray(b.counts, float) / sum(b.counts)
    q = np.asarray(cur, float) / sum(cur)
    pf, qf = np.maximum(p, PSI_FLOOR), np.maximum(q, PSI_FLOOR)
    want_psi = float(np.sum(rel_entr(qf, pf) + rel_entr(pf, qf)))
    want_js = float(jensenshannon(p, q, base=2))
    means = np.asarray(b.means)
    want_w1 = float(wasserstein_distance(means, means, b.counts, cur)) / b.std
    want_ks = float(
        ks_2samp(np.repeat(means, b.counts), np.repeat(means, cur), method="asymp").statistic
    )
    assert got.samples == len(cur_values)
    assert got.psi == pytest.approx(want_psi, rel=1e-9, abs=1e-12)
    assert got.js == pytest.approx(want_js, rel=1e-9, abs=1e-12)
    assert got.wasserstein == pytest.approx(want_w1, rel=1e-9, abs=1e-12)
    assert got.ks == pytest.approx(want_ks, rel=1e-9, abs=1e-12)


def test_bins_are_quantiles_of_training_values_and_hold_every_value() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(0, 1, 10_000).astype(np.float32)
    b = build_bins(v, 10)
    assert len(b.counts) == 10 and sum(b.counts) == 10_000
    assert all(c == 1000 for c in b.counts)  # distinct values: equal-mass bins
    assert set(b.edges) <= set(v.astype(np.float64).tolist())  # edges are training values
    assert b.means == sorted(b.means)
    assert b.std == pytest.approx(float(v.astype(np.float64).std()))
    # a value's bin is the same read as float32 (the model) or float64 (the online store)
    for e in b.edges:
        assert b.index(e) == b.index(float(np.float32(e)))


def test_repeated_values_get_fewer_bins_and_nan_reads_as_zero() -> None:
    v = np.array([0.0] * 80 + [1.0] * 15 + [2.0] * 5)
    b = build_bins(v, 10)
    assert b.edges == [0.0, 1.0] and b.counts == [80, 15, 5]
    assert b.index(float("nan")) == b.index(0.0) == 0
    assert b.index(1.0) == 1 and b.index(1.5) == 2 and b.index(99.0) == 2 and b.index(-5) == 0
    const = build_bins(np.full(50, 3.0))
    assert const.edges == [] and const.counts == [50]
    assert compare("c", const, [7], DriftPolicy(min_samples=1)).psi == 0.0


def test_a_feature_drifts_only_past_a_threshold_and_the_minimum_sample_count() -> None:
    rng = np.random.default_rng(2)
    b = build_bins(rng.normal(0, 1, 5000))
    same = _counts(b.edges, rng.normal(0, 1, 2000))
    shifted = _counts(b.edges, rng.normal(1, 1, 2000))
    policy = DriftPolicy(min_samples=1000)
    assert compare("f", b, same, policy).breached == []
    assert set(compare("f", b, shifted, policy).breached) == {"psi", "js", "wasserstein", "ks"}
    few = _counts(b.edges, rng.normal(1, 1, 999))
    judged = compare("f", b, few, policy)
    assert judged.breached == [] and judged.psi > policy.psi  # too few values to judge
    empty = compare("f", b, [0] * len(b.counts), policy)
    assert (empty.samples, empty.psi, empty.breached) == (0, 0.0, [])


def test_a_reference_covers_every_feature_and_the_score() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 3))
    s = 1 / (1 + np.exp(-x[:, 0]))
    ref = build_reference(["a", "b", "c"], x, s)
    assert ref.columns == ["a", "b", "c", "__score__"] and ref.rows == 600
    counts = [b.counts for b in ref.bins]  # the training set against itself
    assert all(sc.psi == 0 and sc.ks == 0 and sc.breached == [] for sc in compare_all(ref, counts))
    with pytest.raises(ValueError, match="expected"):
        build_reference(["a"], x, s)
    with pytest.raises(ValueError, match="scores"):
        build_reference(["a", "b", "c"], x, s[:10])
    with pytest.raises(ValueError, match="count vectors"):
        compare_all(ref, counts[:2])
