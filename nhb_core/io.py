"""Loading T1 volumes (NIfTI or DICOM series) and ROI masks; writing NIfTI.

Everything is returned in RAS+ (closest canonical) orientation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from nhb_core.fileio import atomic_path


@dataclass
class Volume:
    """A 3D image in RAS+ orientation.

    data : np.ndarray, shape (X, Y, Z); float32 for T1, int16 for label masks
    affine : np.ndarray, shape (4, 4); voxel index -> RAS world coordinates in mm
    spacing : tuple of 3 floats, voxel size in mm along X, Y, Z
    source : str, the file or folder it was read from
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str = ""


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=None) -> Path:
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
            import gzip

            raw = img.to_bytes()
            with open(tmp, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="", compresslevel=6) as gz:
                gz.write(raw)
        else:
            nib.save(img, str(tmp))
    return path
