"""Threshold metrics, calibration, decision curves, readers, and the study-level helpers
(set_metrics, study_metrics, tidy_table, roc_table) that build metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from nhb_core import stats
from nhb_core.fileio import to_json


def _cohort(n_subj=40, slices=4, seed=0, center="A", p_pos=0.45):
    rng = np.random.default_rng(seed)
    rows, subs = [], []
    for i in range(n_subj):
        lab = int(rng.random() < p_pos)
        u = rng.normal()
        ps = []
        for k in range(slices):
            p1 = 1 / (1 + np.exp(-(1.5 * lab - 0.75 + u + rng.normal(scale=0.7))))
            p2 = 1 / (1 + np.exp(-(0.8 * lab - 0.4 + u + rng.normal(scale=0.9))))
            rows.append({"subject_id": f"{center}{i:03d}", "center": center, "slice_index": k, "label": lab,
                         "m1": p1, "m2": p2})
            ps.append((p1, p2))
        ps = np.array(ps).mean(0)
        subs.append({"subject_id": f"{center}{i:03d}", "center": center, "label": lab, "m1": ps[0], "m2": ps[1],
                     "reader_1": int(rng.random() < (0.8 if lab else 0.2)),
                     "reader_2": int(rng.random() < (0.7 if lab else 0.15))})
    return pd.DataFrame(subs), pd.DataFrame(rows)


# ----------------------------------------------------------------------------- building blocks
def test_wilson_matches_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    for c, n in [(0, 5), (5, 5), (3, 17), (40, 52), (1, 1)]:
        np.testing.assert_allclose(stats.wilson_ci(c, n), proportion_confint(c, n, method="wilson"), atol=1e-12)
        np.testing.assert_allclose(stats.clopper_pearson_ci(c, n), proportion_confint(c, n, method="beta"),
                                   atol=1e-12)
    assert all(np.isnan(stats.wilson_ci(0, 0)))


def test_mcnemar_exact_matches_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar

    for b, c in [(0, 0), (5, 2), (6, 6), (0, 9), (30, 12)]:
        ref = mcnemar([[10, b], [c, 3]], exact=True)
        r = stats.mcnemar_exact(b, c)
        assert r["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)
        assert r["statistic"] == ref.statistic


def test_threshold_metrics_fixed_threshold_and_f1():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.5, 0.2, 0.5, 0.1, 0.3, 0.7])
    tm = stats.threshold_metrics(y, s, 0.5)  # positive when score >= 0.5
    assert tm["confusion"] == {"tp": 2, "fp": 2, "tn": 2, "fn": 1}
    assert tm["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert tm["precision"]["value"] == pytest.approx(0.5)
    assert tm["f1"]["value"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert tm["f1"]["ci"][0] < tm["f1"]["value"] < tm["f1"]["ci"][1]
    none = stats.threshold_metrics(y, s, 5.0)  # nothing called positive: PPV undefined
    assert np.isnan(none["precision"]["value"]) and np.isnan(none["precision"]["ci"][0])


def test_youden_threshold_finite_and_best():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(50), np.zeros(50)]
    s = rng.normal(size=100) + 1.5 * y
    t = stats.youden_threshold(y, s)
    tm = stats.threshold_metrics(y, s, t)
    j = tm["sensitivity"]["value"] + tm["specificity"]["value"] - 1
    rc = stats.roc_curve(y, s)
    assert j == pytest.approx((rc.sensitivity + rc.specificity - 1).max())
    assert np.isfinite(stats.youden_threshold(y, np.zeros(100)))


def test_unpaired_delong():
    rng = np.random.default_rng(2)
    ya = np.r_[np.ones(30), np.zeros(40)]
    sa = rng.normal(size=70) + ya
    yb = np.r_[np.ones(25), np.zeros(25)]
    sb = rng.normal(size=50) + 0.3 * yb
    r = stats.delong_unpaired(ya, sa, yb, sb)
    va, vb = stats.delong_var(ya, sa), stats.delong_var(yb, sb)
    assert r["z"] == pytest.approx((stats.auc(ya, sa) - stats.auc(yb, sb)) / np.sqrt(va + vb))
    assert 0 < r["p_value"] < 1


def test_delong_matrix_k_models():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(50), np.zeros(70)]
    sc = {f"m{k}": rng.normal(size=120) + k * 0.4 * y for k in range(4)}
    mat = stats.delong_matrix(y, sc)
    assert mat["z"].shape == (4, 4) and len(mat["pairs"]) == 6
    np.testing.assert_allclose(mat["z"], -mat["z"].T, atol=1e-12)
    r = stats.delong_paired(y, sc["m1"], sc["m3"])
    assert mat["z"][1, 3] == pytest.approx(r["z"]) and mat["p"][3, 1] == pytest.approx(r["p_value"])


def test_calibration_matches_statsmodels_glm():
    import statsmodels.api as sm

    rng = np.random.default_rng(4)
    n = 400
    x = rng.normal(size=n)
    p_true = 1 / (1 + np.exp(-x))
    y = (rng.random(n) < p_true).astype(float)
    p = 1 / (1 + np.exp(-(1.8 * x + 0.4)))  # over-confident and shifted
    cal = stats.calibration(y, p)
    lp = np.log(p / (1 - p))
    slope = sm.GLM(y, sm.add_constant(lp), family=sm.families.Binomial()).fit().params[1]
    inter = sm.GLM(y, np.ones((n, 1)), family=sm.families.Binomial(), offset=lp).fit().params[0]
    assert cal["slope"] == pytest.approx(slope, abs=1e-6)
    assert cal["intercept"] == pytest.approx(inter, abs=1e-6)
    assert cal["slope"] < 1
    assert cal["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert sum(cal["bins"]["count"]) == n
    assert stats.brier_score(y, p) == pytest.approx(cal["brier"])


def test_decision_curve_by_hand():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.6, 0.2, 0.1, 0.05, 0.7, 0.3])
    dc = stats.decision_curve(y, p, thresholds=[0.25, 0.5])
    # pt = 0.5: positive when p >= 0.5 -> tp = 2, fp = 2; nb = 2/8 - 2/8 * 1
    assert dc["net_benefit"][1] == pytest.approx(0.0)
    # pt = 0.25: tp = 2, fp = 3 -> 2/8 - 3/8 * (1/3)
    assert dc["net_benefit"][0] == pytest.approx(2 / 8 - 3 / 8 / 3)
    assert dc["treat_all"][0] == pytest.approx(3 / 8 - 5 / 8 / 3)
    assert dc["treat_none"] == [0.0, 0.0]


def test_kappa_matches_sklearn_and_consensus():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(5)
    a = rng.integers(0, 2, 80)
    b = np.where(rng.random(80) < 0.8, a, 1 - a)
    k = stats.cohens_kappa(a, b)
    assert k["kappa"] == pytest.approx(cohen_kappa_score(a, b))
    assert k["ci"][0] < k["kappa"] < k["ci"][1]
    assert stats.cohens_kappa(a, a)["kappa"] == pytest.approx(1.0)
    cons = stats.reader_consensus({"r1": [1, 0, 1, np.nan], "r2": [1, 0, 0, np.nan], "r3": [0, 0, 1, np.nan]})
    np.testing.assert_array_equal(cons[:3], [1, 0, 1])
    assert np.isnan(cons[3])
    np.testing.assert_array_equal(stats.reader_consensus([[1, 0], [0, 0]], rule="any"), [1, 0])


def test_precision_paired_seeded():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 100)
    a = np.where(rng.random(100) < 0.85, y, 1 - y)
    b = np.where(rng.random(100) < 0.7, y, 1 - y)
    r1 = stats.precision_paired(y, a, b, n_boot=500, seed=1)
    assert r1 == stats.precision_paired(y, a, b, n_boot=500, seed=1)
    assert 0 <= r1["p_value"] <= 1 and r1["ci"][0] <= r1["diff"] <= r1["ci"][1]
    same = stats.precision_paired(y, a, a, n_boot=100)
    assert same["diff"] == 0 and same["p_value"] == 1.0


def test_roc_band_contains_curve():
    rng = np.random.default_rng(7)
    y = np.r_[np.ones(60), np.zeros(80)]
    s = rng.normal(size=140) + y
    band = stats.roc_band(y, s, n_boot=300, seed=0)
    lo, hi, tpr = map(np.asarray, (band["band_lower"], band["band_upper"], band["tpr"]))
    assert len(band["fpr"]) == len(stats.FPR_GRID)
    assert np.all(lo <= hi + 1e-12) and np.all((lo >= 0) & (hi <= 1))
    assert np.mean((lo <= tpr + 1e-12) & (tpr <= hi + 1e-12)) > 0.95
    assert tpr[-1] == 1.0 and np.all(np.diff(tpr) >= -1e-12)


# ----------------------------------------------------------------------------- set / study level
def test_set_metrics_block_shape():
    subs, slices = _cohort()
    blk = stats.set_metrics(subs, "label", ["m1", "m2"], None, ["reader_1", "reader_2"],
                            {"m1": 0.5, "m2": 0.45}, seed=0, n_boot=300)
    assert blk["n"] == len(subs) and blk["n_pos"] == subs["label"].sum() and blk["n_clusters"] is None
    m = blk["models"]["m1"]
    for key in ("auc", "auc_ci_delong", "auc_ci_bootstrap", "threshold", "confusion", "accuracy", "sensitivity",
                "specificity", "precision", "npv", "f1", "brier", "calibration", "decision_curve", "roc"):
        assert key in m, key
    assert m["threshold"] == 0.5 and m["auc_clustered"] is None
    assert set(m["accuracy"]) == {"value", "ci"}
    assert set(m["roc"]) >= {"fpr", "tpr", "thresholds", "band_lower", "band_upper"}
    assert len(m["roc"]["fpr"]) == len(m["roc"]["band_upper"]) == len(m["roc"]["thresholds"])
    assert set(m["decision_curve"]) == {"thresholds", "net_benefit", "treat_all", "treat_none"}
    (c,) = blk["comparisons"]
    assert {"a", "b", "auc_diff", "ci", "delong_z", "delong_p"} <= set(c)
    r = blk["readers"]["reader_1"]
    assert set(r["vs"]) == {"m1", "m2"}
    assert {"mcnemar_p", "mcnemar_p_sensitivity", "mcnemar_p_specificity", "precision_p"} <= set(r["vs"]["m1"])
    assert -1 <= blk["reader_agreement"]["kappa"] <= 1
    assert blk["consensus"]["rule"] == "majority" and "vs" in blk["consensus"]
    json.loads(to_json(blk))  # serialisable
    again = stats.set_metrics(subs, "label", ["m1", "m2"], None, ["reader_1", "reader_2"],
                              {"m1": 0.5, "m2": 0.45}, seed=0, n_boot=300)
    assert to_json(again) == to_json(blk)  # reproducible


def test_set_metrics_clustered_slice_level():
    _, slices = _cohort()
    blk = stats.set_metrics(slices, "label", ["m1", "m2"], "subject_id", [], {"m1": 0.5}, n_boot=300)
    m = blk["models"]["m1"]
    assert blk["n_clusters"] == slices["subject_id"].nunique()
    assert m["auc_clustered"] == pytest.approx(m["auc"])
    wide = m["auc_ci_clustered"][1] - m["auc_ci_clustered"][0]
    naive = m["auc_ci_delong"][1] - m["auc_ci_delong"][0]
    assert wide > naive  # correlated slices: the clustered CI is wider
    assert m["auc_ci_cluster_bootstrap"][0] < m["auc"] < m["auc_ci_cluster_bootstrap"][1]
    assert m["roc"]["band_method"] == "cluster bootstrap"
    assert "clustered_p" in blk["comparisons"][0]
    assert any("no threshold given for m2" in n for n in blk["notes"])


def test_set_metrics_one_class_is_null_not_error():
    subs, _ = _cohort()
    allpos = subs[subs["label"] == 1]
    blk = stats.set_metrics(allpos, "label", ["m1", "m2"], None, ["reader_1"], {"m1": 0.5, "m2": 0.5},
                            n_boot=100)
    m = blk["models"]["m1"]
    assert m["auc"] is None and m["roc"] is None and m["auc_ci_delong"] is None
    assert blk["comparisons"] == []
    assert m["sensitivity"]["value"] is not None and np.isnan(m["specificity"]["value"])
    assert blk["notes"] and "one class" in blk["notes"][0]
    assert "mcnemar_p" in blk["readers"]["reader_1"]["vs"]["m1"]
    json.loads(to_json(blk))


def _write_run(pred):
    pred.mkdir(parents=True)
    for set_name, center, seed in (("test", "A", 1), ("external_B", "B", 2), ("external_C", "C", 3), ("val", "A", 4)):
        subs, slices = _cohort(n_subj=24, slices=3, seed=seed, center=center)
        subs.to_csv(pred / f"{set_name}__subjects.csv", index=False)
        slices.to_csv(pred / f"{set_name}__slices.csv", index=False)


def test_study_metrics_and_tidy_tables(tmp_path):
    pred = tmp_path / "predictions"
    _write_run(pred)
    events = []
    sets = stats.study_metrics(pred, {"m1": 0.5, "m2": 0.5}, seed=0, n_boot=200, progress=events.append)
    assert set(sets) == {"test", "external:B", "external:C", "val", "pooled"}
    assert set(sets["pooled"]["pooled_from"]) == {"test", "external:B", "external:C"}
    assert sets["pooled"]["centers"] == {}  # each center is already its own set
    for s in sets.values():
        assert set(s["level"]) == {"subject", "slice"}
        assert s["level"]["slice"]["n_clusters"] == s["level"]["subject"]["n"]
        assert set(s["level"]["subject"]["readers"]) == {"reader_1", "reader_2"}
    assert sets["pooled"]["level"]["subject"]["n"] == 72
    assert events and events[-1]["done"] == events[-1]["total"]
    json.loads(to_json({"sets": sets}))
    tidy = stats.tidy_table({"sets": sets})
    assert len(tidy) == 5 * 2 * 2  # sets x levels x models
    row = tidy[(tidy.set == "test") & (tidy.level == "slice") & (tidy.model == "m1")].iloc[0]
    assert row.ci_method == "obuchowski" and row.auc_lower < row.auc < row.auc_upper
    assert {"sensitivity", "sensitivity_lower", "specificity_upper", "brier", "cal_slope"} <= set(tidy.columns)
    assert tidy["auc"].dtype == float
    roc = stats.roc_table(sets)
    assert len(roc) == len(tidy) * len(stats.FPR_GRID)
    assert (roc["lower"] <= roc["upper"] + 1e-12).all()


def test_study_metrics_all_positive_center(tmp_path):
    pred = tmp_path / "predictions"
    pred.mkdir()
    subs, slices = _cohort(n_subj=12, slices=2, seed=9, center="D")
    subs["label"] = 1
    slices["label"] = 1
    subs.to_csv(pred / "external_D__subjects.csv", index=False)
    slices.to_csv(pred / "external_D__slices.csv", index=False)
    sets = stats.study_metrics(pred, {"m1": 0.5, "m2": 0.5}, n_boot=50)
    blk = sets["external:D"]["level"]["subject"]
    assert blk["models"]["m1"]["auc"] is None and blk["notes"]
    assert stats.tidy_table(sets)["auc"].isna().all()


def test_study_metrics_missing_folder(tmp_path):
    from nhb_core.errors import StatsInputError

    with pytest.raises(StatsInputError):
        stats.study_metrics(tmp_path / "nope", {})
    assert stats.set_name_from_file("external_B") == "external:B"
    assert stats.set_name_from_file("test") == "test"


def test_aggregate_subjects():
    _, slices = _cohort(n_subj=10, slices=3)
    agg = stats.aggregate_subjects(slices, ["m1", "m2"])
    assert len(agg) == 10
    first = slices[slices.subject_id == agg.subject_id[0]]
    assert agg.m1[0] == pytest.approx(first.m1.mean())
    assert stats.aggregate_subjects(slices, ["m1"], how="max").m1[0] == pytest.approx(first.m1.max())


def test_study_metrics_per_center_rows(tmp_path):
    pred = tmp_path / "predictions"
    pred.mkdir()
    parts = [_cohort(n_subj=16, slices=2, seed=s, center=c) for s, c in ((11, "A"), (12, "E"))]
    pd.concat([p[0] for p in parts]).to_csv(pred / "test__subjects.csv", index=False)
    pd.concat([p[1] for p in parts]).to_csv(pred / "test__slices.csv", index=False)
    sets = stats.study_metrics(pred, {"m1": 0.5}, n_boot=50)
    assert list(sets) == ["test"]  # one held-out set: nothing to pool
    assert set(sets["test"]["centers"]) == {"A", "E"}
    assert sets["test"]["centers"]["A"]["level"]["subject"]["n"] == 16
    tidy = stats.tidy_table(sets)
    assert set(tidy["center"]) == {"all", "A", "E"} and set(tidy["model"]) == {"m1"}
