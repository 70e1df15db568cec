"""The synthetic two-center cohort (nhb_core.synth): sizes, files, geometry, determinism,
and the statistical properties the rest of the project relies on.

Statistics that need the full paper cohort are checked cheaply: the tabular part
(labels, NBNA, reads, covariates, latent severity) of the whole paper preset is
drawn without images (`draw_cohort`, under a second), and the image baseline and
ROI Dice are measured on the center-A volumes rendered in memory
(`render_subject`, the exact arrays `synthesize` writes; no gzip), in two
processes. See docs/synth.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nhb_core import synth
from nhb_core.errors import ConfigError
from nhb_core.fileio import sha256_file

MANIFEST_COLUMNS = ["subject_id", "center", "t1", "roi", "nbna", "label", "reader_1", "reader_2", "sex",
                    "gestational_age_weeks", "postnatal_age_days", "tsb_umol_l"]


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def _ring_ratio(t1, roi, width=4):
    """Mean T1 in the ROI over the mean in an in-plane ring of ``width`` voxels around it."""
    from scipy.ndimage import binary_dilation

    m = roi > 0
    st = np.zeros((3, 3, 3), bool)
    st[:, :, 1] = True
    ring = binary_dilation(m, st, iterations=width) & ~m
    return float(t1[m].mean() / t1[ring].mean())


def _measure(subject):
    v = synth.render_subject(subject, seed=0)
    t1 = v["t1"].astype(np.float64)
    return {"subject_id": subject["subject_id"], "ratio": _ring_ratio(t1, v["roi"]),
            "dice": _dice(v["roi"], v["gp_true"]),
            "dice_left": _dice(v["roi"] == 1, v["gp_true"] == 1),
            "gp_slices": int((v["gp_true"].sum(axis=(0, 1)) > 0).sum())}


@pytest.fixture(scope="module")
def paper_table():
    return synth.draw_cohort("paper", seed=0)


@pytest.fixture(scope="module")
def paper_a_measures(paper_table):
    """Baseline ratio and ROI Dice of every center-A subject of the paper preset (in memory)."""
    rows = paper_table[paper_table.center == "A"].to_dict("records")
    with ProcessPoolExecutor(max_workers=2) as ex:
        res = list(ex.map(_measure, rows, chunksize=8))
    return pd.DataFrame(res).merge(paper_table[["subject_id", "label", "severity"]], on="subject_id")


# ---------------------------------------------------------------------------------- small cohort
def test_small_cohort_files_and_manifest(small_cohort):
    root = Path(small_cohort).parent
    df = pd.read_csv(small_cohort)
    assert list(df.columns) == MANIFEST_COLUMNS
    counts = df.groupby(["center", "label"]).size().to_dict()
    assert counts == {("A", 0): 8, ("A", 1): 8, ("B", 0): 5, ("B", 1): 5}
    assert df.subject_id.is_unique
    assert ((df.nbna <= 37).astype(int) == df.label).all()
    assert set(df.sex) <= {"M", "F"}
    for col in ("reader_1", "reader_2"):
        assert set(df[col]) <= {0, 1}
    for rel in list(df.t1) + list(df.roi):
        assert not Path(rel).is_absolute() and (root / rel).is_file()
    meta = json.loads((root / "cohort.json").read_text())
    assert meta["preset"] == "small" and meta["seed"] == 0
    assert meta["generator_version"] == synth.GENERATOR_VERSION
    assert meta["counts"] == {"A": {"1": 8, "0": 8}, "B": {"1": 5, "0": 5}}
    assert set(meta["oracle_auc"]) == {"A", "B"} and all(0.5 <= v <= 1.0 for v in meta["oracle_auc"].values())
    truth = pd.read_csv(root / "truth.csv")
    assert list(truth.subject_id) == list(df.subject_id)
    assert "severity" not in df.columns and "oracle_p" not in df.columns  # the truth stays out of the manifest


def test_geometry_is_clinical_2d_axial(small_cohort):
    root = Path(small_cohort).parent
    df = pd.read_csv(small_cohort)
    seen = {}
    for _, row in df.groupby("center").head(2).iterrows():
        t1 = nib.load(str(root / row.t1))
        roi = nib.load(str(root / row.roi))
        zooms = np.array(t1.header.get_zooms()[:3])
        assert 0.5 <= zooms[0] <= 0.9 and 0.5 <= zooms[1] <= 0.9
        assert 4.0 <= zooms[2] <= 6.0
        assert zooms[2] / zooms[0] > 4  # strongly anisotropic
        np.testing.assert_allclose(np.abs(np.diag(t1.affine))[:3], zooms)
        assert nib.aff2axcodes(t1.affine) == ("R", "A", "S")
        assert t1.shape == roi.shape and np.allclose(t1.affine, roi.affine)
        assert t1.get_data_dtype() == np.int16
        data = np.asarray(roi.dataobj)
        assert set(np.unique(data)) == {0, 1, 2}
        # 1 = left GP (RAS: x < 0), 2 = right GP
        xs = (t1.affine @ np.c_[np.argwhere(data == 1), np.ones((data == 1).sum())].T)[0]
        assert xs.mean() < -5
        xs = (t1.affine @ np.c_[np.argwhere(data == 2), np.ones((data == 2).sum())].T)[0]
        assert xs.mean() > 5
        # the GP is outlined on a few thick slices, as in the study
        assert 1 <= int((data.sum(axis=(0, 1)) > 0).sum()) <= 5
        seen[row.center] = tuple(zooms)
    assert seen["A"] != seen["B"]  # two scanners


def test_written_volumes_equal_in_memory_render(small_cohort):
    root = Path(small_cohort).parent
    table = synth.draw_cohort("small", seed=0)
    subject = table.iloc[-1].to_dict()
    v = synth.render_subject(subject, seed=0)
    t1 = nib.load(str(root / "images" / f"{subject['subject_id']}_t1.nii.gz"))
    np.testing.assert_array_equal(np.asarray(t1.dataobj), v["t1"])
    np.testing.assert_allclose(t1.affine, v["affine"])
    truth = synth.subject_truth(root, subject["subject_id"])
    np.testing.assert_array_equal(truth["gp_true"], v["gp_true"])
    assert truth["severity"] == pytest.approx(subject["severity"])


def test_injured_gp_is_brighter_on_the_slices_through_it(small_cohort):
    """The centre of the GP is brighter for high latent severity than for low (same center)."""
    root = Path(small_cohort).parent
    df = pd.read_csv(small_cohort).merge(pd.read_csv(root / "truth.csv")[["subject_id", "severity"]])
    a = df[df.center == "A"].sort_values("severity")
    ratios = {}
    for sid in list(a.subject_id[:3]) + list(a.subject_id[-3:]):
        row = a[a.subject_id == sid].iloc[0]
        t1 = np.asarray(nib.load(str(root / row.t1)).dataobj).astype(float)
        roi = np.asarray(nib.load(str(root / row.roi)).dataobj)
        ratios[sid] = _ring_ratio(t1, roi)
    low = np.mean([ratios[s] for s in a.subject_id[:3]])
    high = np.mean([ratios[s] for s in a.subject_id[-3:]])
    assert high > low + 0.05


def test_manifest_validates(small_cohort):
    manifest = pytest.importorskip("nhb_core.manifest")
    report = manifest.validate_manifest(small_cohort)
    assert report.ok, [p.line() for p in report.problems]


# ---------------------------------------------------------------------------------- determinism
def test_byte_identical_and_independent_of_workers(tmp_path):
    n = {"A": (1, 1), "B": (1, 1)}
    a = synth.synthesize(tmp_path / "a", preset="small", seed=3, n=n, workers=1)
    b = synth.synthesize(tmp_path / "b", preset="small", seed=3, n=n, workers=2)
    files_a = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.parent) for p in b.parent.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 4 + 2 * 4  # manifest, truth, cohort.json, readings.csv
    for rel in files_a:
        assert sha256_file(a.parent / rel) == sha256_file(b.parent / rel), rel
    c = synth.synthesize(tmp_path / "c", preset="small", seed=4, n=n, workers=1)
    assert sha256_file(c.parent / "images") != sha256_file(a.parent / "images")


def test_subject_streams_do_not_depend_on_cohort_size():
    small = synth.draw_cohort("small", seed=0)
    paper = synth.draw_cohort("paper", seed=0)
    # the same (center, index) with the same label draws the same subject
    merged = small.merge(paper, on=["center", "index", "label"], suffixes=("_s", "_p"))
    assert len(merged) > 0
    np.testing.assert_allclose(merged.severity_s, merged.severity_p)


def test_write_truth_and_progress(tmp_path):
    events = []
    man = synth.synthesize(tmp_path, preset="small", seed=1, n={"A": (1, 0)}, workers=1, write_truth=True,
                           progress=events.append)
    sid = pd.read_csv(man).subject_id[0]
    gp = np.asarray(nib.load(str(tmp_path / "truth" / f"{sid}_gp_true.nii.gz")).dataobj)
    np.testing.assert_array_equal(gp, synth.subject_truth(tmp_path, sid)["gp_true"])
    assert "truth" not in pd.read_csv(man).to_csv()
    assert events[-1]["done"] == events[-1]["total"] == 1 and all(e["stage"] == "synth" for e in events)


# ---------------------------------------------------------------------------------- sizes, errors
def test_paper_counts(paper_table):
    counts = paper_table.groupby(["center", "label"]).size().to_dict()
    assert counts == {("A", 1): 106, ("A", 0): 119, ("B", 1): 34, ("B", 0): 18}


def test_size_overrides():
    df = synth.draw_cohort("paper", seed=0, n=40)
    assert len(df) == 40 and df.groupby(["center", "label"]).size().min() >= 1
    df = synth.draw_cohort("small", seed=0, n={"A": (2, 3)})
    assert df.groupby(["center", "label"]).size().to_dict() == {("A", 0): 3, ("A", 1): 2}
    with pytest.raises(ConfigError):
        synth.draw_cohort("huge")
    with pytest.raises(ConfigError):
        synth.draw_cohort("small", n=2)


def test_cli_small_and_errors(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "cohort"
    r = subprocess.run([sys.executable, "-m", "nhb_core", "synth", "--out", str(out), "--preset", "small",
                        "--n", "4", "--seed", "2", "-q"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.csv").is_file() and "oracle AUC" in r.stdout
    assert len(pd.read_csv(out / "manifest.csv")) == 4
    r = subprocess.run([sys.executable, "-m", "nhb_core", "synth", "--out", str(tmp_path / "x"), "--preset", "huge"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------- statistics (paper preset)
def test_oracle_auc(paper_table):
    a = paper_table[paper_table.center == "A"]
    oracle_a = synth.auc_score(a.label, a.oracle_p)
    assert 0.90 <= oracle_a <= 0.97
    # the oracle is P(label | severity) of the generative model: check it against simulation
    rng = np.random.default_rng(0)
    s = np.full(20000, 1.2)
    nbna = synth.NBNA_INTERCEPT - synth.NBNA_SLOPE * s + rng.normal(0, synth.NBNA_SD, s.size)
    assert np.mean(np.round(nbna) <= 37) == pytest.approx(float(synth.oracle_probability(1.2)), abs=0.015)


def test_readers(paper_table):
    y = paper_table.label.to_numpy()
    reads = {}
    for r in ("reader_1", "reader_2"):
        x = paper_table[r].to_numpy()
        sens, spec = x[y == 1].mean(), 1 - x[y == 0].mean()
        assert 0.55 <= sens <= 0.75, (r, sens)
        assert 0.80 <= spec <= 0.90, (r, spec)
        reads[r] = x
    # moderate agreement (Cohen's kappa), not identical readers
    a, b = reads["reader_1"], reads["reader_2"]
    po = np.mean(a == b)
    pe = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
    kappa = (po - pe) / (1 - pe)
    assert 0.4 <= kappa <= 0.7


def test_covariates_plausible_and_linked_to_severity(paper_table):
    df = paper_table
    assert df.gestational_age_weeks.between(35, 42).all()
    assert df.postnatal_age_days.between(2, 28).all()
    assert df.tsb_umol_l.between(150, 680).all()
    assert 0.45 < (df.sex == "M").mean() < 0.7
    assert df.nbna.between(20, 40).all()
    assert np.corrcoef(df.severity, df.tsb_umol_l)[0, 1] > 0.3
    assert np.corrcoef(df.severity, df.gestational_age_weeks)[0, 1] < -0.1
    assert df.groupby("label").tsb_umol_l.mean()[1] > df.groupby("label").tsb_umol_l.mean()[0]


def test_roi_dice_against_true_gp(paper_a_measures):
    d = paper_a_measures.dice
    assert 0.70 <= d.mean() <= 0.90
    assert d.quantile(0.05) > 0.55
    assert 0.65 <= paper_a_measures.dice_left.mean() <= 0.92
    # the GP crosses 2-4 thick slices
    assert 2.0 <= paper_a_measures.gp_slices.mean() <= 4.0


def test_simple_baseline_auc_center_a(paper_a_measures):
    auc = synth.auc_score(paper_a_measures.label, paper_a_measures.ratio)
    assert 0.70 <= auc <= 0.90


def test_cancelling_progress_stops_and_writes_no_manifest(tmp_path):
    class Cancelled(Exception):
        pass

    def cancel(ev):
        if ev.get("done", 0) >= 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        synth.synthesize(tmp_path, preset="small", seed=0, n={"A": (2, 2)}, workers=2, progress=cancel)
    assert not (tmp_path / "manifest.csv").exists()


def test_write_reader_study_redraws_the_written_readings(small_cohort, tmp_path):
    """The reader study is redrawn from cohort.json: without a network it equals the readings.csv
    synthesize wrote; with one, both arms are restricted to the scored subjects; a folder without
    cohort.json gives the one-line error."""
    from nhb_core.errors import InputError

    root = Path(small_cohort).parent
    again = pd.read_csv(synth.write_reader_study(root, out=tmp_path / "again.csv"))
    pd.testing.assert_frame_equal(again, pd.read_csv(root / "readings.csv"))
    ids = sorted(again["case_id"].unique())[:4]
    aided = pd.read_csv(synth.write_reader_study(root, network={s: 0.9 for s in ids}, out=tmp_path / "aided.csv"))
    assert sorted(aided["case_id"].unique()) == ids
    assert aided["modality"].nunique() == 2
    with pytest.raises(InputError, match="cohort.json"):
        synth.write_reader_study(tmp_path, out=tmp_path / "x.csv")
