"""The ROI slice dataset: axial slices through the bilateral globus pallidus ROI.

For each subject of a cohort manifest, :func:`prepare` picks the axial slices
that intersect the bilateral GP ROI, crops a square of fixed physical size
(``crop_mm``) centred on the bilateral ROI centroid, resamples it in-plane to a
fixed grid (``size`` x ``size`` pixels, bilinear), normalises intensities per
volume inside a head mask, and optionally appends the ROI mask as a second
channel. Slices are never resampled through-plane: a slice of the output is one
acquired slice of the source volume.

Output folder (schemas in ``docs/dataset.md``)::

    index.csv      one row per slice: subject_id, center, label, slice_index,
                   source_sha256, roi_sha256, row, image_sha256, roi_voxels
    slices.npy     float32 [n_slices, channels, size, size], row i = index row i
    masks.npy      uint8 [n_slices, size, size], the bilateral ROI (0/1) per slice
    subjects.csv   one row per subject: manifest columns (no paths) + n_slices + hashes
    prepare.json   config, input hashes, versions, channels, size, crop_mm, cache keys
    cache/         one file per subject, keyed on (T1 sha256, ROI sha256, config)

Geometry conventions (all in the RAS+ closest-canonical arrays that
:mod:`nhb_core.io` returns):

* the slice axis is array axis 2 (the acquired axis closest to inferior ->
  superior; for an oblique axial acquisition still the acquired slice axis);
* an output image row runs anterior (row 0) -> posterior, a column runs the
  patient's right (column 0) -> left: the radiological display convention;
* pixel ``(r, c)`` lies ``crop_mm/2 - (c + 0.5) * crop_mm/size`` mm to the right
  and ``crop_mm/2 - (r + 0.5) * crop_mm/size`` mm anterior of the ROI centroid,
  measured in the slice plane, so the crop covers exactly ``crop_mm`` mm whatever
  the voxel size; an oblique slice keeps its plane but its in-plane rotation is
  undone (:func:`inplane_matrix`);
* outside the image the crop is padded with the volume's background (its
  minimum intensity, normalised like every other value: 0 for the default
  clipped percentile normalisation).
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nhb_core.errors import ConfigError, DatasetError, ImageError
from nhb_core.fileio import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_bytes,
    sha256_file,
    sha256_json,
)
from nhb_core.progress import EtaEstimator, ProgressCallback, emit

#: Version of the slice-extraction algorithm; part of every cache key, so that a
#: change of the algorithm invalidates caches written by an older version.
ALGORITHM_VERSION = 3

INDEX_COLUMNS = ["subject_id", "center", "label", "slice_index", "source_sha256", "roi_sha256",
                 "row", "image_sha256", "roi_voxels", "si_left", "si_right", "si_both"]
#: The signal-intensity ratios of a slice (index.csv columns): GP mean over the mean of its
#: surroundings (see :func:`si_ratios`), left, right and both sides.
SI_COLUMNS = ["si_left", "si_right", "si_both"]
PATH_COLUMNS = ("t1", "roi", "t1_path", "roi_path")


# --------------------------------------------------------------------------- config


@dataclass
class PrepareConfig:
    """How slices are chosen, cropped, resampled and normalised.

    Parameters
    ----------
    crop_mm : float
        Side of the square crop in mm (default 64: both GP and their landmarks).
    size : int
        Output grid side in pixels (images are ``size`` x ``size``).
    slice_select : {"min_voxels", "central"}
        ``"min_voxels"``: every axial slice with at least ``min_roi_voxels`` ROI
        voxels (when none reaches it, the slice with the most ROI voxels, and a
        warning in prepare.json). ``"central"``: the ``n_central`` ROI-bearing
        slices closest to the ROI centroid along the slice axis.
    min_roi_voxels : int
        Threshold for ``"min_voxels"`` (voxels of the bilateral ROI in the slice).
    n_central : int
        Number of slices for ``"central"``.
    norm : {"percentile", "zscore", "reference"}
        ``"percentile"``: ``(x - p_low) / (p_high - p_low)`` with the percentiles
        taken inside the head mask, clipped to [0, 1] when ``clip``.
        ``"zscore"``: ``(x - mean) / std`` inside the head mask, clipped to
        [-z_clip, z_clip] when ``clip``.
        ``"reference"``: signal relative to the tissue around the GP, as a
        radiologist reads the sign: ``x / ref - 1`` where ``ref`` is the mean
        raw intensity of the slice's ring of ``ref_ring_mm`` around the ROI
        (the ROI's 1-pixel border excluded), clipped to [-1, ref_clip - 1] when
        ``clip``. 0 = as bright as the surroundings; an injured GP is > 0. It
        removes scanner gain, bias field and the field-strength contrast that a
        per-volume normalisation leaves in.
    ref_ring_mm : float
        Outer width (mm) of the reference ring around the ROI for ``"reference"``.
    ref_clip : float
        Upper clip of ``x / ref`` for ``"reference"`` (fat and skin are ~2-3 x the
        deep grey matter).
    roi_window_mm : float or None
        Keep only the neighbourhood of the GP: the normalised image is multiplied by
        a window that is 1 up to ``roi_window_mm`` mm from the ROI and falls off as a
        Gaussian (sigma 2 mm) beyond it, so the network sees the GP and the tissue a
        radiologist compares it with, not the rest of the brain. None: the whole crop.
    p_low, p_high : float
        Percentiles (0-100) for ``"percentile"``.
    z_clip : float
        Clip bound for ``"zscore"``.
    clip : bool
        Clip normalised values (robustness to bright fat / artefacts).
    head_threshold : float
        The head mask is every voxel brighter than ``head_threshold`` times the
        volume's 99.5th percentile (the background of an MRI is near zero).
    roi_channel : bool
        Append the bilateral ROI mask (0/1, nearest neighbour) as channel 2.
    antialias : bool
        Smooth in-plane with a Gaussian before bilinear sampling when the output
        pixel is larger than the voxel (sigma = (factor - 1) / 2 voxels).
    """

    crop_mm: float = 64.0
    size: int = 64
    slice_select: str = "min_voxels"
    min_roi_voxels: int = 10
    n_central: int = 3
    norm: str = "percentile"
    ref_ring_mm: float = 6.0
    ref_clip: float = 3.0
    roi_window_mm: float | None = None
    p_low: float = 0.5
    p_high: float = 99.5
    z_clip: float = 5.0
    clip: bool = True
    head_threshold: float = 0.05
    roi_channel: bool = False
    antialias: bool = True

    def __post_init__(self) -> None:
        src = "prepare config"
        try:
            self.crop_mm = float(self.crop_mm)
            self.size = int(self.size)
            self.min_roi_voxels = int(self.min_roi_voxels)
            self.n_central = int(self.n_central)
            self.p_low = float(self.p_low)
            self.p_high = float(self.p_high)
            self.z_clip = float(self.z_clip)
            self.head_threshold = float(self.head_threshold)
            self.ref_ring_mm = float(self.ref_ring_mm)
            self.ref_clip = float(self.ref_clip)
            if self.roi_window_mm is not None:
                self.roi_window_mm = float(self.roi_window_mm)
        except (TypeError, ValueError) as err:
            raise ConfigError(src, f"a numeric option has a non-numeric value ({err})",
                              "Give crop_mm, size, min_roi_voxels, n_central, p_low, p_high as numbers") from None
        for name in ("clip", "roi_channel", "antialias"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise ConfigError(src, f"option {name} must be true or false, got {v!r}", f"Set {name} to true or false")
            setattr(self, name, bool(v))
        if not (self.crop_mm > 0 and np.isfinite(self.crop_mm)):
            raise ConfigError(src, f"crop_mm must be a positive number of mm, got {self.crop_mm}", "Use e.g. crop_mm: 64")
        if not 4 <= self.size <= 1024:
            raise ConfigError(src, f"size must be between 4 and 1024 pixels, got {self.size}", "Use e.g. size: 64")
        if self.slice_select not in ("min_voxels", "central"):
            raise ConfigError(src, f"slice_select must be 'min_voxels' or 'central', got {self.slice_select!r}",
                              "Choose one of min_voxels, central")
        if self.min_roi_voxels < 1:
            raise ConfigError(src, f"min_roi_voxels must be at least 1, got {self.min_roi_voxels}", "Use e.g. 10")
        if self.n_central < 1:
            raise ConfigError(src, f"n_central must be at least 1, got {self.n_central}", "Use e.g. 3")
        if self.norm not in ("percentile", "zscore", "reference"):
            raise ConfigError(src, f"norm must be 'percentile', 'zscore' or 'reference', got {self.norm!r}",
                              "Choose one of percentile, zscore, reference")
        if not (self.ref_ring_mm > 0 and np.isfinite(self.ref_ring_mm)):
            raise ConfigError(src, f"ref_ring_mm must be a positive number of mm, got {self.ref_ring_mm}",
                              "Use e.g. ref_ring_mm: 6")
        if self.roi_window_mm is not None and not (self.roi_window_mm >= 0 and np.isfinite(self.roi_window_mm)):
            raise ConfigError(src, f"roi_window_mm must be a number of mm >= 0 or null, got {self.roi_window_mm}",
                              "Use e.g. roi_window_mm: 8, or leave it unset for the whole crop")
        if not (self.ref_clip > 1 and np.isfinite(self.ref_clip)):
            raise ConfigError(src, f"ref_clip must be a number above 1, got {self.ref_clip}", "Use e.g. ref_clip: 3")
        if not 0 <= self.p_low < self.p_high <= 100:
            raise ConfigError(src, f"need 0 <= p_low < p_high <= 100, got {self.p_low}, {self.p_high}", "Use e.g. p_low 0.5, p_high 99.5")
        if not self.z_clip > 0:
            raise ConfigError(src, f"z_clip must be positive, got {self.z_clip}", "Use e.g. 5")
        if not 0 <= self.head_threshold < 1:
            raise ConfigError(src, f"head_threshold must be in [0, 1), got {self.head_threshold}", "Use e.g. 0.05")

    @property
    def channels(self) -> list[str]:
        """Channel names, in order: ``["t1"]`` or ``["t1", "roi"]``."""
        return ["t1", "roi"] if self.roi_channel else ["t1"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "prepare config") -> PrepareConfig:
        """Build from a dict (e.g. the ``prepare:`` section of a study config).

        Unknown keys raise :class:`ConfigError` naming them (a typo must not be ignored).
        """
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(source, f"unknown prepare option(s): {', '.join(unknown)}",
                              f"Use only: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except ConfigError as err:
            raise ConfigError(source, err.problem, err.fix) from None

    def sha256(self) -> str:
        """Hash of the options (with the algorithm version): the config part of cache keys."""
        return sha256_json({"config": self.to_dict(), "algorithm": ALGORITHM_VERSION})


# --------------------------------------------------------------------------- per-volume work


def select_slices(roi_mask: np.ndarray, config: PrepareConfig) -> tuple[np.ndarray, list[str]]:
    """Choose the axial slices (indices along array axis 2) of a subject.

    Parameters
    ----------
    roi_mask : np.ndarray of bool, shape (X, Y, Z)
        The bilateral ROI (any label > 0).
    config : PrepareConfig

    Returns
    -------
    slices : np.ndarray of int64, shape (k,)
        Sorted slice indices, k >= 1.
    warnings : list of str
    """
    return _select_from_counts(np.count_nonzero(roi_mask, axis=(0, 1)).astype(np.int64), config)


def _select_from_counts(counts: np.ndarray, config: PrepareConfig) -> tuple[np.ndarray, list[str]]:
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        raise ImageError(None, "the ROI mask is empty", "Draw the bilateral GP ROI (labels 1 and 2)")
    warnings: list[str] = []
    if config.slice_select == "min_voxels":
        sel = np.flatnonzero(counts >= config.min_roi_voxels)
        if sel.size == 0:
            best = int(np.argmax(counts))
            warnings.append(f"no slice has {config.min_roi_voxels} ROI voxels (max {int(counts[best])}); "
                            f"kept slice {best} only")
            sel = np.array([best])
    else:
        z = np.arange(counts.size, dtype=np.float64)
        zc = float((z * counts).sum() / counts.sum())
        # closest to the centroid first; ties go to the slice with more ROI, then the lower index
        order = sorted(nz.tolist(), key=lambda k: (abs(k - zc), -int(counts[k]), k))
        sel = np.array(sorted(order[: config.n_central]))
        if sel.size < config.n_central:
            warnings.append(f"only {sel.size} slices intersect the ROI (n_central={config.n_central})")
    return sel.astype(np.int64), warnings


#: intensity statistics use a regular sample of at most this many voxels (every k-th
#: voxel of the array in memory order): the 0.5 / 99.5 percentiles of 65536 samples
#: rest on ~330 tail samples each, and cost a tenth of a whole-volume sort
STATS_MAX_SAMPLES = 1 << 16


def intensity_stats(data: np.ndarray, config: PrepareConfig) -> tuple[float, float, float]:
    """The affine normalisation of a volume: returns ``(offset, scale, background)``.

    ``normalised = (raw - offset) / scale``; ``background`` is the raw value used
    to pad crops outside the image (the volume's minimum). The head mask is every
    voxel above ``background + head_threshold * (p99.5 - background)`` (every voxel
    above the minimum when that leaves under 10% of the volume); the
    percentiles / mean and std are taken inside it, over a regular sample of at
    most :data:`STATS_MAX_SAMPLES` voxels (deterministic).
    """
    flat = data.reshape(-1)
    step = max(1, -(-flat.size // STATS_MAX_SAMPLES))
    sample = np.asarray(flat[::step], dtype=np.float32)
    if not np.isfinite(sample).all():
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise ImageError(None, "the T1 volume has no finite voxel", "Check the T1 file")
    background = float(np.nanmin(flat)) if step > 1 else float(sample.min())
    robust_max = float(np.percentile(sample, 99.5))
    head = sample[sample > background + config.head_threshold * (robust_max - background)]
    if head.size < 0.1 * sample.size:
        # no air around the head (a cropped field of view) and a bright minority above p99.5:
        # every voxel above the minimum is head
        head = sample[sample > background]
    if head.size < 10:
        raise ImageError(None, "the T1 volume is (almost) constant, no head found",
                         "Check that the T1 file holds an image")
    if config.norm == "percentile":
        lo, hi = np.percentile(head, [config.p_low, config.p_high])
        offset, scale = float(lo), float(hi - lo)
    else:
        offset, scale = float(head.mean(dtype=np.float64)), float(head.std(dtype=np.float64))
    if not scale > 0 or not np.isfinite(scale):
        raise ImageError(None, "the T1 intensities inside the head are constant",
                         "Check that the T1 file holds an image")
    return offset, scale, background


def apply_norm(x: np.ndarray, offset: float, scale: float, config: PrepareConfig) -> np.ndarray:
    """``(x - offset) / scale``, clipped as configured (float32, in place when possible)."""
    x = np.asarray(x, dtype=np.float32)
    x -= np.float32(offset)
    x /= np.float32(scale)
    if config.clip:
        if config.norm == "percentile":
            np.clip(x, 0.0, 1.0, out=x)
        else:
            np.clip(x, -config.z_clip, config.z_clip, out=x)
    return x


def reference_ring(mask: np.ndarray, config: PrepareConfig) -> np.ndarray:
    """The reference ring of one crop: pixels more than one pixel and at most
    ``ref_ring_mm`` mm outside the ROI (bool, shape of ``mask``)."""
    from scipy import ndimage

    m = np.asarray(mask) > 0
    if not m.any():
        return np.zeros_like(m)
    pix_mm = config.crop_mm / config.size
    dist_px = ndimage.distance_transform_edt(~m)
    return (dist_px > 1.0) & (dist_px * pix_mm <= config.ref_ring_mm + 1e-9)


def reference_norm(raw: np.ndarray, masks: np.ndarray, config: PrepareConfig, name: str | None = None,
                   background: float = 0.0) -> np.ndarray:
    """``(raw - background) / (ref - background) - 1`` per slice, ``ref`` the mean of
    the slice's reference ring (``background``: the volume's black level, its minimum).

    Parameters
    ----------
    raw : np.ndarray float32 [k, H, W]
        Crops in the volume's raw intensity units.
    masks : np.ndarray uint8 [k, H, W]
        The ROI on the same grid.

    Returns
    -------
    np.ndarray float32 [k, H, W]: 0 where as bright as the surroundings, clipped to
    ``[-1, ref_clip - 1]`` when ``config.clip``.

    >>> import numpy as np
    >>> cfg = PrepareConfig(norm="reference", size=16, crop_mm=16)
    >>> raw = np.full((1, 16, 16), 100.0, np.float32); m = np.zeros((1, 16, 16), np.uint8)
    >>> m[0, 6:10, 6:10] = 1; raw[0][m[0] > 0] = 130.0
    >>> out = reference_norm(raw, m, cfg)
    >>> round(float(out[0, 8, 8]), 3), round(float(out[0, 0, 0]), 3)
    (0.3, 0.0)
    """
    out = np.empty(raw.shape, dtype=np.float32)
    for i in range(raw.shape[0]):
        ring = reference_ring(masks[i], config)
        vals = raw[i][ring]
        ref = float(np.mean(vals, dtype=np.float64)) - background if vals.size >= 8 else float("nan")
        if not (np.isfinite(ref) and ref > 0):
            raise ImageError(name, f"no usable reference tissue around the ROI on crop slice {i} "
                                   f"(ring of {config.ref_ring_mm:g} mm: {vals.size} pixels, mean {ref:.3g})",
                             "Check that the ROI lies inside the brain, or use prepare norm: percentile")
        x = (raw[i].astype(np.float32) - np.float32(background)) / np.float32(ref) - np.float32(1.0)
        if config.clip:
            np.clip(x, -1.0, config.ref_clip - 1.0, out=x)
        out[i] = x
    return out


def roi_window(masks: np.ndarray, config: PrepareConfig, sigma_mm: float = 2.0) -> np.ndarray:
    """The GP-neighbourhood window of ``roi_window_mm`` (float32 [k, H, W] in [0, 1]).

    1 within ``roi_window_mm`` mm of the ROI, ``exp(-e^2 / (2 sigma^2))`` at ``e`` mm beyond.
    """
    from scipy import ndimage

    pix_mm = config.crop_mm / config.size
    window_mm = float(config.roi_window_mm or 0.0)  # only called when roi_window_mm is set
    out = np.ones(masks.shape, dtype=np.float32)
    for i in range(masks.shape[0]):
        m = np.asarray(masks[i]) > 0
        if not m.any():
            continue
        excess = np.clip(ndimage.distance_transform_edt(~m) * pix_mm - window_mm, 0, None)
        out[i] = np.exp(-0.5 * (excess / sigma_mm) ** 2)
    return out


def si_ratios(raw: np.ndarray, sides: np.ndarray, config: PrepareConfig, background: float = 0.0) -> np.ndarray:
    """Signal-intensity ratios of the GP on each crop: the quantitative sign a radiologist measures.

    For each side (ROI label 1 = left, 2 = right) and for both together: the mean
    intensity inside the ROI over the mean of its reference ring
    (:func:`reference_ring`: up to ``ref_ring_mm`` around the ROI, the bilateral
    ROI and its 1-pixel border excluded), black level ``background`` subtracted.

    Parameters
    ----------
    raw : np.ndarray float32 [k, H, W]
        Crops in raw intensity units.
    sides : np.ndarray int [k, H, W]
        ROI labels on the same grid (0, 1 = left, 2 = right; any other non-zero value
        counts for "both" only).

    Returns
    -------
    np.ndarray float64 [k, 3]: (left, right, both); NaN where a side is absent on a crop
    or its ring has under 8 pixels.
    """
    out = np.full((raw.shape[0], 3), np.nan)
    for i in range(raw.shape[0]):
        both = sides[i] > 0
        x = raw[i].astype(np.float64) - background
        for j, m in enumerate((sides[i] == 1, sides[i] == 2, both)):
            if not m.any():
                continue
            ring = reference_ring(m, config) & ~reference_ring_exclusion(both)
            if ring.sum() < 8:
                continue
            ref = float(x[ring].mean())
            if ref > 0:
                out[i, j] = float(x[m].mean()) / ref
    return out


def reference_ring_exclusion(mask: np.ndarray) -> np.ndarray:
    """The ROI and its 1-pixel border (never part of a reference ring)."""
    from scipy import ndimage

    return ndimage.binary_dilation(np.asarray(mask) > 0, ndimage.generate_binary_structure(2, 2))


def inplane_matrix(affine: np.ndarray | None, spacing: tuple[float, ...]) -> np.ndarray:
    """Voxel displacement (along array axes 0, 1) per mm towards patient right / anterior.

    Returns a 2x2 matrix ``M``: ``[di, dj] = M @ [d_right_mm, d_anterior_mm]``. The
    directions are world R and A projected onto the slice plane (spanned by array
    axes 0 and 1) and orthonormalised, so an oblique acquisition is cropped in its
    own slice plane (never through-plane) but with its in-plane rotation undone.
    Without an affine, the array axes are taken as R and A with ``spacing``.
    """
    if affine is None:
        return np.diag([1.0 / float(spacing[0]), 1.0 / float(spacing[1])])
    L = np.asarray(affine, dtype=np.float64)[:3, :2]
    n = np.cross(L[:, 0], L[:, 1])
    nn = np.linalg.norm(n)
    if not nn > 0:
        raise ImageError(None, "the image affine is degenerate in-plane", "Fix the image header")
    n /= nn
    r = np.array([1.0, 0.0, 0.0]) - n[0] * n
    if np.linalg.norm(r) < 1e-6:  # plane perpendicular to R: fall back to the array axis
        r = L[:, 0].copy()
    r /= np.linalg.norm(r)
    a = np.array([0.0, 1.0, 0.0]) - n[1] * n
    a -= a.dot(r) * r
    if np.linalg.norm(a) < 1e-6:
        a = np.cross(n, r)
    a /= np.linalg.norm(a)
    return np.linalg.pinv(L) @ np.stack([r, a], axis=1)


def sampling_grid(centre_xy: tuple[float, float], inplane: np.ndarray, config: PrepareConfig,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Voxel coordinates (along array axes 0, 1) of the output pixels, each shape (size, size) [row, col].

    ``inplane`` is :func:`inplane_matrix`. Row 0 is the most anterior, column 0 the
    patient's right; pixel centres are ``crop_mm / size`` mm apart.
    """
    n, c = config.size, config.crop_mm
    off = c / 2.0 - (np.arange(n, dtype=np.float64) + 0.5) * c / n  # mm, decreasing
    d_right = off[None, :]  # varies along columns
    d_ant = off[:, None]  # varies along rows
    M = np.asarray(inplane, dtype=np.float64)
    gx = centre_xy[0] + M[0, 0] * d_right + M[0, 1] * d_ant
    gy = centre_xy[1] + M[1, 0] * d_right + M[1, 1] * d_ant
    return gx, gy


def extract_slices(t1: np.ndarray, roi: np.ndarray, spacing: tuple[float, float, float],
                   config: PrepareConfig, affine: np.ndarray | None = None, t1_name: str | None = None,
                   roi_name: str | None = None) -> dict[str, Any]:
    """All the per-subject work on arrays already loaded (RAS+ closest canonical).

    Parameters
    ----------
    t1 : np.ndarray, shape (X, Y, Z), float
        The T1 volume.
    roi : np.ndarray, shape (X, Y, Z), int
        ROI labels (> 0 = bilateral GP).
    spacing : tuple of 3 floats
        Voxel size in mm along X, Y, Z.
    config : PrepareConfig
    affine : np.ndarray (4, 4) or None
        Voxel -> RAS mm; used to undo an oblique in-plane rotation (see
        :func:`inplane_matrix`). None: array axes 0, 1 are taken as R, A.
    t1_name, roi_name : str or None
        File names used in error messages.

    Returns
    -------
    dict with ``images`` float32 [k, C, size, size], ``masks`` uint8 [k, size, size],
    ``slice_index`` int64 [k], ``roi_voxels`` int64 [k], ``centroid_vox`` [3] float,
    ``si`` float64 [k, 3] (:func:`si_ratios`: left, right, both),
    ``warnings`` list of str.
    """
    from scipy import ndimage

    if t1.ndim != 3 or roi.shape != t1.shape:
        raise ImageError(roi_name, f"T1 shape {t1.shape} and ROI shape {roi.shape} differ",
                         "Give the ROI drawn on this T1 (same grid)")
    # one pass over the mask: the ROI voxels' indices (the ROI is small)
    ix, iy, iz = np.unravel_index(np.flatnonzero(roi.reshape(-1) > 0), roi.shape)
    counts = np.bincount(iz, minlength=roi.shape[2]).astype(np.int64)
    try:
        sel, warnings = _select_from_counts(counts, config)
    except ImageError as err:
        raise ImageError(roi_name, err.problem, err.fix) from None
    # bilateral ROI centroid in voxel coordinates
    centroid = [float(ix.mean()), float(iy.mean()), float(iz.mean())]
    sx, sy = float(spacing[0]), float(spacing[1])
    if not (sx > 0 and sy > 0):
        raise ImageError(t1_name, f"invalid voxel spacing {spacing}", "Fix the image header (pixdim)")

    # does the crop contain the whole ROI in-plane?
    half = config.crop_mm / 2.0
    extent = max((centroid[0] - ix.min()) * sx, (ix.max() - centroid[0]) * sx,
                 (centroid[1] - iy.min()) * sy, (iy.max() - centroid[1]) * sy)
    if extent > half:
        warnings.append(f"the ROI extends {extent:.1f} mm from its centroid, beyond the crop "
                        f"half-width {half:.1f} mm; increase crop_mm")

    try:
        offset, scale, background = intensity_stats(t1, config)
    except ImageError as err:
        raise ImageError(t1_name, err.problem, err.fix) from None
    try:
        M = inplane_matrix(affine, (sx, sy))
    except ImageError as err:
        raise ImageError(t1_name, err.problem, err.fix) from None
    gx, gy = sampling_grid((centroid[0], centroid[1]), M, config)
    coords = np.stack([gx, gy])  # (2, size, size)
    pix_mm = config.crop_mm / config.size
    # voxels per output pixel along each array axis -> anti-aliasing sigma (voxels)
    step = pix_mm * np.abs(M).max(axis=1)
    sigma = tuple(float(max(0.0, (f - 1) / 2)) for f in step) if config.antialias else (0.0, 0.0)

    # only the in-plane box the grid touches (plus a margin for the filter) is processed
    margin = int(np.ceil(3 * max(sigma))) + 2
    X, Y = t1.shape[0], t1.shape[1]
    x0 = max(0, int(np.floor(gx.min())) - margin)
    x1 = min(X, int(np.ceil(gx.max())) + margin + 1)
    y0 = max(0, int(np.floor(gy.min())) - margin)
    y1 = min(Y, int(np.ceil(gy.max())) + margin + 1)
    k = sel.size
    C = 2 if config.roi_channel else 1
    images = np.full((k, C, config.size, config.size), background, dtype=np.float32)
    masks = np.zeros((k, config.size, config.size), dtype=np.uint8)
    sides = np.zeros((k, config.size, config.size), dtype=np.uint8)
    if x0 < x1 and y0 < y1:  # the crop overlaps the image
        local = coords - np.array([x0, y0], dtype=np.float64)[:, None, None]
        for i, z in enumerate(sel):
            sl = np.asarray(t1[x0:x1, y0:y1, z], dtype=np.float32)
            if sigma[0] > 0 or sigma[1] > 0:
                sl = ndimage.gaussian_filter(sl, sigma=sigma, mode="nearest")
            images[i, 0] = ndimage.map_coordinates(sl, local, order=1, mode="constant", cval=background)
            sides[i] = ndimage.map_coordinates(np.clip(roi[x0:x1, y0:y1, z], 0, 3).astype(np.uint8), local,
                                               order=0, mode="constant", cval=0)
            masks[i] = sides[i] > 0
    # left/right ratios need the 1 = left, 2 = right labelling; any other labelling gives "both" only
    if set(np.unique(roi[ix, iy, iz]).tolist()) != {1, 2}:
        sides = masks.copy() * np.uint8(3)
    si = si_ratios(images[:, 0], sides, config, background=background)
    if config.norm == "reference":
        images[:, 0] = reference_norm(images[:, 0], masks, config, name=t1_name, background=background)
    else:
        images[:, 0] = apply_norm(images[:, 0], offset, scale, config)
    if config.roi_window_mm is not None:
        images[:, 0] *= roi_window(masks, config)
    if config.roi_channel:
        images[:, 1] = masks
    roi_voxels = counts[sel]
    return {"images": images, "masks": masks, "slice_index": sel, "roi_voxels": roi_voxels,
            "centroid_vox": np.array(centroid), "si": si, "warnings": warnings}


def process_subject(t1_path: str, roi_path: str, config: PrepareConfig) -> dict[str, Any]:
    """Load one subject with :mod:`nhb_core.io` and run :func:`extract_slices` on it.

    Errors are :class:`ImageError` naming the file at fault.
    """
    from nhb_core.io import load_roi, load_t1

    t1 = load_t1(t1_path)
    roi = load_roi(roi_path, reference=t1)
    sp = t1.spacing
    return extract_slices(t1.data, roi.data, (sp[0], sp[1], sp[2]), config, affine=t1.affine, t1_name=str(t1_path),
                          roi_name=str(roi_path))


# --------------------------------------------------------------------------- hashing + cache


class _HashMemo:
    """sha256 of input files, memoised by (absolute path, size, mtime_ns).

    The memo (``cache/hashes.json``) lets an unchanged rerun skip reading image
    bytes; any change of size or modification time rehashes the file. Folders
    (DICOM series) are always rehashed.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data: dict[str, dict[str, Any]] = read_json(path) if path.exists() else {}
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    @staticmethod
    def stat_key(p: str) -> list[int] | None:
        try:
            st = os.stat(p)
        except OSError:
            return None
        if not os.path.isfile(p):
            return None
        return [int(st.st_size), int(st.st_mtime_ns)]

    def get(self, p: str) -> str | None:
        key = self.stat_key(p)
        ent = self.data.get(p)
        if key is not None and ent and ent.get("stat") == key:
            return ent["sha256"]
        return None

    def put(self, p: str, sha: str, stat: list[int] | None) -> None:
        if stat is not None:
            self.data[p] = {"stat": stat, "sha256": sha}
            self.dirty = True

    def save(self) -> None:
        if self.dirty:
            atomic_write_json(self.path, self.data, indent=None)
            self.dirty = False


def _hash_input(p: str) -> tuple[str, list[int] | None]:
    stat = _HashMemo.stat_key(p)
    if not os.path.exists(p):
        raise ImageError(p, "the file does not exist", "Fix the path in the manifest")
    return sha256_file(p), stat


def subject_cache_key(t1_sha: str, roi_sha: str, config_sha: str) -> str:
    """Cache key of one subject: sha256 of (T1 sha256, ROI sha256, config hash)."""
    return sha256_json({"t1": t1_sha, "roi": roi_sha, "config": config_sha})


_CACHE_FIELDS = ("images", "masks", "slice_index", "roi_voxels", "centroid_vox", "si", "warnings")
CACHE_SUFFIX = ".npys"


def _save_cache(path: Path, res: dict[str, Any]) -> None:
    """One subject's arrays as consecutive .npy records in one file (no zip, no pickle)."""
    import json

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            for name in _CACHE_FIELDS[:-1]:
                np.save(fh, np.ascontiguousarray(res[name]), allow_pickle=False)
            np.save(fh, np.frombuffer(json.dumps(res["warnings"]).encode(), dtype=np.uint8), allow_pickle=False)


def _load_cache(path: Path) -> dict[str, Any] | None:
    import json

    try:
        with open(path, "rb") as fh:
            arrs = [np.load(fh, allow_pickle=False) for _ in _CACHE_FIELDS]
        out = dict(zip(_CACHE_FIELDS, arrs))
        out["warnings"] = json.loads(out["warnings"].tobytes().decode())
        return out
    except (OSError, ValueError, EOFError, UnicodeDecodeError):
        return None


def _work(job: dict[str, Any]) -> dict[str, Any]:
    """One subject in a worker: hash what the memo lacked, reuse the cache or compute."""
    out: dict[str, Any] = {"i": job["i"], "hashed": {}}
    shas = {}
    for kind in ("t1", "roi"):
        p = job[f"{kind}_path"]
        sha = job.get(f"{kind}_sha")
        if sha is None:
            sha, stat = _hash_input(p)
            out["hashed"][p] = (sha, stat)
        shas[kind] = sha
    key = subject_cache_key(shas["t1"], shas["roi"], job["config_sha"])
    out.update(t1_sha=shas["t1"], roi_sha=shas["roi"], key=key)
    cache_file = Path(job["cache_dir"]) / f"{key}{CACHE_SUFFIX}"
    res = _load_cache(cache_file) if cache_file.exists() else None
    if res is None:
        res = process_subject(job["t1_path"], job["roi_path"], PrepareConfig.from_dict(job["config"]))
        _save_cache(cache_file, res)
        out["cached"] = False
    else:
        out["cached"] = True
    out["result"] = res
    return out


# --------------------------------------------------------------------------- dataset


@dataclass
class SliceDataset:
    """A prepared slice dataset (see ``docs/dataset.md``).

    Attributes
    ----------
    index : pd.DataFrame
        One row per slice (``index.csv``); row i describes ``images[i]``.
    images : np.ndarray, float32 [n_slices, in_chans, H, W] (memory-mapped)
    masks : np.ndarray or None, uint8 [n_slices, H, W] the bilateral ROI per slice
    subjects : pd.DataFrame
        One row per subject (``subjects.csv``).
    meta : dict
        ``prepare.json``.
    path : Path
    """

    index: pd.DataFrame
    images: np.ndarray
    subjects: pd.DataFrame
    meta: dict[str, Any]
    masks: np.ndarray | None = None
    path: Path | None = None

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def config(self) -> PrepareConfig:
        return PrepareConfig.from_dict(self.meta.get("config", {}))

    def __len__(self) -> int:
        return len(self.index)


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"subject_id": str, "center": str}, keep_default_na=True)


def load_dataset(path: str | os.PathLike, mmap: bool = True) -> SliceDataset:
    """Open a dataset folder written by :func:`prepare`.

    ``images`` is memory-mapped (read-only) unless ``mmap=False``. Raises
    :class:`DatasetError` naming the file when the folder is incomplete or its
    files disagree.
    """
    d = Path(path)
    meta_p = d / "prepare.json"
    if not meta_p.exists():
        raise DatasetError(d, "not a prepared slice dataset (no prepare.json)",
                           "Run `python -m nhb_core prepare --manifest M.csv --out DIR` first")
    try:
        meta = read_json(meta_p)
    except (OSError, ValueError) as err:
        raise DatasetError(meta_p, f"unreadable ({err})", "Rerun prepare") from None
    for name in ("index.csv", "slices.npy", "subjects.csv"):
        if not (d / name).exists():
            raise DatasetError(d / name, "missing", "Rerun prepare")
    index = _read_table(d / "index.csv")
    subjects = _read_table(d / "subjects.csv")
    try:
        images = np.load(d / "slices.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(d / "slices.npy", f"unreadable ({err})", "Rerun prepare") from None
    if images.ndim != 4 or images.shape[0] != len(index):
        raise DatasetError(d / "slices.npy", f"shape {images.shape} does not match index.csv ({len(index)} rows)",
                           "Rerun prepare")
    masks = None
    if (d / "masks.npy").exists():
        masks = np.load(d / "masks.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        if masks.shape[0] != len(index):
            raise DatasetError(d / "masks.npy", "row count differs from index.csv", "Rerun prepare")
    return SliceDataset(index=index, images=images, subjects=subjects, meta=meta, masks=masks, path=d)


def _versions() -> dict[str, str]:
    from nhb_core.versions import module_versions

    return module_versions("nhb_core", "numpy", "scipy", "nibabel", "pandas")


def _outputs_present(out: Path) -> bool:
    return all((out / n).exists() for n in ("prepare.json", "index.csv", "slices.npy", "subjects.csv", "masks.npy"))


def prepare(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, config: PrepareConfig | dict | None = None,
            workers: int | None = None, progress: ProgressCallback | None = None) -> Path:
    """Build (or update) the ROI slice dataset of a cohort.

    Parameters
    ----------
    manifest_path : path
        The cohort manifest CSV (read with :func:`nhb_core.manifest.load_manifest`).
    out_dir : path
        Dataset folder; created if needed. Reusing a folder reuses its per-subject
        cache: only subjects whose T1 or ROI file changed, or all subjects when an
        option changed, are recomputed; an unchanged rerun returns without reading
        any image data.
    config : PrepareConfig or dict or None
        Options (None = defaults).
    workers : int or None
        Worker processes over subjects (None = min(2, CPUs); 1 = in this process).
    progress : callable or None
        Called with ``{"stage": "prepare", "done": i, "total": n, "message": ..., "eta_s": ...}``.

    Returns
    -------
    Path
        ``out_dir``.
    """
    from nhb_core.manifest import load_manifest

    if config is None:
        config = PrepareConfig()
    elif isinstance(config, dict):
        config = PrepareConfig.from_dict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "cache"
    cache_dir.mkdir(exist_ok=True)
    manifest = load_manifest(manifest_path)
    df = manifest.df.reset_index(drop=True)
    if df["subject_id"].duplicated().any():
        dup = df.loc[df["subject_id"].duplicated(), "subject_id"].iloc[0]
        raise DatasetError(manifest_path, f"subject_id {dup!r} appears more than once",
                           "Give every subject one row")
    n = len(df)
    if n == 0:
        raise DatasetError(manifest_path, "the manifest lists no subject", "Add subjects to the manifest")
    no_roi = df[df["roi_path"].fillna("").astype(str) == ""]
    if len(no_roi):
        listed = ", ".join(f"{r.subject_id} (row {r.manifest_row})" for r in no_roi.head(10).itertuples())
        more = f" and {len(no_roi) - 10} more" if len(no_roi) > 10 else ""
        raise DatasetError(manifest_path, f"{len(no_roi)} row(s) have no ROI mask: {listed}{more}",
                           "Fill them with `python -m nhb_core roi propose --manifest <manifest> --out <dir>` "
                           "and prepare that folder's manifest.csv, or draw the masks")
    emit(progress, "prepare", done=0, total=n, message="checking inputs")

    config_sha = config.sha256()
    memo = _HashMemo(cache_dir / "hashes.json")
    manifest_table_sha = sha256_bytes(df.to_csv(index=False).encode())
    jobs: list[dict[str, Any]] = []
    for i, r in df.iterrows():
        t1p, roip = str(r["t1_path"]), str(r["roi_path"])
        jobs.append({"i": i, "t1_path": t1p, "roi_path": roip, "t1_sha": memo.get(t1p), "roi_sha": memo.get(roip),
                     "config": config.to_dict(), "config_sha": config_sha, "cache_dir": str(cache_dir)})

    # fast path: every hash known and the stored state matches -> nothing to do
    if all(j["t1_sha"] and j["roi_sha"] for j in jobs) and _outputs_present(out):
        keys = [subject_cache_key(j["t1_sha"], j["roi_sha"], config_sha) for j in jobs]
        if _state_unchanged(out, _state_key(config_sha, manifest_table_sha, df["subject_id"].tolist(), keys)):
            emit(progress, "prepare", done=n, total=n, message="unchanged (cache)")
            return out

    results: list[dict[str, Any] | None] = [None] * n
    eta = EtaEstimator()
    n_workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    n_workers = min(n_workers, n)
    done = 0
    n_computed = 0

    def _finish(res: dict[str, Any]) -> None:
        nonlocal done, n_computed
        results[res["i"]] = res
        for p, (sha, stat) in res["hashed"].items():
            memo.put(p, sha, stat)
        done += 1
        n_computed += 0 if res["cached"] else 1
        sid = str(df.at[res["i"], "subject_id"])
        emit(progress, "prepare", done=done, total=n, eta_s=eta.eta(done, n),
             message=f"{sid} (cached)" if res["cached"] else str(sid))

    try:
        if n_workers <= 1:
            for j in jobs:
                _finish(_work(j))
        else:
            import multiprocessing as mp

            # import the heavy modules once here, so that forked workers inherit them
            import scipy.ndimage  # noqa: F401

            import nhb_core.io  # noqa: F401

            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as ex:
                pending = {ex.submit(_work, j) for j in jobs}
                try:
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            _finish(f.result())
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
    finally:
        memo.save()

    # every subject came from the cache and nothing else changed (e.g. DICOM folders, which
    # the memo does not cover): leave the outputs as they are
    if n_computed == 0 and _outputs_present(out):
        keys = [r["key"] for r in results if r is not None]
        if _state_unchanged(out, _state_key(config_sha, manifest_table_sha, df["subject_id"].tolist(), keys)):
            emit(progress, "prepare", done=n, total=n, message="unchanged (cache)")
            return out

    # assemble
    rows: list[dict[str, Any]] = []
    images_list, masks_list = [], []
    warnings: list[dict[str, str]] = []
    subj_extra = []
    row = 0
    for i, r in df.iterrows():
        res = results[i]
        assert res is not None
        arr = res["result"]
        k = int(arr["images"].shape[0])
        images_list.append(arr["images"])
        masks_list.append(arr["masks"])
        for w in arr["warnings"]:
            warnings.append({"subject_id": str(r["subject_id"]), "warning": w})
        for s in range(k):
            rows.append({"subject_id": r["subject_id"], "center": r["center"], "label": int(r["label"]),
                         "slice_index": int(arr["slice_index"][s]), "source_sha256": res["t1_sha"],
                         "roi_sha256": res["roi_sha"], "row": row,
                         "image_sha256": sha256_bytes(np.ascontiguousarray(arr["images"][s]).tobytes()),
                         "roi_voxels": int(arr["roi_voxels"][s]),
                         **{c: float(arr["si"][s, j]) for j, c in enumerate(SI_COLUMNS)}})
            row += 1
        subj_extra.append({"n_slices": k, "t1_sha256": res["t1_sha"], "roi_sha256": res["roi_sha"],
                           "cache_key": res["key"]})
    images = np.concatenate(images_list).astype(np.float32, copy=False)
    masks = np.concatenate(masks_list)
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    index_csv = index.to_csv(index=False)
    subjects = df.drop(columns=[c for c in PATH_COLUMNS if c in df.columns]).copy()
    for c in ("n_slices", "t1_sha256", "roi_sha256"):
        subjects[c] = [e[c] for e in subj_extra]

    with atomic_path(out / "slices.npy") as tmp:
        np.save(tmp, images)
    with atomic_path(out / "masks.npy") as tmp:
        np.save(tmp, masks)
    atomic_write_text(out / "index.csv", index_csv)
    atomic_write_text(out / "subjects.csv", subjects.to_csv(index=False))
    keys = [e["cache_key"] for e in subj_extra]
    meta = {
        "format": "nhb-slices",
        "format_version": 1,
        "algorithm_version": ALGORITHM_VERSION,
        "config": config.to_dict(),
        "config_sha256": config_sha,
        "channels": config.channels,
        "in_chans": len(config.channels),
        "size": config.size,
        "input_size": [config.size, config.size],
        "crop_mm": config.crop_mm,
        "pixel_mm": config.crop_mm / config.size,
        "orientation": {"rows": "anterior->posterior", "cols": "patient right->left", "slice_axis": "RAS+ axis 2"},
        "n_subjects": n,
        "n_slices": int(images.shape[0]),
        "centers": sorted(df["center"].astype(str).unique().tolist()),
        "manifest_sha256": sha256_file(manifest_path),
        "manifest_table_sha256": manifest_table_sha,
        "dataset_sha256": sha256_bytes(index_csv.encode()),
        "subjects": {str(sid): {"t1_sha256": e["t1_sha256"], "roi_sha256": e["roi_sha256"], "cache_key": e["cache_key"],
                                "n_slices": e["n_slices"]}
                     for sid, e in zip(df["subject_id"], subj_extra)},
        "state_sha256": _state_key(config_sha, manifest_table_sha, df["subject_id"].tolist(), keys),
        "n_computed": n_computed,
        "warnings": warnings,
        "versions": _versions(),
    }
    atomic_write_json(out / "prepare.json", meta)
    # drop cache entries no subject of this dataset uses any more (only files it wrote: *.npys)
    live = {f"{k}{CACHE_SUFFIX}" for k in keys} | {"hashes.json"}
    for entry in cache_dir.iterdir():
        if entry.is_file() and not entry.is_symlink() and entry.name.endswith(CACHE_SUFFIX) and entry.name not in live \
                and not entry.name.startswith("."):
            try:
                entry.unlink()
            except OSError:
                pass
    emit(progress, "prepare", done=n, total=n, message=f"{n_computed} computed, {n - n_computed} cached")
    return out


def _state_key(config_sha: str, manifest_sha: str, subject_ids: list, keys: list[str]) -> str:
    return sha256_json({"config": config_sha, "manifest": manifest_sha,
                        "subjects": [[str(s), k] for s, k in zip(subject_ids, keys)],
                        "algorithm": ALGORITHM_VERSION})


def _state_unchanged(out: Path, state: str) -> bool:
    """Whether ``out/prepare.json`` records this state (then the outputs are already what they would be)."""
    try:
        return read_json(out / "prepare.json").get("state_sha256") == state
    except (OSError, ValueError, AttributeError):
        return False
