"""The "ROIs" page and :mod:`nhb_core.roi_edit`: a painted square lands on the exact voxels of
a new NIfTI on the T1's grid; the original mask and the other subjects' files are never
touched; the page renders the grid sorted by confidence and saves through the same function
(AppTest cannot drive the canvas's browser side: the stroke-to-voxel path is tested on the
library functions the page calls)."""

from __future__ import annotations

import csv
import hashlib
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_roi_propose import TINY  # noqa: E402


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _hashes(root: Path, skip=("manifest.csv", "proposals.csv")) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def roi_out(tmp_path_factory) -> Path:
    """A roi propose folder: 4 subjects with masks, B001 and A002 proposed (tiny network)."""
    import torch

    from nhb_core.roi_propose import propose_rois
    from nhb_core.synth import synthesize

    root = tmp_path_factory.mktemp("roi_page_cohort")
    synthesize(root, preset="small", n=6, seed=0, workers=1)
    rows = _rows(root / "manifest.csv")
    for r in rows:
        if r["subject_id"] in ("A002", "B001"):
            r["roi"] = ""
    with open(root / "partial.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("roi_page_out")
    propose_rois(root / "partial.csv", out, TINY)
    return out


@pytest.fixture
def roi_dir(roi_out, tmp_path) -> Path:
    """A private copy (tests write corrections into it); its relative paths still resolve."""
    dst = roi_out.parent / f"{roi_out.name}_{tmp_path.name}"
    shutil.copytree(roi_out, dst)
    return dst


def test_canvas_pixels_block_majority():
    from nhb_core.roi_edit import canvas_pixels

    rgba = np.zeros((20, 30, 4), np.uint8)  # a 10 x 15 view at 2 canvas px per pixel
    rgba[4:8, 6:12, 3] = 255  # pixels (2..3, 3..5)
    rgba[0, 0, 3] = 255  # a quarter of pixel (0, 0): not painted
    p = canvas_pixels(rgba, (10, 15))
    expect = np.zeros((10, 15), bool)
    expect[2:4, 3:6] = True
    np.testing.assert_array_equal(p, expect)
    assert not canvas_pixels(None, (10, 15)).any()


def test_painted_square_saved_on_exact_voxels(roi_dir):
    from nhb_core.io import load_t1
    from nhb_core.roi_edit import load_case, paint, save_correction, view

    before = _hashes(roi_dir)
    other_rows = {r["subject_id"]: r for r in _rows(roi_dir / "manifest.csv") if r["subject_id"] != "B001"}
    case = load_case(roi_dir, "B001")
    z = case["slices"][0]
    x0, x1, y0, y1 = case["box"]
    h, w = view(case["t1"], z, case["box"]).shape
    assert (h, w) == (y1 - y0, x1 - x0)
    painted = np.zeros((h, w), bool)
    painted[10:15, 20:25] = True  # a 5 x 5 square on the displayed slice
    new = paint(case["mask"], z, case["box"], painted, 2)
    path = save_correction(roi_dir, "B001", new)
    assert path == roi_dir / "corrected" / "B001_roi_corrected.nii.gz"
    # exact voxels: display (r, c) is voxel (x0 + w-1-c, y0 + h-1-r) of slice z; nothing else changed
    expect = case["mask"].copy()
    for r in range(10, 15):
        for c in range(20, 25):
            expect[x0 + w - 1 - c, y0 + h - 1 - r, z] = 2
    img = nib.load(str(path))
    t1 = nib.load(case["t1_path"])
    np.testing.assert_array_equal(img.affine, t1.affine)
    assert img.shape == t1.shape and img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj), expect)  # synth T1s are RAS+: file order = canonical
    assert int((np.asarray(img.dataobj) != case["mask"]).sum()) == int((case["mask"][x0 + w - 25:x0 + w - 20,
                                                                                      y0 + h - 15:y0 + h - 10, z] != 2).sum())
    load_t1(case["t1_path"])
    # the original proposal and every other file are unchanged; only B001's rows changed
    after = _hashes(roi_dir)
    assert {k: v for k, v in after.items() if not k.startswith("corrected/")} == before
    rows = {r["subject_id"]: r for r in _rows(roi_dir / "manifest.csv")}
    assert rows["B001"]["roi_source"] == "corrected"
    assert rows["B001"]["roi"] == "corrected/B001_roi_corrected.nii.gz"
    assert {k: v for k, v in rows.items() if k != "B001"} == other_rows
    prop = pd.read_csv(roi_dir / "proposals.csv", dtype=str).set_index("subject_id")
    assert prop.loc["B001", "roi_source"] == "corrected"
    # a second correction of the same subject replaces the corrected file, never the original
    again = paint(new, z, case["box"], painted, 0)
    save_correction(roi_dir, "B001", again)
    assert (np.asarray(nib.load(str(path)).dataobj)[..., z] == 2).sum() == (case["mask"][..., z] == 2).sum() - int(
        (case["mask"][x0 + w - 25:x0 + w - 20, y0 + h - 15:y0 + h - 10, z] == 2).sum())
    assert {k: v for k, v in _hashes(roi_dir).items() if not k.startswith("corrected/")} == before


def test_page_grid_sorted_and_save(roi_dir, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("NHB_ROI_DIR", str(roi_dir))
    monkeypatch.setenv("NHB_RUNS_DIR", str(roi_dir / "no_runs"))
    before = _hashes(roi_dir)
    at = AppTest.from_file(str(REPO / "dashboard_pages" / "6_ROIs.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    prop = table[table["roi_source"] == "proposed"]
    assert list(prop["confidence"]) == sorted(prop["confidence"])  # lowest confidence first
    assert list(table["roi_source"])[: len(prop)] == ["proposed"] * len(prop)  # manual (no confidence) last
    assert len(at.get("imgs")) + len(at.get("image")) >= 1
    at.selectbox(key="roi_sort").select("QC flags (most first)").run()
    table = at.dataframe[0].value
    assert list(table["qc_flags"].fillna("").map(lambda s: len([f for f in s.split(";") if f]))) == sorted(
        table["qc_flags"].fillna("").map(lambda s: len([f for f in s.split(";") if f])), reverse=True)
    at.selectbox(key="roi_subject").select("A002").run()
    assert not at.exception
    [b for b in at.button if b.label == "Apply brush strokes"][0].click().run()
    assert any("No brush stroke" in i.value for i in at.info)
    [b for b in at.button if b.label == "Accept and save"][0].click().run()
    assert not at.exception and not at.error
    assert any("marked corrected" in s.value for s in at.success)
    saved = roi_dir / "corrected" / "A002_roi_corrected.nii.gz"
    assert saved.is_file()
    np.testing.assert_array_equal(np.asarray(nib.load(str(saved)).dataobj),
                                  np.asarray(nib.load(str(roi_dir / "masks" / "A002_roi_proposed.nii.gz")).dataobj))
    assert {k: v for k, v in _hashes(roi_dir).items() if not k.startswith("corrected/")} == before
    # a fresh session (a reload) sees what was saved
    at2 = AppTest.from_file(str(REPO / "dashboard_pages" / "6_ROIs.py"), default_timeout=120).run()
    t2 = at2.dataframe[0].value.set_index("subject_id")
    assert t2.loc["A002", "roi_source"] == "corrected"
    assert t2.loc["B001", "roi_source"] == "proposed"
