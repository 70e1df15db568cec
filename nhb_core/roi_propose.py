"""GP ROI proposals learned from a few manual masks (``python -m nhb_core roi propose``).

The rows of a manifest that have an ROI mask (``roi_source`` manual or corrected,
or no ``roi_source`` column) train a 2D segmentation network
(:mod:`segmentation_models_pytorch` U-Net with a randomly initialised timm/torchvision
encoder; three classes: 0 background, 1 = left GP, 2 = right GP) on axial slices
through and around the GP; every other row (no ``roi``, or ``roi_source`` =
proposed) gets a proposed mask on its T1's own grid, a confidence and QC flags.

Geometry and intensities follow :mod:`nhb_core.slices`: arrays in RAS+ closest
canonical orientation, the slice axis is array axis 2, in-plane crops of a fixed
physical size (``crop_mm`` at ``size`` pixels, row 0 anterior, column 0 the
patient's right, the in-plane rotation of an oblique acquisition undone by
:func:`nhb_core.slices.inplane_matrix`), volumes normalised with
:func:`nhb_core.slices.intensity_stats` / :func:`~nhb_core.slices.apply_norm`
(percentile, clipped to [0, 1]). The network sees three channels: the slice and
its two neighbours along the slice axis (edge slices repeated).

Localisation of a subject without a mask (coarse to fine, with the same network):

1. **prior**: the in-plane centre of the head (voxels brighter than the head
   threshold of :func:`~nhb_core.slices.intensity_stats`) plus the mean offset
   (mm, right/anterior) of the manual GP centroids from their head centres;
2. **pass 1**: the network on every slice of a larger crop (``search_mm``)
   around the prior; the largest 3D connected foreground component gives the GP
   centre;
3. **pass 2**: the network on every slice of a ``crop_mm`` crop centred there;
   its class probabilities are resampled (bilinear) onto the T1's voxel grid,
   the label is the most probable class, and each label keeps its largest 3D
   connected component.

Outputs (``out_dir``)::

    manifest.csv            the input manifest with the proposals filled in, paths
                            rewritten relative to out_dir, and a column roi_source
                            (manual | proposed | corrected)
    proposals.csv           one row per subject: roi_source, confidence, QC flags
                            and the measures behind them (see docs/roi.md)
    masks/<id>_roi_proposed.nii.gz   int16 labels (1 = left, 2 = right) on the T1 grid
    roi_model.safetensors   the trained network; roi_model.json its config,
                            the training subjects and the cohort reference stats

Everything random (weight init, sampling, augmentation) is fixed by ``seed``;
two CPU runs with the same inputs, seed and thread count give identical masks.
"""

from __future__ import annotations

import csv
import io as _io
import math
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nhb_core.errors import ConfigError, InputError, ManifestError
from nhb_core.fileio import atomic_path, atomic_write_json, atomic_write_text
from nhb_core.progress import EtaEstimator, ProgressCallback, emit

#: roi_source values
SOURCES = ("manual", "proposed", "corrected")

PROPOSALS_COLUMNS = [
    "subject_id", "center", "roi_source", "roi", "confidence", "qc_ok", "qc_flags", "soft_dice", "mean_prob",
    "volume_left_mm3", "volume_right_mm3", "asymmetry", "position_mm", "separation_mm", "intensity_mean",
    "intensity_outlier_frac", "ring_contrast", "intensity_sd", "n_slices",
]


@dataclass
class RoiConfig:
    """Options of :func:`propose_rois`.

    Parameters
    ----------
    encoder : str
        segmentation-models-pytorch encoder name (random init, never downloaded):
        the default is timm's MobileNetV3-small (``tu-`` = a timm encoder; 1 M
        parameters, 3x faster than ``"resnet18"`` on a CPU); ``"resnet18"``,
        ``"mobilenet_v2"``, ``"efficientnet-b0"`` also work.
    encoder_depth : int
        Encoder stages used by the U-Net (``size`` must be a multiple of 2**depth).
    decoder_channels : tuple of int
        U-Net decoder widths, one per stage (length ``encoder_depth``).
    crop_mm, size : float, int
        Fine crop side in mm and in pixels (pixel = crop_mm / size mm).
    search_mm : float
        Side (mm) of the pass-1 crop around the prior position.
    epochs : int
        Training epochs; one epoch = ``samples_per_subject`` crops per manual subject
        (counted as at least 20 subjects, so that a few masks still get enough steps).
    samples_per_subject : int
        Crops drawn per training subject and epoch (weighted towards GP slices).
    batch_size : int
    lr : float
        AdamW peak learning rate (one-cycle schedule).
    shift_mm : float
        Training crops are centred up to this far (uniform, per axis) from the GP centroid.
    near_slices : int
        Slices within this many of a GP-bearing slice are drawn as often as GP slices;
        the rest of the volume is drawn with weight ``far_weight``.
    far_weight : float
    seed : int
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """

    encoder: str = "tu-mobilenetv3_small_100"
    encoder_depth: int = 4
    decoder_channels: tuple = (64, 32, 16, 16)
    crop_mm: float = 64.0
    size: int = 80
    search_mm: float = 102.4
    epochs: int = 15
    samples_per_subject: int = 24
    batch_size: int = 16
    lr: float = 3e-3
    shift_mm: float = 14.0
    near_slices: int = 2
    far_weight: float = 0.15
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        src = "roi propose options"
        try:
            self.encoder_depth = int(self.encoder_depth)
            self.decoder_channels = tuple(int(c) for c in self.decoder_channels)
            self.crop_mm, self.search_mm = float(self.crop_mm), float(self.search_mm)
            self.size, self.epochs = int(self.size), int(self.epochs)
            self.samples_per_subject, self.batch_size = int(self.samples_per_subject), int(self.batch_size)
            self.lr, self.shift_mm, self.far_weight = float(self.lr), float(self.shift_mm), float(self.far_weight)
            self.near_slices, self.seed = int(self.near_slices), int(self.seed)
        except (TypeError, ValueError) as err:
            raise ConfigError(src, f"an option has a wrong type ({err})", "Give numbers for the numeric options") from None
        m = 2 ** self.encoder_depth
        if self.size < m or self.size % m:
            raise ConfigError(src, f"size {self.size} is not a positive multiple of {m} (2**encoder_depth)",
                              f"Use e.g. size {max(m, round(self.size / m) * m)}")
        if len(self.decoder_channels) != self.encoder_depth:
            raise ConfigError(src, f"decoder_channels has {len(self.decoder_channels)} values for encoder_depth "
                              f"{self.encoder_depth}", "Give one decoder width per encoder stage")
        if self.epochs < 1 or self.batch_size < 1 or self.samples_per_subject < 1:
            raise ConfigError(src, "epochs, batch_size and samples_per_subject must be at least 1", "Use positive values")
        if not (self.crop_mm > 0 and self.search_mm >= self.crop_mm):
            raise ConfigError(src, f"crop_mm {self.crop_mm:g} / search_mm {self.search_mm:g} are invalid",
                              "Use crop_mm > 0 and search_mm >= crop_mm")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(src, f"unknown device {self.device!r}", "Use auto, cpu or cuda")

    @property
    def pixel_mm(self) -> float:
        return self.crop_mm / self.size

    @property
    def search_size(self) -> int:
        """Pass-1 crop side in pixels (a multiple of 2**encoder_depth, same pixel size)."""
        m = 2 ** self.encoder_depth
        return max(self.size, int(math.ceil(self.search_mm / self.pixel_mm / m)) * m)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RoiConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError("roi propose options", f"unknown option(s) {', '.join(bad)}",
                              f"Use only {', '.join(sorted(known))}")
        return cls(**d)


# --------------------------------------------------------------------------- geometry / per-subject arrays


@dataclass
class _Subject:
    """One subject's arrays, in RAS+ closest canonical orientation.

    ``vol`` float32 (X, Y, Z) normalised T1 (percentile, [0, 1]); ``roi`` int16 (X, Y, Z)
    or None; ``M`` 2x2 (voxels per mm towards right / anterior, array axes 0, 1);
    ``head_xy`` the in-plane head centre (voxels); ``spacing`` mm; ``affine`` 4x4.
    """

    sid: str
    vol: np.ndarray
    roi: np.ndarray | None
    M: np.ndarray
    head_xy: np.ndarray
    spacing: tuple
    affine: np.ndarray


def _load_subject(sid: str, t1_path: str, roi_path: str | None) -> _Subject:
    from nhb_core.errors import ImageError
    from nhb_core.io import load_roi, load_t1
    from nhb_core.slices import PrepareConfig, apply_norm, inplane_matrix, intensity_stats

    t1 = load_t1(t1_path)
    pc = PrepareConfig()
    try:
        offset, scale, background = intensity_stats(t1.data, pc)
        M = inplane_matrix(t1.affine, t1.spacing)
    except ImageError as err:
        raise ImageError(t1_path, err.problem, err.fix) from None
    raw = np.asarray(t1.data, dtype=np.float32)
    robust_max = float(np.percentile(raw[:, :, :].reshape(-1)[:: max(1, raw.size // 65536)], 99.5))
    head = raw > background + pc.head_threshold * (robust_max - background)
    ix, iy = np.nonzero(head.any(axis=2)) if head.any() else (np.array([raw.shape[0] / 2]), np.array([raw.shape[1] / 2]))
    head_xy = np.array([ix.mean(), iy.mean()], dtype=np.float64)
    vol = apply_norm(raw.copy(), offset, scale, pc)
    roi = None
    if roi_path:
        roi = np.asarray(load_roi(roi_path, reference=t1).data, dtype=np.int16)
    return _Subject(sid, vol, roi, M, head_xy, tuple(float(s) for s in t1.spacing), np.asarray(t1.affine))


def _grid(centre_xy, M: np.ndarray, crop_mm: float, size: int, rot_deg: float = 0.0, scale: float = 1.0):
    """Voxel coordinates (2, size, size) of a crop: row 0 anterior, column 0 the patient's right."""
    off = crop_mm / 2.0 - (np.arange(size, dtype=np.float64) + 0.5) * crop_mm / size
    d_right = np.broadcast_to(off[None, :], (size, size)) * scale
    d_ant = np.broadcast_to(off[:, None], (size, size)) * scale
    if rot_deg:
        t = math.radians(rot_deg)
        d_right, d_ant = math.cos(t) * d_right - math.sin(t) * d_ant, math.sin(t) * d_right + math.cos(t) * d_ant
    gx = centre_xy[0] + M[0, 0] * d_right + M[0, 1] * d_ant
    gy = centre_xy[1] + M[1, 0] * d_right + M[1, 1] * d_ant
    return np.stack([gx, gy])


def _sample_stack(vol: np.ndarray, z: int, coords: np.ndarray) -> np.ndarray:
    """The slices z-1, z, z+1 (edges repeated) sampled at ``coords`` -> float32 (3, H, W)."""
    from scipy import ndimage

    nz = vol.shape[2]
    out = np.empty((3,) + coords.shape[1:], dtype=np.float32)
    for c, dz in enumerate((-1, 0, 1)):
        zz = min(max(z + dz, 0), nz - 1)
        out[c] = ndimage.map_coordinates(vol[:, :, zz], coords, order=1, mode="constant", cval=0.0)
    return out


def _centroid_xy(roi: np.ndarray) -> np.ndarray:
    ix, iy, _ = np.nonzero(roi > 0)
    return np.array([ix.mean(), iy.mean()], dtype=np.float64)


def _to_mm(M: np.ndarray, dvox: np.ndarray) -> np.ndarray:
    """In-plane voxel displacement -> (right, anterior) mm."""
    return np.linalg.solve(M, dvox)


# --------------------------------------------------------------------------- cohort reference stats (QC)


def _measures(s: _Subject, mask: np.ndarray) -> dict[str, float]:
    """Volume per label (mm^3), asymmetry, GP offset from the head centre and L-R separation (mm), intensity.

    ``ring_contrast``: mean normalised T1 inside the mask minus the mean in a 1-voxel in-plane
    ring around it (the GP is brighter than its surroundings); ``intensity_sd`` inside the mask.
    """
    from scipy import ndimage

    vox_mm3 = float(np.prod(s.spacing))
    v1, v2 = float((mask == 1).sum()) * vox_mm3, float((mask == 2).sum()) * vox_mm3
    out: dict[str, float] = {"volume_left_mm3": v1, "volume_right_mm3": v2,
                             "asymmetry": abs(v1 - v2) / (v1 + v2) if v1 + v2 > 0 else float("nan")}
    if (mask > 0).any():
        off = _to_mm(s.M, _centroid_xy(mask) - s.head_xy)
        out["offset_right_mm"], out["offset_ant_mm"] = float(off[0]), float(off[1])
        vals = s.vol[mask > 0]
        out["intensity_mean"] = float(vals.mean())
        out["intensity_sd"] = float(vals.std())
        ring = ndimage.binary_dilation(mask > 0, np.ones((3, 3, 1), bool)) & ~(mask > 0)
        out["ring_contrast"] = float(vals.mean() - s.vol[ring].mean()) if ring.any() else float("nan")
        out["_values"] = vals  # type: ignore[assignment]
    else:
        out["offset_right_mm"] = out["offset_ant_mm"] = out["intensity_mean"] = float("nan")
        out["intensity_sd"] = out["ring_contrast"] = float("nan")
    if (mask == 1).any() and (mask == 2).any():
        d = _to_mm(s.M, _centroid_xy(mask == 1) - _centroid_xy(mask == 2))
        out["separation_mm"] = float(np.hypot(*d))
    else:
        out["separation_mm"] = float("nan")
    out["n_slices"] = int((mask > 0).any(axis=(0, 1)).sum())
    return out


def _reference(manual: list[dict[str, float]]) -> dict[str, Any]:
    """Cohort reference from the manual masks' measures (means, spreads, QC limits)."""
    def arr(k):
        return np.array([m[k] for m in manual if np.isfinite(m.get(k, np.nan))], dtype=np.float64)

    def ms(k, floor_frac=0.0, floor_abs=0.0):
        a = arr(k)
        mean = float(a.mean()) if a.size else float("nan")
        sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
        return mean, max(sd, floor_frac * abs(mean), floor_abs)

    vols = np.concatenate([arr("volume_left_mm3"), arr("volume_right_mm3")])
    off = np.stack([arr("offset_right_mm"), arr("offset_ant_mm")], axis=1)
    off_mean = off.mean(axis=0)
    dist = np.hypot(*(off - off_mean).T)
    pooled = np.concatenate([m["_values"] for m in manual if "_values" in m])
    return {
        "n_manual": len(manual),
        "volume_mean_mm3": float(vols.mean()), "volume_sd_mm3": max(float(vols.std(ddof=1)) if vols.size > 1 else 0.0,
                                                                    0.15 * float(vols.mean())),
        "asymmetry_limit": float(max(0.3, 3 * np.sqrt(np.mean(arr("asymmetry") ** 2)))),
        "offset_mean_mm": [float(off_mean[0]), float(off_mean[1])],
        "position_limit_mm": float(max(6.0, 3 * np.sqrt(np.mean(dist ** 2)))),
        "separation_mean_mm": ms("separation_mm")[0],
        "separation_limit_mm": float(max(5.0, 3 * ms("separation_mm", floor_abs=1.0)[1])),
        "intensity_mean": ms("intensity_mean")[0],
        "intensity_sd": ms("intensity_mean", floor_abs=0.02)[1],
        "intensity_range": [float(np.percentile(pooled, 1)), float(np.percentile(pooled, 99))],
        "ring_contrast_mean": ms("ring_contrast")[0], "ring_contrast_sd": ms("ring_contrast", floor_abs=0.01)[1],
        "intensity_sd_mean": ms("intensity_sd")[0], "intensity_sd_sd": ms("intensity_sd", floor_abs=0.01)[1],
    }


def _qc(meas: dict[str, float], ref: dict[str, Any], soft_dice: float = float("nan"),
        min_soft_dice: float = 0.0) -> tuple[list[str], dict[str, float]]:
    """QC flags of one mask against the cohort reference -> (flags, extra measures)."""
    flags: list[str] = []
    extra: dict[str, float] = {}
    v1, v2 = meas["volume_left_mm3"], meas["volume_right_mm3"]
    if v1 == 0 or v2 == 0:
        flags.append("missing_label")
    lo = ref["volume_mean_mm3"] - 3 * ref["volume_sd_mm3"]
    hi = ref["volume_mean_mm3"] + 3 * ref["volume_sd_mm3"]
    if any(not (max(lo, 0.25 * ref["volume_mean_mm3"]) <= v <= hi) for v in (v1, v2) if v > 0):
        flags.append("volume")
    if np.isfinite(meas["asymmetry"]) and meas["asymmetry"] > ref["asymmetry_limit"]:
        flags.append("asymmetry")
    pos = float(np.hypot(meas["offset_right_mm"] - ref["offset_mean_mm"][0],
                         meas["offset_ant_mm"] - ref["offset_mean_mm"][1]))
    extra["position_mm"] = pos
    sep_bad = np.isfinite(meas["separation_mm"]) and abs(meas["separation_mm"] - ref["separation_mean_mm"]) > ref["separation_limit_mm"]
    if (np.isfinite(pos) and pos > ref["position_limit_mm"]) or sep_bad:
        flags.append("position")
    frac = float("nan")
    if "_values" in meas:
        vals = meas["_values"]
        lo_i, hi_i = ref["intensity_range"]
        frac = float(((vals < lo_i) | (vals > hi_i)).mean())
        if frac > 0.25 or abs(meas["intensity_mean"] - ref["intensity_mean"]) > 3 * ref["intensity_sd"]:
            flags.append("intensity")
    extra["intensity_outlier_frac"] = frac
    rc, isd = meas.get("ring_contrast", float("nan")), meas.get("intensity_sd", float("nan"))
    if "ring_contrast_mean" in ref and (
            (np.isfinite(rc) and rc < ref["ring_contrast_mean"] - 2 * ref["ring_contrast_sd"])
            or (np.isfinite(isd) and isd > ref["intensity_sd_mean"] + 3 * ref["intensity_sd_sd"])):
        flags.append("contrast")
    if np.isfinite(soft_dice) and soft_dice < min_soft_dice:
        flags.append("low_confidence")
    return flags, extra


def _plausibility(flags: list[str]) -> float:
    """Multiplier of the confidence for failed plausibility checks (each halves it)."""
    n = sum(f in ("missing_label", "volume", "asymmetry", "position", "intensity", "contrast") for f in flags)
    return 0.5 ** n


# --------------------------------------------------------------------------- network


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"device {name} requested but no CUDA GPU is available", "Use --device cpu or auto")
    return torch.device(name)


def create_net(config: RoiConfig):
    """The U-Net (segmentation-models-pytorch, random init): input [B, 3, H, W] -> logits [B, 3, H, W]."""
    import segmentation_models_pytorch as smp

    try:
        return smp.Unet(config.encoder, encoder_weights=None, encoder_depth=config.encoder_depth,
                        decoder_channels=config.decoder_channels, in_channels=3, classes=3)
    except (KeyError, ValueError, RuntimeError) as err:
        raise ConfigError("--encoder", f"cannot build a U-Net with encoder {config.encoder!r} "
                          f"({' '.join(str(err).split())[:160]})", "Use e.g. resnet18 or mobilenet_v2") from None


def _augment_sample(s: _Subject, z: int, cfg: RoiConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random training crop: image float32 (3, size, size), target int64 (size, size)."""
    from scipy import ndimage

    assert s.roi is not None, "training subjects have a manual ROI"
    c = _centroid_xy(s.roi)
    shift = rng.uniform(-cfg.shift_mm, cfg.shift_mm, 2) if rng.random() < 0.6 else rng.normal(0, 3.0, 2)
    centre = c + s.M @ shift
    coords = _grid(centre, s.M, cfg.crop_mm, cfg.size, rot_deg=float(rng.normal(0, 7)),
                   scale=float(np.exp(rng.normal(0, 0.07))))
    img = _sample_stack(s.vol, z, coords)
    tgt = ndimage.map_coordinates(s.roi[:, :, z], coords, order=0, mode="constant", cval=0).astype(np.int64)
    tgt[(tgt != 1) & (tgt != 2)] = 0
    if rng.random() < 0.5:  # mirror left/right: columns flip, labels swap
        img, tgt = img[:, :, ::-1], tgt[:, ::-1]
        tgt = np.where(tgt == 1, 2, np.where(tgt == 2, 1, 0))
    # intensity: gamma, contrast/brightness, smooth bias field, blur, noise (scanner shift)
    img = np.clip(img, 0, 1) ** float(np.exp(rng.normal(0, 0.25)))
    img = img * float(rng.uniform(0.85, 1.15)) + float(rng.normal(0, 0.04))
    yy, xx = np.mgrid[0:cfg.size, 0:cfg.size] / cfg.size
    bias = np.exp(rng.normal(0, 0.12) * (xx - 0.5) + rng.normal(0, 0.12) * (yy - 0.5))
    img = img * bias[None]
    if rng.random() < 0.5:
        sig = float(rng.uniform(0.2, 1.0))
        img = ndimage.gaussian_filter(img, sigma=(0.0, sig, sig))
    img = img + rng.normal(0, float(rng.uniform(0.0, 0.04)), img.shape)
    return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(tgt)


def _train(train: list[_Subject], cfg: RoiConfig, device, progress: ProgressCallback | None):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1,)))
    net = create_net(cfg).to(device)
    # slice sampling weights: GP slices and their near neighbours 1, the rest far_weight
    items, weights = [], []
    for si, s in enumerate(train):
        assert s.roi is not None, "training subjects have a manual ROI"
        has = np.flatnonzero((s.roi > 0).any(axis=(0, 1)))
        for z in range(s.vol.shape[2]):
            near = has.size and np.abs(has - z).min() <= cfg.near_slices
            items.append((si, z))
            weights.append(1.0 if near else cfg.far_weight)
    p = np.asarray(weights) / np.sum(weights)
    n_per_epoch = cfg.samples_per_subject * max(len(train), 20)
    steps = max(1, -(-n_per_epoch // cfg.batch_size))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.15)
    eta = EtaEstimator()
    history = []
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        picks = rng.choice(len(items), size=steps * cfg.batch_size, p=p)
        total = 0.0
        for step in range(steps):
            batch = [_augment_sample(train[items[k][0]], items[k][1], cfg, rng)
                     for k in picks[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
            x = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
            y = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
            logits = net(x)
            prob = logits.softmax(1)
            onehot = F.one_hot(y, 3).permute(0, 3, 1, 2).float()
            inter = (prob * onehot)[:, 1:].sum((0, 2, 3))
            denom = (prob + onehot)[:, 1:].sum((0, 2, 3))
            dice = 1 - ((2 * inter + 1) / (denom + 1)).mean()
            loss = F.cross_entropy(logits, y) + dice
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            done = (epoch - 1) * steps + step + 1
            emit(progress, "roi_train", epoch=epoch, epochs=cfg.epochs, step=step + 1, steps=steps,
                 eta_s=eta.eta(done, cfg.epochs * steps), metrics={"loss": total / (step + 1)})
        history.append({"epoch": epoch, "loss": total / steps})
    net.eval()
    return net, history


def _predict_crops(net, stacks: np.ndarray, device, batch: int = 32) -> np.ndarray:
    """Softmax probabilities float32 [n, 3, H, W] for images [n, 3, H, W]."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(stacks), batch):
            x = torch.from_numpy(np.ascontiguousarray(stacks[i:i + batch])).to(device)
            out.append(net(x).softmax(1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 3) + stacks.shape[2:], np.float32)


def _crop_probs(net, s: _Subject, centre, crop_mm: float, size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [Z, 3, size, size] of every slice of a crop and its voxel grid (2, size, size)."""
    coords = _grid(centre, s.M, crop_mm, size)
    stacks = np.stack([_sample_stack(s.vol, z, coords) for z in range(s.vol.shape[2])])
    return _predict_crops(net, stacks, device), coords


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.reshape(-1))[1:]
    return lab == (1 + int(np.argmax(sizes)))


def propose_subject(net, s: _Subject, ref: dict[str, Any], cfg: RoiConfig, device) -> dict[str, Any]:
    """Coarse-to-fine proposal for one subject.

    Returns ``mask`` int16 (X, Y, Z) on the subject's (canonical) grid, ``fg_prob``
    float32 (X, Y, Z) foreground probability, ``found`` (pass 1 found a GP).
    """
    from scipy import ndimage

    prior = s.head_xy + s.M @ np.asarray(ref["offset_mean_mm"], dtype=np.float64)
    # pass 1: a large crop around the prior
    P1, coords1 = _crop_probs(net, s, prior, cfg.search_size * cfg.pixel_mm, cfg.search_size, device)
    # the GP pair: the two largest 3D foreground components (the second only when at least
    # a third of the first); its centre is the mean of their centroids
    lab1, n1 = ndimage.label(P1[:, 0] < 0.5, structure=np.ones((3, 3, 3), bool))  # (Z, H, W)
    found = n1 > 0
    centre = prior
    if found:
        sizes = np.bincount(lab1.reshape(-1))[1:]
        order = np.argsort(-sizes, kind="stable")[:2]
        keep = [int(order[0])] + [int(k) for k in order[1:] if sizes[k] >= sizes[order[0]] / 3]
        rc = np.array([np.argwhere(lab1 == k + 1)[:, 1:].mean(axis=0) for k in keep]).mean(axis=0)
        centre = np.array([ndimage.map_coordinates(coords1[k], [[rc[0]], [rc[1]]], order=1)[0] for k in range(2)])
    # pass 2: the fine crop centred on the detection
    P2, coords2 = _crop_probs(net, s, centre, cfg.crop_mm, cfg.size, device)
    X, Y, Z = s.vol.shape
    x0 = max(0, int(np.floor(coords2[0].min())) - 1)
    x1 = min(X, int(np.ceil(coords2[0].max())) + 2)
    y0 = max(0, int(np.floor(coords2[1].min())) - 1)
    y1 = min(Y, int(np.ceil(coords2[1].max())) + 2)
    probs = np.zeros((3, X, Y, Z), dtype=np.float32)
    probs[0] = 1.0
    if x0 < x1 and y0 < y1:
        gi, gj = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64), indexing="ij")
        d = np.linalg.solve(s.M, np.stack([gi.ravel() - centre[0], gj.ravel() - centre[1]]))
        col = (cfg.crop_mm / 2 - d[0]) / cfg.pixel_mm - 0.5
        row = (cfg.crop_mm / 2 - d[1]) / cfg.pixel_mm - 0.5
        rc = np.stack([row, col])
        for z in range(Z):
            for k in range(3):
                probs[k, x0:x1, y0:y1, z] = ndimage.map_coordinates(
                    P2[z, k], rc, order=1, mode="constant", cval=1.0 if k == 0 else 0.0).reshape(gi.shape)
    lab = np.argmax(probs, axis=0).astype(np.int16)
    mask = np.zeros_like(lab)
    for k in (1, 2):
        largest = _largest_component(lab == k)
        mask[largest] = k
    return {"mask": mask, "fg_prob": 1.0 - probs[0], "found": found}


# --------------------------------------------------------------------------- manifest I/O


def _safe_name(sid: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", sid).strip("._") or "subject"
    name, i = base, 2
    while name.lower() in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name.lower())
    return name


def _rel(path: str, out_dir: Path) -> str:
    try:
        return os.path.relpath(path, out_dir)
    except ValueError:  # another drive (Windows)
        return str(path)


def _write_manifest(manifest_path: Path, out_dir: Path, new_roi: dict[int, str], sources: dict[int, str]) -> Path:
    """The input manifest with every path made valid from out_dir, proposals filled in and roi_source."""
    from nhb_core.manifest import _Collector, _norm_col, _read_table, _resolve

    col = _Collector(str(manifest_path))
    table = _read_table(manifest_path, col)
    assert table is not None  # load_manifest already read it
    header, rows = table
    names = [_norm_col(h) for h in header]
    ncol = len(header)
    while ncol > 1 and header[ncol - 1].strip() == "" and all(len(c) < ncol or not c[ncol - 1].strip() for _r, c in rows):
        ncol -= 1
    header, names = list(header[:ncol]), names[:ncol]
    i_t1, i_roi = names.index("t1"), names.index("roi")
    if "roi_source" in names:
        i_src = names.index("roi_source")
    else:
        header.append("roi_source")
        names.append("roi_source")
        i_src = len(header) - 1
    root = manifest_path.resolve().parent
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row, cells in rows:
        if not cells or all(c.strip() == "" for c in cells):
            continue
        cells = [c.strip() for c in cells[:ncol]] + [""] * max(0, len(header) - min(len(cells), ncol))
        cells = cells[:len(header)]
        if cells[i_t1]:
            cells[i_t1] = _rel(str(_resolve(cells[i_t1], root)), out_dir)
        if row in new_roi:
            cells[i_roi] = new_roi[row]
        elif cells[i_roi]:
            cells[i_roi] = _rel(str(_resolve(cells[i_roi], root)), out_dir)
        cells[i_src] = sources.get(row, cells[i_src])
        w.writerow(cells)
    out = out_dir / "manifest.csv"
    atomic_write_text(out, buf.getvalue())
    return out


# --------------------------------------------------------------------------- public API


def propose_rois(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, config: RoiConfig | dict | None = None,
                 progress: ProgressCallback | None = None) -> Path:
    """Train on the manifest's manual masks and propose the missing ones; returns ``out_dir/manifest.csv``.

    Parameters
    ----------
    manifest_path : path
        Cohort manifest (``docs/manifest.md``); rows with an empty ``roi`` (or
        ``roi_source`` = proposed) get proposals, the others train the network.
    out_dir : path
        Output folder (created): ``manifest.csv``, ``proposals.csv``, ``masks/``,
        ``roi_model.safetensors``, ``roi_model.json``. Must not be the manifest's folder.
    config : RoiConfig or dict or None
        Options (defaults: :class:`RoiConfig`).
    progress : callable or None
        Receives ``{"stage": "roi_load"|"roi_train"|"roi_propose", ...}`` updates.

    Raises
    ------
    ManifestError
        No row has a mask, or the output would overwrite the input manifest.
    ImageError / DicomError
        A T1 or a manual mask cannot be used (the file is named).
    """
    import torch
    from safetensors.torch import save_file

    from nhb_core.manifest import load_manifest

    cfg = config if isinstance(config, RoiConfig) else RoiConfig.from_dict(config)
    t0 = time.monotonic()
    manifest_path = Path(manifest_path)
    man = load_manifest(manifest_path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "the output path is a file", "Give a folder for --out")
    if (out / "manifest.csv").resolve() == manifest_path.resolve():
        raise ManifestError(manifest_path, "--out is the manifest's own folder; its manifest.csv would be overwritten",
                            "Give another output folder")
    df = man.df.reset_index(drop=True)
    src_col = df["roi_source"].fillna("").astype(str).str.strip().str.lower() if "roi_source" in df else pd.Series([""] * len(df))
    bad = df[~src_col.isin(("",) + SOURCES)]
    if len(bad):
        r = bad.iloc[0]
        raise ManifestError(manifest_path, f"roi_source {r['roi_source']!r} is not manual, proposed or corrected",
                            "Use manual, proposed, corrected or leave it empty", row=int(r["manifest_row"]))
    has_roi = df["roi_path"].fillna("").astype(str) != ""
    is_train = has_roi & (src_col != "proposed")
    if not is_train.any():
        raise ManifestError(manifest_path, "no row has a manual ROI mask to learn from",
                            "Draw the GP ROI of a few subjects (about 20) and give them in the 'roi' column")
    device = _device(cfg.device)
    emit(progress, "roi_load", done=0, total=int(is_train.sum()), message="loading manual masks")
    train: list[_Subject] = []
    train_meas: list[dict[str, float]] = []
    for k, r in enumerate(df[is_train].itertuples(), 1):
        s = _load_subject(r.subject_id, r.t1_path, r.roi_path)
        if s.roi is None or not (s.roi > 0).any():
            from nhb_core.errors import ImageError
            raise ImageError(r.roi_path, "ROI mask is empty (every voxel is 0)", "Draw the region or leave roi empty")
        train.append(s)
        train_meas.append(_measures(s, s.roi))
        emit(progress, "roi_load", done=k, total=int(is_train.sum()), message=str(r.subject_id))
    ref = _reference(train_meas)
    t_load = time.monotonic() - t0
    net, history = _train(train, cfg, device, progress)
    t_train = time.monotonic() - t0 - t_load
    del train

    out.mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    used: set[str] = set()
    new_roi: dict[int, str] = {}
    sources: dict[int, str] = {}
    records: list[dict[str, Any]] = []
    train_by_row = {int(r.manifest_row): m for r, m in zip(df[is_train].itertuples(), train_meas)}
    n_prop = int((~is_train).sum())
    eta = EtaEstimator()
    done = 0
    for r in df.itertuples():
        row = int(r.manifest_row)
        rec: dict[str, Any] = {"subject_id": r.subject_id, "center": r.center}
        if row in train_by_row:
            src = src_col.iloc[r.Index] or "manual"
            sources[row] = src
            meas = train_by_row[row]
            flags, extra = _qc(meas, ref)
            rec.update(roi_source=src, roi=_rel(r.roi_path, out), confidence=float("nan"), soft_dice=float("nan"),
                       mean_prob=float("nan"))
        else:
            s = _load_subject(r.subject_id, r.t1_path, None)
            res = propose_subject(net, s, ref, cfg, device)
            mask, fg = res["mask"], res["fg_prob"]
            m = mask > 0
            soft = float(2 * (fg * m).sum() / (fg.sum() + m.sum())) if (fg.sum() + m.sum()) > 0 else 0.0
            mean_prob = float(fg[m].mean()) if m.any() else 0.0
            meas = _measures(s, mask)
            flags, extra = _qc(meas, ref, soft, min_soft_dice=0.6)
            if not res["found"]:
                flags.append("not_found")
            conf = soft * _plausibility(flags) * (1.0 if res["found"] else 0.5)
            name = f"masks/{_safe_name(str(r.subject_id), used)}_roi_proposed.nii.gz"
            _save_on_t1_grid(mask, s.affine, r.t1_path, out / name)
            new_roi[row] = name
            sources[row] = "proposed"
            rec.update(roi_source="proposed", roi=name, confidence=conf, soft_dice=soft, mean_prob=mean_prob)
            done += 1
            emit(progress, "roi_propose", done=done, total=n_prop, message=str(r.subject_id), eta_s=eta.eta(done, n_prop))
        rec.update({k: meas[k] for k in ("volume_left_mm3", "volume_right_mm3", "asymmetry", "separation_mm",
                                         "intensity_mean", "ring_contrast", "intensity_sd", "n_slices")})
        rec.update(extra)
        rec["qc_flags"] = ";".join(flags)
        rec["qc_ok"] = not flags
        records.append(rec)
    table = pd.DataFrame(records, columns=PROPOSALS_COLUMNS)
    atomic_write_text(out / "proposals.csv", table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    # the network and its reference statistics
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(out / "roi_model.safetensors") as tmp:
        save_file(state, str(tmp))
    from nhb_core import __version__
    atomic_write_json(out / "roi_model.json", {
        "config": cfg.to_dict(), "manifest": str(manifest_path.resolve()),
        "train_subjects": [str(x) for x in df.loc[is_train, "subject_id"]], "reference": ref,
        "history": history, "device": str(device), "torch_threads": torch.get_num_threads(),
        "seconds": {"load": round(t_load, 2), "train": round(t_train, 2), "total": round(time.monotonic() - t0, 2)},
        "versions": _versions(), "nhb_core": __version__,
    })
    return _write_manifest(manifest_path, out, new_roi, sources)


def _versions() -> dict[str, str]:
    from nhb_core.versions import module_versions

    return module_versions("torch", "segmentation_models_pytorch", "numpy")


def _save_on_t1_grid(mask: np.ndarray, canon_affine: np.ndarray, t1_path: str, path: Path) -> None:
    """Write a canonical-orientation mask on the T1 file's own grid (axis order and affine of the NIfTI file).

    A DICOM-series T1 has no file grid: the mask keeps the RAS+ grid of the loaded volume
    (same voxel positions, which :func:`nhb_core.io.load_roi` accepts).
    """
    import nibabel as nib

    from nhb_core.io import save_nifti

    data, affine = mask.astype(np.int16), canon_affine
    p = Path(t1_path)
    if p.is_file():
        try:
            hdr_aff = nib.load(str(p)).affine  # type: ignore[attr-defined]  # a NIfTI image
        except Exception:  # noqa: BLE001 - load_t1 already read it; keep the canonical grid
            hdr_aff = None
        if hdr_aff is not None:
            ornt = nib.orientations.io_orientation(hdr_aff)
            back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
            data = np.ascontiguousarray(nib.orientations.apply_orientation(data, back))
            affine = canon_affine @ nib.orientations.inv_ornt_aff(back, mask.shape)
            if np.allclose(affine, hdr_aff, atol=1e-4):
                affine = hdr_aff  # exactly the T1's affine
    save_nifti(data, affine, path, dtype=np.int16)
