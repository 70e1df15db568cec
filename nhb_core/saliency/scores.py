"""Scores of a map: CAM energy inside the ROI, the pointing game, and faithfulness (ROAD most
relevant first against random maps)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nhb_core.errors import InputError
from nhb_core.saliency.computation import _CAM_LOCK, DEFAULT_FRACTIONS, _as_batch, _model_device

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

