"""The cohort manifest: parsing, label rule, readers/covariates, validation, CLI tables."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nhb_core.errors import ManifestError
from nhb_core.io import save_nifti
from nhb_core.manifest import cohort_summary, load_manifest, validate_manifest

SHAPE = (12, 14, 10)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
AFFINE[:3, 3] = (-9.0, -10.0, -10.0)


def write_subject_images(folder: Path, sid: str, seed: int = 0, shape=SHAPE, affine=AFFINE) -> tuple[str, str]:
    """Tiny T1 + ROI (labels 1 = left, 2 = right) for one subject; returns the paths relative to ``folder``."""
    rng = np.random.default_rng(seed)
    t1 = (rng.random(shape) * 100).astype(np.float32)
    roi = np.zeros(shape, np.uint8)
    roi[3:5, 5:8, 4:6] = 1
    roi[7:9, 5:8, 4:6] = 2
    save_nifti(t1, affine, folder / "images" / f"{sid}_t1.nii.gz")
    save_nifti(roi, affine, folder / "images" / f"{sid}_roi.nii.gz")
    return f"images/{sid}_t1.nii.gz", f"images/{sid}_roi.nii.gz"


def make_cohort(folder: Path, n: int = 6, centers=("A", "B"), readers=("reader_1",), covariates=True,
                extra=True, nbna=True, label=False, images=True) -> Path:
    """A small valid cohort in ``folder``: images + manifest.csv; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        sid = f"S{i + 1:03d}"
        t1, roi = write_subject_images(folder, sid, seed=i) if images else (f"images/{sid}_t1.nii.gz", f"images/{sid}_roi.nii.gz")
        injured = i % 2 == 1
        row = {"subject_id": sid, "center": centers[i % len(centers)], "t1": t1, "roi": roi}
        if nbna:
            row["nbna"] = 33 + i % 3 if injured else 38 + i % 3
        if label:
            row["label"] = int(injured)
        for r in readers:
            row[r] = int(injured) if i != 3 else ""
        if covariates:
            row.update(sex="F" if i % 3 else "M", gestational_age_weeks=38 + (i % 3) * 0.5,
                       postnatal_age_days=5 + i, tsb_umol_l=300 + 10 * i)
        if extra:
            row["scanner"] = "Siemens 3T"
        rows.append(row)
    path = folder / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def edit_manifest(path: Path, fn) -> Path:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    df.to_csv(path, index=False)
    return path


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nhb_core", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_load_manifest_columns_and_label_rule(tmp_path):
    m = make_cohort(tmp_path / "c", n=6)
    man = load_manifest(m)
    df = man.df
    assert list(df["subject_id"]) == [f"S{i:03d}" for i in range(1, 7)]
    assert df["label"].dtype.kind == "i"
    # nbna 38,34,40,33,39,35 -> injury when <= 37
    assert df["nbna"].tolist() == [38, 34, 40, 33, 39, 35]
    assert df["label"].tolist() == [0, 1, 0, 1, 0, 1]
    assert man.readers == ["reader_1"]
    assert np.isnan(df.loc[3, "reader_1"]) and df.loc[1, "reader_1"] == 1.0
    assert man.covariates == ["sex", "gestational_age_weeks", "postnatal_age_days", "tsb_umol_l"]
    assert man.extra_columns == ["scanner"] and set(df["scanner"]) == {"Siemens 3T"}
    assert df["manifest_row"].tolist() == [2, 3, 4, 5, 6, 7]
    assert Path(df.loc[0, "t1_path"]).is_absolute() and Path(df.loc[0, "t1_path"]).exists()
    assert Path(df.loc[0, "t1_path"]) == (tmp_path / "c" / "images" / "S001_t1.nii.gz").resolve()
    assert man.root == (tmp_path / "c").resolve()
    # a different threshold changes the labels
    man35 = load_manifest(m, nbna_threshold=35)
    assert man35.df["label"].tolist() == [0, 1, 0, 1, 0, 1]
    man34 = load_manifest(m, nbna_threshold=34)
    assert man34.df["label"].tolist() == [0, 1, 0, 1, 0, 0]


def test_label_column_only_and_precedence_warning(tmp_path):
    m = make_cohort(tmp_path / "c", n=4, nbna=False, label=True, readers=(), covariates=False, extra=False)
    assert load_manifest(m).df["label"].tolist() == [0, 1, 0, 1]
    # both columns, one disagreement: label wins, a warning names the row
    m2 = make_cohort(tmp_path / "d", n=4, nbna=True, label=True)
    edit_manifest(m2, lambda df: df.assign(label=["0", "1", "1", "1"]))  # row 4: nbna 40 but label 1
    rep = validate_manifest(m2, check_images=False)
    assert rep.ok
    assert [w.row for w in rep.warnings] == [4]
    assert "disagrees with nbna 40" in rep.warnings[0].problem
    assert rep.manifest.df["label"].tolist() == [0, 1, 1, 1]


def test_bom_and_case_insensitive_headers(tmp_path):
    m = make_cohort(tmp_path / "c", n=4)
    text = m.read_text(encoding="utf-8")
    header, rest = text.split("\n", 1)
    header = ",".join(h.upper() if h in ("subject_id", "center") else f" {h} " for h in header.split(","))
    m.write_bytes(("\ufeff" + header + "\n" + rest).encode("utf-8"))
    man = load_manifest(m)
    assert man.df["subject_id"].tolist()[0] == "S001"
    assert "center" in man.df.columns


def test_validate_collects_all_problems_with_rows(tmp_path):
    m = make_cohort(tmp_path / "c", n=6)

    def breakit(df):
        df.loc[1, "subject_id"] = "S001"          # row 3 duplicate
        df.loc[2, "nbna"] = "55"                  # row 4 out of range
        df.loc[3, "center"] = ""                  # row 5 empty center
        df.loc[4, "t1"] = "images/nope.nii.gz"    # row 6 missing file
        df.loc[5, "reader_1"] = "yes"             # row 7 reader not 0/1
        return df

    edit_manifest(m, breakit)
    rep = validate_manifest(m)
    assert not rep.ok
    assert [p.row for p in rep.problems] == [3, 4, 5, 6, 7]
    cols = [p.column for p in rep.problems]
    assert cols == ["subject_id", "nbna", "center", "t1", "reader_1"]
    assert rep.manifest is not None and rep.manifest.df["subject_id"].tolist() == ["S001"]
    with pytest.raises(ManifestError) as ei:
        load_manifest(m)
    assert ei.value.row == 3 and "duplicate subject_id 'S001' (also on row 2)" in str(ei.value)
    d = rep.to_dict()
    assert d["ok"] is False and len(d["problems"]) == 5 and d["problems"][0]["row"] == 3
    json.dumps(d)


def test_image_problems_reported_for_every_row(tmp_path):
    m = make_cohort(tmp_path / "c", n=5)
    root = tmp_path / "c"
    save_nifti(np.zeros(SHAPE, np.uint8), AFFINE, root / "images" / "S002_roi.nii.gz")  # empty ROI
    save_nifti(np.ones((12, 14, 9), np.uint8), AFFINE, root / "images" / "S004_roi.nii.gz")  # wrong shape
    (root / "images" / "S005_t1.nii.gz").write_text("not an image")
    events = []
    rep = validate_manifest(m, progress=events.append)
    assert [p.row for p in rep.problems] == [3, 5, 6]
    assert "ROI mask is empty" in rep.problems[0].problem
    assert "shape (12, 14, 9) differs from the T1 shape (12, 14, 10)" in rep.problems[1].problem
    assert "not gzip-compressed" in rep.problems[2].problem
    assert [e["done"] for e in events] == [1, 2, 3, 4, 5] and all(e["stage"] == "validate" and e["total"] == 5 for e in events)
    # without images only existence is checked
    assert validate_manifest(m, check_images=False).ok


def test_cohort_summary_tables(tmp_path):
    m = make_cohort(tmp_path / "c", n=8)
    rep = validate_manifest(m)
    assert rep.ok, [p.line() for p in rep.problems]
    ct = rep.cohort_table
    assert list(ct.columns) == [0, 1] and list(ct.index) == ["A", "B"]
    # A: rows 0,2,4,6 (even -> control), B: odd -> injury
    assert ct.loc["A", 0] == 4 and ct.loc["A", 1] == 0 and ct.loc["B", 1] == 4
    rt = rep.reader_table.set_index("reader")
    assert rt.loc["reader_1", "n_read"] == 7 and rt.loc["reader_1", "sensitivity"] == 1.0
    cv = cohort_summary(rep.manifest)["covariates"].set_index("covariate")
    assert cv.loc["postnatal_age_days", "n"] == 8
    assert cv.loc["postnatal_age_days", "all"] == f"{np.mean(np.arange(5, 13)):.1f} ± {np.std(np.arange(5, 13), ddof=1):.1f}"
    assert cv.loc["sex", "all"] == "F:5 M:3"


def test_cli_valid_manifest_prints_tables(tmp_path):
    m = make_cohort(tmp_path / "c", n=6)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = run_cli("validate", m)
    assert r.returncode == 0, r.stderr
    assert "Cohort: 6 subjects" in r.stdout and "controls (0)" in r.stdout and "NHB (1)" in r.stdout
    assert "reader_1" in r.stdout and "gestational_age_weeks" in r.stdout and "manifest OK" in r.stdout
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    rj = run_cli("validate", "--json", m)
    assert rj.returncode == 0
    d = json.loads(rj.stdout)
    assert d["ok"] and d["n_subjects"] == 6 and d["cohort_table"]["A"] == {"0": 3, "1": 0}


def test_cli_warnings_do_not_fail(tmp_path):
    m = make_cohort(tmp_path / "c", n=4)
    edit_manifest(m, lambda df: df.assign(gestational_age_weeks=["38", "38", "60", "38"]))
    r = run_cli("validate", "--no-images", m)
    assert r.returncode == 0
    assert f"warning: {m}:4: gestational_age_weeks 60 is outside the plausible range" in r.stderr


def test_threshold_option_and_bad_threshold(tmp_path):
    m = make_cohort(tmp_path / "c", n=6)
    r = run_cli("validate", "--json", "--nbna-threshold", "34", m)
    assert r.returncode == 0
    d = json.loads(r.stdout)
    assert d["cohort_table"]["B"] == {"0": 1, "1": 2}
    r = run_cli("validate", "--nbna-threshold", "50", m)
    assert r.returncode == 2 and "NBNA threshold 50.0 is outside 0..40" in r.stderr


def test_trailing_empty_columns_and_windows_paths(tmp_path):
    m = make_cohort(tmp_path / "c", n=3, readers=(), covariates=False, extra=False)
    lines = m.read_text().splitlines()
    lines = [lines[0] + ",,"] + [ln.replace("images/", "images\\") + ",," for ln in lines[1:]]
    m.write_text("\r\n".join(lines) + "\r\n")  # Excel style: CRLF, trailing empty columns
    man = load_manifest(m)
    assert list(man.df["subject_id"]) == ["S001", "S002", "S003"]
    assert Path(man.df.loc[0, "t1_path"]).exists()
    assert man.extra_columns == []


def test_docs_example_is_valid(tmp_path, repo_dir):
    """The example in docs/manifest.md parses as documented."""
    text = (repo_dir / "docs" / "manifest.md").read_text(encoding="utf-8")
    example = text.split("```csv\n", 1)[1].split("```", 1)[0]
    site_b = tmp_path / "siteB"
    example = example.replace("/data/siteB", str(site_b))
    root = tmp_path / "cohort"
    for rel in ("images/A001_t1.nii.gz", "images/A001_roi.nii.gz", "images/A002_roi.nii.gz"):
        save_nifti(np.ones(SHAPE, np.uint8), AFFINE, root / rel)
    (root / "dicom" / "A002_t1").mkdir(parents=True)
    save_nifti(np.ones(SHAPE, np.uint8), AFFINE, site_b / "B001" / "t1.nii")
    save_nifti(np.ones(SHAPE, np.uint8), AFFINE, site_b / "B001" / "gp_mask.nii.gz")
    (root / "manifest.csv").write_text(example, encoding="utf-8")
    rep = validate_manifest(root / "manifest.csv", check_images=False)
    assert rep.ok, [p.line() for p in rep.problems]
    df = rep.manifest.df
    assert df["label"].tolist() == [0, 1, 1]
    assert np.isnan(df.loc[2, "reader_2"]) and df.loc[2, "reader_1"] == 1.0
    assert rep.manifest.extra_columns == ["scanner"]


def test_progress_exception_cancels(tmp_path):
    m = make_cohort(tmp_path / "c", n=8, readers=(), covariates=False, extra=False)
    seen = []

    def cb(ev):
        seen.append(ev["done"])
        if ev["done"] == 2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        validate_manifest(m, progress=cb, workers=2)
    assert seen == [1, 2]
