"""Properties of the ROC/AUC statistics (hypothesis) and edge cases that break other tools."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nhb_core import stats
from nhb_core.errors import StatsInputError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labelled_scores(draw, min_size=4, max_size=40, max_int=6):
    """Integer-valued scores (so ties are frequent) with both classes present."""
    n = draw(st.integers(min_size, max_size))
    y = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    y[0], y[1] = 1, 0
    s = draw(st.lists(st.integers(-max_int, max_int), min_size=n, max_size=n))
    return np.array(y), np.array(s, dtype=float)


def brute_auc(y, s):
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


@SETTINGS
@given(labelled_scores())
def test_matches_brute_force_pairs_ties_half(data):
    y, s = data
    a, v10, v01 = brute_auc(y, s)
    assert stats.auc(y, s) == pytest.approx(a, abs=1e-12)
    p10, p01 = stats.delong_placements(y, s)
    np.testing.assert_allclose(p10, v10, atol=1e-12)
    np.testing.assert_allclose(p01, v01, atol=1e-12)


@SETTINGS
@given(labelled_scores(), st.sampled_from(["cube", "exp", "affine", "rank"]))
def test_invariant_under_monotone_transform(data, kind):
    y, s = data
    f = {"cube": lambda x: x ** 3 + 2 * x, "exp": np.exp, "affine": lambda x: 7.5 * x - 3,
         "rank": lambda x: np.unique(x, return_inverse=True)[1].astype(float)}[kind]
    t = f(s)
    assert stats.auc(y, t) == pytest.approx(stats.auc(y, s), abs=1e-12)
    assert stats.delong_var(y, t) == pytest.approx(stats.delong_var(y, s), abs=1e-12, nan_ok=True)


@SETTINGS
@given(labelled_scores())
def test_negated_score_gives_one_minus_auc(data):
    y, s = data
    assert stats.auc(y, -s) == pytest.approx(1 - stats.auc(y, s), abs=1e-12)
    assert stats.delong_var(y, -s) == pytest.approx(stats.delong_var(y, s), abs=1e-12, nan_ok=True)
    r = stats.delong_paired(y, s, -s)
    assert r["auc_diff"] == pytest.approx(2 * stats.auc(y, s) - 1, abs=1e-12)


@SETTINGS
@given(labelled_scores())
def test_clustered_equals_ordinary_with_one_slice_per_cluster(data):
    y, s = data
    r = stats.clustered_auc(y, s, [f"c{i}" for i in range(y.size)])
    assert r["auc"] == pytest.approx(stats.auc(y, s), abs=1e-12)
    if min(y.sum(), (1 - y).sum()) >= 2:
        assert r["var"] == pytest.approx(stats.delong_var(y, s), abs=1e-12)
        assert r["components"]["S11"] == pytest.approx(0.0, abs=1e-12)
        p = stats.delong_paired(y, s, s ** 3 - s)
        pc = stats.clustered_paired(y, s, s ** 3 - s, np.arange(y.size))
        assert pc["z"] == pytest.approx(p["z"], abs=1e-9, nan_ok=True)


@SETTINGS
@given(labelled_scores(min_size=6))
def test_cis_inside_unit_interval(data):
    y, s = data
    for lo, hi in (stats.auc_ci_delong(y, s), stats.auc_ci_bootstrap(y, s, n_boot=200, seed=1)):
        if np.isfinite(lo):
            assert 0 <= lo <= hi <= 1
    r = stats.clustered_auc(y, s, np.arange(y.size) // 2)
    if np.isfinite(r["ci"][0]):
        assert 0 <= r["ci"][0] <= r["ci"][1] <= 1


@SETTINGS
@given(labelled_scores(max_size=25), st.integers(0, 2 ** 31))
def test_weighted_bootstrap_equals_naive_resampling(data, seed):
    """The vectorised bootstrap computes exactly the AUCs of explicitly resampled data sets."""
    y, s = data
    B = 50
    got = stats.bootstrap_aucs(y, s, n_boot=B, seed=seed)["aucs"][0]
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    ip = pos[rng.integers(0, pos.size, size=(B, pos.size))]
    ineg = neg[rng.integers(0, neg.size, size=(B, neg.size))]
    want = [brute_auc(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[s[ip[b]], s[ineg[b]]])[0] for b in range(B)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_all_ties_everywhere():
    y = np.array([1, 0] * 50)
    s = np.ones(100)
    assert stats.auc(y, s) == 0.5
    assert stats.auc_ci_delong(y, s) == (0.5, 0.5)  # pROC: variance 0
    assert stats.auc_ci_bootstrap(y, s, n_boot=100) == (0.5, 0.5)
    r = stats.delong_paired(y, s, s)
    assert r["z"] == 0.0 and r["p_value"] == 1.0  # pROC: z = 0 when diff and variance are 0


def test_near_one_auc_large_n_upper_bound_at_most_one_and_not_collapsed():
    rng = np.random.default_rng(3)
    n = 20000
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)]
    s = np.where(y == 1, 1.0 + rng.random(n), rng.random(n))  # separated ...
    s[0], s[-1] = 0.2, 1.5  # ... but for one positive and one negative
    a = stats.auc(y, s)
    assert 0.999 < a < 1
    lo, hi = stats.auc_ci_delong(y, s)
    assert hi <= 1 and lo < a and hi - lo > 0
    blo, bhi = stats.auc_ci_bootstrap(y, s, n_boot=300)
    assert 0 <= blo <= bhi <= 1 and bhi - blo > 0
    c = stats.clustered_auc(y, s, np.arange(n) // 4)
    assert c["ci"][1] <= 1 and c["ci"][1] > c["ci"][0]


def test_perfect_separation_gives_one():
    y = np.r_[np.ones(30), np.zeros(30)]
    s = np.r_[np.linspace(2, 3, 30), np.linspace(0, 1, 30)]
    assert stats.auc(y, s) == 1.0
    assert stats.auc_ci_delong(y, s) == (1.0, 1.0)
    assert stats.auc_ci_bootstrap(y, s, n_boot=200) == (1.0, 1.0)


def test_direction_fixed_below_chance():
    y = np.r_[np.ones(10), np.zeros(10)]
    s = np.r_[np.zeros(10), np.ones(10)]
    assert stats.auc(y, s) == 0.0


def test_bootstrap_seeded():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(40), np.zeros(60)]
    s = rng.normal(size=100) + y
    assert stats.auc_ci_bootstrap(y, s, seed=4, n_boot=500) == stats.auc_ci_bootstrap(y, s, seed=4, n_boot=500)
    assert stats.cluster_bootstrap_ci(y, s, np.arange(100) // 5, seed=2, n_boot=300) == \
        stats.cluster_bootstrap_ci(y, s, np.arange(100) // 5, seed=2, n_boot=300)


@pytest.mark.parametrize("bad", ["one_class", "nan", "length", "labels"])
def test_bad_input_raises_stats_input_error(bad):
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.1, 0.9, 0.3, 0.5, 0.7])
    if bad == "one_class":
        y = np.ones(5)
    elif bad == "nan":
        s[2] = np.nan
    elif bad == "length":
        s = s[:4]
    elif bad == "labels":
        y = np.array([0, 1, 2, 1, 1])
    with pytest.raises(StatsInputError) as ex:
        stats.auc(y, s)
    assert "\n" not in ex.value.line()


def test_reader_values_checked():
    from nhb_core.stats._binary import check_reader

    with pytest.raises(StatsInputError, match="reader_x"):
        check_reader([0, 1, 3], 3, column="reader_x")
    with pytest.raises(StatsInputError, match="missing"):
        check_reader([0, 1, np.nan], 3, column="reader_x")
    assert np.isnan(check_reader([0, 1, np.nan], 3, column="reader_x", allow_missing=True)[2])


@SETTINGS
@given(labelled_scores())
def test_roc_polygon_area_is_auc(data):
    y, s = data
    pts = stats.roc_curve(y, s).to_dict()
    fpr, tpr = np.asarray(pts["fpr"]), np.asarray(pts["tpr"])
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(stats.auc(y, s), abs=1e-12)


@SETTINGS
@given(st.integers(2, 30), st.integers(2, 30), st.integers(0, 10 ** 6))
def test_roc_band_curve_on_grid_untied(m, n, seed):
    """Without ties the grid curve is the step ROC: the best TPR among vertices with FPR <= f."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(m), np.zeros(n)]
    s = rng.permutation(m + n).astype(float) + 0.3 * y
    band = stats.roc_band(y, s, n_boot=20, seed=seed)
    pts = stats.roc_curve(y, s).to_dict()
    fpr, tpr = np.asarray(pts["fpr"]), np.asarray(pts["tpr"])
    want = [tpr[fpr <= f + 1e-9].max() for f in stats.FPR_GRID]
    np.testing.assert_allclose(band["tpr"], want, atol=1e-9)
