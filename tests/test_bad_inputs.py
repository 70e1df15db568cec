"""Bad inputs through the real CLI (``python -m nhb_core validate``): each one gives the documented
one-line message naming the file and row, exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_dicom import write_series
from test_manifest import AFFINE, SHAPE, edit_manifest, make_cohort

from nhb_core.io import save_nifti


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nhb_core", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _img(root: Path, name: str) -> Path:
    return root / "images" / name


def _set(col, row_index, value):
    def fn(df):
        df.loc[row_index, col] = value
        return df
    return fn


def _dicom_t1(root: Path, fn_series) -> None:
    """Point subject S002's t1 at a DICOM folder built by ``fn_series(folder)``."""
    fn_series(root / "dicom" / "S002")
    edit_manifest(root / "manifest.csv", _set("t1", 1, "dicom/S002"))


def _nan_inf_t1() -> np.ndarray:
    a = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    a[1, 1, 1] = np.nan
    a[2, 3, 4] = np.inf
    a[5, 6, 7] = -np.inf
    return a


def _write_csv_bytes(root: Path, data: bytes) -> None:
    (root / "manifest.csv").write_bytes(data)


# Each case: (id, how to break a valid 3-subject cohort in `root`, expected row or None, expected text)
CASES = [
    ("truncated_nii_gz",
     lambda r: _img(r, "S002_t1.nii.gz").write_bytes(_img(r, "S002_t1.nii.gz").read_bytes()[:300]),
     3, "t1 images/S002_t1.nii.gz: T1 file is truncated or corrupt"),
    ("text_named_nii_gz",
     lambda r: _img(r, "S002_t1.nii.gz").write_text("subject notes, not an image"),
     3, "t1 images/S002_t1.nii.gz: T1 file is named .gz but is not gzip-compressed (not a NIfTI file). Export the T1 again as NIfTI"),
    ("gzip_not_nifti",
     lambda r: _img(r, "S003_roi.nii.gz").write_bytes(gzip.compress(b"0" * 1000)),
     4, "roi images/S003_roi.nii.gz: cannot read the ROI mask as NIfTI"),
    ("t1_4d",
     lambda r: save_nifti(np.ones(SHAPE + (3,), np.float32), AFFINE, _img(r, "S002_t1.nii.gz")),
     3, "T1 is 4D with shape (12, 14, 10, 3); a single 3D volume is needed. Extract one 3D volume"),
    ("t1_nan_inf",
     lambda r: save_nifti(_nan_inf_t1(), AFFINE, _img(r, "S001_t1.nii.gz")),
     2, "T1 has 3 NaN or infinite voxel(s). Replace them"),
    ("t1_blank",
     lambda r: save_nifti(np.zeros(SHAPE, np.float32), AFFINE, _img(r, "S003_t1.nii.gz")),
     4, "T1 is blank: every voxel is 0"),
    ("roi_empty",
     lambda r: save_nifti(np.zeros(SHAPE, np.uint8), AFFINE, _img(r, "S001_roi.nii.gz")),
     2, "roi images/S001_roi.nii.gz: ROI mask is empty (every voxel is 0). Draw the region"),
    ("roi_shape_mismatch",
     lambda r: save_nifti(np.ones((12, 14, 11), np.uint8), AFFINE, _img(r, "S002_roi.nii.gz")),
     3, "ROI mask shape (12, 14, 11) differs from the T1 shape (12, 14, 10) of S002_t1.nii.gz (both in RAS+ orientation). Resample the mask onto the T1 grid"),
    ("roi_affine_mismatch",
     lambda r: save_nifti(np.ones(SHAPE, np.uint8), AFFINE @ np.diag([1.0, 1.0, 1.1, 1.0]), _img(r, "S002_roi.nii.gz")),
     3, "ROI mask is not on the T1 grid of S002_t1.nii.gz: voxel positions differ by up to 1.8 mm (tolerance 0.05 mm). Resample the mask"),
    ("roi_probability_map",
     lambda r: save_nifti(np.full(SHAPE, 0.25, np.float32), AFFINE, _img(r, "S003_roi.nii.gz")),
     4, "ROI mask has non-integer values (e.g. 0.25)"),
    ("missing_t1_file",
     lambda r: _img(r, "S002_t1.nii.gz").unlink(),
     3, "T1 not found: images/S002_t1.nii.gz (looked for"),
    ("missing_roi_file",
     lambda r: edit_manifest(r / "manifest.csv", _set("roi", 2, "masks/S003.nii.gz")),
     4, "ROI mask not found: masks/S003.nii.gz"),
    ("roi_is_folder",
     lambda r: (r / "images" / "roi_dir").mkdir() or edit_manifest(r / "manifest.csv", _set("roi", 0, "images/roi_dir")),
     2, "ROI images/roi_dir is a folder. Give the mask as a NIfTI file"),
    ("duplicate_subject_id",
     lambda r: edit_manifest(r / "manifest.csv", _set("subject_id", 2, "S001")),
     4, "duplicate subject_id 'S001' (also on row 2). Give every subject a unique id"),
    ("empty_subject_id",
     lambda r: edit_manifest(r / "manifest.csv", _set("subject_id", 1, "")),
     3, "subject_id is empty"),
    ("label_not_binary",
     lambda r: edit_manifest(r / "manifest.csv", lambda df: df.assign(label=["0", "2", "1"])),
     3, "label '2' is not 0 or 1. Write 0 (control) or 1 (injury)"),
    ("nbna_out_of_range",
     lambda r: edit_manifest(r / "manifest.csv", _set("nbna", 0, "41")),
     2, "nbna 41 is outside 0..40. The NBNA score runs from 0 to 40"),
    ("nbna_not_number",
     lambda r: edit_manifest(r / "manifest.csv", _set("nbna", 1, "thirty")),
     3, "nbna 'thirty' is not a number"),
    ("no_label_value",
     lambda r: edit_manifest(r / "manifest.csv", lambda df: df.assign(nbna=["38", "30", ""], label=["0", "1", ""])),
     4, "no label: nbna and label are both empty"),
    ("empty_center",
     lambda r: edit_manifest(r / "manifest.csv", _set("center", 1, "  ")),
     3, "center is empty. Fill in the acquisition center of every subject"),
    ("reader_not_binary",
     lambda r: edit_manifest(r / "manifest.csv", _set("reader_1", 0, "maybe")),
     2, "reader_1 'maybe' is not 0 or 1"),
    ("covariate_not_number",
     lambda r: edit_manifest(r / "manifest.csv", _set("tsb_umol_l", 0, "12,5")),
     2, "tsb_umol_l '12,5' is not a number. Write a number (decimal point '.')"),
    ("dicom_two_series",
     lambda r: _dicom_t1(r, lambda f: (write_series(f, n=4, series_number=3, description="t1_se"),
                                       write_series(f, n=2, series_number=1, description="localizer", start=10))),
     3, "t1 dicom/S002: folder holds 2 DICOM series: series 1 'localizer' (2 files, UID ending "),
    ("dicom_missing_slice",
     lambda r: _dicom_t1(r, lambda f: write_series(f, positions=[0, 2.5, 5, 7.5, 12.5, 15])),
     3, "t1 dicom/S002: missing slice(s): a gap of 5.00 mm between IM0004.dcm and IM0005.dcm where the slice spacing is 2.50 mm (about 1 slice(s) missing)"),
    ("dicom_duplicated_slice",
     lambda r: _dicom_t1(r, lambda f: write_series(f, positions=[0, 2.5, 2.5, 5, 7.5])),
     3, "t1 dicom/S002: duplicated slice: IM0002.dcm and IM0003.dcm"),
    ("dicom_inconsistent_spacing",
     lambda r: _dicom_t1(r, lambda f: write_series(f, positions=[0, 2.0, 4.0, 7.0, 9.0, 11.0])),
     3, "inconsistent slice spacing: gaps between slices range from 2.00 to 3.00 mm"),
    ("dicom_empty_folder",
     lambda r: _dicom_t1(r, lambda f: f.mkdir(parents=True)),
     3, "t1 dicom/S002: folder holds no DICOM image files"),
    ("non_utf8_csv",
     lambda r: _write_csv_bytes(r, (r / "manifest.csv").read_bytes().replace(b"Siemens", "Sié".encode("latin-1"))),
     None, "file is not UTF-8 text (byte 0xe9 on line 2). Save the file as UTF-8 CSV"),
    ("utf16_csv",
     lambda r: _write_csv_bytes(r, (r / "manifest.csv").read_text("utf-8").encode("utf-16")),
     None, "file is UTF-16 text, not UTF-8"),
    ("xlsx_renamed_csv",
     lambda r: _write_csv_bytes(r, b"PK\x03\x04" + bytes(range(256)) * 4),
     None, "file is a spreadsheet workbook (.xlsx/.xls), not a CSV text file. In Excel use Save As"),
    ("missing_required_column",
     lambda r: edit_manifest(r / "manifest.csv", lambda df: df.drop(columns=["roi"])),
     1, "missing required column 'roi'. Add a column 'roi'"),
    ("no_nbna_or_label_column",
     lambda r: edit_manifest(r / "manifest.csv", lambda df: df.drop(columns=["nbna", "label"])),
     1, "neither an 'nbna' nor a 'label' column"),
    ("duplicate_column",
     lambda r: _write_csv_bytes(r, (r / "manifest.csv").read_bytes().replace(b"scanner", b"Center", 1)),
     1, "column 'center' appears twice in the header (columns 2 and"),
    ("semicolon_separated",
     lambda r: _write_csv_bytes(r, (r / "manifest.csv").read_bytes().replace(b",", b";")),
     1, "the header has a single column; the file seems to use ';' as separator"),
    ("empty_manifest",
     lambda r: _write_csv_bytes(r, b""),
     None, "manifest is empty"),
    ("header_only",
     lambda r: _write_csv_bytes(r, (r / "manifest.csv").read_bytes().split(b"\n")[0] + b"\n"),
     1, "manifest has a header but no subject rows"),
    ("ragged_row",
     lambda r: _write_csv_bytes(r, (r / "manifest.csv").read_bytes().rstrip(b"\n") + b",extra,values\n"),
     4, "row has 14 values but the header has 12 columns"),
    ("bad_quoting",
     lambda r: _write_csv_bytes(r, (r / "manifest.csv").read_bytes().replace(b"S002,", b'"S0"02,', 1)),
     3, "CSV syntax error near line 3"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_cli(tmp_path, case):
    _name, breaker, row, expected = case
    root = tmp_path / "cohort"
    m = make_cohort(root, n=3, label=True)
    edit_manifest(m, lambda df: df.assign(label=["0", "1", "0"], nbna=["38", "30", "39"]))
    breaker(root)
    before = snapshot(tmp_path)
    r = run_cli("validate", m)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    where = f"{m}:{row}: " if row is not None else f"{m}: "
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert any(ln.startswith(f"error: {where}") and expected in ln for ln in errors), r.stderr
    assert all(ln.endswith(".") for ln in errors)
    assert "manifest OK" not in r.stdout
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_many_problems_in_one_run(tmp_path):
    root = tmp_path / "cohort"
    m = make_cohort(root, n=5)

    def breakit(df):
        df.loc[0, "center"] = ""
        df.loc[1, "nbna"] = "99"
        df.loc[3, "subject_id"] = "S001"
        return df

    edit_manifest(m, breakit)
    save_nifti(np.zeros(SHAPE, np.uint8), AFFINE, root / "images" / "S005_roi.nii.gz")
    before = snapshot(tmp_path)
    r = run_cli("validate", m)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert [ln.split(":")[2] for ln in errors] == ["2", "3", "5", "6"]
    assert f"{m}: 4 problem(s) in 4 of 5 rows; the manifest is not valid." in r.stderr
    assert snapshot(tmp_path) == before


def test_missing_manifest_and_debug(tmp_path):
    r = run_cli("validate", tmp_path / "nope.csv")
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == f"error: {tmp_path / 'nope.csv'}: manifest not found. Check the path of the manifest CSV."
    r = run_cli("--debug", "validate", tmp_path / "nope.csv")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())


def test_library_errors_become_one_line(tmp_path):
    """Pipeline code raising ImageError through the CLI: one line, exit 2; traceback only with --debug."""
    from nhb_core.errors import ImageError
    from nhb_core.io import load_t1

    p = tmp_path / "t1.nii.gz"
    p.write_text("junk")
    with pytest.raises(ImageError) as ei:
        load_t1(p)
    line = ei.value.line()
    assert line == f"{p}: T1 file is named .gz but is not gzip-compressed (not a NIfTI file). Export the T1 again as NIfTI (.nii or .nii.gz), e.g. with dcm2niix."
