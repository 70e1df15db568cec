"""nhb_core.stats.mrmc (Obuchowski-Rockette MRMC, Hillis ddf) and ``python -m nhb_core mrmc``.

* the oracle in ../shared/data/mrmc_oracle (R's MRMCaov / RJafroc on the Van Dyke data), every value of
  expected.json for both covariance methods, through the library and through the CLI ``--json``;
* an independent brute-force check (leave-one-case-out AUCs recomputed from scratch, DeLong from the
  psi matrix, the OR formulas written with loops) on designs the oracle lacks (3 modalities, a network
  arm, negative variance components);
* properties: reader and case permutation invariance, identical arms give F = 0, a network arm whose
  rating is the same for every reader has no reader variance;
* bad input: one line, exit 2, no traceback.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nhb_core import stats
from nhb_core.cli import main
from nhb_core.errors import StatsInputError
from nhb_core.stats import mrmc as M

_SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ORACLE = _SHARED / "data" / "mrmc_oracle"
REL, P_REL, ZERO = 1e-9, 1e-7, 1e-12


def _expected() -> dict | None:
    p = ORACLE / "expected.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


_EXP = _expected()
_CASES = sorted(_EXP["cases"]) if _EXP else ["<oracle absent>"]


def _num(v) -> float:
    if isinstance(v, str):
        return {"inf": math.inf, "-inf": -math.inf, "Inf": math.inf}[v]
    return math.nan if v is None else float(v)


def _compare(ref, got, path: str, bad: list) -> None:
    """Walk every leaf of ``ref`` and compare with ``got`` at the oracle's tolerances."""
    if isinstance(ref, dict):
        if not isinstance(got, dict):
            bad.append(f"{path}: not a dict")
            return
        for k, v in ref.items():
            if k not in got:
                bad.append(f"{path}.{k}: missing")
            else:
                _compare(v, got[k], f"{path}.{k}", bad)
    elif isinstance(ref, list):
        if len(ref) != len(got):
            bad.append(f"{path}: length {len(got)} != {len(ref)}")
        for i, (a, b) in enumerate(zip(ref, got)):
            _compare(a, b, f"{path}[{i}]", bad)
    elif isinstance(ref, bool):
        if ref != got:
            bad.append(f"{path}: {got} != {ref}")
    elif isinstance(ref, str) and ref not in ("inf", "-inf", "Inf"):
        if ref != got:
            bad.append(f"{path}: {got!r} != {ref!r}")
    else:
        r, g = _num(ref), _num(got)
        if math.isinf(r):
            ok = g > 1e12 if r > 0 else g < -1e12
        elif r == 0:
            ok = abs(g) <= ZERO
        else:
            tol = P_REL if path.rsplit(".", 1)[-1] == "p" else REL
            ok = abs(g - r) <= tol * abs(r) + ZERO
        if not ok:
            bad.append(f"{path}: {g!r} vs {r!r}")


def _oracle_case(name: str) -> tuple[dict, Path]:
    if _EXP is None:
        pytest.skip("../shared/data/mrmc_oracle is absent")
    case = _EXP["cases"][name]
    data = ORACLE / Path(case["data_file"]).name
    if not data.is_file():
        data = ORACLE / case["data_file"]
    return case, data


def _blocks(case: dict) -> list[str]:
    return [k for k in ("jackknife", "DeLong") if k in case]


@pytest.mark.parametrize("name", _CASES)
def test_oracle_library(name):
    case, data = _oracle_case(name)
    assert _blocks(case)
    for cov in _blocks(case):
        res = stats.mrmc(data, cov=cov)
        assert res["cov_method"] == cov
        bad: list[str] = []
        for top in ("reader_auc", "modality_auc", "ms"):
            if top in case:
                _compare(case[top], res[top], top, bad)
        _compare(case[cov], res, cov, bad)
        assert not bad, bad[:10]


@pytest.mark.parametrize("name", _CASES)
def test_oracle_cli_json(name, capsys):
    case, data = _oracle_case(name)
    for cov in _blocks(case):
        code, out, err = _cli(capsys, "--readings", str(data), "--cov", cov.lower(), "--json")
        assert code == 0, err
        assert out.count("\n") == 1
        res = json.loads(out)
        bad: list[str] = []
        for top in ("reader_auc", "modality_auc", "ms"):
            if top in case:
                _compare(case[top], res[top], top, bad)
        _compare(case[cov], res, cov, bad)
        assert not bad, bad[:10]
        # the README's example key paths
        assert set(res["RRRC"]) >= {"F", "df1", "df2", "p", "diff", "single_modality"}
        assert "ci_lower" in res["RRFC"]["diff"] and "var_tr" in res["variance_components"]


def test_oracle_published_headline():
    """The headline of the README / OR-DBM MRMC 2.51 printout, to its printed digits."""
    if _EXP is None or "vandyke" not in _EXP["cases"]:
        pytest.skip("the Van Dyke oracle case is absent")
    _, data = _oracle_case("vandyke")
    res = stats.mrmc(data, cov="jackknife")
    assert res["modality_auc"]["1"] == pytest.approx(0.89703704, abs=5e-9)
    assert res["modality_auc"]["2"] == pytest.approx(0.94083736, abs=5e-9)
    assert res["RRRC"]["F"] == pytest.approx(4.456319, abs=5e-7)
    assert res["RRRC"]["df2"] == pytest.approx(15.259675, abs=5e-7)
    assert res["RRRC"]["p"] == pytest.approx(0.0516657, abs=5e-8)


# ----------------------------------------------------------------------------- brute force
def _auc_naive(y, s) -> float:
    x, z = s[y], s[~y]
    return float(((x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])).mean())


def _reference(R: np.ndarray, y: np.ndarray, cov: str) -> dict:
    """Textbook Obuchowski-Rockette / Hillis from scratch: loops, leave-one-out recomputation."""
    t, r, n = R.shape
    A = np.array([[_auc_naive(y, R[i, j]) for j in range(r)] for i in range(t)])
    if cov == "jackknife":
        th = np.array([[[_auc_naive(np.delete(y, k), np.delete(R[i, j], k)) for k in range(n)]
                        for j in range(r)] for i in range(t)]).reshape(t * r, n)
        d = th - th.mean(axis=1, keepdims=True)
        C = (n - 1) / n * d @ d.T
    else:
        pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
        V10 = np.empty((t * r, pos.size))
        V01 = np.empty((t * r, neg.size))
        for q in range(t * r):
            s = R.reshape(t * r, n)[q]
            psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
            V10[q], V01[q] = psi.mean(axis=1), psi.mean(axis=0)
        C = np.cov(V10) / pos.size + np.cov(V01) / neg.size
    idx = list(itertools.product(range(t), range(r)))
    var, c1, c2, c3 = [], [], [], []
    for (a, (i, j)), (b, (i2, j2)) in itertools.product(enumerate(idx), enumerate(idx)):
        (var if (i, j) == (i2, j2) else c1 if j == j2 else c2 if i == i2 else c3).append(C[a, b])
    var, c1, c2, c3 = map(np.mean, (var, c1, c2, c3))
    mi, mj, g = A.mean(1), A.mean(0), A.mean()
    ms_t = r * ((mi - g) ** 2).sum() / (t - 1)
    ms_r = t * ((mj - g) ** 2).sum() / (r - 1)
    ms_tr = ((A - mi[:, None] - mj[None, :] + g) ** 2).sum() / ((t - 1) * (r - 1))
    den = ms_tr + r * max(c2 - c3, 0)
    return {"A": A, "C": C, "var_error": var, "cov1": c1, "cov2": c2, "cov3": c3, "ms_t": ms_t, "ms_r": ms_r,
            "ms_tr": ms_tr, "F": ms_t / den, "df2": den ** 2 / (ms_tr ** 2 / ((t - 1) * (r - 1))),
            "var_r": (ms_r - ms_tr) / t - c1 + c3, "var_tr": ms_tr - var + c1 + c2 - c3,
            "X2": (t - 1) * ms_t / (var - c1 + (r - 1) * max(c2 - c3, 0))}


def _sim(t=2, r=4, n=40, seed=0, ai=False, levels=True):
    """Simulated ratings: a shared case signal, reader noise and thresholds; optional network arm 0."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, bool)
    y[: n * 2 // 5] = True
    signal = 1.2 * y + rng.normal(size=n)
    R = np.empty((t, r, n))
    for i in range(t):
        for j in range(r):
            lat = signal + 0.4 * i * y + rng.normal(scale=0.8, size=n)
            R[i, j] = np.digitize(lat, np.sort(rng.normal(size=4)) + 0.6) + 1 if levels else lat
    if ai:
        R[0] = np.round(signal + rng.normal(scale=0.3, size=n), 2)
    return R, y


@pytest.mark.parametrize("cov", ["jackknife", "delong"])
@pytest.mark.parametrize("design", [dict(t=2, r=3, seed=1), dict(t=3, r=4, seed=2), dict(t=2, r=5, seed=3, ai=True)])
def test_against_brute_force(cov, design):
    R, y = _sim(n=30, **design)
    ref = _reference(R, y, cov)
    res = M.mrmc_arrays(R, y, cov=cov)
    t, r = R.shape[:2]
    np.testing.assert_allclose(np.array(res["cov_matrix"]["values"]), ref["C"], rtol=1e-10, atol=1e-15)
    got_auc = np.array([[res["reader_auc"][f"{i + 1}|{j + 1}"] for j in range(r)] for i in range(t)])
    np.testing.assert_allclose(got_auc, ref["A"], rtol=1e-12)
    vc = res["variance_components"]
    for k in ("var_error", "cov1", "cov2", "cov3", "var_r", "var_tr"):
        assert vc[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-14), k
    for k in ("ms_t", "ms_r", "ms_tr"):
        assert res["ms"][k] == pytest.approx(ref[k], rel=1e-9, abs=1e-15), k
    assert res["RRRC"]["F"] == pytest.approx(ref["F"], rel=1e-9)
    assert res["RRRC"]["df2"] == pytest.approx(ref["df2"], rel=1e-9)
    assert res["FRRC"]["X2"] == pytest.approx(ref["X2"], rel=1e-9)
    assert res["RRRC"]["df1"] == t - 1 and len(res["RRRC"]["diffs"]) == t * (t - 1) // 2


def test_three_modalities_pairwise_and_global():
    R, y = _sim(t=3, r=4, n=60, seed=5)
    res = M.mrmc_arrays(R, y, modalities=["A", "B", "C"], cov="delong")
    assert [d["comparison"] for d in res["RRRC"]["diffs"]] == ["A - B", "A - C", "B - C"]
    ma = res["modality_auc"]
    for d in res["RRRC"]["diffs"]:
        a, b = d["comparison"].split(" - ")
        assert d["estimate"] == pytest.approx(ma[a] - ma[b], abs=1e-15)
        # pairwise SE uses the global denominator (Hillis 2007)
        assert d["stderr"] == pytest.approx(math.sqrt(2 / 4 * res["RRRC"]["denominator"]))
        assert d["ci_lower"] < d["estimate"] < d["ci_upper"]
    assert res["RRRC"]["diff"] == res["RRRC"]["diffs"][0]
    from scipy import stats as sps
    assert res["RRRC"]["p"] == pytest.approx(sps.f.sf(res["RRRC"]["F"], 2, res["RRRC"]["df2"]))
    assert res["FRRC"]["p"] == pytest.approx(sps.chi2.sf(res["FRRC"]["X2"], 2))
    # per reader, pairwise: SE from that reader's own two variances and covariance
    C4 = np.array(res["cov_matrix"]["values"]).reshape(3, 4, 3, 4)
    pr = res["FRRC"]["per_reader_diffs"]["2"][2]  # reader 2, B - C
    assert pr["stderr"] == pytest.approx(math.sqrt(C4[1, 1, 1, 1] + C4[2, 1, 2, 1] - 2 * C4[1, 1, 2, 1]))


def test_negative_variance_components_are_kept():
    found = None
    for seed in range(200):
        R, y = _sim(t=2, r=3, n=24, seed=seed)
        res = M.mrmc_arrays(R, y)
        vc = res["variance_components"]
        if vc["var_tr"] < 0 or vc["var_r"] < 0:
            found = (R, y, res)
            break
    assert found is not None
    R, y, res = found
    ref = _reference(R, y, "jackknife")
    vc = res["variance_components"]
    assert vc["var_tr"] == pytest.approx(ref["var_tr"], rel=1e-9, abs=1e-15)
    assert vc["var_r"] == pytest.approx(ref["var_r"], rel=1e-9, abs=1e-15)
    assert min(vc["var_tr"], vc["var_r"]) < 0  # reported as estimated, not truncated at 0


def test_cov2_below_cov3_is_truncated_in_denominators():
    for seed in range(300):
        R, y = _sim(t=2, r=3, n=24, seed=seed, levels=False)
        res = M.mrmc_arrays(R, y, cov="delong")
        vc = res["variance_components"]
        if vc["cov2"] < vc["cov3"]:
            assert res["RRRC"]["cov2_minus_cov3_truncated_at_0"] is True
            assert res["RRRC"]["denominator"] == pytest.approx(res["ms"]["ms_tr"], rel=1e-12)
            assert res["FRRC"]["denominator"] == pytest.approx(vc["var_error"] - vc["cov1"], rel=1e-12)
            assert res["FRRC"]["denominator_without_max"] < res["FRRC"]["denominator"]
            return
    pytest.fail("no simulated design with Cov2 < Cov3")


# ----------------------------------------------------------------------------- properties
def _long(R: np.ndarray, y: np.ndarray, modalities=None, readers=None, cases=None) -> pd.DataFrame:
    t, r, n = R.shape
    modalities = modalities or [str(i + 1) for i in range(t)]
    readers = readers or [str(j + 1) for j in range(r)]
    cases = cases or [f"c{k:03d}" for k in range(n)]
    rows = [(readers[j], modalities[i], cases[k], int(y[k]), float(R[i, j, k]))
            for i in range(t) for j in range(r) for k in range(n)]
    return pd.DataFrame(rows, columns=list(M.READINGS_COLUMNS))


def _flat(res: dict) -> dict:
    out = {}

    def walk(o, p):
        if isinstance(o, dict):
            for k, v in o.items():
                if k not in ("per_reader", "per_reader_diffs"):  # keyed by reader label: checked apart
                    walk(v, f"{p}.{k}")
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            out[p] = float(o)
    for k in ("modality_auc", "ms", "variance_components", "RRRC", "FRRC", "RRFC"):
        walk(res[k], k)
    return out


def test_reader_and_case_permutation_invariance():
    R, y = _sim(t=2, r=5, n=50, seed=7)
    df = _long(R, y)
    base = stats.mrmc(df, cov="jackknife")
    rng = np.random.default_rng(0)
    shuffled_rows = df.iloc[rng.permutation(len(df))].reset_index(drop=True)
    # relabel readers in another order and cases in another order: same analysis
    perm_r = {str(j + 1): str(p + 1) for j, p in enumerate(rng.permutation(5))}
    perm_c = {f"c{k:03d}": f"c{p:03d}" for k, p in enumerate(rng.permutation(50))}
    relabelled = df.assign(reader=df["reader"].map(perm_r), case_id=df["case_id"].map(perm_c))
    for other in (shuffled_rows, relabelled):
        res = stats.mrmc(other, cov="jackknife")
        a, b = _flat(base), _flat(res)
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-14), k
    res = stats.mrmc(relabelled, cov="jackknife")
    for old, new in perm_r.items():
        assert res["reader_auc"][f"1|{new}"] == pytest.approx(base["reader_auc"][f"1|{old}"], rel=1e-12)
        assert res["FRRC"]["per_reader"][new]["stderr"] == pytest.approx(base["FRRC"]["per_reader"][old]["stderr"],
                                                                         rel=1e-9)


def test_identical_arms_give_zero():
    R, y = _sim(t=1, r=4, n=40, seed=3)
    R2 = np.concatenate([R, R])
    for cov in ("jackknife", "delong"):
        res = M.mrmc_arrays(R2, y, cov=cov)
        for an in ("RRRC", "RRFC"):
            assert res[an]["F"] == 0.0 and res[an]["p"] == 1.0
            assert res[an]["diff"]["estimate"] == 0.0
            assert res[an]["diff"]["ci_lower"] == 0.0 == res[an]["diff"]["ci_upper"]
        assert res["FRRC"]["X2"] == 0.0 and res["FRRC"]["p"] == 1.0 and res["FRRC"]["diff"]["estimate"] == 0.0
        assert res["ms"]["ms_t"] == 0.0


def test_network_arm_same_for_every_reader():
    R, y = _sim(t=2, r=5, n=60, seed=11, ai=True)
    assert (R[0] == R[0, :1]).all()
    for cov in ("jackknife", "delong"):
        res = M.mrmc_arrays(R, y, modalities=["net", "readers"], cov=cov)
        vc = res["variance_components"]
        assert abs(vc["var_r"]) <= 1e-12  # no reader variance: the network is one "reader" repeated
        ai_rrrc = res["RRRC"]["single_modality"]["net"]
        assert ai_rrrc["ms_r"] == 0.0
        assert ai_rrrc["df"] == math.inf
        assert res["RRFC"]["single_modality"]["net"]["stderr"] == 0.0
        # var_tr: the interaction left after the readers' spread is split equally between the arms
        assert res["ms"]["ms_r"] == pytest.approx(res["ms"]["ms_tr"], rel=1e-9)
        assert vc["cov1"] == pytest.approx(vc["cov3"], rel=1e-9)
        # every reader has the network's AUC in the network arm
        assert len({res["reader_auc"][f"net|{j}"] for j in res["readers"]}) == 1
        # the network arm's single-modality SE comes from the case variance alone
        assert ai_rrrc["stderr"] == pytest.approx(math.sqrt(max(ai_rrrc["cov2"], 0)))
    # JSON: the infinite df reads back as inf
    js = json.loads(json.dumps(M.json_ready(res)))
    assert float(js["RRRC"]["single_modality"]["net"]["df"]) == math.inf


def test_delong_and_jackknife_from_placements_closed_form():
    """Jackknife = (N-1)/N (S10/(m-1) + S01/(n-1)) vs DeLong S10/m + S01/n: same AUCs, close variances."""
    R, y = _sim(t=2, r=3, n=200, seed=4)
    a = M.mrmc_arrays(R, y, cov="jackknife")
    b = M.mrmc_arrays(R, y, cov="delong")
    assert a["reader_auc"] == b["reader_auc"]
    va, vb = np.array(a["cov_matrix"]["values"]), np.array(b["cov_matrix"]["values"])
    assert np.all(np.diag(va) > np.diag(vb)) and np.allclose(va, vb, rtol=0.03)


def test_mrmc_table():
    R, y = _sim(t=3, r=3, n=40, seed=9)
    tab = stats.mrmc_table(M.mrmc_arrays(R, y))
    assert list(tab["analysis"].unique()) == ["RRRC", "FRRC", "RRFC"]
    assert len(tab) == 9 and tab["p"].between(0, 1).all()


# ----------------------------------------------------------------------------- CLI
def _cli(capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["mrmc", *args])
    out = capsys.readouterr()
    return ex.value.code, out.out, out.err


def _write(tmp_path, df, name="readings.csv") -> Path:
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


def test_cli_table_and_json(tmp_path, capsys):
    R, y = _sim(t=2, r=4, n=40, seed=1)
    p = _write(tmp_path, _long(R, y, modalities=["unaided", "aided"]))
    code, out, err = _cli(capsys, "--readings", str(p))
    assert code == 0, err
    assert "RRRC" in out and "aided" in out and "Hillis" in out
    code, out, err = _cli(capsys, "--readings", str(p), "--cov", "delong", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["cov_method"] == "DeLong" and res["modalities"] == ["aided", "unaided"]
    assert res["RRRC"]["diff"]["comparison"] == "aided - unaided"
    lib = M.mrmc_arrays(R[::-1], y, modalities=["aided", "unaided"], cov="delong")
    assert res["RRRC"]["F"] == pytest.approx(lib["RRRC"]["F"], rel=1e-12)


def _bad_cases(R, y):
    df = _long(R, y)
    out = {}
    out["missing_column"] = (df.drop(columns=["truth"]), "truth")
    out["unbalanced"] = (df.drop(index=5), "unbalanced")
    d = df.copy()
    d.loc[(d["case_id"] == "c000") & (d["reader"] == "2"), "truth"] = 0
    out["truth_differs"] = (d, "case 'c000' has truth")
    d = df.copy().astype({"rating": object})
    d.loc[7, "rating"] = "high"
    out["non_numeric_rating"] = (d, "rating")
    out["single_reader"] = (df[df["reader"] == "1"], "single reader")
    out["one_class"] = (df.assign(truth=1), "only positives")
    d = df.copy()
    d.loc[3, "rating"] = np.nan
    out["missing_rating"] = (d, "rating")
    out["duplicate"] = (pd.concat([df, df.iloc[[0]]]), "rated 2 times")
    out["truth_not_binary"] = (df.assign(truth=df["truth"] * 2), "other than 0/1")
    out["single_modality"] = (df[df["modality"] == "1"], "single modality")
    return out


@pytest.mark.parametrize("case", ["missing_column", "unbalanced", "truth_differs", "non_numeric_rating",
                                  "single_reader", "one_class", "missing_rating", "duplicate", "truth_not_binary",
                                  "single_modality"])
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, case):
    R, y = _sim(t=2, r=3, n=20, seed=0)
    df, needle = _bad_cases(R, y)[case]
    p = _write(tmp_path, df)
    code, out, err = _cli(capsys, "--readings", str(p), "--json")
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {p}") and "Traceback" not in err
    assert needle in lines[0], lines[0]
    with pytest.raises(StatsInputError):
        stats.mrmc(p)


def test_cli_bad_options(tmp_path, capsys):
    R, y = _sim(t=2, r=3, n=20, seed=0)
    p = _write(tmp_path, _long(R, y))
    code, _, err = _cli(capsys, "--readings", str(p), "--cov", "bootstrap")
    assert code == 2 and "jackknife or delong" in err
    code, _, err = _cli(capsys, "--readings", str(tmp_path / "absent.csv"))
    assert code == 2 and "file not found" in err


def test_subprocess_exit_codes(tmp_path):
    R, y = _sim(t=2, r=3, n=20, seed=0)
    p = _write(tmp_path, _long(R, y))
    ok = subprocess.run([sys.executable, "-m", "nhb_core", "mrmc", "--readings", str(p), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["RRRC"]["df1"] == 1
    bad = subprocess.run([sys.executable, "-m", "nhb_core", "mrmc", "--readings", str(p.with_name("x.csv"))],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- synthetic reader study
def test_synth_reader_study_paper_preset():
    from nhb_core import synth

    coh = synth.draw_cohort("paper", seed=0)
    rs = synth.reader_study(coh, seed=0)
    assert list(rs.columns) == ["reader", "modality", "case_id", "truth", "rating", "center"]
    assert sorted(rs["reader"].unique()) == ["R1", "R2", "R3", "R4", "R5"] and set(rs["modality"]) == {"unaided"}
    assert len(rs) == 5 * len(coh) and rs["rating"].between(1, 5).all() and rs["rating"].dtype.kind == "i"
    assert set(rs["rating"].unique()) == {1, 2, 3, 4, 5}
    summ = synth.reader_study_summary(rs)["unaided"]
    for r, v in summ.items():
        assert 0.7 <= v["auc"] <= 0.9, (r, v)
        assert 0.45 <= v["sensitivity"] <= 0.8 and 0.75 <= v["specificity"] <= 0.95, (r, v)
    # correlated through the shared visible signal: clearly positive between-reader correlation
    wide = rs.pivot(index="case_id", columns="reader", values="rating")
    corr = wide.corr(method="spearman").to_numpy()
    assert corr[np.triu_indices(5, 1)].min() > 0.4
    # the truth is the label, and the ratings are deterministic
    assert (rs.groupby("case_id")["truth"].first() == coh.set_index("subject_id")["label"]).all()
    assert rs.equals(synth.reader_study(synth.draw_cohort("paper", seed=0), seed=0))
    assert not rs["rating"].equals(synth.reader_study(coh, seed=1)["rating"])


def test_synth_aided_arm_leans_towards_network():
    from nhb_core import synth

    coh = synth.draw_cohort("paper", seed=0)
    base = synth.reader_study(coh, seed=0)
    good = dict(zip(coh["subject_id"], coh["oracle_p"]))
    rs = synth.reader_study(coh, seed=0, network=good)
    unaided = rs[rs["modality"] == "unaided"].reset_index(drop=True)
    pd.testing.assert_frame_equal(unaided, base)  # requesting the aided arm shifts no unaided draw
    res = stats.mrmc(rs[rs["center"] == "A"])
    assert res["modality_auc"]["aided"] > res["modality_auc"]["unaided"] + 0.05
    assert res["RRRC"]["p"] < 0.05
    # a useless network (constant 0.5) drags the aided ratings to the equivocal middle
    flat = synth.reader_study(coh, seed=0, network={k: 0.5 for k in good})
    sd_a = flat[flat["modality"] == "aided"]["rating"].std()
    sd_u = flat[flat["modality"] == "unaided"]["rating"].std()
    assert sd_a < sd_u
    # subjects without a network score are left out of both arms (fully crossed)
    part = synth.reader_study(coh, seed=0, network={k: good[k] for k in list(good)[:50]})
    assert part["case_id"].nunique() == 50 and len(part) == 2 * 5 * 50


def test_synthesize_writes_readings_and_keeps_the_rest(small_cohort):
    from nhb_core import synth

    root = Path(small_cohort).parent
    man = pd.read_csv(small_cohort)
    assert {"reader_1", "reader_2"} <= set(man.columns) and man["reader_1"].isin([0, 1]).all()
    coh = synth.draw_cohort("small", seed=0)
    assert (man["reader_1"].to_numpy() == coh["reader_1"].to_numpy()).all()  # the binary reads are unchanged
    rs = pd.read_csv(root / "readings.csv", dtype={"case_id": str, "reader": str})
    assert set(rs["case_id"]) == set(man["subject_id"])
    pd.testing.assert_frame_equal(rs, synth.reader_study(coh, seed=0), check_dtype=False)
    meta = json.loads((root / "cohort.json").read_text())
    assert meta["reader_study"]["file"] == "readings.csv" and meta["reader_study"]["positive_rating"] == 3
    assert set(meta["reader_study"]["summary"]["unaided"]) == {"R1", "R2", "R3", "R4", "R5"}
    # the CLI reads the synthetic study (a single modality: an MRMC comparison needs a second arm)
    with pytest.raises(StatsInputError, match="single modality"):
        stats.mrmc(root / "readings.csv")


# ----------------------------------------------------------------------------- 1-5 ratings in reader_* columns
def test_manifest_reader_columns_hold_ratings(small_cohort, tmp_path):
    from nhb_core.manifest import cohort_summary, load_manifest, validate_manifest

    root = Path(small_cohort).parent
    man = pd.read_csv(small_cohort, dtype=str, keep_default_na=False)
    for c in ("t1", "roi"):
        man[c] = [str(root / v) for v in man[c]]
    rs = pd.read_csv(root / "readings.csv", dtype={"case_id": str})
    r1 = rs[rs["reader"] == "R1"].set_index("case_id")["rating"]
    man["reader_1"] = [str(r1[s]) for s in man["subject_id"]]
    man.loc[2, "reader_1"] = ""  # not read
    p = tmp_path / "manifest.csv"
    man.to_csv(p, index=False)
    m = load_manifest(p)
    assert m.reader_scales == {"reader_1": "rating", "reader_2": "binary"}
    assert set(m.df["reader_1"].dropna().unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0} and np.isnan(m.df.loc[2, "reader_1"])
    rt = cohort_summary(m)["readers"].set_index("reader")
    read = m.df[m.df["reader_1"].notna()]
    calls = read["reader_1"] >= 3
    assert rt.loc["reader_1", "scale"] == "rating" and rt.loc["reader_1", "n_positive"] == int(calls.sum())
    assert rt.loc["reader_1", "sensitivity"] == pytest.approx(calls[read["label"] == 1].mean())
    assert rt.loc["reader_1", "specificity"] == pytest.approx(1 - calls[read["label"] == 0].mean())
    # a column mixing 0/1 reads with 2-5 ratings is a problem naming the row
    man.loc[0, "reader_1"], man.loc[1, "reader_1"] = "0", "4"
    man.to_csv(p, index=False)
    rep = validate_manifest(p, check_images=False)
    hit = [q for q in rep.problems if "mixes 0/1 reads with 1-5 ratings" in q.problem]
    assert len(hit) == 1 and hit[0].row == 3 and hit[0].column == "reader_1"


def _rating_table(n=80, seed=0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2, int), np.zeros(n - n // 2, int)]
    lat = y + rng.normal(size=n)
    return pd.DataFrame({"label": y, "m1": 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=n)))),
                         "reader_1": np.digitize(lat + rng.normal(scale=0.5, size=n), [-0.5, 0.2, 0.7, 1.3]) + 1,
                         "reader_2": (lat + rng.normal(scale=0.5, size=n) > 0.6).astype(int)})


def test_set_metrics_rating_reader_gets_auc_and_calls():
    df = _rating_table()
    blk = stats.set_metrics(df, "label", ["m1"], None, ["reader_1", "reader_2"], {"m1": 0.5}, n_boot=200)
    r1, r2 = blk["readers"]["reader_1"], blk["readers"]["reader_2"]
    y, rat = df["label"].to_numpy(), df["reader_1"].to_numpy(float)
    assert r1["scale"] == "rating" and r1["positive_rating"] == 3
    assert r1["auc"] == pytest.approx(stats.auc(y, rat), rel=1e-12)
    assert r1["auc_ci_delong"] == pytest.approx(list(stats.auc_ci_delong(y, rat)), rel=1e-12)
    assert r1["confusion"]["tp"] == int(((rat >= 3) & (y == 1)).sum())
    assert r1["roc"]["points"]["fpr"][0] == 0.0 and r1["roc"]["points"]["tpr"][-1] == 1.0
    ref = stats.delong_paired(y, df["m1"], rat)
    assert r1["vs"]["m1"]["delong_p"] == pytest.approx(ref["p_value"], rel=1e-12)
    assert r1["vs"]["m1"]["auc_diff"] == pytest.approx(ref["auc_diff"], rel=1e-12)
    assert "auc" not in r2 and "scale" not in r2  # a 0/1 reader is as before
    assert blk["reader_agreement"]["pairs"][0]["n"] == len(df)  # kappa on the calls


def test_stats_cli_accepts_a_rating_reader(tmp_path, capsys):
    df = _rating_table()
    p = tmp_path / "pred.csv"
    df.to_csv(p, index=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["stats", "--predictions", str(p), "--truth", "label", "--score", "m1", "--reader", "reader_1",
              "--threshold", "0.5", "--json", "--n-boot", "100"])
    out = capsys.readouterr()
    assert ex.value.code == 0, out.err
    r1 = json.loads(out.out)["readers"]["reader_1"]
    assert r1["scale"] == "rating" and r1["auc"] == pytest.approx(stats.auc(df["label"], df["reader_1"]))


# ----------------------------------------------------------------------------- study integration
def _fake_run(tmp_path, aided=True, seed=0):
    from nhb_core import synth

    coh = synth.draw_cohort("paper", seed=seed)
    rng = np.random.default_rng(5)
    coh["m1"] = np.clip(coh["oracle_p"] + rng.normal(0, 0.1, len(coh)), 0, 1)
    coh["m2"] = rng.random(len(coh))  # a useless network
    pred = tmp_path / "predictions"
    pred.mkdir()
    test = coh[coh["center"] == "A"].iloc[::3]
    ext = coh[coh["center"] == "B"]
    cols = ["subject_id", "center", "label", "m1", "m2", "reader_1"]
    test[cols].to_csv(pred / "test__subjects.csv", index=False)
    ext[cols].to_csv(pred / "external_B__subjects.csv", index=False)
    coh[coh["center"] == "A"].iloc[1::3][cols].to_csv(pred / "val__subjects.csv", index=False)
    net = dict(zip(coh["subject_id"], coh["m1"])) if aided else None
    rs = synth.reader_study(coh, seed=seed, network=net)
    rs = rs[rs["case_id"] != test["subject_id"].iloc[0]]  # one test subject not read
    readings = tmp_path / "readings.csv"
    rs.to_csv(readings, index=False)
    return pred, readings, test, ext, rs


def test_study_mrmc_networks_vs_readers(tmp_path):
    pred, readings, test, ext, rs = _fake_run(tmp_path)
    out = M.study_mrmc(pred, readings, ["m1", "m2"])
    assert set(out) == {"test", "external:B", "pooled"}  # held-out sets only
    t = out["test"]
    assert t["n_cases"] == len(test) - 1 and t["n_set_subjects"] == len(test) and "not rated" in t["notes"][0]
    assert set(t["comparisons"]) == {"m1 vs aided", "m1 vs unaided", "m2 vs aided", "m2 vs unaided",
                                     "aided vs unaided"}
    # one comparison equals the analysis of the long table built by hand (network repeated per reader)
    keep = test.iloc[1:]
    un = rs[(rs["modality"] == "unaided") & rs["case_id"].isin(keep["subject_id"])]
    net = pd.concat([un.assign(modality="m1", rating=un["case_id"].map(dict(zip(keep["subject_id"], keep["m1"]))))])
    ref = stats.mrmc(pd.concat([net, un]), cov="jackknife")  # modalities sort as m1, unaided
    got = t["comparisons"]["m1 vs unaided"]
    for k in ("F", "df2", "p"):
        assert got["RRRC"][k] == pytest.approx(ref["RRRC"][k], rel=1e-9)
    assert got["RRRC"]["diff"]["comparison"] == "m1 - unaided"
    assert got["RRRC"]["single_modality"]["m1"]["df"] == "inf"  # the network: no reader variance
    assert abs(got["variance_components"]["var_r"]) < 1e-12
    # the good network beats the unaided readers, the useless one does not
    tab = M.study_mrmc_table(out["pooled"])
    row = tab.set_index("comparison")
    assert row.loc["m1 vs unaided", "diff"] > 0 and row.loc["m2 vs unaided", "diff"] < 0
    assert row.loc["aided vs unaided", "auc_a"] > row.loc["aided vs unaided", "auc_b"]
    assert out["pooled"]["n_cases"] == len(test) - 1 + len(ext)
    agr = out["pooled"]["agreement"]
    assert set(agr) == {"aided", "unaided"} and agr["unaided"]["calls"]["n_readers"] == 5
    assert agr["unaided"]["calls"]["kappa"] > 0.3 and agr["unaided"]["ratings"]["categories"] == [1, 2, 3, 4, 5]
    json.dumps(out, allow_nan=False)  # JSON-ready


def test_study_mrmc_edge_cases(tmp_path):
    pred, readings, test, ext, rs = _fake_run(tmp_path, aided=False)
    # readers who read only the test set: the external set has no analysis, and says why
    rs[rs["center"] == "A"].to_csv(readings, index=False)
    out = M.study_mrmc(pred, readings, ["m1"], sets=["test", "external:B"])
    assert set(out) == {"test", "external:B"}
    assert out["external:B"]["comparisons"] == {} and out["external:B"]["n_cases"] == 0
    assert any("no MRMC analysis" in n for n in out["external:B"]["notes"])
    assert set(out["test"]["comparisons"]) == {"m1 vs unaided"}
    # a truth that disagrees with the study's label: that subject is left out, with a note
    bad = rs.copy()
    sid = test["subject_id"].iloc[5]
    bad.loc[bad["case_id"] == sid, "truth"] = 1 - bad.loc[bad["case_id"] == sid, "truth"]
    bad.to_csv(readings, index=False)
    out = M.study_mrmc(pred, readings, ["m1"], sets=["test"])
    assert out["test"]["n_cases"] == len(test) - 2 and any("truth" in n for n in out["test"]["notes"])


def test_study_run_writes_mrmc_into_metrics_report_and_page_tables(small_run, small_cohort):
    from nhb_core.fileio import read_json
    from nhb_core.report import render_report
    from nhb_dashboard import data as dd

    assert (Path(small_cohort).parent / "readings.csv").is_file()
    m = read_json(small_run / "metrics.json")
    models = list(m["run"]["models"])
    held = [s for s in m["sets"] if s == "test" or s.startswith("external:") or s == "pooled"]
    assert held and "mrmc" not in m["sets"].get("val", {})
    for s in held:
        blk = m["sets"][s]["mrmc"]
        assert blk["design"] == "networks vs readers" and blk["arms"] == ["unaided"]
        assert blk["readers"] == ["R1", "R2", "R3", "R4", "R5"]
        if blk["comparisons"]:
            assert set(blk["comparisons"]) == {f"{x} vs unaided" for x in models}
            res = blk["comparisons"][f"{models[0]} vs unaided"]
            assert res["RRRC"]["diff"]["comparison"] == f"{models[0]} - unaided"
            assert abs(res["variance_components"]["var_r"]) < 1e-12
        else:
            assert blk["notes"]
    assert any(m["sets"][s]["mrmc"]["comparisons"] for s in held)  # external:B (5 + 5 subjects) at least
    s = next(s for s in held if m["sets"][s]["mrmc"]["comparisons"])
    blk, comp, aucs = dd.mrmc_tables(m, s)
    assert blk is m["sets"][s]["mrmc"] and len(comp) == len(blk["comparisons"])
    assert set(aucs["reader"]) == {"R1", "R2", "R3", "R4", "R5", "(network)"}
    assert comp["p"].between(0, 1).all()
    from nhb_core import figures

    fig = figures.mrmc_figure(m, s)
    assert list(fig.data[0].y) == list(blk["comparisons"])
    d0 = blk["comparisons"][list(blk["comparisons"])[0]]["RRRC"]["diff"]
    assert fig.data[0].x[0] == pytest.approx(d0["estimate"])
    assert fig.data[0].error_x.array[0] == pytest.approx(d0["ci_upper"] - d0["estimate"])
    empty = figures.mrmc_figure(m, "val")  # no reader study on the validation set
    assert not empty.data and "no reader study" in empty.layout.annotations[0].text
    html = render_report(small_run)
    assert "Reader study: networks versus readers (MRMC)" in html
    assert "Reader study (MRMC)" in html  # the forest plot's title


def test_results_page_shows_the_reader_study(small_run, tmp_path, monkeypatch):
    import shutil

    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from nhb_core.fileio import read_json
    from nhb_dashboard import data as dd

    repo = Path(__file__).resolve().parents[1]
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("NHB_RUNS_DIR", str(runs))
    monkeypatch.setenv("NHB_DATA_DIR", str(tmp_path / "data"))
    shutil.copytree(small_run, runs / small_run.name)
    m = read_json(small_run / "metrics.json")
    s = next(s for s in dd.sort_sets(m["sets"]) if (m["sets"][s].get("mrmc") or {}).get("comparisons"))
    at = AppTest.from_file(str(repo / "app.py"), default_timeout=300).run()
    at.switch_page("dashboard_pages/3_Results.py").run()
    at.selectbox(key="a_set").select(s).run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    assert any("Reader study: networks vs readers" in x.value for x in at.markdown)
    assert any("Reader study (MRMC)" in str(c.proto.spec) for c in at.get("plotly_chart"))
    frames = [d.value for d in at.dataframe]
    comp = next(f for f in frames if "comparison" in f.columns)
    assert set(comp["comparison"]) == set(m["sets"][s]["mrmc"]["comparisons"])
    assert any("R1" in set(f.get("reader", [])) for f in frames)


# ----------------------------------------------------------------------------- agreement
def test_fleiss_kappa_matches_statsmodels_and_is_used():
    sm = pytest.importorskip("statsmodels.stats.inter_rater")
    from nhb_core import synth
    from nhb_core.stats._checks import RATING_POSITIVE

    assert synth.RATING_POSITIVE == RATING_POSITIVE
    rng = np.random.default_rng(0)
    X = rng.integers(1, 6, size=(5, 60))
    X[1] = np.where(rng.random(60) < 0.6, X[0], X[1])
    for data in (X, (X >= 3).astype(int)):
        got = stats.fleiss_kappa(data)
        ref = sm.fleiss_kappa(sm.aggregate_raters(data.T)[0])
        assert got["kappa"] == pytest.approx(ref, rel=1e-12) and got["n"] == 60 and got["n_readers"] == 5
        assert 0 < got["p_value"] < 1 and got["se0"] > 0
    # two readers, two categories: Fleiss' kappa is Scott's pi; perfect agreement gives 1
    same = stats.fleiss_kappa({"a": [0, 1, 1, 0, 1], "b": [0, 1, 1, 0, 1]})
    assert same["kappa"] == pytest.approx(1.0) and same["p_value"] < 0.05
    # missing reads: the case is dropped
    assert stats.fleiss_kappa({"a": [0, 1, np.nan, 1], "b": [0, 1, 1, 1]})["n"] == 3
    # the synthetic readers agree (shared visible signal), and set_metrics reports it
    rs = synth.reader_study(synth.draw_cohort("paper", seed=0), seed=0)
    wide = rs.pivot(index="case_id", columns="reader", values="rating")
    fk = stats.fleiss_kappa(wide.to_numpy().T >= 3)
    assert 0.4 < fk["kappa"] < 0.8 and fk["p_value"] < 1e-6
    blk = stats.set_metrics(_rating_table(), "label", ["m1"], None, ["reader_1", "reader_2"], {"m1": 0.5},
                            n_boot=50)
    assert blk["reader_agreement"]["fleiss"]["n_readers"] == 2


def test_roc_figure_draws_a_rating_readers_curve():
    from nhb_core import figures

    blk = stats.set_metrics(_rating_table(), "label", ["m1"], None, ["reader_1", "reader_2"], {"m1": 0.5},
                            n_boot=50)
    metrics = {"sets": {"test": {"level": {"subject": blk}}}, "run": {"models": {"m1": {}}}}
    fig = figures.roc_figure(metrics, "test", "subject")
    names = [t.name for t in fig.data]
    curve = [t for t in fig.data if t.name.startswith("reader_1 ratings")]
    assert len(curve) == 1 and f"AUC {blk['readers']['reader_1']['auc']:.3f}" in curve[0].name
    assert list(curve[0].x) == blk["readers"]["reader_1"]["roc"]["points"]["fpr"]
    assert not any(n.startswith("reader_2 ratings") for n in names)  # a 0/1 reader stays a point
    assert any(n.startswith("reader_2 (sens") for n in names)


def test_synth_readings_cli_adds_an_aided_arm_from_a_run(small_run, small_cohort, tmp_path, capsys):
    root = Path(small_cohort).parent
    before = (root / "readings.csv").read_bytes()
    out = tmp_path / "readings.csv"
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["synth-readings", "--cohort", str(root), "--run", str(small_run), "--out", str(out)])
    res = capsys.readouterr()
    assert ex.value.code == 0, res.err
    assert "aided arm leans towards" in res.out
    rs = pd.read_csv(out, dtype={"case_id": str})
    preds = pd.concat([pd.read_csv(f, dtype={"subject_id": str})
                       for f in (small_run / "predictions").glob("*__subjects.csv")])
    assert set(rs["case_id"]) == set(preds["subject_id"]) and set(rs["modality"]) == {"aided", "unaided"}
    orig = pd.read_csv(root / "readings.csv", dtype={"case_id": str})
    un = rs[rs["modality"] == "unaided"].merge(orig, on=["reader", "modality", "case_id"], suffixes=("", "_o"))
    assert len(un) == len(rs) // 2 and (un["rating"] == un["rating_o"]).all()  # the same unaided draws
    assert (root / "readings.csv").read_bytes() == before  # --out: the cohort's own file untouched
    code, js, err = _cli(capsys, "--readings", str(out), "--json")
    assert code == 0, err
    assert json.loads(js)["RRRC"]["diff"]["comparison"] == "aided - unaided"
    # bad options: one line, exit 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["synth-readings", "--cohort", str(root), "--run", str(small_run), "--model", "nope",
              "--out", str(out)])
    assert ex.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as ex:
        main(["synth-readings", "--cohort", str(tmp_path), "--out", str(out)])
    assert ex.value.code == 2 and "cohort.json" in capsys.readouterr().err
