"""Loading T1 volumes (NIfTI or DICOM series) and ROI masks; writing NIfTI.

Everything is returned in RAS+ (closest canonical) orientation: voxel index
increases along axis 0 towards the patient's Right, axis 1 towards Anterior and
axis 2 towards Superior, as closely as the acquisition grid allows (axes are only
permuted and flipped, never resampled).

Public API
----------
- :class:`Volume`: pixel data + geometry (no patient identifiers).
- :func:`load_t1`: a ``.nii``/``.nii.gz`` file or a DICOM series folder -> float32 volume.
- :func:`load_roi`: a NIfTI label mask -> int16 volume, checked against a reference grid.
- :func:`check_same_grid`: the geometry check used by :func:`load_roi`.
- :func:`save_nifti`: atomic NIfTI writer.

Every user-facing failure is an :class:`nhb_core.errors.ImageError` (or
:class:`~nhb_core.errors.DicomError` for DICOM folders) naming the file, the
problem and the fix.

Patient identifiers
-------------------
DICOM headers are read for geometry and pixel data only. :attr:`Volume.meta`
holds a fixed allow-list of technical fields (series description and number,
manufacturer, modality, number of files); nothing else from the headers
(PatientName, PatientID, BirthDate, dates, institution, ...) is kept or put into
an error message.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nhb_core.errors import DicomError, ImageError
from nhb_core.fileio import atomic_path

#: default tolerance (mm) of :func:`load_roi` / :func:`check_same_grid`: the largest
#: allowed distance between the same voxel's centre in the two grids (checked at the
#: 8 corners of the volume, which bounds every voxel since the maps are affine).
ROI_ATOL_MM = 0.05

#: relative tolerance on DICOM slice gaps: a gap may differ from the median gap by
#: this fraction before the series counts as having inconsistent spacing.
SLICE_GAP_RTOL = 0.05

NIFTI_SUFFIXES = (".nii", ".nii.gz")

_RESAMPLE_FIX = ("Resample the mask onto the T1 grid with nearest-neighbour interpolation "
                 "(e.g. `mri_vol2vol --nearest`, ANTs `antsApplyTransforms -n NearestNeighbor`, "
                 "or draw it on this T1 in ITK-SNAP/3D Slicer)")


@dataclass
class Volume:
    """A 3D image in RAS+ (closest canonical) orientation.

    Attributes
    ----------
    data : np.ndarray, shape (X, Y, Z)
        float32 for a T1 (scanner intensities, DICOM rescale slope/intercept and
        NIfTI scl_slope/scl_inter applied), int16 for a label mask.
    affine : np.ndarray, shape (4, 4), float64
        Voxel index -> RAS+ world coordinates in mm.
    spacing : tuple of 3 floats
        Voxel size in mm along X, Y, Z.
    source : str
        The file or folder it was read from (the path given; never header content).
    meta : dict
        Safe technical facts only: ``format`` ("nifti" | "dicom"),
        ``original_axcodes`` (e.g. ``("P", "S", "R")``), and for DICOM
        ``n_files``, ``series_description``, ``series_number``, ``manufacturer``,
        ``modality``. Never patient identifiers.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def axcodes(self) -> tuple[str, str, str]:
        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- NIfTI


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=None, compresslevel: int = 6) -> Path:
    """Write ``data`` with ``affine`` as NIfTI-1 (atomic: temp file, then rename).

    The qform and sform are both set to ``affine`` (code 1, scanner). A ``.nii.gz``
    is written with a fixed gzip mtime so that equal inputs give byte-identical files.
    """
    path = Path(path)
    arr = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(arr.dtype)
    with atomic_path(path) as tmp:
        if "".join(path.suffixes[-2:]) == ".nii.gz":
            raw = img.to_bytes()
            with open(tmp, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="", compresslevel=compresslevel) as gz:
                gz.write(raw)
        else:
            nib.save(img, str(tmp))
    return path


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(sp[0]), float(sp[1]), float(sp[2]))


def _read_nifti(path: Path, what: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read a NIfTI file -> (data in RAS+, affine, original axcodes). ``what`` names it in messages."""
    fix_export = f"Export the {what} again as NIfTI (.nii or .nii.gz), e.g. with dcm2niix"
    if not path.exists():
        raise ImageError(path, f"{what} file not found", "Check the path (relative paths start at the manifest's folder)")
    if path.is_dir():
        raise ImageError(path, f"{what} is a folder, not a NIfTI file", "Give the path of a .nii or .nii.gz file")
    if path.stat().st_size == 0:
        raise ImageError(path, f"{what} file is empty (0 bytes)", fix_export)
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as fh:
            magic = fh.read(2)
        if magic != b"\x1f\x8b":
            raise ImageError(path, f"{what} file is named .gz but is not gzip-compressed (not a NIfTI file)", fix_export)
    try:
        img = nib.load(str(path), mmap=False)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ImageError(path, f"{what} file is truncated or corrupt ({_short(err)})", "Copy or export the file again") from None
    except Exception as err:  # nibabel raises ImageFileError, HeaderDataError, ValueError, OSError...
        why = _diagnose_nifti(path)
        if why:
            raise ImageError(path, f"{what} file is {why}", "Copy or export the file again") from None
        raise ImageError(path, f"cannot read the {what} as NIfTI ({_short(err, path)})", fix_export) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageError(path, f"{what} is not a NIfTI image ({type(img).__name__})", fix_export)
    hdr = img.header
    if int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        raise ImageError(path, f"{what} has no orientation (qform_code and sform_code are both 0), so left and right are unknown",
                         "Convert the scan again with a tool that records the orientation (dcm2niix), or copy the header "
                         "geometry from the T1 it was drawn on")
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise ImageError(path, f"{what} is {len(shape)}D with shape {shape}; a single 3D volume is needed",
                         "Extract one 3D volume (e.g. `fslroi in out 0 1`) or give the series' 3D T1")
    if len(shape) < 3 or min(shape) < 1:
        raise ImageError(path, f"{what} is not a 3D volume (shape {tuple(img.shape)})", "Give a 3D volume")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageError(path, f"{what} has an invalid affine (singular or not finite)", fix_export)
    try:
        raw = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ImageError(path, f"{what} file is truncated or corrupt ({_short(err)})", "Copy or export the file again") from None
    except Exception as err:
        need = int(getattr(img.dataobj, "offset", 0) or 0) + int(np.prod(img.shape)) * np.dtype(hdr.get_data_dtype()).itemsize
        why = _diagnose_nifti(path, need)
        if why:
            raise ImageError(path, f"{what} file is {why}", "Copy or export the file again") from None
        raise ImageError(path, f"cannot read the {what}'s voxel data ({_short(err, path)})", fix_export) from None
    raw = raw.reshape(shape)
    axcodes = tuple(nib.aff2axcodes(affine))
    data, affine = _to_canonical(raw, affine)
    return data, affine, axcodes


def _to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip axes to the closest RAS+ orientation (no resampling)."""
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    if np.array_equal(ornt, target):
        return data, affine
    transform = nib.orientations.ornt_transform(ornt, target)
    new = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(new), new_affine


def _short(err: BaseException, path: Path | None = None) -> str:
    msg = str(err)
    if path is not None:
        msg = msg.replace(str(path), path.name)
    msg = " ".join(msg.split()) or type(err).__name__
    return msg[:160]


def _diagnose_nifti(path: Path, need: int = 348) -> str | None:
    """Why a NIfTI file did not load, when it is truncation: 'truncated or corrupt (...)' or None.

    ``need``: the bytes a complete (uncompressed) file holds (348 = the header alone).
    """
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                n = len(fh.read())
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as err:
            return f"truncated or corrupt ({_short(err, path)})"
    else:
        n = path.stat().st_size
    if n < 348:
        return f"truncated or corrupt (only {n} bytes; a NIfTI header alone is 348)"
    if n < need:
        return f"truncated (it holds {n} bytes of the {need} its header announces)"
    return None


# ----------------------------------------------------------------------------- T1


def load_t1(path: str | os.PathLike) -> Volume:
    """Load a T1-weighted volume from a NIfTI file or a DICOM series folder.

    Parameters
    ----------
    path : path-like
        A ``.nii`` / ``.nii.gz`` file, or a folder holding the files of exactly one
        DICOM series (other files, such as a README, are ignored).

    Returns
    -------
    Volume
        ``data`` float32 of shape (X, Y, Z) in RAS+ closest canonical orientation,
        intensities with NIfTI scaling or DICOM RescaleSlope/Intercept applied;
        ``affine`` voxel -> RAS mm; ``spacing`` in mm.

    Raises
    ------
    ImageError
        Missing, unreadable, truncated, not 3D, NaN/inf voxels, constant image.
    DicomError
        A folder with no series, several series, missing/duplicated slices,
        inconsistent slice spacing, undecodable pixel data.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "T1 not found", "Check the path (relative paths start at the manifest's folder)")
    if path.is_dir():
        vol = _read_dicom_series(path)
        data = vol.data
        meta = vol.meta
        affine = vol.affine
    else:
        if not _is_nifti_name(path):
            if path.suffix.lower() in (".dcm", ".ima") or path.suffix == "":
                raise ImageError(path, "T1 is a single file, not a NIfTI image or a DICOM series folder",
                                 "Give the folder that holds all the files of the DICOM series, or a .nii/.nii.gz file")
            raise ImageError(path, f"unsupported T1 file type '{path.suffix}'",
                             "Give a NIfTI file (.nii or .nii.gz) or a DICOM series folder; convert other formats with dcm2niix")
        raw, affine, axcodes = _read_nifti(path, "T1")
        try:
            data = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError):
            raise ImageError(path, f"T1 voxel type {raw.dtype} is not numeric", "Export the T1 with a numeric voxel type") from None
        meta = {"format": "nifti", "original_axcodes": axcodes}
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ImageError(path, f"T1 has {bad} NaN or infinite voxel(s)",
                         "Replace them (e.g. by 0) or export the image again from the scanner data")
    if data.size and float(data.min()) == float(data.max()):
        raise ImageError(path, f"T1 is blank: every voxel is {float(data.min()):g}", "Give the real T1 image")
    return Volume(data=np.ascontiguousarray(data, dtype=np.float32), affine=affine, spacing=_spacing(affine),
                  source=str(path), meta=meta)


# ----------------------------------------------------------------------------- ROI


def load_roi(path: str | os.PathLike, reference: Volume | None = None, atol_mm: float = ROI_ATOL_MM,
             allow_empty: bool = False) -> Volume:
    """Load an ROI label mask (NIfTI) in RAS+ orientation, on the grid of ``reference``.

    Parameters
    ----------
    path : path-like
        ``.nii`` / ``.nii.gz`` mask. Any non-zero voxel is ROI; integer labels are
        kept as they are (e.g. 1 = left globus pallidus, 2 = right).
    reference : Volume, optional
        The T1 the mask was drawn on. When given, the mask must have the same shape
        and the same voxel -> world mapping after both are brought to RAS+.
    atol_mm : float
        Largest allowed distance (mm) between a voxel centre in the mask grid and
        in the reference grid (default :data:`ROI_ATOL_MM` = 0.05 mm).
    allow_empty : bool
        By default an all-zero mask is an error.

    Returns
    -------
    Volume
        ``data`` int16 of shape (X, Y, Z); ``affine``/``spacing`` of the mask.

    Raises
    ------
    ImageError
        Unreadable file, not 3D, non-integer / negative / NaN values, empty mask,
        or a grid that does not match ``reference``.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "ROI mask not found", "Check the path (relative paths start at the manifest's folder)")
    if not _is_nifti_name(path) and not path.is_dir():
        raise ImageError(path, f"unsupported ROI file type '{path.suffix}'", "Give the mask as a NIfTI file (.nii or .nii.gz)")
    raw, affine, axcodes = _read_nifti(path, "ROI mask")
    if raw.dtype.kind not in "biuf":
        raise ImageError(path, f"ROI voxel type {raw.dtype} is not numeric", "Save the mask with an integer voxel type")
    if raw.dtype.kind == "f":
        finite = np.isfinite(raw)
        if not finite.all():
            raise ImageError(path, f"ROI mask has {int(raw.size - finite.sum())} NaN or infinite voxel(s)",
                             "Save the mask with integer labels (0 = background)")
        frac = raw != np.round(raw)
        if frac.any():
            example = float(raw[frac].flat[0])
            raise ImageError(path, f"ROI mask has non-integer values (e.g. {example:g}); it looks like a probability "
                             "map or a mask resampled with linear interpolation",
                             "Threshold it, or resample it with nearest-neighbour interpolation, and save integer labels")
    if raw.size and (raw.min() < 0 or raw.max() > np.iinfo(np.int16).max):
        raise ImageError(path, f"ROI labels must be 0..32767 (found {raw.min():g}..{raw.max():g})",
                         "Save the mask with 0 = background and positive integer labels")
    data = np.ascontiguousarray(raw, dtype=np.int16)
    vol = Volume(data=data, affine=affine, spacing=_spacing(affine), source=str(path),
                 meta={"format": "nifti", "original_axcodes": axcodes})
    if reference is not None:
        check_same_grid(vol, reference, atol_mm=atol_mm)
    if not allow_empty and not data.any():
        raise ImageError(path, "ROI mask is empty (every voxel is 0)",
                         "Draw the region (e.g. the globus pallidus) on this subject's T1 and save it")
    return vol


def check_same_grid(roi: Volume, reference: Volume, atol_mm: float = ROI_ATOL_MM) -> None:
    """Raise :class:`ImageError` (naming ``roi.source``) unless both volumes share one grid.

    Same shape in RAS+, and every voxel centre within ``atol_mm`` mm (checked at the
    8 corners of the grid, which bounds all voxels since both maps are affine).
    """
    ref_name = Path(reference.source).name if reference.source else "the T1"
    if roi.data.shape != reference.data.shape:
        raise ImageError(roi.source, f"ROI mask shape {tuple(roi.data.shape)} differs from the T1 shape "
                         f"{tuple(reference.data.shape)} of {ref_name} (both in RAS+ orientation)", _RESAMPLE_FIX)
    corners = np.array([[i, j, k, 1.0] for i in (0, roi.data.shape[0] - 1) for j in (0, roi.data.shape[1] - 1)
                        for k in (0, roi.data.shape[2] - 1)]).T
    dist = np.linalg.norm((roi.affine @ corners - reference.affine @ corners)[:3], axis=0)
    worst = float(dist.max())
    if not np.isfinite(worst) or worst > atol_mm:
        raise ImageError(roi.source, f"ROI mask is not on the T1 grid of {ref_name}: voxel positions differ by up to "
                         f"{worst:.3g} mm (tolerance {atol_mm:g} mm)", _RESAMPLE_FIX)


# ----------------------------------------------------------------------------- DICOM

#: header fields copied into Volume.meta (an allow-list; nothing identifying)
_SAFE_DICOM_META = {"SeriesDescription": "series_description", "SeriesNumber": "series_number",
                    "Manufacturer": "manufacturer", "Modality": "modality"}

_SKIP_NAMES = {"dicomdir"}


def _dicom_candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower() not in _SKIP_NAMES)


def _read_header(p: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(p), stop_before_pixels=True)
    except InvalidDicomError:
        if p.suffix.lower() in (".dcm", ".ima"):
            # some exports omit the 128-byte preamble; only then try harder
            try:
                ds = pydicom.dcmread(str(p), stop_before_pixels=True, force=True)
            except Exception:
                raise DicomError(p, "file is named .dcm but is not readable DICOM", "Remove it from the series folder") from None
            if "Rows" in ds:
                return ds
            raise DicomError(p, "file is named .dcm but is not readable DICOM", "Remove it from the series folder")
        return None
    except Exception as err:
        if p.suffix.lower() in (".dcm", ".ima"):
            raise DicomError(p, f"DICOM file is truncated or corrupt ({_short(err)})", "Copy the series again from PACS") from None
        return None


def _floats(ds, key: str, n: int, fname: str, folder: Path) -> np.ndarray:
    val = ds.get(key)
    try:
        arr = np.array([float(v) for v in val], dtype=np.float64)
    except Exception:
        arr = None
    if arr is None or arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise DicomError(folder, f"{fname} has no valid {key}",
                         "Export the series as classic single-frame DICOM from the scanner or PACS, or convert it with dcm2niix")
    return arr


def _read_dicom_series(folder: Path) -> Volume:
    """Assemble one DICOM series folder into a RAS+ float32 volume (see :func:`load_t1`)."""
    fix_pacs = "Export the complete series again from the scanner or PACS"
    headers = []
    for p in _dicom_candidates(folder):
        ds = _read_header(p)
        if ds is None:
            continue  # not DICOM (README, notes, ...)
        if "Rows" not in ds or "Columns" not in ds:
            sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
            if sop is not None and "Image Storage" in getattr(sop, "name", ""):
                raise DicomError(folder, f"{p.name} is truncated or corrupt (an image file without image header)",
                                 "Copy the series again from the scanner or PACS")
            continue  # a non-image DICOM object (DICOMDIR, structured report, ...)
        headers.append((p, ds))
    if not headers:
        sub = [d.name for d in sorted(folder.iterdir()) if d.is_dir()][:5] if folder.is_dir() else []
        hint = f" (sub-folders: {', '.join(sub)})" if sub else ""
        raise DicomError(folder, f"folder holds no DICOM image files{hint}",
                         "Point to the folder that directly contains the series' DICOM files, or to a NIfTI file")
    # one series only
    series: dict[str, list] = {}
    for p, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append((p, ds))
    if len(series) > 1:
        parts = []
        for _uid, items in sorted(series.items(), key=lambda kv: (str(kv[1][0][1].get("SeriesNumber", "")), kv[0])):
            ds0 = items[0][1]
            desc = str(ds0.get("SeriesDescription", "") or "no description")
            parts.append(f"series {ds0.get('SeriesNumber', '?')} '{desc}' ({len(items)} files)")
        raise DicomError(folder, f"folder holds {len(series)} DICOM series: {'; '.join(parts)}",
                         "Put each series in its own folder and point the manifest to the T1 series folder")
    items = next(iter(series.values()))
    ds0 = items[0][1]
    n_frames = int(ds0.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        raise DicomError(folder, f"multi-frame (enhanced) DICOM with {n_frames} frames in one file is not supported",
                         "Convert the series to NIfTI with dcm2niix and give the .nii.gz file")
    if len(items) < 2:
        raise DicomError(folder, "series has only 1 slice; a 3D T1 needs several",
                         "Give the folder of the 3D T1 series (or a NIfTI file)")
    # geometry per slice
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    iop0 = _floats(ds0, "ImageOrientationPatient", 6, items[0][0].name, folder)
    ps0 = _floats(ds0, "PixelSpacing", 2, items[0][0].name, folder)
    positions = []
    for p, ds in items:
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise DicomError(folder, f"slices have different sizes ({rows}x{cols} and {int(ds.Rows)}x{int(ds.Columns)} in {p.name})",
                             "Put only the files of one 3D series in the folder")
        iop = _floats(ds, "ImageOrientationPatient", 6, p.name, folder)
        if np.abs(iop - iop0).max() > 1e-4:
            raise DicomError(folder, f"slices have different orientations ({p.name}); this looks like a localizer or a mixed series",
                             "Put only the files of one 3D series in the folder")
        ps = _floats(ds, "PixelSpacing", 2, p.name, folder)
        if np.abs(ps - ps0).max() > 1e-4:
            raise DicomError(folder, f"slices have different pixel spacings ({p.name})", "Put only the files of one 3D series in the folder")
        positions.append(_floats(ds, "ImagePositionPatient", 3, p.name, folder))
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1) > 1e-3 or abs(float(row_dir @ col_dir)) > 1e-3:
        raise DicomError(folder, "ImageOrientationPatient is not two orthogonal unit vectors", fix_pacs)
    positions = np.array(positions)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    items = [items[i] for i in order]
    positions = positions[order]
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise DicomError(folder, f"duplicated slice: {items[i][0].name} and {items[i + 1][0].name} are both at position "
                         f"{dist[i]:.2f} mm along the slice normal ({dup.size} duplicate(s) in all; several echoes or a repeated acquisition?)",
                         "Keep one file per slice position (one echo, one acquisition) in the folder")
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > SLICE_GAP_RTOL * step)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / step
        if abs(ratio - round(ratio)) <= SLICE_GAP_RTOL * 2 and round(ratio) >= 2:
            n_missing = int(sum(round(g / step) - 1 for g in gaps[bad] if round(g / step) >= 2))
            raise DicomError(folder, f"missing slice(s): a gap of {gaps[i]:.2f} mm between {items[i][0].name} and "
                             f"{items[i + 1][0].name} where the slice spacing is {step:.2f} mm (about {n_missing} slice(s) missing)",
                             fix_pacs)
        raise DicomError(folder, f"inconsistent slice spacing: gaps between slices range from {gaps.min():.2f} to "
                         f"{gaps.max():.2f} mm (first odd gap between {items[i][0].name} and {items[i + 1][0].name})",
                         "Export the series again; a volume needs evenly spaced slices (or convert it with dcm2niix)")
    slice_vec = (positions[-1] - positions[0]) / (len(items) - 1)
    off_normal = slice_vec - (slice_vec @ normal) * normal
    if np.linalg.norm(off_normal) > 0.01 * step + 1e-3:
        raise DicomError(folder, "slices are sheared (gantry tilt or positions not along the slice normal)",
                         "Convert the series with dcm2niix, which corrects gantry tilt, and give the NIfTI file")
    # pixel data
    import pydicom

    stack = np.empty((cols, rows, len(items)), dtype=np.float32)
    for k, (p, _ds) in enumerate(items):
        try:
            full = pydicom.dcmread(str(p), force=True)
            px = full.pixel_array
        except Exception as err:
            ts = ""
            try:
                ts = f" (transfer syntax {full.file_meta.TransferSyntaxUID.name})"  # type: ignore[possibly-undefined]
            except Exception:
                pass
            raise DicomError(folder, f"cannot decode the pixel data of {p.name}{ts}: {_short(err)}",
                             "Convert the series with dcm2niix, or decompress it (gdcmconv --raw), and try again") from None
        if px.shape != (rows, cols):
            raise DicomError(folder, f"{p.name} has pixel data of shape {px.shape}, not {rows}x{cols}", fix_pacs)
        slope = float(full.get("RescaleSlope", 1) or 1)
        inter = float(full.get("RescaleIntercept", 0) or 0)
        sl = px.astype(np.float32)
        if slope != 1 or inter != 0:
            sl = sl * np.float32(slope) + np.float32(inter)
        stack[:, :, k] = sl.T  # i runs along a row (columns index), j down the rows
    # voxel (i, j, k) -> LPS: IPP0 + i*col_spacing*row_dir + j*row_spacing*col_dir + k*slice_vec
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps0[1]
    lps[:3, 1] = col_dir * ps0[0]
    lps[:3, 2] = slice_vec
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    axcodes = tuple(nib.aff2axcodes(affine))
    data, affine = _to_canonical(stack, affine)
    meta: dict[str, Any] = {"format": "dicom", "original_axcodes": axcodes, "n_files": len(items)}
    for tag, key in _SAFE_DICOM_META.items():
        val = ds0.get(tag)
        if val not in (None, ""):
            meta[key] = int(val) if tag == "SeriesNumber" else str(val)
    return Volume(data=data, affine=affine, spacing=_spacing(affine), source=str(folder), meta=meta)
