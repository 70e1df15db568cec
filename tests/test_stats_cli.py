"""``python -m nhb_core stats``: JSON schema, rich tables, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from nhb_core.cli import main


def _write(tmp_path, name="pred.csv", n=60, seed=0, **extra):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2, int), np.zeros(n - n // 2, int)]
    df = pd.DataFrame({"y": y, "a": rng.normal(size=n) + y, "b": rng.normal(size=n) + 0.5 * y,
                       "subj": [f"s{i // 3:02d}" for i in range(n)],
                       "r1": (rng.random(n) < 0.3 + 0.5 * y).astype(int),
                       "r2": (rng.random(n) < 0.2 + 0.6 * y).astype(int)})
    for k, v in extra.items():
        df[k] = v
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p, df


def _cli(capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["stats", *args])
    out = capsys.readouterr()
    return ex.value.code, out.out, out.err


def test_json_schema_all_options(tmp_path, capsys):
    p, df = _write(tmp_path)
    code, out, err = _cli(capsys, "--predictions", str(p), "--truth", "y", "--score", "a", "--score", "b",
                          "--cluster", "subj", "--reader", "r1", "--reader", "r2", "--threshold", "0.3",
                          "--json", "--n-boot", "300")
    assert code == 0, err
    assert out.count("\n") == 1  # one JSON object on one line
    res = json.loads(out)
    for s in ("a", "b"):
        e = res["scores"][s]
        for key in ("auc", "auc_ci_delong", "auc_ci_bootstrap", "auc_clustered", "auc_clustered_ci",
                    "auc_ci_cluster_bootstrap", "threshold_metrics"):
            assert key in e, key
        assert e["auc_clustered"] == pytest.approx(e["auc"], abs=1e-12)
        for lo, hi in (e["auc_ci_delong"], e["auc_ci_bootstrap"], e["auc_clustered_ci"]):
            assert 0 <= lo <= e["auc"] <= hi <= 1
    (comp,) = res["comparisons"]
    assert (comp["a"], comp["b"]) == ("a", "b")
    assert {"delong_z", "delong_p", "auc_diff", "ci", "clustered_z", "clustered_p"} <= set(comp)
    for r in ("r1", "r2"):
        rd = res["readers"][r]
        for key in ("mcnemar_p", "mcnemar_p_sensitivity", "mcnemar_p_specificity", "precision_p"):
            assert 0 <= rd[key] <= 1
        assert set(rd["vs"]) == {"a", "b"}
        assert rd["mcnemar_p"] == rd["vs"]["a"]["mcnemar_p"]
    assert res["reader_agreement"]["pairs"][0]["a"] == "r1"
    assert res["n_clusters"] == df["subj"].nunique()
    sl = res["subject_level"]
    assert sl["n"] == df["subj"].nunique() and sl["aggregate"] == "mean"
    subj = df.groupby("subj").agg(y=("y", "max"), a=("a", "mean"))
    from nhb_core import stats

    assert sl["scores"]["a"]["auc"] == pytest.approx(stats.auc(subj["y"], subj["a"]))


def test_seed_reproducible_and_changes_bootstrap(tmp_path, capsys):
    p, _ = _write(tmp_path)
    args = ["--predictions", str(p), "--truth", "y", "--score", "a", "--json", "--n-boot", "400"]
    r1 = json.loads(_cli(capsys, *args)[1])
    r2 = json.loads(_cli(capsys, *args)[1])
    r3 = json.loads(_cli(capsys, *args, "--seed", "5")[1])
    assert r1 == r2
    assert r3["scores"]["a"]["auc_ci_bootstrap"] != r1["scores"]["a"]["auc_ci_bootstrap"]


def test_rich_tables(tmp_path, capsys):
    p, _ = _write(tmp_path)
    code, out, err = _cli(capsys, "--predictions", str(p), "--truth", "y", "--score", "a", "--score", "b",
                          "--reader", "r1", "--threshold", "0.5", "--n-boot", "200")
    assert code == 0, err
    assert "AUC" in out and "DeLong" in out and "McNemar" in out


@pytest.mark.parametrize("case", ["one_class", "nan_score", "missing_column", "reader_not_binary", "truth_not_binary",
                                  "reader_without_threshold", "missing_file", "text_score"])
def test_bad_input_one_line_exit_2(tmp_path, capsys, case):
    p, df = _write(tmp_path)
    args = ["--truth", "y", "--score", "a"]
    column = None
    if case == "one_class":
        df["y"] = 1
        column = "y"
    elif case == "nan_score":
        df.loc[4, "a"] = np.nan
        column = "a"
    elif case == "missing_column":
        args = ["--truth", "y", "--score", "nope"]
        column = "nope"
    elif case == "reader_not_binary":
        df.loc[3, "r1"] = 2
        args += ["--reader", "r1", "--threshold", "0.5"]
        column = "r1"
    elif case == "truth_not_binary":
        df.loc[7, "y"] = 3
        column = "y"
    elif case == "reader_without_threshold":
        args += ["--reader", "r1"]
        column = "--threshold"
    elif case == "text_score":
        df["a"] = df["a"].astype(object)
        df.loc[2, "a"] = "high"
        column = "a"
    if case == "missing_file":
        p = tmp_path / "absent.csv"
    else:
        df.to_csv(p, index=False)
    code, out, err = _cli(capsys, "--predictions", str(p), *args, "--json")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if case != "missing_file" and case != "reader_without_threshold":
        assert str(p) in lines[0]
    if column:
        assert column in lines[0]
    assert out == ""
    if case in ("nan_score", "reader_not_binary", "truth_not_binary", "text_score"):
        assert f"{p}:" in lines[0]  # names the row


def test_subprocess_exit_code_and_stdout_json(tmp_path):
    p, df = _write(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "nhb_core", "stats", "--predictions", str(p), "--truth", "y",
                         "--score", "a", "--json", "--n-boot", "200"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["scores"]["a"]["auc"] > 0.5
    df["y"] = 0
    df.to_csv(p, index=False)
    bad = subprocess.run([sys.executable, "-m", "nhb_core", "stats", "--predictions", str(p), "--truth", "y",
                          "--score", "a", "--json"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "only negatives" in bad.stderr and "Traceback" not in bad.stderr
