"""Grad-CAM saliency over the globus pallidus (GP) crop, with attention and faithfulness measures.

What it computes (see ``docs/saliency.md``):

* :func:`compute_cam` / :func:`compute_cams`: a class-activation map (Grad-CAM, Grad-CAM++,
  EigenCAM or LayerCAM from the ``grad-cam`` package, ``pytorch_grad_cam``) for the model's
  single "injury" logit, at the input resolution of the crop, min-max normalised per slice
  to [0, 1].
* :func:`cam_energy_in_roi`: the share of CAM energy (sum of the map) inside the GP ROI.
* :func:`pointing_game`: whether the CAM maximum falls inside the GP ROI.
* :func:`faithfulness`: ROAD "most relevant first" (Rong et al. 2022, the noisy linear
  imputer of ``pytorch_grad_cam.metrics.road``): the drop of the model's probability when the
  top CAM pixels are removed and imputed, next to the same drop for random maps.
* :func:`paste_back`: the crop-space map placed back on the full slice.
* :func:`overlay_png`: grayscale slice + CAM colour map + ROI contour as PNG bytes.
* :func:`cam_for_case` and :func:`saliency_summary`: the same over a finished run, cached
  under ``<run>/saliency/`` (npz keyed by model, method, subject, slice and weights hash).
"""

from __future__ import annotations

import io
import os
import re
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nhb_core.errors import DatasetError, InputError, RunError
from nhb_core.fileio import atomic_path, sha256_bytes
from nhb_core.models import MODEL_LOCK
from nhb_core.progress import EtaEstimator, ProgressCallback, emit
from nhb_core.runs import RunFolder

#: Accepted method names (lower case) -> pytorch_grad_cam class name.
METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
}
_ALIASES = {
    "gradcampp": "gradcam++",
    "gradcam_pp": "gradcam++",
    "gradcamplusplus": "gradcam++",
    "grad-cam": "gradcam",
    "grad-cam++": "gradcam++",
    "eigen-cam": "eigencam",
    "layer-cam": "layercam",
}

#: Grad-CAM hooks the model's layers: one computation at a time per process (the dashboard
#: serves sessions from threads that share the cached models); the same lock as every forward pass.
_CAM_LOCK = MODEL_LOCK

#: Fractions of the crop's pixels removed by :func:`faithfulness` (most relevant first).
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


def normalize_method(method: str) -> str:
    """The canonical method name (``gradcam``, ``gradcam++``, ``eigencam``, ``layercam``).

    Raises :class:`~nhb_core.errors.InputError` for an unknown name.
    """
    m = str(method).strip().lower()
    m = _ALIASES.get(m, m)
    if m not in METHODS:
        raise InputError("--method", f"unknown saliency method {method!r}",
                         f"Use one of: {', '.join(METHODS)}")
    return m


# ---------------------------------------------------------------------------------------------
# target layer


def _timm_feature_module(model, input_hw: tuple[int, int] | None = None):
    """The deepest timm ``feature_info`` stage whose map keeps at least ``MIN_CAM_CELLS`` cells a side at ``input_hw``.

    Falls back to the last stage when ``input_hw`` is unknown or every stage is coarser.
    """
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    try:
        stages = [(f["module"], int(f["reduction"])) for f in info]
    except (TypeError, KeyError):
        try:
            stages = [(n, int(r)) for n, r in zip(info.module_name(), info.reduction())]
        except Exception:
            return None
    if not stages:
        return None
    name = stages[-1][0]
    if input_hw is not None:
        fitting = [n for n, r in stages if min(input_hw) // r >= MIN_CAM_CELLS]
        if fitting:
            name = fitting[-1]
    return model.get_submodule(name)


#: A target layer whose map has fewer cells a side than this (at the crop size) is replaced by
#: a shallower stage: a 1 x 1 or 2 x 2 map cannot say where in a 32-64 px crop the model looks,
#: and a cell must not be larger than a globus pallidus (5 x 8 mm): on the 64 mm crop that takes
#: 16 cells (4 mm each; 64 px: ResNet layer1, DenseNet denseblock1, EfficientNet blocks.1). Measured on
#: resnet18's true positives (docs/training.md): 8 x 8 cells put 4 x chance of the energy on the GP,
#: 16 x 16 cells 7 x (Grad-CAM) to 11 x (LayerCAM, made for such layers).
MIN_CAM_CELLS = 16


def _output_hw(model, layer, in_chans: int, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """Spatial size of ``layer``'s output for a zero input of ``input_hw`` (one no-grad pass)."""
    import torch

    seen: list[tuple[int, int]] = []

    def hook(_m, _i, out):
        t = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(t, torch.Tensor) and t.ndim == 4:
            seen.append((int(t.shape[-2]), int(t.shape[-1])))

    with _CAM_LOCK:
        return _output_hw_locked(model, layer, in_chans, input_hw, hook, seen)


def _output_hw_locked(model, layer, in_chans, input_hw, hook, seen):
    import torch

    h = layer.register_forward_hook(hook)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, in_chans, *input_hw), device=_model_device(model)))
    finally:
        h.remove()
        model.train(was_training)
    return seen[0] if seen else None


def resolve_target_layer(model, model_name: str | None = None, input_hw: tuple[int, int] | None = None,
                         in_chans: int | None = None):
    """The layer Grad-CAM reads.

    ``nhb_core.models.default_target_layer(model, name)`` (the last convolutional block) unless,
    at the crop size ``input_hw``, its map has fewer than :data:`MIN_CAM_CELLS` cells a side; then
    the deepest timm ``feature_info`` stage that keeps that many (a 64 px crop: ResNet ``layer3``,
    DenseNet ``features.denseblock3``, EfficientNet ``blocks.4``, 4 x 4 cells).
    """
    from nhb_core.models import default_target_layer

    layer = default_target_layer(model, model_name)
    if input_hw is None:
        return layer
    if in_chans is None:
        conv = next((m for m in model.modules() if hasattr(m, "in_channels")), None)
        in_chans = int(getattr(conv, "in_channels", 1))
    memo = _LAYER_MEMO.setdefault(model, {})
    key = (str(model_name), tuple(input_hw), int(in_chans))
    if key in memo:
        return memo[key]
    hw_in = (int(input_hw[0]), int(input_hw[1]))
    hw = _output_hw(model, layer, in_chans, hw_in)
    if hw is None or min(hw) < MIN_CAM_CELLS:
        shallower = _timm_feature_module(getattr(model, "module", model), hw_in)
        layer = shallower if shallower is not None else layer
    memo[key] = layer
    return layer


#: model -> {(name, input_hw, in_chans): target layer}; forgotten with the model.
_LAYER_MEMO: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------
# CAM computation


def _as_batch(images) -> Any:
    import torch

    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, dtype=np.float32, copy=True))
    t = t.detach().float()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise InputError(None, f"image batch has shape {tuple(t.shape)}, expected [N, C, H, W] or [C, H, W]",
                         "Pass one slice as [C, H, W] float32")
    return t


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        import torch

        return torch.device("cpu")


def compute_cams(model, images, method: str = "gradcam", target_layer=None, model_name: str | None = None,
                 batch_size: int = 32, return_probs: bool = False):
    """Class-activation maps for a batch of crops.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier with one output logit (the "injury" class), as built by ``nhb_core.models``.
    images : np.ndarray or torch.Tensor, shape [N, C, H, W] (or [C, H, W]), float32
        Model-ready crops (already normalised as the model was trained).
    method : {"gradcam", "gradcam++", "eigencam", "layercam"}
    target_layer : torch.nn.Module, optional
        Layer whose activations are used; default :func:`resolve_target_layer`.
    model_name : str, optional
        Architecture name (``"resnet18"``...) for the default target layer.
    batch_size : int
        Crops per forward/backward pass.

    return_probs : bool
        Also return the model's probabilities, ``sigmoid(logit)`` float64 [N], from the same
        forward pass.

    Returns
    -------
    np.ndarray, shape [N, H, W], float32 in [0, 1]
        One map per crop at the crop's resolution, min-max normalised per crop; a map with no
        positive evidence is all zeros. The target is always the positive (injury) logit.
        With ``return_probs``: ``(maps, probs)``.
    """
    m = normalize_method(method)
    x = _as_batch(images)
    n, _, h, w = x.shape
    if target_layer is None:
        target_layer = resolve_target_layer(model, model_name, (h, w), in_chans=int(x.shape[1]))
    with _CAM_LOCK:
        return _compute_cams_locked(model, x, m, target_layer, batch_size, return_probs)


def _compute_cams_locked(model, x, m, target_layer, batch_size, return_probs):
    import pytorch_grad_cam as pgc
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    n, _, h, w = x.shape
    was_training = model.training
    model.eval()
    cam_cls = getattr(pgc, METHODS[m])
    out = np.zeros((n, h, w), dtype=np.float32)
    probs = np.zeros(n, dtype=np.float64)
    # Only the gradient at the target layer is needed: no parameter gradients, and the autograd
    # graph starts at the target layer's output (made a leaf that requires grad), so the backward
    # pass stops there instead of running through the whole network down to the input.
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]

    def _leaf(_mod, _inp, output):
        if isinstance(output, torch.Tensor):
            return output.detach().requires_grad_(True) * 1.0
        return None

    hook = target_layer.register_forward_hook(_leaf, prepend=True)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad(), cam_cls(model=model, target_layers=[target_layer]) as cam:
            for i in range(0, n, batch_size):
                xb = x[i:i + batch_size].to(_model_device(model))
                targets = [ClassifierOutputTarget(0) for _ in range(len(xb))]
                maps = cam(input_tensor=xb, targets=targets)
                out[i:i + len(xb)] = np.asarray(maps, dtype=np.float32).reshape(len(xb), h, w)
                logits = cam.outputs.detach().reshape(len(xb), -1)[:, 0]
                probs[i:i + len(xb)] = torch.sigmoid(logits).cpu().numpy()
    finally:
        hook.remove()
        for p, r in zip(params, saved):
            p.requires_grad_(r)
        model.train(was_training)
    out = np.clip(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0).astype(np.float32)
    return (out, probs) if return_probs else out


def compute_cam(model, image, method: str = "gradcam", target_layer=None, model_name: str | None = None) -> np.ndarray:
    """Class-activation map of one crop.

    Parameters
    ----------
    model : torch.nn.Module
        One-logit classifier.
    image : np.ndarray or torch.Tensor, shape [C, H, W], float32
        A model-ready crop.
    method : {"gradcam", "gradcam++", "eigencam", "layercam"}
    target_layer : torch.nn.Module, optional
        Default :func:`resolve_target_layer` (``models.default_target_layer``).
    model_name : str, optional
        Architecture name, for the default target layer.

    Returns
    -------
    np.ndarray, shape [H, W], float32 in [0, 1] (normalised per slice).
    """
    x = _as_batch(image)
    if x.shape[0] != 1:
        raise InputError(None, f"compute_cam takes one image [C, H, W], got {tuple(x.shape)}", "Use compute_cams for a batch")
    return compute_cams(model, x, method=method, target_layer=target_layer, model_name=model_name)[0]


# ---------------------------------------------------------------------------------------------
# attention measures


def _check_pair(cam: np.ndarray, roi_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = np.asarray(cam, dtype=np.float64)
    roi = np.asarray(roi_mask) > 0
    if cam.shape != roi.shape:
        raise InputError(None, f"CAM shape {cam.shape} differs from ROI mask shape {roi.shape}",
                         "Give the ROI crop matching the CAM")
    return cam, roi


def cam_energy_in_roi(cam: np.ndarray, roi_mask: np.ndarray) -> float:
    """Share of CAM energy inside the ROI: ``sum(cam * roi) / sum(cam)``.

    Parameters
    ----------
    cam : np.ndarray, shape [H, W], non-negative
    roi_mask : np.ndarray, shape [H, W]; non-zero = inside the GP ROI

    Returns
    -------
    float in [0, 1]; NaN when the map is all zeros (no attention to share).
    """
    cam, roi = _check_pair(cam, roi_mask)
    cam = np.clip(cam, 0.0, None)
    total = float(cam.sum())
    if not np.isfinite(total) or total <= 0:
        return float("nan")
    return float(np.clip(cam[roi].sum() / total, 0.0, 1.0))


def pointing_game(cam: np.ndarray, roi_mask: np.ndarray, tolerance_px: float = 0) -> bool:
    """Pointing-game hit: the CAM maximum falls inside the ROI.

    Parameters
    ----------
    cam : np.ndarray, shape [H, W]
    roi_mask : np.ndarray, shape [H, W]; non-zero = inside
    tolerance_px : float
        A maximum within this Euclidean distance (pixels) of the ROI counts as a hit (0 = strict).

    Returns
    -------
    bool: True when a pixel attaining the maximum lies in the (dilated) ROI. A constant map
    (no maximum) and an empty ROI are misses.
    """
    cam, roi = _check_pair(cam, roi_mask)
    if not roi.any() or not np.isfinite(cam).all() or float(cam.max()) <= float(cam.min()):
        return False
    if tolerance_px > 0:
        from scipy.ndimage import distance_transform_edt

        roi = distance_transform_edt(~roi) <= float(tolerance_px)
    peak = cam >= cam.max()
    return bool((peak & roi).any())


# ---------------------------------------------------------------------------------------------
# faithfulness


def _removal_order(cam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices, most relevant first (ties broken at random, reproducibly)."""
    flat = np.asarray(cam, dtype=np.float64).ravel()
    tie = rng.random(flat.size)
    return np.lexsort((tie, -flat))


def faithfulness(model, image, cam: np.ndarray, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 n_random: int = 3, seed: int = 0, noise: float = 0.01) -> dict[str, Any]:
    """ROAD "most relevant first" faithfulness of a map, next to random maps.

    For each fraction ``f`` the top ``f`` share of crop pixels by CAM value are removed and
    filled by ``pytorch_grad_cam.metrics.road.NoisyLinearImputer`` (noisy linear imputation,
    which avoids the out-of-distribution artefacts of blacking pixels out); the model's injury
    probability is recomputed. The same is done for ``n_random`` uniform random maps.

    Parameters
    ----------
    model : torch.nn.Module
        One-logit classifier.
    image : np.ndarray or torch.Tensor, shape [C, H, W], float32
    cam : np.ndarray, shape [H, W]
    fractions : sequence of float in (0, 1)
        Shares of pixels removed.
    n_random : int
        Random maps averaged for the baseline.
    seed : int
        Fixes the random maps, tie-breaking and the imputer's noise.
    noise : float
        Standard deviation of the imputer's noise (image units).

    Returns
    -------
    dict with ``prob`` (original probability), ``drop`` (mean over fractions of
    ``prob - prob_after`` for the CAM; larger = the CAM found pixels the model relies on),
    ``random_baseline_drop`` (the same for random maps), ``drops`` / ``random_drops`` (per
    fraction), ``fractions``, ``method`` (``"road_morf"``).
    """
    import torch
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    x = _as_batch(image)
    if x.shape[0] != 1:
        raise InputError(None, "faithfulness takes one image [C, H, W]", "Call it once per crop")
    _, c, h, w = x.shape
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != (h, w):
        raise InputError(None, f"CAM shape {cam.shape} differs from the image's {(h, w)}", "Compute the CAM on this image")
    fr = [float(f) for f in fractions]
    if not fr or any(not 0 < f < 1 for f in fr):
        raise InputError(None, "faithfulness fractions must lie strictly between 0 and 1", "Use e.g. 0.1, 0.2, 0.3")
    rng = np.random.default_rng(seed)
    maps = [cam] + [rng.random((h, w)).astype(np.float32) for _ in range(int(n_random))]
    orders = [_removal_order(m, rng) for m in maps]
    imputer = NoisyLinearImputer(noise=noise)
    img = x[0].cpu()
    perturbed = []
    import warnings

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # the imputer calls np.argwhere on a torch tensor (a NumPy 2 deprecation inside grad-cam)
        warnings.filterwarnings("ignore", message=".*__array_wrap__.*", category=DeprecationWarning)
        torch.manual_seed(seed)
        for f in fr:
            k = max(1, int(round(f * h * w)))
            for order in orders:
                keep = np.ones(h * w, dtype=np.float32)
                keep[order[:k]] = 0.0
                perturbed.append(imputer(img, torch.from_numpy(keep.reshape(h, w))))
    batch = torch.cat([x.cpu(), torch.stack(perturbed)])
    with _CAM_LOCK:  # no CAM hooks of another thread may see these passes
        p = _probs_locked(model, batch)
    p0 = float(p[0])
    after = p[1:].reshape(len(fr), len(maps))
    drops = p0 - after
    return {
        "method": "road_morf",
        "prob": p0,
        "fractions": fr,
        "drops": drops[:, 0].tolist(),
        "random_drops": drops[:, 1:].mean(axis=1).tolist() if n_random > 0 else [float("nan")] * len(fr),
        "drop": float(drops[:, 0].mean()),
        "random_baseline_drop": float(drops[:, 1:].mean()) if n_random > 0 else float("nan"),
    }


def _probs_locked(model, batch) -> np.ndarray:
    import torch

    was_training = model.training
    model.eval()
    probs = []
    try:
        with torch.no_grad():
            for i in range(0, len(batch), 64):
                logits = model(batch[i:i + 64].to(_model_device(model)))
                probs.append(torch.sigmoid(logits.reshape(len(logits), -1)[:, 0]).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(probs).astype(np.float64)


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


# ---------------------------------------------------------------------------------------------
# runs: cached maps per case, summaries


def _safe_part(text: str, max_len: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._-")[:max_len]
    return s or "x"


def run_dataset_dir(run_dir: str | os.PathLike) -> Path:
    """The prepared slice dataset a run was trained on.

    Looked up in ``stages.json`` (the prepare stage's ``dataset_dir``), then ``metrics.json``
    (``run.dataset_dir``), then ``<run>/dataset``. Raises :class:`DatasetError` when none exists.
    """
    from nhb_core.fileio import read_json

    rd = Path(run_dir)
    cands: list[Path] = []
    for fname, getter in (("stages.json", lambda d: (d.get("prepare") or {}).get("dataset_dir")),
                          ("metrics.json", lambda d: (d.get("run") or {}).get("dataset_dir"))):
        try:
            v = getter(read_json(rd / fname))
        except (OSError, ValueError, AttributeError):
            v = None
        if v:
            cands.append(Path(v))
    cands.append(rd / "dataset")
    for c in cands:
        if (c / "prepare.json").is_file():
            return c
    raise DatasetError(rd, "the run's prepared slice dataset was not found (no dataset/prepare.json)",
                       "Rerun the study, or keep its dataset folder (cache_dir) in place")


_DATASETS: dict[tuple[str, int], Any] = {}


def _load_ds(ds_dir: Path):
    from nhb_core.slices import load_dataset

    key = (str(ds_dir.resolve()), (ds_dir / "index.csv").stat().st_mtime_ns)
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key] = load_dataset(ds_dir)
    return _DATASETS[key]


def _set_members(run_dir: Path, set_name: str) -> set[str] | None:
    from nhb_core.fileio import read_json

    p = run_dir / "split.json"
    if not p.is_file():
        return None
    split = read_json(p)
    sets = split.get("sets") or {}
    if set_name not in sets:
        raise InputError(p, f"the split has no set {set_name!r}", f"Use one of: {', '.join(sets)}")
    return {str(s) for s in sets[set_name]}


def _in_set(members: set[str] | None, subject_id: str, slice_index: int) -> bool:
    return members is None or subject_id in members or f"{subject_id}#{slice_index}" in members


def _roi_crop(ds, row: int) -> np.ndarray:
    if ds.masks is not None:
        return np.asarray(ds.masks[row]) > 0
    chans = list(ds.meta.get("channels") or [])
    if "roi" in chans:
        return np.asarray(ds.images[row, chans.index("roi")]) > 0.5
    raise DatasetError(ds.path, "the dataset has no ROI crops (no masks.npy, no ROI channel)", "Rerun prepare")


def _cache_path(run_dir: Path, model_name: str, method: str, subject_id: str, slice_index: int, key: str) -> Path:
    m = method.replace("++", "pp")
    return (run_dir / "saliency" / "cache" / _safe_part(model_name) / m /
            f"{_safe_part(subject_id)}__z{int(slice_index):03d}__{key[:16]}.npz")


def _read_npz(path: Path) -> dict[str, Any] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None


def _write_npz(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **data)


def cam_for_case(run_dir: str | os.PathLike, model_name: str, set_name: str, subject_id: str, slice_index: int,
                 method: str = "gradcam", with_faithfulness: bool = False, seed: int = 0) -> dict[str, Any]:
    """The CAM of one slice of a run's dataset, computed once and cached.

    Parameters
    ----------
    run_dir : path
        A study run folder.
    model_name : str
        One of its models (``models/<name>/``).
    set_name : str
        The split set the case belongs to (``"test"``, ``"val"``, ``"external:B"``...).
    subject_id : str
    slice_index : int
        Axial slice index (the dataset's ``slice_index``).
    method : str
        See :data:`METHODS`.
    with_faithfulness : bool
        Also compute (and cache) :func:`faithfulness` (a few dozen forward passes).
    seed : int
        Seed of the faithfulness random maps.

    Returns
    -------
    dict with ``cam`` float32 [H, W] in [0, 1], ``image`` float32 [C, H, W] (the model input),
    ``roi`` bool [H, W] (the GP ROI crop), ``prob`` (the model's probability for the slice),
    ``label`` (0/1), ``energy_in_roi``, ``pointing_hit``, ``threshold``, ``subject_id``,
    ``slice_index``, ``model``, ``method``, ``cached`` (bool); with faithfulness also
    ``faithfulness`` (drop) and ``random_baseline``.

    The cache file is ``<run>/saliency/cache/<model>/<method>/<subject>__z<slice>__<key>.npz``,
    the key hashing model, method, subject, slice, the weights' SHA-256 and the image's bytes.
    """
    from nhb_core.fileio import sha256_json
    from nhb_core.models import load_run_model, weights_sha256

    rd = Path(run_dir)
    m = normalize_method(method)
    subject_id = str(subject_id)
    slice_index = int(slice_index)
    mdir = RunFolder(rd).model_dir(model_name)
    if not (mdir / "model.safetensors").is_file():
        raise RunError(mdir, f"model {model_name!r} has no trained weights in this run", "Pick a trained model")
    run_dir_dataset = run_dataset_dir(rd)
    ds = _load_ds(run_dir_dataset)
    idx = ds.index
    hit = idx[(idx["subject_id"].astype(str) == subject_id) & (idx["slice_index"].astype(int) == slice_index)]
    if hit.empty:
        raise InputError(run_dir_dataset / "index.csv", f"no slice {slice_index} of subject {subject_id!r} in the dataset",
                         "Pick a subject and slice listed in the run's predictions")
    members = _set_members(rd, set_name)
    if not _in_set(members, subject_id, slice_index):
        raise InputError(rd / "split.json", f"subject {subject_id!r} is not in set {set_name!r}", "Pick a case of that set")
    row = int(hit.iloc[0]["row"]) if "row" in hit.columns else int(hit.index[0])
    image = np.asarray(ds.images[row], dtype=np.float32)
    roi = _roi_crop(ds, row)
    label = int(hit.iloc[0]["label"])
    wsha = weights_sha256(mdir)
    key = sha256_json({"model": model_name, "method": m, "subject": subject_id, "slice": slice_index,
                       "weights": wsha, "image": sha256_bytes(np.ascontiguousarray(image).tobytes()), "v": 1})
    path = _cache_path(rd, model_name, m, subject_id, slice_index, key)
    cached = _read_npz(path) if path.is_file() else None
    need_faith = with_faithfulness and (cached is None or "faithfulness" not in cached
                                        or int(cached.get("faith_seed", -1)) != int(seed))
    model = mj = None
    if cached is None or need_faith:
        model, mj = load_run_model(rd, model_name)
    if cached is None:
        arch = (mj or {}).get("architecture") or model_name
        cams, probs = compute_cams(model, image[None], method=m, model_name=arch, return_probs=True)
        cam, prob = cams[0], float(probs[0])
        data = {"cam": cam.astype(np.float32), "prob": np.float64(prob), "key": np.array(key)}
        was_cached = False
    else:
        data = dict(cached)
        was_cached = not need_faith
    if need_faith:
        f = faithfulness(model, image, data["cam"], seed=seed)
        data.update(faithfulness=np.float64(f["drop"]), random_baseline=np.float64(f["random_baseline_drop"]),
                    faith_seed=np.int64(seed))
    if not was_cached:
        _write_npz(path, data)
    thr = None
    try:
        from nhb_core.fileio import read_json

        thr = read_json(mdir / "model.json").get("threshold")
    except (OSError, ValueError):
        pass
    cam = np.asarray(data["cam"], dtype=np.float32)
    out = {
        "cam": cam, "image": image, "roi": roi, "prob": float(data["prob"]), "label": label,
        "energy_in_roi": cam_energy_in_roi(cam, roi), "pointing_hit": pointing_game(cam, roi),
        "roi_share": float((np.asarray(roi) > 0).mean()),
        "threshold": None if thr is None else float(thr), "subject_id": subject_id, "slice_index": slice_index,
        "model": model_name, "method": m, "cached": was_cached, "cache_file": str(path),
    }
    if "faithfulness" in data:
        out["faithfulness"] = float(data["faithfulness"])
        out["random_baseline"] = float(data["random_baseline"])
    return out


def cam_on_slice(run_dir: str | os.PathLike, case: dict[str, Any]) -> dict[str, Any]:
    """A :func:`cam_for_case` result placed on the subject's full axial slice.

    Re-reads the subject's T1 and ROI (paths from the run's manifest) and re-derives the crop
    position with ``nhb_core.slices.extract_slices`` under the model's preprocessing.

    Returns
    -------
    dict with ``image`` float32 [Y, X] (the raw T1 slice), ``roi`` bool [Y, X], ``cam`` float32
    [Y, X] in [0, 1] (0 outside the crop), ``geometry`` (see :func:`crop_geometry`), in the
    :func:`display_slice` orientation.
    """
    from nhb_core.fileio import read_json
    from nhb_core.io import load_roi, load_t1
    from nhb_core.slices import PrepareConfig, extract_slices

    rd = Path(run_dir)
    manifest = None
    for p, get in ((rd / "config.yaml", None), (rd / "metrics.json", lambda d: (d.get("run") or {}).get("manifest"))):
        try:
            if get is None:
                import yaml

                manifest = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("manifest")
            else:
                manifest = get(read_json(p))
        except (OSError, ValueError, AttributeError, ImportError):
            manifest = None
        if manifest:
            break
    if not manifest:
        raise RunError(rd, "the run does not record its manifest", "Open the case from a run made by the study")
    from nhb_core.manifest import load_manifest

    df = load_manifest(manifest).df
    row = df[df["subject_id"].astype(str) == str(case["subject_id"])]
    if row.empty:
        raise InputError(manifest, f"subject {case['subject_id']!r} is not in the manifest", "Check the run's manifest")
    t1 = load_t1(row.iloc[0]["t1_path"])
    roi = load_roi(row.iloc[0]["roi_path"], reference=t1)
    mj = read_json(RunFolder(rd).model_json_path(case["model"]))
    cfg = PrepareConfig.from_dict(mj.get("preprocessing") or {})
    sp = t1.spacing
    res = extract_slices(t1.data, roi.data, (sp[0], sp[1], sp[2]), cfg, affine=t1.affine)
    geo = crop_geometry(res["centroid_vox"], t1.spacing, t1.data.shape, cfg, affine=t1.affine)
    z = int(case["slice_index"])
    img = display_slice(t1.data, z).astype(np.float32)
    full = paste_back(case["cam"], geo, img.shape)
    if full.max() > 0:
        full = full / full.max()
    return {"image": img, "roi": display_slice(np.asarray(roi.data) > 0, z), "cam": full, "geometry": geo}


def _outcome(label: int, prob: float, thr: float | None) -> str:
    if thr is None or prob is None or not np.isfinite(prob):
        return ""
    pred = prob >= thr
    return ("TP" if pred else "FN") if label == 1 else ("FP" if pred else "TN")


def _pick_cases(ds, members: set[str] | None, max_cases: int | None, seed: int):
    """One slice per subject of the set (the one with most ROI voxels), stratified by label."""
    idx = ds.index.copy()
    idx["subject_id"] = idx["subject_id"].astype(str)
    if members is not None:
        keep = idx["subject_id"].isin(members) | (idx["subject_id"] + "#" + idx["slice_index"].astype(str)).isin(members)
        idx = idx[keep]
    if idx.empty:
        return idx
    rv = idx["roi_voxels"] if "roi_voxels" in idx.columns else 0
    idx = idx.assign(_rv=rv).sort_values(["subject_id", "_rv", "slice_index"], ascending=[True, False, True])
    best = idx.drop_duplicates("subject_id", keep="first")
    rng = np.random.default_rng(seed)
    best = best.iloc[rng.permutation(len(best))]
    if max_cases is not None and max_cases < len(best):
        pos, neg = best[best["label"] == 1], best[best["label"] != 1]
        n_pos = min(len(pos), (int(max_cases) + 1) // 2)
        n_neg = min(len(neg), int(max_cases) - n_pos)
        n_pos = min(len(pos), int(max_cases) - n_neg)
        import pandas as pd

        best = pd.concat([pos.iloc[:n_pos], neg.iloc[:n_neg]])
    return best.sort_values(["label", "subject_id"], ascending=[False, True]).drop(columns=["_rv"])


def default_set(run_dir: str | os.PathLike) -> str:
    """``"test"`` when the run's split has it, else its first non-train set."""
    from nhb_core.fileio import read_json

    try:
        sets = list(read_json(Path(run_dir) / "split.json").get("sets") or {})
    except (OSError, ValueError):
        sets = []
    if "test" in sets or not sets:
        return "test"
    rest = [s for s in sets if s != "train"]
    return rest[0] if rest else sets[0]


SUMMARY_COLUMNS = ["model", "subject_id", "center", "slice_index", "label", "prob", "subject_prob", "threshold",
                   "outcome", "energy_in_roi", "roi_share", "pointing_hit", "faithfulness", "random_baseline"]


def saliency_summary(run_dir: str | os.PathLike, model_name: str | None = None, set_name: str | None = None,
                     method: str = "gradcam", max_cases: int | None = None,
                     progress: ProgressCallback | None = None, *, models: Sequence[str] | None = None,
                     n_cases: int | None = None, out_dir: str | os.PathLike | None = None,
                     seed: int = 0, with_faithfulness: bool = True):
    """Attention and faithfulness of a run's models over the cases of one set.

    Parameters
    ----------
    run_dir : path
        A study run.
    model_name : str, optional
        One model; default: every model of the run (or ``models``).
    set_name : str, optional
        Split set (default :func:`default_set`: ``"test"``).
    method : str
        See :data:`METHODS`.
    max_cases : int, optional
        At most this many subjects (half positive, half negative where possible, chosen with
        ``seed``); default all subjects of the set. ``n_cases`` is a synonym.
    progress : callable, optional
        ``{"stage": "saliency", "model", "done", "total", "eta_s"}``.
    models : list of str, optional
        Models to summarise (default all).
    out_dir : path, optional
        Also write ``summary.json`` (per-model means + cases), ``cases.csv`` and one overlay PNG
        per case and model under ``overlays/<model>/`` there.
    seed : int
        Case selection and faithfulness random maps.
    with_faithfulness : bool
        Compute ROAD faithfulness and its random baseline (the slow part).

    Returns
    -------
    pandas.DataFrame, one row per model and case (one slice per subject: the slice with the
    most ROI voxels), columns :data:`SUMMARY_COLUMNS`; ``outcome`` (TP/FP/FN/TN) compares the
    subject probability of the run's predictions (else the slice probability) to the model's
    threshold. Per-model means: :func:`saliency_means`.
    """
    import pandas as pd

    rd = Path(run_dir)
    m = normalize_method(method)
    all_models = RunFolder(rd).require_trained_models()
    if model_name is not None:
        names = [model_name]
    elif models:
        names = [str(x) for x in models]
    else:
        names = all_models
    missing = [n for n in names if n not in all_models]
    if missing:
        raise RunError(RunFolder(rd).models_dir, f"model {missing[0]!r} has no trained weights in this run",
                       f"Use one of: {', '.join(all_models)}")
    set_name = set_name or default_set(rd)
    if max_cases is None and n_cases is not None:
        max_cases = int(n_cases)
    ds = _load_ds(run_dataset_dir(rd))
    members = _set_members(rd, set_name)
    cases = _pick_cases(ds, members, max_cases, seed)
    subj_probs = {}
    pred_p = RunFolder(rd).predictions_path(set_name, "subject")
    if pred_p.is_file():
        try:
            pdf = pd.read_csv(pred_p, dtype={"subject_id": str})
            subj_probs = {n: dict(zip(pdf["subject_id"], pdf[n])) for n in names if n in pdf.columns}
        except (OSError, ValueError, KeyError):
            subj_probs = {}
    total = len(cases) * len(names)
    done = 0
    eta = EtaEstimator()
    rows = []
    emit(progress, "saliency", done=0, total=total, message=f"{set_name}: {len(cases)} cases x {len(names)} models")
    for name in names:
        for _, c in cases.iterrows():
            r = cam_for_case(rd, name, set_name, str(c["subject_id"]), int(c["slice_index"]), method=m,
                             with_faithfulness=with_faithfulness, seed=seed)
            sp = subj_probs.get(name, {}).get(str(c["subject_id"]))
            sp = float(sp) if sp is not None and np.isfinite(sp) else None
            rows.append({
                "model": name, "subject_id": str(c["subject_id"]), "center": str(c.get("center", "")),
                "slice_index": int(c["slice_index"]), "label": int(c["label"]), "prob": r["prob"],
                "subject_prob": sp, "threshold": r["threshold"],
                "outcome": _outcome(int(c["label"]), sp if sp is not None else r["prob"], r["threshold"]),
                "energy_in_roi": r["energy_in_roi"], "roi_share": r.get("roi_share", float("nan")),
                "pointing_hit": bool(r["pointing_hit"]),
                "faithfulness": r.get("faithfulness", float("nan")),
                "random_baseline": r.get("random_baseline", float("nan")),
            })
            if out_dir is not None:
                rel = Path("overlays") / _safe_part(name) / f"{_safe_part(r['subject_id'])}__z{r['slice_index']:03d}.png"
                from nhb_core.fileio import atomic_write_bytes

                atomic_write_bytes(Path(out_dir) / rel, overlay_png(r["image"][0], r["cam"], r["roi"]))
                rows[-1]["png"] = rel.as_posix()
            done += 1
            emit(progress, "saliency", model=name, done=done, total=total, eta_s=eta.eta(done, total))
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS + (["png"] if out_dir is not None else []))
    if out_dir is not None:
        from nhb_core.fileio import atomic_write_json, atomic_write_text

        od = Path(out_dir)
        atomic_write_text(od / "cases.csv", df.to_csv(index=False))
        means = saliency_means(df)
        atomic_write_json(od / "summary.json", {
            "method": m, "set": set_name, "n_cases": int(len(cases)), "seed": int(seed),
            "faithfulness": "ROAD most-relevant-first: mean drop of the injury probability when the top "
                            f"{', '.join(str(int(f * 100)) for f in DEFAULT_FRACTIONS)}% CAM pixels are imputed",
            "models": {r["model"]: {k: r[k] for k in means.columns if k != "model"} for _, r in means.iterrows()},
            "cases": df.to_dict(orient="records"),
        })
    return df


def saliency_means(summary) -> Any:
    """Per-model means of a :func:`saliency_summary` table.

    Returns
    -------
    pandas.DataFrame with ``model``, ``n``, ``energy_in_roi`` (mean share), ``energy_chance`` (mean
    share of the crop inside the ROI: the share of a map that ignores anatomy, and the pointing rate
    of a random maximum, ``pointing_chance``), ``energy_x_chance`` (their ratio), ``pointing_hit_rate``,
    ``faithfulness`` (mean ROAD drop), ``random_baseline`` (mean drop for random maps),
    ``faithfulness_gain`` (the difference) — NaNs skipped.
    """
    import pandas as pd

    cols = ["model", "n", "energy_in_roi", "energy_chance", "energy_x_chance", "pointing_hit_rate",
            "pointing_chance", "faithfulness", "random_baseline", "faithfulness_gain"]
    if summary is None or len(summary) == 0:
        return pd.DataFrame(columns=cols)
    g = summary.groupby("model", sort=False)
    out = pd.DataFrame({
        "n": g.size(),
        "energy_in_roi": g["energy_in_roi"].mean(),
        # chance: a map that ignores anatomy puts the ROI's share of the crop inside the ROI, and
        # its maximum lands in the ROI with that probability
        "energy_chance": g["roi_share"].mean() if "roi_share" in summary else np.nan,
        "pointing_hit_rate": g["pointing_hit"].mean(),
        "faithfulness": g["faithfulness"].mean(),
        "random_baseline": g["random_baseline"].mean(),
    })
    out["faithfulness_gain"] = out["faithfulness"] - out["random_baseline"]
    out["energy_x_chance"] = out["energy_in_roi"] / out["energy_chance"]
    out["pointing_chance"] = out["energy_chance"]
    return out.reset_index()[cols]
