"""``roi propose``: GP ROI proposals learned from the manifest's manual masks.

A 7-subject synthetic cohort (generated here) with 4 manual masks and 3 hidden ones,
one of which is also given as a left-right/anterior-posterior flipped copy of its T1
(an LPS file): proposals must land on each T1's own grid whatever its orientation.
The network is tiny (2 mm pixels, 1 epoch): these tests check files, geometry, labels,
manifest columns, bad inputs and determinism, not segmentation quality
(``benchmarks/bench_roi.py`` measures that).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

TINY = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8], "crop_mm": 64, "size": 32,
        "search_mm": 96, "epochs": 1, "samples_per_subject": 4, "batch_size": 8, "device": "cpu", "seed": 3}
HIDDEN = ("A002", "A004", "B001")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nhb_core", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """manifest.csv: 4 subjects with masks, A002/A004/B001 without, and A004F = A004's T1 stored as LPS."""
    from nhb_core.synth import synthesize

    root = tmp_path_factory.mktemp("roi_cohort")
    synthesize(root, preset="small", n=6, seed=0, workers=1)
    rows = _read(root / "manifest.csv")
    assert len(rows) >= 6
    img = nib.load(str(root / "images" / "A004_t1.nii.gz"))
    flip = nib.Nifti1Image(np.asarray(img.dataobj)[::-1, ::-1, :].copy(),
                           img.affine @ np.array([[-1, 0, 0, img.shape[0] - 1], [0, -1, 0, img.shape[1] - 1],
                                                  [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float))
    nib.save(flip, str(root / "images" / "A004F_t1.nii.gz"))
    assert nib.aff2axcodes(flip.affine) == ("L", "P", "S")
    out = []
    for r in rows:
        r = dict(r)
        if r["subject_id"] in HIDDEN:
            r["roi"] = ""
        out.append(r)
        if r["subject_id"] == "A004":
            out.append({**r, "subject_id": "A004F", "t1": "images/A004F_t1.nii.gz"})
    return _write(root / "manifest_partial.csv", out)


@pytest.fixture(scope="module")
def proposed(cohort, tmp_path_factory) -> tuple[Path, list[dict]]:
    import torch

    from nhb_core.roi_propose import propose_rois

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("roi_out")
    events: list[dict] = []
    propose_rois(cohort, out, TINY, progress=events.append)
    return out, events


def test_outputs_and_manifest(cohort, proposed):
    from nhb_core.manifest import load_manifest, validate_manifest

    out, _ = proposed
    for name in ("manifest.csv", "proposals.csv", "roi_model.safetensors", "roi_model.json"):
        assert (out / name).is_file(), name
    src = _read(cohort)
    res = _read(out / "manifest.csv")
    assert list(res[0]) == list(src[0]) + ["roi_source"]
    assert [r["subject_id"] for r in res] == [r["subject_id"] for r in src]
    for a, b in zip(src, res):
        hidden = a["roi"] == ""
        assert b["roi_source"] == ("proposed" if hidden else "manual")
        # every path resolves from the new folder to the same file
        assert (out / b["t1"]).resolve() == (cohort.parent / a["t1"]).resolve()
        if hidden:
            assert b["roi"] == f"masks/{a['subject_id']}_roi_proposed.nii.gz"
            assert (out / b["roi"]).is_file()
        else:
            assert (out / b["roi"]).resolve() == (cohort.parent / a["roi"]).resolve()
        for k in a:  # every other cell unchanged
            if k not in ("t1", "roi"):
                assert b[k] == a[k], k
    # the new manifest loads (every row has a mask now); the input one is unchanged
    df = load_manifest(out / "manifest.csv").df
    assert (df["roi_path"] != "").all() and len(df) == len(src)
    rep = validate_manifest(out / "manifest.csv", check_images=False)
    assert rep.ok and not any("roi is empty" in w.problem for w in rep.warnings)


def test_masks_on_the_t1_grid(cohort, proposed):
    from nhb_core.io import load_roi, load_t1

    out, _ = proposed
    res = {r["subject_id"]: r for r in _read(out / "manifest.csv")}
    for sid in HIDDEN + ("A004F",):
        t1_file = nib.load(str((out / res[sid]["t1"]).resolve()))
        m = nib.load(str(out / res[sid]["roi"]))
        assert m.shape == t1_file.shape
        np.testing.assert_array_equal(m.affine, t1_file.affine)
        assert nib.aff2axcodes(m.affine) == nib.aff2axcodes(t1_file.affine)
        data = np.asarray(m.dataobj)
        assert data.dtype == np.int16
        assert set(np.unique(data)) <= {0, 1, 2}
        load_roi(out / res[sid]["roi"], reference=load_t1(out / res[sid]["t1"]), allow_empty=True)
    # the flipped copy of A004 gets the same mask, in its own (LPS) voxel order
    a = load_roi(out / res["A004"]["roi"], allow_empty=True)
    f = load_roi(out / res["A004F"]["roi"], allow_empty=True)
    np.testing.assert_array_equal(a.data, f.data)
    np.testing.assert_allclose(a.affine, f.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / res["A004F"]["roi"])).dataobj)[::-1, ::-1, :],
                                  np.asarray(nib.load(str(out / res["A004"]["roi"])).dataobj))


def test_proposals_table_and_progress(cohort, proposed):
    from nhb_core.roi_propose import PROPOSALS_COLUMNS

    out, events = proposed
    p = pd.read_csv(out / "proposals.csv", dtype={"subject_id": str, "qc_flags": str}, keep_default_na=False,
                    na_values=[""])
    assert list(p.columns) == PROPOSALS_COLUMNS
    assert len(p) == len(_read(cohort))
    prop = p[p["roi_source"] == "proposed"]
    assert sorted(prop["subject_id"]) == sorted(HIDDEN + ("A004F",))
    assert prop["confidence"].between(0, 1).all()
    man = p[p["roi_source"] == "manual"]
    assert man["confidence"].isna().all()
    assert (man["volume_left_mm3"] > 0).all() and (man["volume_right_mm3"] > 0).all()
    # QC: the flags column and qc_ok agree
    for r in p.itertuples():
        assert bool(r.qc_ok) == (pd.isna(r.qc_flags) or r.qc_flags == "")
    stages = {e["stage"] for e in events}
    assert {"roi_load", "roi_train", "roi_propose"} <= stages
    last = [e for e in events if e["stage"] == "roi_propose"][-1]
    assert last["done"] == last["total"] == 4
    meta = __import__("json").loads((out / "roi_model.json").read_text())
    assert sorted(meta["train_subjects"]) == sorted(r["subject_id"] for r in _read(cohort) if r["roi"])
    assert meta["config"]["seed"] == 3


def test_same_seed_same_masks(cohort, proposed, tmp_path):
    import torch

    from nhb_core.roi_propose import propose_rois

    out, _ = proposed
    torch.set_num_threads(1)
    propose_rois(cohort, tmp_path / "again", TINY)
    for f in sorted((out / "masks").iterdir()):
        assert f.read_bytes() == (tmp_path / "again" / "masks" / f.name).read_bytes(), f.name
    a = pd.read_csv(out / "proposals.csv").drop(columns="roi")  # manual paths are relative to each folder
    b = pd.read_csv(tmp_path / "again" / "proposals.csv").drop(columns="roi")
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_corrected_rows_train_and_proposed_rows_are_redone(proposed, tmp_path):
    from nhb_core.roi_propose import propose_rois

    out, _ = proposed
    rows = _read(out / "manifest.csv")
    for r in rows:
        if r["subject_id"] == "A002":
            r["roi_source"] = "corrected"
    man = _write(out.parent / "manifest_corrected.csv", [
        {**r, "t1": str((out / r["t1"]).resolve()), "roi": str((out / r["roi"]).resolve())} for r in rows])
    propose_rois(man, tmp_path / "next", {**TINY, "epochs": 1})
    res = {r["subject_id"]: r for r in _read(tmp_path / "next" / "manifest.csv")}
    assert res["A002"]["roi_source"] == "corrected"
    assert (tmp_path / "next" / res["A002"]["roi"]).resolve() == (out / "masks" / "A002_roi_proposed.nii.gz").resolve()
    for sid in ("A004", "B001", "A004F"):
        assert res[sid]["roi_source"] == "proposed"
        assert res[sid]["roi"] == f"masks/{sid}_roi_proposed.nii.gz"
    meta = __import__("json").loads((tmp_path / "next" / "roi_model.json").read_text())
    assert "A002" in meta["train_subjects"] and "B001" not in meta["train_subjects"]


def test_manifest_rows_without_roi_warn_and_prepare_refuses(cohort, tmp_path):
    from nhb_core.errors import DatasetError
    from nhb_core.manifest import validate_manifest
    from nhb_core.slices import prepare

    rep = validate_manifest(cohort, check_images=False)
    assert rep.ok
    w = [x for x in rep.warnings if "roi is empty" in x.problem]
    assert sorted(x.row for x in w) == [i + 2 for i, r in enumerate(_read(cohort)) if r["roi"] == ""]
    assert all("roi propose" in x.fix for x in w)
    with pytest.raises(DatasetError) as ei:
        prepare(cohort, tmp_path / "ds", workers=1)
    line = ei.value.line()
    assert "4 row(s) have no ROI mask" in line and "A002 (row 3)" in line and "B001" in line
    assert "roi propose" in line and "\n" not in line
    r = run_cli("validate", cohort)
    assert r.returncode == 0, r.stderr
    assert "roi propose" in r.stdout + r.stderr


@pytest.mark.parametrize("case, edit, args, expect", [
    ("no manual masks", lambda rows: [{**r, "roi": ""} for r in rows], [],
     "no row has a manual ROI mask to learn from"),
    ("bad roi_source", lambda rows: [{**r, "roi_source": "guessed"} for r in rows], [],
     "roi_source 'guessed' is not manual, proposed or corrected"),
    ("out is the manifest folder", None, ["--out", "{root}"], "its manifest.csv would be overwritten"),
    ("bad encoder", None, ["--encoder", "no_such_net"], "cannot build a U-Net with encoder 'no_such_net'"),
    ("bad size", None, ["--size", "30"], "size 30 is not a positive multiple of 16"),
    ("bad device", None, ["--device", "tpu"], "unknown device 'tpu'"),
    ("missing manifest", None, ["--manifest", "{root}/nope.csv"], "manifest not found"),
])
def test_bad_inputs_one_line_exit_2(cohort, tmp_path, case, edit, args, expect):
    root = tmp_path / "c"
    root.mkdir()
    rows = [{**r, "t1": str((cohort.parent / r["t1"]).resolve()),
             "roi": str((cohort.parent / r["roi"]).resolve()) if r["roi"] else ""} for r in _read(cohort)]
    man = _write(root / "manifest.csv", edit(rows) if edit else rows)
    argv = ["roi", "propose", "--manifest", man, "--out", tmp_path / "out", "--epochs", "1"]
    for a in args:
        argv.append(a.format(root=root) if isinstance(a, str) else a)
    # later options win in typer: put the overrides after the defaults
    r = run_cli(*argv)
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expect in err, err
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_cli_propose_summary(cohort, tmp_path):
    r = run_cli("roi", "propose", "--manifest", cohort, "--out", tmp_path / "cli", "--epochs", "1", "--size", "32",
                "--threads", "1", "--seed", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "4 proposed, 3 manual/corrected masks" in " ".join(r.stdout.split())
    res = _read(tmp_path / "cli" / "manifest.csv")
    assert sorted(x["subject_id"] for x in res if x["roi_source"] == "proposed") == sorted(HIDDEN + ("A004F",))
    meta = __import__("json").loads((tmp_path / "cli" / "roi_model.json").read_text())
    assert meta["config"]["size"] == 32 and meta["config"]["seed"] == 1 and meta["device"] == "cpu"
