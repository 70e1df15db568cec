"""Geometry and images: the crop placed back on the full slice, display orientation, grayscale,
the CAM overlay PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from nhb_core.errors import InputError

# ---------------------------------------------------------------------------------------------
# geometry and images


def _geometry_matrix(crop_geometry: dict[str, Any], crop_hw: tuple[int, int]) -> np.ndarray:
    """2 x 3 affine: slice pixel (row, col, 1) -> crop pixel (i, j), pixel centres at integers."""
    if "matrix" in crop_geometry:
        A = np.asarray(crop_geometry["matrix"], dtype=np.float64)
        if A.shape != (2, 3):
            raise InputError(None, f"crop geometry matrix has shape {A.shape}, expected (2, 3)", "Use crop_geometry()")
        size = crop_geometry.get("size")
        if size is not None and int(size) != crop_hw[0]:
            # the map is at another resolution than the crop: rescale crop coordinates
            f = crop_hw[0] / float(size)
            A = A * f
            A[:, 2] += (f - 1) / 2
        return A
    try:
        row0, col0 = float(crop_geometry["row0"]), float(crop_geometry["col0"])
        rows, cols = float(crop_geometry["rows"]), float(crop_geometry["cols"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(None, f"crop geometry lacks {exc}", "Give matrix, or row0, col0, rows and cols") from None
    h, w = crop_hw
    return np.array([[h / rows, 0.0, (0.5 - row0) * h / rows - 0.5],
                     [0.0, w / cols, (0.5 - col0) * w / cols - 0.5]])


def paste_back(cam_crop: np.ndarray, crop_geometry: dict[str, Any], slice_shape: tuple[int, int]) -> np.ndarray:
    """Place a crop-space map on the full slice.

    Parameters
    ----------
    cam_crop : np.ndarray, shape [h, w]
        The map at crop resolution.
    crop_geometry : dict
        How the crop was cut from the slice, either as returned by :func:`crop_geometry`
        (``matrix``: a 2 x 3 affine taking a slice pixel ``(row, col, 1)`` to the crop pixel
        ``(i, j)``, pixel centres at integer coordinates; handles rotated, oblique crops), or an
        axis-aligned box in slice pixel *edge* coordinates: ``row0``, ``col0`` (top-left edge),
        ``rows``, ``cols`` (extent in slice pixels), so that crop pixel ``(i, j)`` covers rows
        ``row0 + i * rows / h`` to ``row0 + (i + 1) * rows / h``. Parts of the crop outside the
        slice are dropped.
    slice_shape : (int, int)
        Shape of the full slice.

    Returns
    -------
    np.ndarray, shape ``slice_shape``, float32: the map resampled (bilinear) onto the slice
    pixels whose centre falls inside the crop, 0 elsewhere.
    """
    from scipy.ndimage import map_coordinates

    cam_crop = np.asarray(cam_crop, dtype=np.float32)
    if cam_crop.ndim != 2:
        raise InputError(None, f"cam_crop must be 2D, got shape {cam_crop.shape}", "Pass one [H, W] map")
    h, w = cam_crop.shape
    A = _geometry_matrix(crop_geometry, (h, w))
    H, W = int(slice_shape[0]), int(slice_shape[1])
    rr, cc = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    ii = A[0, 0] * rr + A[0, 1] * cc + A[0, 2]
    jj = A[1, 0] * rr + A[1, 1] * cc + A[1, 2]
    inside = (ii >= -0.5) & (ii < h - 0.5) & (jj >= -0.5) & (jj < w - 0.5)
    out = np.zeros((H, W), dtype=np.float32)
    if inside.any():
        vals = map_coordinates(cam_crop, [ii[inside], jj[inside]], order=1, mode="nearest")
        out[inside] = vals.astype(np.float32)
    return out


def gray_u8(image2d: np.ndarray) -> np.ndarray:
    """Grayscale uint8 between the image's 1st and 99th percentiles (per slice; NaN as 0)."""
    a = np.asarray(image2d, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0)
    lo, hi = np.percentile(a, [1, 99]) if a.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _contour(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    m = np.asarray(mask) > 0
    if not m.any():
        return m
    return m & ~binary_erosion(m, border_value=0)


def overlay_png(image2d: np.ndarray, cam: np.ndarray | None = None, roi_mask: np.ndarray | None = None,
                alpha: float = 0.45, colormap: str = "jet", scale: int | None = None,
                contour_rgb: tuple[int, int, int] = (0, 255, 0)) -> bytes:
    """PNG of a slice in grayscale with the CAM as a colour map and the ROI contour.

    Parameters
    ----------
    image2d : np.ndarray, shape [H, W]
        The slice (any intensity scale; shown between its 1st and 99th percentiles).
    cam : np.ndarray, shape [H, W], values in [0, 1], optional
        Blended per pixel with weight ``alpha * cam`` (no attention = plain grayscale).
    roi_mask : np.ndarray, shape [H, W], optional
        Its outline is drawn in ``contour_rgb``.
    alpha : float in [0, 1]
    colormap : str
        A matplotlib colormap name.
    scale : int, optional
        Integer upscaling (nearest); default: enough to make the image at least 256 px.

    Returns
    -------
    bytes: a PNG (RGB).
    """
    from PIL import Image

    gray = gray_u8(image2d)
    H, W = gray.shape
    if scale is None:
        scale = max(1, int(np.ceil(256 / max(1, min(H, W)))))
    scale = int(max(1, scale))

    def up(a):
        return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1) if scale > 1 else a

    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float64) / 255.0
    if cam is not None:
        cam = np.asarray(cam, dtype=np.float64)
        if cam.shape != gray.shape:
            raise InputError(None, f"CAM shape {cam.shape} differs from the image's {gray.shape}", "Paste the CAM back first")
        cam = np.clip(np.nan_to_num(cam), 0, 1)
        if colormap == "jet":  # the classic piecewise-linear jet (no matplotlib import on this path)
            colour = np.clip(1.5 - np.abs(4 * cam[..., None] - np.array([3.0, 2.0, 1.0])), 0, 1)
        else:
            from matplotlib import colormaps

            colour = colormaps[colormap](cam)[..., :3]
        wgt = float(np.clip(alpha, 0, 1)) * cam[..., None]
        rgb = (1 - wgt) * rgb + wgt * colour
    rgb8 = up((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
    if roi_mask is not None:
        roi = np.asarray(roi_mask) > 0
        if roi.shape != gray.shape:
            raise InputError(None, f"ROI shape {roi.shape} differs from the image's {gray.shape}", "Give the matching ROI")
        edge = _contour(up(roi))
        rgb8[edge] = np.asarray(contour_rgb, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb8).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def display_slice(volume: np.ndarray, slice_index: int) -> np.ndarray:
    """Axial slice ``slice_index`` (RAS+ array axis 2) in the slice dataset's display orientation.

    Rows run anterior (row 0) -> posterior, columns the patient's right (column 0) -> left
    (radiological convention, as ``nhb_core.slices`` crops): ``out[r, c] = volume[X-1-c, Y-1-r, z]``.

    Returns
    -------
    np.ndarray, shape (Y, X), the volume's dtype.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or not 0 <= int(slice_index) < vol.shape[2]:
        raise InputError(None, f"slice {slice_index} is outside the volume of shape {vol.shape}", "Give a valid slice index")
    return np.ascontiguousarray(vol[::-1, ::-1, int(slice_index)].T)


def crop_geometry(centroid_vox: Sequence[float], spacing: Sequence[float], volume_shape: Sequence[int],
                  config: Any, affine: np.ndarray | None = None) -> dict[str, Any]:
    """Where a slice-dataset crop lies on the :func:`display_slice` image (for :func:`paste_back`).

    Mirrors ``nhb_core.slices.extract_slices``: crop pixel ``(i, j)`` lies
    ``crop_mm/2 - (j + .5) crop_mm/size`` mm right and ``crop_mm/2 - (i + .5) crop_mm/size`` mm
    anterior of the ROI centroid, in the slice plane (``slices.inplane_matrix``).

    Parameters
    ----------
    centroid_vox : (x, y[, z]) voxel coordinates of the ROI centroid (``extract_slices``'
        ``centroid_vox``), the crop centre.
    spacing : voxel size in mm (x, y[, z]).
    volume_shape : (X, Y[, Z]) of the RAS+ volume.
    config : ``nhb_core.slices.PrepareConfig`` (or a dict with ``crop_mm`` and ``size``).
    affine : (4, 4) voxel -> RAS mm, optional (as passed to ``extract_slices``).

    Returns
    -------
    dict with ``matrix`` (2 x 3: display pixel ``(row, col, 1)`` -> crop pixel ``(i, j)``),
    ``size`` (crop pixels a side) and ``crop_mm``.
    """
    from nhb_core.slices import inplane_matrix

    crop = float(config["crop_mm"] if isinstance(config, dict) else config.crop_mm)
    size = int(config["size"] if isinstance(config, dict) else config.size)
    cx, cy = float(centroid_vox[0]), float(centroid_vox[1])
    X, Y = int(volume_shape[0]), int(volume_shape[1])
    M = inplane_matrix(affine, (float(spacing[0]), float(spacing[1])))
    # voxel offset from the centre of display pixel (R, C): [X-1-C-cx, Y-1-R-cy] = P @ [R, C, 1]
    P = np.array([[0.0, -1.0, X - 1 - cx], [-1.0, 0.0, Y - 1 - cy]])
    D = np.linalg.inv(M) @ P  # -> [d_right_mm, d_anterior_mm]
    k = size / crop
    off = size / 2.0 - 0.5
    A = np.array([[-k * D[1, 0], -k * D[1, 1], off - k * D[1, 2]],   # i from d_anterior
                  [-k * D[0, 0], -k * D[0, 1], off - k * D[0, 2]]])  # j from d_right
    return {"matrix": A.tolist(), "size": size, "crop_mm": crop}

