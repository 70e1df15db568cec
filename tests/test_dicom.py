"""DICOM series loading: the real Siemens series in ../shared against dcm2niix, and broken series."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nhb_core.errors import DicomError, ImageError
from nhb_core.io import load_roi, load_t1, save_nifti

SERIES = "data/dicom/siemens_t1"
# reference values recorded in ../shared/data/dicom/siemens_t1/README.md (dcm2niix v1.0.20220720 + nibabel)
REF_AFFINE = np.array([[0, 0, 4.799995, -81.599846], [-1.015625, 0, 0, 130.0], [0, 1.015625, 0, -128.984375], [0, 0, 0, 1]])
REF_CANON_AFFINE = np.array([[4.799995, 0, 0, -81.599846], [0, 1.015625, 0, -128.984375],
                             [0, 0, 1.015625, -128.984375], [0, 0, 0, 1]])
REF_SUM = 516841282
REF_SHA = "17ca8aa23ba0728e3849dcab5cc7ed3eb9da90fc0310cb53cb95cb5aabf1eeaa"
PATIENT_STRINGS = ("crlab",)  # PatientID of the shared series (PatientName 'HFS' is also the PatientPosition)


def write_series(folder: Path, n: int = 6, rows: int = 8, cols: int = 7, spacing: float = 2.5, positions=None,
                 series_uid: str | None = None, series_number: int = 5, description: str = "t1_mprage",
                 iop=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.9, 1.1), slope=None, intercept=None,
                 patient_name: str = "Doe^Jane", patient_id: str = "PID-123456", seed: int = 0,
                 start: int = 0) -> list[Path]:
    """Synthesise a tiny single-frame MR series (uint16) with pydicom; returns the files written."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    rng = np.random.default_rng(seed)
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    if positions is None:
        positions = [k * spacing for k in range(n)]
    files = []
    for k, d in enumerate(positions):
        ipp = np.array([-10.0, -20.0, 5.0]) + d * normal
        meta = FileMetaDataset()
        uid = generate_uid()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = uid
        ds.Modality = "MR"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "20240101"
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3.4"
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = start + k + 1
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = spacing
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if slope is not None:
            ds.RescaleSlope = slope
        if intercept is not None:
            ds.RescaleIntercept = intercept
        px = rng.integers(1, 1000, size=(rows, cols), dtype=np.uint16)
        ds.PixelData = px.tobytes()
        f = folder / f"IM{start + k + 1:04d}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
    return files


def _pixels(f: Path) -> np.ndarray:
    import pydicom

    return pydicom.dcmread(f).pixel_array


# ------------------------------------------------------------------ the real series


def test_shared_series_matches_dcm2niix(shared_dir):
    folder = shared_dir / SERIES
    if not folder.is_dir():
        pytest.skip("shared DICOM series absent")
    vol = load_t1(folder)
    assert vol.data.dtype == np.float32
    assert vol.shape == (35, 256, 256)  # after as_closest_canonical
    assert vol.axcodes == ("R", "A", "S")
    np.testing.assert_allclose(vol.spacing, (4.8, 1.015625, 1.015625), atol=1e-4)
    np.testing.assert_allclose(vol.affine, REF_CANON_AFFINE, atol=1e-3)
    assert float(vol.data.sum(dtype=np.float64)) == REF_SUM
    assert float(vol.data.min()) == 0 and float(vol.data.max()) == 1948
    assert int(np.count_nonzero(vol.data)) == 2144383
    # put it back in dcm2niix's voxel order (P S R) and compare the bytes with the recorded hash
    o = nib.orientations
    t = o.ornt_transform(o.io_orientation(vol.affine), o.io_orientation(REF_AFFINE))
    d = o.apply_orientation(vol.data, t)
    aff = vol.affine @ o.inv_ornt_aff(t, vol.data.shape)
    assert d.shape == (256, 256, 35)
    assert tuple(nib.aff2axcodes(aff)) == ("P", "S", "R")
    np.testing.assert_allclose(aff, REF_AFFINE, atol=1e-3)
    assert d[128, 128, 17] == 649
    assert np.isclose(d.mean(dtype=np.float64), 225.32491716657367) and np.isclose(d.std(dtype=np.float64), 331.75642560592985)
    assert hashlib.sha256(np.ascontiguousarray(d.astype(np.int16)).tobytes()).hexdigest() == REF_SHA
    # the README in the folder is ignored; only technical, non-identifying metadata is kept
    assert vol.meta["n_files"] == 35 and vol.meta["series_description"] == "t1_fl2d_sag"
    assert vol.meta["original_axcodes"] == ("P", "I", "R")
    text = repr(vol.meta) + vol.source
    assert not any(s in text for s in PATIENT_STRINGS)


def test_shared_series_missing_and_two_series(shared_dir, tmp_path):
    import pydicom

    folder = shared_dir / SERIES
    if not folder.is_dir():
        pytest.skip("shared DICOM series absent")
    files = sorted(folder.glob("*.dcm"))
    gap = tmp_path / "gap"
    gap.mkdir()
    for f in files:
        if not f.name.startswith("0018_"):
            shutil.copy(f, gap / f.name)
    with pytest.raises(DicomError) as ei:
        load_t1(gap)
    msg = str(ei.value)
    assert "missing slice(s): a gap of 9.60 mm" in msg and "spacing is 4.80 mm (about 1 slice(s) missing)" in msg
    assert "crlab" not in msg
    two = tmp_path / "two"
    two.mkdir()
    for f in files[:5]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"
        ds.SeriesNumber = 99
        ds.SeriesDescription = "localizer"
        ds.save_as(two / f.name)
    for f in files[5:]:
        shutil.copy(f, two / f.name)
    with pytest.raises(DicomError) as ei:
        load_t1(two)
    msg = str(ei.value)
    assert re.search(r"folder holds 2 DICOM series: series 3 't1_fl2d_sag' \(30 files, acquired [0-9:]+, UID ending "
                     r"[0-9.]+\); series 99 'localizer' \(5 files, ", msg), msg
    assert "crlab" not in msg


# ------------------------------------------------------------------ synthetic series


def test_synthetic_series_geometry_and_rescale(tmp_path):
    files = write_series(tmp_path / "s", n=5, slope=2.0, intercept=-10.0)
    vol = load_t1(tmp_path / "s")
    # axial IOP (1,0,0,0,1,0): i -> L, j -> P, k -> S in LPS; RAS canonical flips i and j
    assert vol.meta["original_axcodes"] == ("L", "P", "S")
    assert vol.shape == (7, 8, 5)
    np.testing.assert_allclose(vol.spacing, (1.1, 0.9, 2.5))
    px = [_pixels(f).astype(np.float32) * 2 - 10 for f in files]  # (rows, cols)
    for k in range(5):
        # RAS voxel (x, y, k) = DICOM column (cols-1-x), row (rows-1-y)
        np.testing.assert_array_equal(vol.data[:, :, k], px[k][::-1, ::-1].T)
    # world position of voxel (0,0,0): DICOM pixel (row 7, col 6) of slice 0 in LPS, negated x,y
    ipp = np.array([-10.0, -20.0, 5.0])
    lps = ipp + 6 * 1.1 * np.array([1, 0, 0]) + 7 * 0.9 * np.array([0, 1, 0])
    np.testing.assert_allclose(vol.affine[:3, 3], [-lps[0], -lps[1], lps[2]])
    np.testing.assert_allclose(np.diag(vol.affine)[:3], [1.1, 0.9, 2.5])
    for f in files:
        f.rename(f.with_name(f"{f.stem[::-1]}"))  # file names and order do not matter
    vol2 = load_t1(tmp_path / "s")
    np.testing.assert_array_equal(vol2.data, vol.data)


def test_no_patient_identifiers_anywhere(tmp_path):
    write_series(tmp_path / "s", n=4, patient_name="Secret^Person", patient_id="ID-987")
    vol = load_t1(tmp_path / "s")
    blob = repr(vol.meta) + vol.source + repr(vars(vol).keys())
    assert "Secret" not in blob and "ID-987" not in blob and "20240101" not in blob
    write_series(tmp_path / "s", n=2, series_number=7, description="other", patient_name="Secret^Person", start=10)
    with pytest.raises(DicomError) as ei:
        load_t1(tmp_path / "s")
    assert "Secret" not in str(ei.value) and "ID-987" not in str(ei.value)


@pytest.mark.parametrize("positions, expected", [
    ([0, 2.5, 5, 10, 12.5], "missing slice(s): a gap of 5.00 mm between IM0003.dcm and IM0004.dcm"),
    ([0, 2.5, 5, 5, 7.5], "duplicated slice: IM0003.dcm and IM0004.dcm are both at position 10.00 mm"),
    ([0, 2.5, 5, 8.2, 10.7], "inconsistent slice spacing: gaps between slices range from 2.50 to 3.20 mm"),
])
def test_bad_slice_positions(tmp_path, positions, expected):
    write_series(tmp_path / "s", positions=positions)
    with pytest.raises(DicomError) as ei:
        load_t1(tmp_path / "s")
    assert expected in str(ei.value)
    assert str(ei.value).startswith(str(tmp_path / "s") + ": ")


def test_other_dicom_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(DicomError, match=r"folder holds no DICOM image files \(sub-folders: sub\)"):
        load_t1(empty)
    one = tmp_path / "one"
    write_series(one, n=1)
    with pytest.raises(DicomError, match="series has only 1 slice"):
        load_t1(one)
    mixed = tmp_path / "mixed"
    write_series(mixed, n=3)
    import pydicom

    f = sorted(mixed.glob("*.dcm"))[1]
    ds = pydicom.dcmread(f)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(f)
    with pytest.raises(DicomError, match="slices have different orientations"):
        load_t1(mixed)
    trunc = tmp_path / "trunc"
    files = write_series(trunc, n=3)
    files[1].write_bytes(files[1].read_bytes()[:200])
    with pytest.raises(ImageError) as ei:
        load_t1(trunc)
    assert "IM0002.dcm" in str(ei.value)
    single = tmp_path / "single" / "IM0001.dcm"
    write_series(single.parent, n=2)
    with pytest.raises(ImageError, match="single file, not a NIfTI image or a DICOM series folder"):
        load_t1(single)


def test_roi_on_dicom_t1(tmp_path):
    write_series(tmp_path / "s", n=5)
    t1 = load_t1(tmp_path / "s")
    roi = np.zeros(t1.shape, np.uint8)
    roi[1:3, 2:4, 2] = 1
    roi[4:6, 2:4, 2] = 2
    save_nifti(roi, t1.affine, tmp_path / "roi.nii.gz")
    m = load_roi(tmp_path / "roi.nii.gz", reference=t1)
    assert set(np.unique(m.data)) == {0, 1, 2}
    # the same mask stored in the scanner's LPS voxel order still matches after reorientation
    o = nib.orientations
    t = o.ornt_transform(o.axcodes2ornt(("R", "A", "S")), o.axcodes2ornt(("L", "P", "S")))
    save_nifti(o.apply_orientation(roi, t), t1.affine @ o.inv_ornt_aff(t, roi.shape), tmp_path / "roi_lps.nii.gz")
    m2 = load_roi(tmp_path / "roi_lps.nii.gz", reference=t1)
    np.testing.assert_array_equal(m2.data, m.data)


def test_manifest_with_shared_dicom_t1(shared_dir, tmp_path):
    """A manifest row whose t1 is the real DICOM folder and whose ROI was drawn on it validates."""
    from nhb_core.manifest import validate_manifest

    folder = shared_dir / SERIES
    if not folder.is_dir():
        pytest.skip("shared DICOM series absent")
    t1 = load_t1(folder)
    roi = np.zeros(t1.shape, np.uint8)
    roi[10:12, 120:124, 120:124] = 1
    roi[22:24, 120:124, 120:124] = 2
    save_nifti(roi, t1.affine, tmp_path / "roi.nii.gz")
    save_nifti(roi[:, :, :-1], t1.affine, tmp_path / "roi_bad.nii.gz")
    (tmp_path / "manifest.csv").write_text(
        "subject_id,center,t1,roi,label\n"
        f"D1,A,{folder},roi.nii.gz,1\n"
        f"D2,A,{folder},roi_bad.nii.gz,0\n")
    rep = validate_manifest(tmp_path / "manifest.csv")
    assert [p.row for p in rep.problems] == [3]
    assert "ROI mask shape (35, 256, 255) differs from the T1 shape (35, 256, 256) of siemens_t1" in rep.problems[0].problem
    assert [w.row for w in rep.warnings] == [3]  # the same T1 on two rows
    assert all("crlab" not in p.line() for p in rep.problems + rep.warnings)
