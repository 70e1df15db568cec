"""NIfTI T1 / ROI loading in RAS+ and the geometry checks."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from nhb_core.errors import ImageError
from nhb_core.io import ROI_ATOL_MM, Volume, check_same_grid, load_roi, load_t1, save_nifti

SHAPE = (10, 12, 8)


def _las_affine():
    a = np.diag([-1.2, 1.0, 2.0, 1.0])  # i -> Left: stored in LAS
    a[:3, 3] = (6.0, -5.0, -8.0)
    return a


def test_save_nifti_roundtrip_and_deterministic(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    a = np.diag([1.0, 1.5, 2.0, 1.0])
    p1 = save_nifti(data, a, tmp_path / "a.nii.gz")
    p2 = save_nifti(data, a, tmp_path / "b.nii.gz")
    assert p1.read_bytes() == p2.read_bytes()
    save_nifti(data, a, tmp_path / "c.nii")
    for p in (p1, tmp_path / "c.nii"):
        v = load_t1(p)
        np.testing.assert_array_equal(v.data, data)
        assert v.spacing == (1.0, 1.5, 2.0) and v.meta["format"] == "nifti"
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left


def test_t1_reoriented_to_ras(tmp_path):
    data = np.random.default_rng(0).random(SHAPE).astype(np.float64)
    a = _las_affine()
    save_nifti(data, a, tmp_path / "t1.nii.gz")
    v = load_t1(tmp_path / "t1.nii.gz")
    assert isinstance(v, Volume)
    assert v.data.dtype == np.float32 and v.affine.dtype == np.float64
    assert v.axcodes == ("R", "A", "S") and v.meta["original_axcodes"] == ("L", "A", "S")
    np.testing.assert_allclose(v.data, data[::-1].astype(np.float32))
    np.testing.assert_allclose(v.spacing, (1.2, 1.0, 2.0))
    # every voxel keeps its world position
    ijk = np.array([2, 3, 4, 1.0])
    world_orig = a @ np.array([SHAPE[0] - 1 - 2, 3, 4, 1.0])
    np.testing.assert_allclose(v.affine @ ijk, world_orig, atol=1e-5)


def test_scaled_int_and_singleton_4d(tmp_path):
    raw = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    img = nib.Nifti1Image(raw[..., None], np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    img.set_qform(np.eye(4), code=1)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    v = load_t1(tmp_path / "s.nii.gz")
    assert v.shape == SHAPE
    np.testing.assert_allclose(v.data, raw * 0.5 + 10)


def test_roi_labels_preserved_and_reference_check(tmp_path):
    a = _las_affine()
    t1 = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    roi = np.zeros(SHAPE, np.uint8)
    roi[1:3, 4:6, 3] = 1
    roi[6:8, 4:6, 3] = 2
    save_nifti(t1, a, tmp_path / "t1.nii.gz")
    save_nifti(roi, a, tmp_path / "roi.nii.gz")
    ref = load_t1(tmp_path / "t1.nii.gz")
    m = load_roi(tmp_path / "roi.nii.gz", reference=ref)
    assert m.data.dtype == np.int16
    np.testing.assert_array_equal(m.data, roi[::-1])
    assert sorted(np.unique(m.data)) == [0, 1, 2]
    # float masks with integer values are fine
    save_nifti(roi.astype(np.float32), a, tmp_path / "roi_f.nii.gz")
    np.testing.assert_array_equal(load_roi(tmp_path / "roi_f.nii.gz", ref).data, m.data)
    # a shift below the tolerance passes, above fails with the fix
    b = a.copy()
    b[0, 3] += ROI_ATOL_MM / 2
    save_nifti(roi, b, tmp_path / "roi_ok.nii.gz")
    load_roi(tmp_path / "roi_ok.nii.gz", ref)
    b[0, 3] += 0.5
    save_nifti(roi, b, tmp_path / "roi_shift.nii.gz")
    with pytest.raises(ImageError) as ei:
        load_roi(tmp_path / "roi_shift.nii.gz", ref)
    msg = str(ei.value)
    assert msg.startswith(str(tmp_path / "roi_shift.nii.gz") + ": ROI mask is not on the T1 grid of t1.nii.gz")
    assert "differ by up to 0.525 mm (tolerance 0.05 mm)" in msg and "nearest-neighbour" in msg
    # a custom tolerance
    load_roi(tmp_path / "roi_shift.nii.gz", ref, atol_mm=1.0)


def test_check_same_grid_rotation(tmp_path):
    data = np.zeros(SHAPE, np.int16)
    ref = Volume(data.astype(np.float32), np.eye(4), (1.0, 1.0, 1.0), "t1.nii.gz")
    th = np.deg2rad(1.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    with pytest.raises(ImageError, match="voxel positions differ"):
        check_same_grid(Volume(data, rot, (1.0, 1.0, 1.0), "roi.nii.gz"), ref)


@pytest.mark.parametrize("maker, expected", [
    (lambda p: p.write_bytes(b""), "T1 file is empty (0 bytes)"),
    (lambda p: p.write_text("hello, I am text"), "T1 file is named .gz but is not gzip-compressed"),
    (lambda p: p.write_bytes(gzip.compress(b"x" * 500)), "cannot read the T1 as NIfTI"),
])
def test_t1_unreadable(tmp_path, maker, expected):
    p = tmp_path / "t1.nii.gz"
    maker(p)
    with pytest.raises(ImageError) as ei:
        load_t1(p)
    assert expected in str(ei.value) and str(ei.value).startswith(str(p))


def test_t1_truncated_4d_nan_blank_no_orientation(tmp_path):
    data = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    full = save_nifti(data, np.eye(4), tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageError, match="T1 file is truncated or corrupt"):
        load_t1(tmp_path / "trunc.nii.gz")
    raw = save_nifti(data, np.eye(4), tmp_path / "full.nii").read_bytes()
    (tmp_path / "trunc.nii").write_bytes(raw[:-100])
    with pytest.raises(ImageError, match=r"T1 file is truncated \(it holds 16636 bytes of the 16736 its header announces\)"):
        load_t1(tmp_path / "trunc.nii")
    save_nifti(np.zeros((4, 4, 4, 3), np.float32), np.eye(4), tmp_path / "4d.nii.gz")
    with pytest.raises(ImageError, match=r"T1 is 4D with shape \(4, 4, 4, 3\)"):
        load_t1(tmp_path / "4d.nii.gz")
    nan = data.copy()
    nan[1, 2, 3] = np.nan
    nan[2, 2, 2] = np.inf
    save_nifti(nan, np.eye(4), tmp_path / "nan.nii.gz")
    with pytest.raises(ImageError, match="T1 has 2 NaN or infinite voxel"):
        load_t1(tmp_path / "nan.nii.gz")
    save_nifti(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "blank.nii.gz")
    with pytest.raises(ImageError, match="T1 is blank: every voxel is 0"):
        load_t1(tmp_path / "blank.nii.gz")
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "noorient.nii"))
    with pytest.raises(ImageError, match="has no orientation"):
        load_t1(tmp_path / "noorient.nii")
    with pytest.raises(ImageError, match="unsupported T1 file type '.mha'"):
        (tmp_path / "x.mha").write_text("x")
        load_t1(tmp_path / "x.mha")
    with pytest.raises(ImageError, match="T1 not found"):
        load_t1(tmp_path / "missing.nii.gz")


def test_roi_bad_values(tmp_path):
    a = np.eye(4)
    cases = {
        "empty": (np.zeros(SHAPE, np.uint8), "ROI mask is empty"),
        "prob": (np.full(SHAPE, 0.5, np.float32), "ROI mask has non-integer values (e.g. 0.5)"),
        "neg": (np.full(SHAPE, -1, np.int16), "ROI labels must be 0..32767"),
        "nan": (np.full(SHAPE, np.nan, np.float32), "ROI mask has 960 NaN or infinite voxel(s)"),
    }
    for name, (arr, expected) in cases.items():
        p = save_nifti(arr, a, tmp_path / f"{name}.nii.gz")
        with pytest.raises(ImageError) as ei:
            load_roi(p)
        assert expected in str(ei.value), name
    assert load_roi(tmp_path / "empty.nii.gz", allow_empty=True).data.sum() == 0
