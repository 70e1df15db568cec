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
        return tuple(nib.aff2axcodes(self.affine))


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
    _check_nifti_header_size(path, what)
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


#: largest NIfTI vox_offset (header + extensions) read before the voxels
_MAX_NIFTI_OFFSET = 16 << 20


def _check_nifti_header_size(path: Path, what: str) -> None:
    """Check the shape and voxel type a NIfTI header declares against the limits
    (``nhb_core.safety``) before nibabel reads anything past the header."""
    import struct

    from nhb_core.safety import check_image_size

    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(540)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
        return  # nibabel's own error path reports it
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", head[70:74])
            offset = struct.unpack(endian + "f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "hh", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return  # not a NIfTI header: nibabel says so
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        return
    shape = tuple(max(int(d), 0) for d in dims[1:1 + ndim])
    check_image_size(path, shape, max(int(bitpix), 8) // 8, what)
    if not (offset == offset) or offset > _MAX_NIFTI_OFFSET:
        raise ImageError(path, f"{what} header declares {offset:.0f} bytes of header extensions before the voxels",
                         "Export the image again as plain NIfTI (e.g. with dcm2niix)")


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
        from nhb_core.safety import count_limited, max_image_bytes

        try:
            with gzip.open(path, "rb") as fh:
                # a running count (never the whole stream in memory), bounded by the image limits
                n = count_limited(fh, max(need, max_image_bytes() + _MAX_NIFTI_OFFSET))
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
    bad = sum(int(data[i:i + 16].size - np.count_nonzero(np.isfinite(data[i:i + 16])))  # slabs: no full-size mask
              for i in range(0, data.shape[0], 16)) if data.ndim else int(not np.isfinite(data))
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
        # checked a slab at a time: no full-size temporaries next to a large float mask
        n_bad = sum(int(raw[i:i + 16].size - np.count_nonzero(np.isfinite(raw[i:i + 16])))
                    for i in range(0, raw.shape[0], 16))
        if n_bad:
            raise ImageError(path, f"ROI mask has {n_bad} NaN or infinite voxel(s)",
                             "Save the mask with integer labels (0 = background)")
        example = None
        for i in range(0, raw.shape[0], 16):
            slab = raw[i:i + 16]
            frac = slab != np.round(slab)
            if frac.any():
                example = float(slab[frac].flat[0])
                break
        if example is not None:
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


_FIX_COPY = "Copy the series again from the scanner or PACS (the file is incomplete)"


def _has_dicm_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_gzip(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _read_header(p: Path):
    """The header of one candidate file, None when it is not DICOM (a README, notes, ...).

    A file that claims to be DICOM (the ``DICM`` preamble, or a .dcm/.ima name) and does
    not read is a :class:`DicomError` naming it: silently skipping it would load the
    series one slice short.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    claims = _has_dicm_preamble(p) or p.suffix.lower() in (".dcm", ".ima")
    try:
        return pydicom.dcmread(str(p), stop_before_pixels=True)
    except InvalidDicomError:
        if claims:
            # some exports omit the 128-byte preamble; only then try harder
            try:
                ds = pydicom.dcmread(str(p), stop_before_pixels=True, force=True)
            except Exception:
                raise DicomError(p, "file looks like DICOM but is not readable DICOM (truncated or corrupt)",
                                 _FIX_COPY + ", or remove the file from the series folder") from None
            if "Rows" in ds:
                return ds
            raise DicomError(p, "file looks like DICOM but is not readable DICOM (truncated or corrupt)",
                             _FIX_COPY + ", or remove the file from the series folder") from None
        return None
    except Exception as err:
        if claims:
            raise DicomError(p, f"DICOM file is truncated or corrupt ({_short(err, p)})", _FIX_COPY) from None
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


def _series_facts(items: list) -> str:
    """What tells one series of a mixed folder from another (never patient identifiers)."""
    ds0 = items[0][1]
    desc = str(ds0.get("SeriesDescription", "") or "no description")
    facts = [f"{len(items)} files" if len(items) != 1 else "1 file"]
    t = ds0.get("AcquisitionTime") or ds0.get("SeriesTime")
    if t:
        t = str(t)
        facts.append(f"acquired {t[0:2]}:{t[2:4]}:{t[4:6]}" if len(t) >= 6 and t[:6].isdigit() else f"time {t[:16]}")
    uid = str(ds0.get("SeriesInstanceUID", "") or "")
    if uid:
        facts.append(f"UID ending {uid[-8:].lstrip('.')}")
    return f"series {ds0.get('SeriesNumber', '?')} '{desc}' ({', '.join(facts)})"


def _read_dicom_series(folder: Path) -> Volume:
    """Assemble one DICOM series folder into a RAS+ float32 volume (see :func:`load_t1`)."""
    headers = []
    candidates = _dicom_candidates(folder)
    for p in candidates:
        ds = _read_header(p)
        if ds is None:
            continue  # not DICOM (README, notes, ...)
        if "Rows" not in ds or "Columns" not in ds:
            sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
            if sop is not None and "Image Storage" in getattr(sop, "name", ""):
                raise DicomError(p, "DICOM file is truncated or corrupt (an image file without image header)",
                                 _FIX_COPY)
            continue  # a non-image DICOM object (DICOMDIR, structured report, ...)
        headers.append((p, ds))
    if not headers:
        gz = [p for p in candidates if _is_gzip(p)]
        if gz:
            raise DicomError(folder, f"folder holds {len(gz)} gzip-compressed file(s) (e.g. {gz[0].name}), "
                             "not DICOM files", "Decompress them first (e.g. `gunzip *.gz` in the folder)")
        sub = [d.name for d in sorted(folder.iterdir()) if d.is_dir()][:5] if folder.is_dir() else []
        hint = f" (sub-folders: {', '.join(sub)})" if sub else ""
        raise DicomError(folder, f"folder holds no DICOM image files{hint}",
                         "Point to the folder that directly contains the series' DICOM files, or to a NIfTI file")
    # one series only
    series: dict[str, list] = {}
    for p, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append((p, ds))
    if len(series) > 1:
        parts = [_series_facts(items) for _uid, items in
                 sorted(series.items(), key=lambda kv: (str(kv[1][0][1].get("SeriesNumber", "")), kv[0]))]
        raise DicomError(folder, f"folder holds {len(series)} DICOM series: {'; '.join(parts)}",
                         "Put each series in its own folder and point the manifest to the T1 series folder")
    items = next(iter(series.values()))
    ds0 = items[0][1]
    try:
        n_frames = int(ds0.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames > 1:
        if len(items) > 1:
            raise DicomError(folder, f"series has {len(items)} multi-frame (enhanced) files; one 3D volume is one file",
                             "Put only the enhanced file of the 3D T1 in the folder")
        frames = _enhanced_frames(folder, items[0][0], n_frames)
    else:
        if len(items) < 2:
            raise DicomError(folder, "series has only 1 slice; a 3D T1 needs several",
                             "Give the folder of the 3D T1 series (or a NIfTI file)")
        frames = _classic_frames(folder, items)
    return _assemble(folder, frames, ds0)


def _classic_frames(folder: Path, items: list) -> list[dict[str, Any]]:
    """One frame per single-frame file: name, geometry and a pixel loader."""
    import pydicom

    from nhb_core.safety import check_image_size

    ds0 = items[0][1]
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    check_image_size(folder, (rows, cols, len(items)), 4, "DICOM series")
    frames = []
    for p, ds in items:
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise DicomError(folder, f"slices have different sizes ({rows}x{cols} and {int(ds.Rows)}x{int(ds.Columns)} in {p.name})",
                             "Put only the files of one 3D series in the folder")

        def load(p: Path = p) -> tuple[np.ndarray, float, float]:
            try:
                full = pydicom.dcmread(str(p), force=True)
            except Exception as err:
                raise DicomError(p, f"DICOM file is truncated or corrupt ({_short(err, p)})", _FIX_COPY) from None
            px = _pixels(p, full)
            return px, float(full.get("RescaleSlope", 1) or 1), float(full.get("RescaleIntercept", 0) or 0)

        frames.append({"name": p.name, "rows": rows, "cols": cols,
                       "iop": _floats(ds, "ImageOrientationPatient", 6, p.name, folder),
                       "ps": _floats(ds, "PixelSpacing", 2, p.name, folder),
                       "ipp": _floats(ds, "ImagePositionPatient", 3, p.name, folder), "load": load})
    return frames


def _pixels(p: Path, full) -> np.ndarray:
    """``full.pixel_array`` with truncation told apart from undecodable compression."""
    ts = getattr(getattr(full, "file_meta", None), "TransferSyntaxUID", None)
    compressed = bool(getattr(ts, "is_compressed", False))
    if "PixelData" not in full:
        raise DicomError(p, "DICOM file is truncated (it has no pixel data)", _FIX_COPY)
    if not compressed:
        try:
            need = int(full.Rows) * int(full.Columns) * int(full.get("NumberOfFrames", 1) or 1) * \
                int(full.get("SamplesPerPixel", 1) or 1) * (int(full.BitsAllocated) // 8)
            have = len(full.PixelData)
        except Exception:  # noqa: BLE001 - the decoder below reports it
            need = have = 0
        if have < need:
            raise DicomError(p, f"DICOM file is truncated: its pixel data holds {have} of the {need} bytes "
                             "its header announces", _FIX_COPY)
    try:
        return full.pixel_array
    except Exception as err:
        name = f" (transfer syntax {ts.name})" if ts is not None else ""
        msg = _short(err, p)
        if any(w in msg.lower() for w in ("truncat", "end of file", "eof", "shorter", "not enough", "expected")):
            raise DicomError(p, f"DICOM file is truncated: its pixel data cannot be read{name} ({msg})",
                             _FIX_COPY) from None
        raise DicomError(p, f"cannot decode the pixel data{name}: {msg}",
                         "Convert the series with dcm2niix, or decompress it (gdcmconv --raw), and try again") from None


def _fg_item(per, shared, seq: str):
    """Item 0 of functional group ``seq`` from the per-frame group, else the shared one."""
    for grp in (per, shared):
        if grp is not None and seq in grp and len(grp[seq].value):
            return grp[seq].value[0]
    return None


def _enhanced_frames(folder: Path, p: Path, n_frames: int) -> list[dict[str, Any]]:
    """The frames of one enhanced (multi-frame) MR file, from its functional groups.

    Geometry per frame: PlanePositionSequence / PlaneOrientationSequence / PixelMeasuresSequence
    and rescale from PixelValueTransformationSequence (per-frame, else shared), as dcm2niix reads them.
    """
    import pydicom

    from nhb_core.safety import check_image_size

    try:
        head = pydicom.dcmread(str(p), stop_before_pixels=True)
    except Exception as err:
        raise DicomError(p, f"DICOM file is truncated or corrupt ({_short(err, p)})", _FIX_COPY) from None
    rows, cols = int(head.Rows), int(head.Columns)
    check_image_size(p, (cols, rows, n_frames), 4, "enhanced DICOM file")
    shared_seq = head.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_seq = head.get("PerFrameFunctionalGroupsSequence")
    if per_seq is None or len(per_seq) != n_frames:
        raise DicomError(p, f"enhanced DICOM file has {0 if per_seq is None else len(per_seq)} per-frame geometry "
                         f"items for {n_frames} frames", "Convert it with dcm2niix and give the NIfTI file")
    cache: dict[str, Any] = {}

    def pixels() -> np.ndarray:
        if "px" not in cache:
            try:
                full = pydicom.dcmread(str(p))
            except Exception as err:
                raise DicomError(p, f"DICOM file is truncated or corrupt ({_short(err, p)})", _FIX_COPY) from None
            px = _pixels(p, full)
            if px.shape != (n_frames, rows, cols):
                raise DicomError(p, f"pixel data of shape {px.shape}, not {n_frames}x{rows}x{cols}",
                                 "Convert it with dcm2niix and give the NIfTI file")
            cache["px"] = px
        return cache["px"]

    frames = []
    for k in range(n_frames):
        per = per_seq[k]
        name = f"{p.name} frame {k + 1}"
        pos = _fg_item(per, shared, "PlanePositionSequence")
        ori = _fg_item(per, shared, "PlaneOrientationSequence")
        mea = _fg_item(per, shared, "PixelMeasuresSequence")
        if pos is None or ori is None or mea is None:
            raise DicomError(p, f"enhanced DICOM frame {k + 1} has no plane position, orientation or pixel spacing",
                             "Convert it with dcm2niix and give the NIfTI file")
        tr = _fg_item(per, shared, "PixelValueTransformationSequence")
        slope = float(tr.get("RescaleSlope", 1) or 1) if tr is not None else 1.0
        inter = float(tr.get("RescaleIntercept", 0) or 0) if tr is not None else 0.0

        def load(k: int = k, slope: float = slope, inter: float = inter) -> tuple[np.ndarray, float, float]:
            return pixels()[k], slope, inter

        frames.append({"name": name, "rows": rows, "cols": cols,
                       "iop": _floats(ori, "ImageOrientationPatient", 6, name, p),
                       "ps": _floats(mea, "PixelSpacing", 2, name, p),
                       "ipp": _floats(pos, "ImagePositionPatient", 3, name, p), "load": load})
    return frames


def _assemble(folder: Path, frames: list[dict[str, Any]], ds0) -> Volume:
    """Sort frames along the slice normal, check the spacing, stack the pixels; RAS+ volume."""
    fix_pacs = "Export the complete series again from the scanner or PACS"
    rows, cols = frames[0]["rows"], frames[0]["cols"]
    iop0, ps0 = frames[0]["iop"], frames[0]["ps"]
    if len(frames) < 2:
        raise DicomError(folder, "series has only 1 slice; a 3D T1 needs several",
                         "Give the folder of the 3D T1 series (or a NIfTI file)")
    for f in frames:
        if np.abs(f["iop"] - iop0).max() > 1e-4:
            raise DicomError(folder, f"slices have different orientations ({f['name']}); this looks like a localizer or a mixed series",
                             "Put only the files of one 3D series in the folder")
        if np.abs(f["ps"] - ps0).max() > 1e-4:
            raise DicomError(folder, f"slices have different pixel spacings ({f['name']})", "Put only the files of one 3D series in the folder")
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1) > 1e-3 or abs(float(row_dir @ col_dir)) > 1e-3:
        raise DicomError(folder, "ImageOrientationPatient is not two orthogonal unit vectors", fix_pacs)
    positions = np.array([f["ipp"] for f in frames])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    frames = [frames[i] for i in order]
    positions = positions[order]
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise DicomError(folder, f"duplicated slice: {frames[i]['name']} and {frames[i + 1]['name']} are both at position "
                         f"{dist[i]:.2f} mm along the slice normal ({dup.size} duplicate(s) in all; several echoes or a repeated acquisition?)",
                         "Keep one file per slice position (one echo, one acquisition) in the folder")
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > SLICE_GAP_RTOL * step)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / step
        if abs(ratio - round(ratio)) <= SLICE_GAP_RTOL * 2 and round(ratio) >= 2:
            n_missing = int(sum(round(g / step) - 1 for g in gaps[bad] if round(g / step) >= 2))
            raise DicomError(folder, f"missing slice(s): a gap of {gaps[i]:.2f} mm between {frames[i]['name']} and "
                             f"{frames[i + 1]['name']} where the slice spacing is {step:.2f} mm (about {n_missing} slice(s) missing)",
                             fix_pacs)
        raise DicomError(folder, f"inconsistent slice spacing: gaps between slices range from {gaps.min():.2f} to "
                         f"{gaps.max():.2f} mm (first odd gap between {frames[i]['name']} and {frames[i + 1]['name']})",
                         "Export the series again; a volume needs evenly spaced slices (or convert it with dcm2niix)")
    slice_vec = (positions[-1] - positions[0]) / (len(frames) - 1)
    off_normal = slice_vec - (slice_vec @ normal) * normal
    if np.linalg.norm(off_normal) > 0.01 * step + 1e-3:
        raise DicomError(folder, "slices are sheared (gantry tilt or positions not along the slice normal)",
                         "Convert the series with dcm2niix, which corrects gantry tilt, and give the NIfTI file")
    # pixel data
    stack = np.empty((cols, rows, len(frames)), dtype=np.float32)
    for k, f in enumerate(frames):
        px, slope, inter = f["load"]()
        if px.shape != (rows, cols):
            raise DicomError(folder, f"{f['name']} has pixel data of shape {px.shape}, not {rows}x{cols}", fix_pacs)
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
    meta: dict[str, Any] = {"format": "dicom", "original_axcodes": axcodes, "n_files": len(frames)}
    if int(ds0.get("NumberOfFrames", 1) or 1) > 1:
        meta["n_files"] = 1
        meta["n_frames"] = len(frames)
    for tag, key in _SAFE_DICOM_META.items():
        val = ds0.get(tag)
        if val not in (None, ""):
            meta[key] = int(val) if tag == "SeriesNumber" else str(val)
    return Volume(data=data, affine=affine, spacing=_spacing(affine), source=str(folder), meta=meta)
