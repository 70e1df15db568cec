"""nhb_core.stats against the pROC / statsmodels oracle in ../shared/data/stats_oracle.

Data-driven: every case listed in expected.json is checked, through the library AND through
``python -m nhb_core stats --json`` with exactly the arguments and keys of the oracle's README
("What the acceptance check runs"). Tolerances are the README's: 1e-9 for exact quantities,
``ci_boot.tol`` for bootstrap bounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nhb_core import stats

ORACLE_REL = Path("data") / "stats_oracle"
_SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EXACT = 1e-9


def _expected() -> dict | None:
    p = _SHARED / ORACLE_REL / "expected.json"
    if not p.is_file():
        return None
    with open(p, encoding="utf-8") as fh:
        return json.load(fh)


_EXP = _expected()


def _ids(kind: str) -> list[str]:
    if _EXP is None:
        return ["<oracle absent>"]
    return sorted(_EXP.get(kind, {}))


@pytest.fixture(scope="module")
def oracle(shared_dir):
    root = shared_dir / ORACLE_REL
    if not (root / "expected.json").is_file():
        pytest.skip("stats oracle absent")
    return root, _EXP if _EXP is not None else json.loads((root / "expected.json").read_text())


def _num(v):
    if isinstance(v, str):
        return {"Inf": math.inf, "-Inf": -math.inf}[v]
    return math.nan if v is None else float(v)


def _close(actual, expected, tol=EXACT, what=""):
    a = np.asarray([_num(x) if not isinstance(x, (float, int, np.floating, np.integer)) or x is None else float(x)
                    for x in np.atleast_1d(np.asarray(actual, dtype=object))], dtype=float)
    e = np.asarray([_num(x) for x in np.atleast_1d(np.asarray(expected, dtype=object))], dtype=float)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    both_nan = np.isnan(a) & np.isnan(e)
    same_inf = np.isinf(e) & (a == e)
    with np.errstate(invalid="ignore"):
        ok = both_nan | same_inf | (np.abs(a - e) <= tol)
    assert ok.all(), f"{what}: {a[~ok]} != {e[~ok]} (tol {tol})"


def _case(oracle, kind, cid):
    root, exp = oracle
    if cid not in exp.get(kind, {}):
        pytest.skip(f"no {kind} in this oracle")
    c = exp[kind][cid]
    return root / c["csv"], c


def _run_cli(capsys, args) -> dict:
    from nhb_core.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["stats", *args])
    out = capsys.readouterr()
    assert ex.value.code == 0, out.err
    return json.loads(out.out)


# ----------------------------------------------------------------------------- ROC cases
@pytest.mark.parametrize("cid", _ids("roc_cases"))
def test_roc_case_library(oracle, cid):
    path, c = _case(oracle, "roc_cases", cid)
    df = pd.read_csv(path)
    y = df["y"].to_numpy()
    assert len(df) == c["n"] and int(y.sum()) == c["n_pos"]
    for m in ("m1", "m2"):
        e = c[m]
        s = df[m].to_numpy()
        _close(stats.auc(y, s), e["auc"], what=f"{cid}.{m}.auc")
        _close(stats.delong_var(y, s), e["delong_var"], what=f"{cid}.{m}.delong_var")
        _close(stats.auc_ci_delong(y, s), [e["ci_delong"]["lower"], e["ci_delong"]["upper"]], what="ci_delong")
        lo, hi = stats.auc_ci_bootstrap(y, s, n_boot=2000, seed=0)
        tol = e["ci_boot"]["tol"]
        _close([lo, hi], [e["ci_boot"]["lower"], e["ci_boot"]["upper"]], tol=tol, what=f"{cid}.{m}.ci_boot")
        rc = stats.roc_curve(y, s)
        _close(rc.thresholds, e["coords"]["threshold"], what="coords.threshold")
        _close(rc.sensitivity, e["coords"]["sensitivity"], what="coords.sensitivity")
        _close(rc.specificity, e["coords"]["specificity"], what="coords.specificity")
        yd = stats.youden_threshold(y, s, return_all=True)
        for k in ("threshold", "sensitivity", "specificity"):
            _close(yd[k], e["youden"][k], what=f"youden.{k}")
        _close(yd["J"], e["youden"]["J"], what="youden.J")
        at = e["at_youden"]
        tm = stats.threshold_metrics(y, s, _num(at["threshold"]))
        assert tm["confusion"] == {k: at["confusion"][k] for k in ("tp", "fp", "tn", "fn")}
        for met, v in at["metrics"].items():
            got = tm[met]
            assert (got["count"], got["nobs"]) == (v["count"], v["nobs"]), met
            _close(got["value"], v["estimate"], what=f"{met}.estimate")
            _close(got["ci"], v["wilson"], what=f"{met}.wilson")
            _close(got["ci_exact"], v["clopper_pearson"], what=f"{met}.clopper_pearson")
        if "placements" in e:
            v10, v01 = stats.delong_placements(y, s)
            _close(v10, e["placements"]["cases_V10"], what="placements V10")
            _close(v01, e["placements"]["controls_V01"], what="placements V01")
    p = c["delong_paired"]
    r = stats.delong_paired(y, df["m1"], df["m2"])
    _close(r["auc_diff"], p["auc_diff"], what="auc_diff")
    _close(r["cov"], p["cov_delong"], what="cov")
    _close(r["z"], p["z"], what="z")
    _close(r["p_value"], p["p_value"], what="p")
    _close(r["ci"], p["ci_diff"], what="ci_diff")
    rev = stats.delong_paired(y, df["m2"], df["m1"])  # sign follows a - b
    _close(rev["z"], -p["z"], what="z reversed")
    _close(rev["p_value"], p["p_value"], what="p reversed")
    mat = stats.delong_matrix(y, {"m1": df["m1"], "m2": df["m2"]})
    _close(mat["z"][0, 1], p["z"], what="matrix z")
    _close(mat["p"][1, 0], p["p_value"], what="matrix p")


@pytest.mark.parametrize("cid", _ids("roc_cases"))
def test_roc_case_cli(oracle, cid, capsys):
    path, c = _case(oracle, "roc_cases", cid)
    out = _run_cli(capsys, ["--predictions", str(path), "--truth", "y", "--score", "m1", "--score", "m2", "--json"])
    for m in ("m1", "m2"):
        e, got = c[m], out["scores"][m]
        _close(got["auc"], e["auc"], what=f"{cid}.{m}.auc")
        _close(got["auc_ci_delong"], [e["ci_delong"]["lower"], e["ci_delong"]["upper"]], what="auc_ci_delong")
        _close(got["auc_ci_bootstrap"], [e["ci_boot"]["lower"], e["ci_boot"]["upper"]], tol=e["ci_boot"]["tol"],
               what=f"{cid}.{m}.auc_ci_bootstrap")
        assert 0 <= got["auc_ci_delong"][0] <= got["auc_ci_delong"][1] <= 1
    comp = [x for x in out["comparisons"] if (x["a"], x["b"]) == ("m1", "m2")]
    assert len(comp) == 1
    _close(comp[0]["delong_z"], c["delong_paired"]["z"], what="delong_z")
    _close(comp[0]["delong_p"], c["delong_paired"]["p_value"], what="delong_p")


def test_bootstrap_ci_stable_across_seeds(oracle):
    """Not tuned to one seed: several seeds all stay within the oracle's tolerance."""
    root, exp = oracle
    for cid, c in sorted(exp.get("roc_cases", {}).items()):
        if c["n"] > 500:
            continue
        df = pd.read_csv(root / c["csv"])
        for m in ("m1", "m2"):
            e = c[m]["ci_boot"]
            for seed in (1, 7, 12345):
                lo, hi = stats.auc_ci_bootstrap(df["y"], df[m], n_boot=2000, seed=seed)
                _close([lo, hi], [e["lower"], e["upper"]], tol=e["tol"], what=f"{cid}.{m} seed {seed}")


# ----------------------------------------------------------------------------- clustered cases
@pytest.mark.parametrize("cid", _ids("clustered_cases"))
def test_clustered_case_library(oracle, cid):
    path, c = _case(oracle, "clustered_cases", cid)
    df = pd.read_csv(path)
    e = c["m1"]
    r = stats.clustered_auc(df["y"], df["m1"], df["cluster"])
    _close(stats.auc(df["y"], df["m1"]), e["auc"], what="auc")
    _close(r["auc"], e["auc_clustered"], what="auc_clustered")
    _close(r["var"], e["var_clustered"], what="var_clustered")
    _close(r["se"], e["se_clustered"], what="se_clustered")
    _close(r["ci_raw"], [e["ci_clustered"]["lower"], e["ci_clustered"]["upper"]], what="ci_clustered")
    _close(r["ci"], np.clip([e["ci_clustered"]["lower"], e["ci_clustered"]["upper"]], 0, 1), what="ci clipped")
    for k, v in e["components"].items():
        _close(r["components"][k], v, what=f"components.{k}")
    assert r["n_clusters"] == c["n_clusters"]
    _close(stats.delong_var(df["y"], df["m1"]), e["delong_var_ignoring_clusters"], what="delong ignoring clusters")
    _close(stats.auc_ci_delong(df["y"], df["m1"]),
           [e["ci_delong_ignoring_clusters"]["lower"], e["ci_delong_ignoring_clusters"]["upper"]], what="ci delong")
    lo, hi = stats.cluster_bootstrap_ci(df["y"], df["m1"], df["cluster"], n_boot=500, seed=0)
    assert 0 <= lo < e["auc"] < hi <= 1


@pytest.mark.parametrize("cid", _ids("clustered_cases"))
def test_clustered_case_cli(oracle, cid, capsys):
    path, c = _case(oracle, "clustered_cases", cid)
    out = _run_cli(capsys, ["--predictions", str(path), "--truth", "y", "--score", "m1", "--cluster", "cluster",
                            "--json"])
    e, got = c["m1"], out["scores"]["m1"]
    _close(got["auc"], e["auc"], what="auc")
    _close(got["auc_clustered"], e["auc_clustered"], what="auc_clustered")
    ci = [e["ci_clustered"]["lower"], e["ci_clustered"]["upper"]]
    _close(got["auc_clustered_ci"], np.clip(ci, 0, 1), what="auc_clustered_ci")
    assert out["n_clusters"] == c["n_clusters"]


# ----------------------------------------------------------------------------- McNemar cases
_STRATA = {"accuracy_all": "mcnemar_p", "sensitivity_positives": "mcnemar_p_sensitivity",
           "specificity_negatives": "mcnemar_p_specificity"}


@pytest.mark.parametrize("cid", _ids("mcnemar_cases"))
def test_mcnemar_case_library(oracle, cid):
    path, c = _case(oracle, "mcnemar_cases", cid)
    df = pd.read_csv(path)
    y, mp, rp = df["y"].to_numpy(), df["model"].to_numpy(), df["reader"].to_numpy()
    r = stats.compare_to_reader(y, mp, rp, n_boot=200)
    for stratum, key in _STRATA.items():
        t = c["tests"][stratum]
        got = r["tables"][stratum]
        assert got["table"] == t["table"], stratum
        assert (got["b"], got["c"]) == (t["b"], t["c"])
        _close(got["statistic"], t["statsmodels_exact"]["statistic"], what=f"{stratum} statistic")
        _close(r[key], t["statsmodels_exact"]["p_value"], what=f"{stratum} p")
        ex = stats.mcnemar_exact(t["b"], t["c"])
        _close(ex["p_value"], t["statsmodels_exact"]["p_value"], what="mcnemar_exact")
        if t.get("r_binom_exact_p") is not None:
            _close(ex["p_value"], t["r_binom_exact_p"], what="binom.test")
    for who, pred in (("model", mp), ("reader", rp)):
        tm = stats.threshold_metrics(y, pred, 0.5)
        assert tm["confusion"] == {k: c[who]["confusion"][k] for k in ("tp", "fp", "tn", "fn")}
        for met, v in c[who]["metrics"].items():
            _close(tm[met]["value"], v["estimate"], what=f"{who}.{met}")
            _close(tm[met]["ci"], v["wilson"], what=f"{who}.{met}.wilson")
            _close(tm[met]["ci_exact"], v["clopper_pearson"], what=f"{who}.{met}.cp")


@pytest.mark.parametrize("cid", _ids("mcnemar_cases"))
def test_mcnemar_case_cli(oracle, cid, capsys):
    path, c = _case(oracle, "mcnemar_cases", cid)
    out = _run_cli(capsys, ["--predictions", str(path), "--truth", "y", "--score", "model", "--reader", "reader",
                            "--threshold", "0.5", "--json", "--n-boot", "200"])
    got = out["readers"]["reader"]
    for stratum, key in _STRATA.items():
        _close(got[key], c["tests"][stratum]["statsmodels_exact"]["p_value"], what=f"{cid}.{key}")
        _close(got["vs"]["model"][key], c["tests"][stratum]["statsmodels_exact"]["p_value"], what=f"vs.{key}")
    assert "precision_p" in got
    tm = out["scores"]["model"]["threshold_metrics"]
    assert tm["confusion"] == {k: c["model"]["confusion"][k] for k in ("tp", "fp", "tn", "fn")}


def test_oracle_lists_cases(oracle):
    """The data-driven tests above saw every case kind (guards against a silently empty oracle)."""
    _, exp = oracle
    assert exp["roc_cases"] and exp["clustered_cases"] and exp["mcnemar_cases"]
