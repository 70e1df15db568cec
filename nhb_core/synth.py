"""A built-in synthetic two-center neonatal T1WI cohort with a known ground truth.

The generator draws, for every subject, a latent bilirubin brain-injury severity
``s >= 0``; from it (plus noise) the NBNA score, the label (``nbna <= 37``),
covariates, two radiologists' visual reads and a 3D neonatal T1-weighted volume
acquired like a clinical 2D axial T1WI (anisotropic voxels: in-plane 0.75 /
0.875 mm, slices 5 / 6 mm) in which both globi pallidi (GP) are brighter the
higher ``s``. Two centers differ like two scanners (field strength, contrast,
SNR, bias field, resolution, slice thickness, intensity scale). A rater's GP
mask (1 = left, 2 = right) with realistic delineation error goes with every
volume. Because the generative model is known, the Bayes-optimal (oracle)
subject-level AUC is computed exactly and written to ``cohort.json``.

Public API
----------
- :func:`synthesize` writes a cohort folder (``manifest.csv``, ``cohort.json``,
  ``truth.csv``, ``images/*.nii.gz``).
- :func:`draw_cohort` draws the tabular part only (labels, NBNA, reads,
  covariates, latent severity, oracle probability): no images, well under a second for the paper preset.
- :func:`render_subject` renders one subject's volumes in memory (T1, rater
  ROI, true GP), :func:`subject_truth` regenerates a written subject's truth.

Everything is deterministic: each subject has its own random streams
(``numpy.random.SeedSequence(seed, spawn_key=(center, index))``), so results do
not depend on the number of worker processes, on the order of generation or on
the other cells' sizes. See ``docs/synth.md`` for the model and its numbers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nhb_core.errors import ConfigError, InputError
from nhb_core.fileio import atomic_write_json, atomic_write_text, read_json
from nhb_core.progress import EtaEstimator, ProgressCallback, emit

GENERATOR_VERSION = "1.0.0"
NBNA_THRESHOLD = 37

#: Subjects per center: (label 1 = NBNA <= 37 "NHB brain injury", label 0 = controls).
PRESETS: dict[str, dict[str, tuple[int, int]]] = {
    "paper": {"A": (106, 119), "B": (34, 18)},
    "small": {"A": (8, 8), "B": (5, 5)},
}
CENTERS = ("A", "B")

# ----------------------------------------------------------------------------------------
# The generative model of the tabular part (see docs/synth.md)
# ----------------------------------------------------------------------------------------
SEVERITY_SHAPE, SEVERITY_SCALE = 1.5, 0.8  # s ~ Gamma(shape, scale)
NBNA_INTERCEPT, NBNA_SLOPE, NBNA_SD = 39.6, 2.2, 0.9  # nbna* = a - b s + N(0, sd); nbna = round(clip)
# GP hyperintensity (fraction of the fat signal) per unit of severity, and its saturation
GP_GAIN = 0.080
GP_SAT = 3.2
VARIANT_P = 0.22  # normal variant: mild bilateral GP brightening unrelated to injury
VARIANT_RANGE = (0.015, 0.05)
GP_BIO_SD = 0.022  # biological subject-to-subject variation of the normal GP signal
# readers: read = 1 if visible + shared + own noise > threshold  (units: fraction of fat signal)
READER_SHARED_SD = 0.020
READERS = {"reader_1": {"threshold": 0.100, "sd": 0.030}, "reader_2": {"threshold": 0.097, "sd": 0.035}}
# the simulated reader study (readings.csv): five radiologists giving 1-5 confidence ratings from the same
# ``visible`` signal, each with own noise (sd) and criteria (4 cuts: rating = 1 + number of cuts below);
# a rating >= RATING_POSITIVE is a positive call (cut 2 sits near the binary readers' threshold)
STUDY_READERS: dict[str, dict[str, Any]] = {
    "R1": {"sd": 0.030, "cuts": (0.065, 0.100, 0.125, 0.160)},
    "R2": {"sd": 0.035, "cuts": (0.060, 0.097, 0.120, 0.155)},
    "R3": {"sd": 0.028, "cuts": (0.075, 0.110, 0.135, 0.170)},  # strict
    "R4": {"sd": 0.040, "cuts": (0.050, 0.088, 0.110, 0.145)},  # lenient, noisier
    "R5": {"sd": 0.032, "cuts": (0.055, 0.095, 0.125, 0.165)},
}
RATING_POSITIVE = 3  # = nhb_core.stats._checks.RATING_POSITIVE (not imported: synth stays light)
REREAD_SD = 0.012  # within-reader noise of a second (aided) read of the same case
AID_WEIGHT = 0.5  # aided arm: latent = (1 - w) (own read) + w (network score on the reader's scale)


@dataclass(frozen=True)
class Scanner:
    """One center's acquisition (a clinical 2D axial T1WI protocol).

    ``shape`` is (X, Y, Z) voxels, ``inplane_mm`` and ``slice_mm`` the voxel size,
    ``tissue`` the noiseless tissue signals (fat = 1), ``noise_sd`` the Rician noise
    level (same units), ``bias`` the bias-field strength (log amplitude),
    ``scale`` the stored intensity scale (int16), ``psf_px`` the in-plane blur
    (Gaussian sigma, pixels), ``gp_gain`` the scanner's visibility of the GP
    T1 shortening relative to center A.
    """

    name: str
    field_T: float
    shape: tuple[int, int, int]
    inplane_mm: float
    slice_mm: float
    noise_sd: float
    bias: float
    scale: float
    psf_px: float
    gp_gain: float
    tissue: dict = field(default_factory=dict)


_TISSUE_A = {  # 3.0 T: lower grey/white T1 contrast, bright PLIC
    "skin": 0.50, "fat": 1.00, "skull": 0.07, "csf": 0.10, "wm": 0.38, "cortex": 0.56,
    "caudate": 0.55, "putamen": 0.57, "gp": 0.58, "thalamus": 0.57, "vl": 0.66, "plic": 0.78,
    "cb_gm": 0.52, "cb_wm": 0.64, "brainstem": 0.62,
}
_TISSUE_B = {  # 1.5 T: stronger grey/white contrast, dimmer myelin
    "skin": 0.55, "fat": 1.00, "skull": 0.09, "csf": 0.14, "wm": 0.33, "cortex": 0.58,
    "caudate": 0.56, "putamen": 0.58, "gp": 0.58, "thalamus": 0.58, "vl": 0.64, "plic": 0.70,
    "cb_gm": 0.55, "cb_wm": 0.62, "brainstem": 0.60,
}

SCANNERS: dict[str, Scanner] = {
    "A": Scanner("A", 3.0, (184, 184, 22), 0.75, 5.0, noise_sd=0.022, bias=0.10, scale=250.0,
                 psf_px=0.35, gp_gain=1.0, tissue=_TISSUE_A),
    "B": Scanner("B", 1.5, (160, 160, 18), 0.875, 6.0, noise_sd=0.040, bias=0.22, scale=420.0,
                 psf_px=0.6, gp_gain=0.85, tissue=_TISSUE_B),
}
Z_BOTTOM_MM = -37.0  # world z of the lowest slice edge (head frame: GP centre at z = 0)


# ----------------------------------------------------------------------------------------
# Tabular part
# ----------------------------------------------------------------------------------------
def _norm_cdf(x):
    from scipy.special import ndtr

    return ndtr(x)


def oracle_probability(severity) -> np.ndarray:
    """P(label = 1 | latent severity) under the generative model (the Bayes-optimal score).

    severity : float or array of floats >= 0 (dimensionless). Returns the same shape.
    """
    s = np.asarray(severity, dtype=np.float64)
    # nbna = round(nbna*) <= 37  <=>  nbna* < 37.5
    return _norm_cdf((NBNA_THRESHOLD + 0.5 - NBNA_INTERCEPT + NBNA_SLOPE * s) / NBNA_SD)


def gp_signal(severity) -> np.ndarray:
    """Mean GP T1 hyperintensity (fraction of the fat signal, center A) caused by ``severity``."""
    s = np.asarray(severity, dtype=np.float64)
    return GP_GAIN * GP_SAT * np.tanh(s / GP_SAT)


def auc_score(y, score) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half). NaN with one class."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _center_sizes(preset: str, n) -> dict[str, tuple[int, int]]:
    if preset not in PRESETS:
        raise ConfigError("--preset", f"unknown preset '{preset}'", f"Use one of: {', '.join(PRESETS)}")
    base = PRESETS[preset]
    if n is None:
        return dict(base)
    if isinstance(n, dict):
        out = {}
        for c, v in n.items():
            if c not in CENTERS:
                raise ConfigError("n", f"unknown center '{c}'", f"Use centers {', '.join(CENTERS)}")
            if isinstance(v, dict):
                v = (v.get(1, v.get("1", v.get("nhb", 0))), v.get(0, v.get("0", v.get("control", 0))))
            pos, neg = int(v[0]), int(v[1])
            if pos < 0 or neg < 0:
                raise ConfigError("n", f"negative count for center {c}", "Give counts >= 0")
            out[c] = (pos, neg)
        if sum(p + q for p, q in out.values()) == 0:
            raise ConfigError("n", "the cohort would be empty", "Give at least one subject")
        return out
    try:
        total = int(n)
    except (TypeError, ValueError):
        raise ConfigError("--n", f"'{n}' is not a number of subjects", "Give a whole number >= 4") from None
    if total < 4:
        raise ConfigError("--n", f"{total} subjects are too few", "Give at least 4 (one per center x label)")
    cells = [(c, j) for c in CENTERS for j in (0, 1)]
    weights = np.array([base[c][j] for c, j in cells], dtype=float)
    raw = weights / weights.sum() * total
    counts = np.maximum(1, np.floor(raw)).astype(int)
    while counts.sum() < total:  # largest remainders first
        counts[np.argmax(raw - counts)] += 1
    while counts.sum() > total:
        k = int(np.argmax(np.where(counts > 1, counts - raw, -np.inf)))
        counts[k] -= 1
    return {c: (int(counts[2 * i]), int(counts[2 * i + 1])) for i, c in enumerate(CENTERS)}


def _subject_streams(seed: int, center: str, index: int):
    """Three independent streams (params, image, roi) of one subject."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(CENTERS.index(center), int(index)))
    return [np.random.default_rng(s) for s in ss.spawn(3)]


def _labels_for_center(seed: int, center: str, n_pos: int, n_neg: int) -> np.ndarray:
    ss = np.random.SeedSequence(int(seed), spawn_key=(100 + CENTERS.index(center),))
    labels = np.array([1] * n_pos + [0] * n_neg, dtype=int)
    return np.random.default_rng(ss).permutation(labels)


def _draw_subject(rng: np.random.Generator, center: str, label: int) -> dict[str, Any]:
    """The tabular draw of one subject, conditioned on its label (rejection sampling)."""
    sc = SCANNERS[center]
    for _ in range(10_000):
        s = rng.gamma(SEVERITY_SHAPE, SEVERITY_SCALE)
        nbna_star = NBNA_INTERCEPT - NBNA_SLOPE * s + rng.normal(0.0, NBNA_SD)
        if int(nbna_star < NBNA_THRESHOLD + 0.5) == label:
            break
    else:  # pragma: no cover - acceptance probability is ~0.5
        raise RuntimeError("rejection sampling did not converge")
    nbna = int(np.clip(np.round(nbna_star), 20, 40))
    sex = "M" if rng.random() < 0.57 else "F"
    ga = float(np.clip(39.0 - 0.35 * s + rng.normal(0.0, 1.2), 35.0, 41.9))
    pna = int(np.clip(np.round(3.0 + rng.gamma(2.0, 2.2) + 1.2 * s), 2, 28))
    tsb = float(np.clip(285.0 + 60.0 * s + rng.normal(0.0, 65.0), 150.0, 680.0))
    variant = float(rng.uniform(*VARIANT_RANGE)) if rng.random() < VARIANT_P else 0.0
    pma = ga + pna / 7.0
    gp_base = 0.010 * (pma - 40.0) + rng.normal(0.0, GP_BIO_SD)  # maturation + biology
    gp_delta = float(gp_signal(s)) + variant
    asym = float(rng.normal(0.0, 0.08))
    # what a radiologist sees: the GP excess over its expected look, blurred by image quality
    shared = rng.normal(0.0, READER_SHARED_SD * (sc.noise_sd / SCANNERS["A"].noise_sd) ** 0.5)
    visible = sc.gp_gain * gp_delta + 0.5 * gp_base + shared
    reads = {}
    for name, rd in READERS.items():
        reads[name] = int(visible + rng.normal(0.0, rd["sd"]) > rd["threshold"])
    # anatomy and pose
    pose = {
        "shift": rng.normal(0.0, [2.5, 3.5, 2.5]).tolist(),
        "angles_deg": rng.normal(0.0, [2.0, 3.5, 4.0]).tolist(),  # roll (x), pitch (x->y), yaw (z)
        "size": float(np.clip(rng.normal(1.0, 0.045), 0.88, 1.12)),
        "aspect": np.clip(rng.normal(1.0, 0.03, 3), 0.92, 1.08).tolist(),
        "shape": rng.normal(0.0, 0.03, 4).tolist(),
        "ventricles": float(np.clip(rng.lognormal(0.0, 0.25), 0.6, 1.9)),
        "csp": float(rng.uniform(0.8, 2.2)) if rng.random() < 0.25 else 0.0,
        "extra_axial": float(np.clip(rng.normal(2.6, 0.6), 1.4, 4.5)),
        "sulci_seed": int(rng.integers(2**31)),
    }
    return {
        "severity": float(s), "nbna_star": float(nbna_star), "nbna": nbna, "label": int(label),
        "sex": sex, "gestational_age_weeks": round(ga, 1), "postnatal_age_days": pna,
        "tsb_umol_l": round(tsb, 1), "variant": variant, "gp_base": float(gp_base),
        "gp_delta": gp_delta, "asym": asym, "visible": float(visible), **reads, "pose": pose,
        "oracle_p": float(oracle_probability(s)),
    }


def draw_cohort(preset: str = "paper", seed: int = 0, n=None):
    """Draw the tabular part of a cohort (no images): one row per subject.

    Parameters
    ----------
    preset : "paper" | "small"
    seed : int
    n : None, int (total subjects, split like the preset) or dict {center: (n_label1, n_label0)}

    Returns
    -------
    pandas.DataFrame with ``subject_id, center, index, label, nbna, reader_1, reader_2, sex,
    gestational_age_weeks, postnatal_age_days, tsb_umol_l`` and the latent truth
    ``severity`` (dimensionless), ``oracle_p`` (P(label=1 | severity)), ``gp_delta``
    (GP T1 hyperintensity, fraction of fat signal), ``variant``, ``gp_base``,
    ``visible`` and ``pose`` (dict, used by :func:`render_subject`).
    """
    import pandas as pd

    sizes = _center_sizes(preset, n)
    rows = []
    for center in CENTERS:
        if center not in sizes:
            continue
        n_pos, n_neg = sizes[center]
        labels = _labels_for_center(seed, center, n_pos, n_neg)
        for i, lab in enumerate(labels):
            rng, _, _ = _subject_streams(seed, center, i)
            d = _draw_subject(rng, center, int(lab))
            rows.append({"subject_id": f"{center}{i + 1:03d}", "center": center, "index": i, **d})
    return pd.DataFrame(rows)


def _study_stream(seed: int, center: str, index: int) -> np.random.Generator:
    """The reader study's own stream of one subject (apart from every other draw: adding the study
    shifts nothing else)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(300 + CENTERS.index(center), int(index))))


def reader_study(cohort, seed: int = 0, network=None, aid_weight: float = AID_WEIGHT,
                 readers: dict | None = None):
    """Simulated MRMC reader study: every reader rates every subject on a 1-5 confidence scale.

    Reader j's latent read of subject k is ``z = visible_k + N(0, sd_j)`` (``visible`` is the GP
    excess the images show, shared by all readers: that makes the readers' ratings correlated), and
    the rating is ``1 + #(cuts_j < z)`` (own criteria). With ``network``, an aided arm is added: the
    reader re-reads (``z + N(0, REREAD_SD)``) and leans towards the network's probability ``p`` put
    on the reader's scale, ``latent = (1 - w) z' + w g_j(p)``, ``g_j(p) = c2 + 2 (p - 0.5) (c4 - c1)``
    with ``c1..c4`` the reader's cuts (p = 0.5 lands at the reader's equivocal cut 2, p = 1 above
    the top cut). Draws come from the subject's own reader-study stream
    (``SeedSequence(seed, spawn_key=(300 + center, index))``): the other draws of the cohort are not
    shifted, and the unaided ratings are the same with or without the aided arm.

    Parameters
    ----------
    cohort : pandas.DataFrame from :func:`draw_cohort` (``subject_id, center, index, label, visible``).
    seed : the cohort's seed.
    network : None, or a mapping subject_id -> probability in [0, 1] (a network's subject-level
        score); subjects without a score are left out of both arms (a fully crossed design).
    aid_weight : w in [0, 1].
    readers : {name: {"sd", "cuts" (4 ascending)}} (default :data:`STUDY_READERS`).

    Returns
    -------
    pandas.DataFrame in the long format of ``python -m nhb_core mrmc``: ``reader, modality
    ("unaided" / "aided"), case_id (= subject_id), truth (= label), rating (int 1-5), center``,
    ordered by modality, reader, subject.

    Examples
    --------
    >>> df = reader_study(draw_cohort("small", seed=0), seed=0)
    >>> sorted(df["reader"].unique()), df["rating"].between(1, 5).all().item()
    (['R1', 'R2', 'R3', 'R4', 'R5'], True)
    """
    import pandas as pd

    readers = STUDY_READERS if readers is None else readers
    if not 0.0 <= float(aid_weight) <= 1.0:
        raise ConfigError("aid_weight", f"aid weight {aid_weight} is not in [0, 1]", "Give a weight between 0 and 1")
    names = list(readers)
    sd = np.array([readers[r]["sd"] for r in names], dtype=float)
    cuts = np.array([readers[r]["cuts"] for r in names], dtype=float)  # (R, 4)
    noise = np.empty((len(cohort), len(names)))
    reread = np.empty_like(noise)
    for k, (c, i) in enumerate(zip(cohort["center"], cohort["index"])):
        rng = _study_stream(seed, c, int(i))
        noise[k] = rng.normal(0.0, 1.0, len(names))
        reread[k] = rng.normal(0.0, 1.0, len(names))
    z = cohort["visible"].to_numpy(dtype=float)[:, None] + noise * sd[None, :]  # (n, R)

    def rate(latent):
        return 1 + (latent[:, :, None] > cuts[None, :, :]).sum(axis=2)

    keep = np.ones(len(cohort), dtype=bool)
    arms = {"unaided": None}
    if network is not None:
        p = np.array([float(network.get(sid, np.nan)) for sid in cohort["subject_id"]])
        keep = np.isfinite(p)
        if not keep.any():
            raise InputError("network", "no subject of the cohort has a network score",
                             "Give probabilities keyed by subject_id")
        if ((p[keep] < 0) | (p[keep] > 1)).any():
            raise InputError("network", "network scores must be probabilities in [0, 1]",
                             "Give the network's subject-level probabilities")
        g = cuts[None, :, 1] + 2.0 * (np.nan_to_num(p)[:, None] - 0.5) * (cuts[None, :, 3] - cuts[None, :, 0])
        arms["aided"] = (1 - aid_weight) * (z + reread * REREAD_SD) + aid_weight * g
    frames = []
    for arm, latent in arms.items():
        ratings = rate(z if latent is None else latent)
        for j, name in enumerate(names):
            frames.append(pd.DataFrame({"reader": name, "modality": arm,
                                        "case_id": cohort["subject_id"].to_numpy()[keep],
                                        "truth": cohort["label"].to_numpy(dtype=int)[keep],
                                        "rating": ratings[keep, j].astype(int),
                                        "center": cohort["center"].to_numpy()[keep]}))
    return pd.concat(frames, ignore_index=True)


def reader_study_summary(readings) -> dict:
    """Per reader and arm: ``auc`` (empirical, of the 1-5 ratings), ``sensitivity`` and
    ``specificity`` of the call ``rating >= RATING_POSITIVE``; NaN where a class is absent."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (arm, r), g in readings.groupby(["modality", "reader"], sort=True):
        y, x = g["truth"].to_numpy(), g["rating"].to_numpy(dtype=float)
        pos = x >= RATING_POSITIVE
        both = (y == 1).any() and (y == 0).any()
        out.setdefault(arm, {})[r] = {
            "auc": auc_score(y, x) if both else None,
            "sensitivity": float(pos[y == 1].mean()) if (y == 1).any() else None,
            "specificity": float(1 - pos[y == 0].mean()) if (y == 0).any() else None}
    return out


# ----------------------------------------------------------------------------------------
# Image part
# ----------------------------------------------------------------------------------------
def center_affine(center: str) -> np.ndarray:
    """4x4 voxel -> RAS mm affine of a center's acquisition grid (axis-aligned, RAS+)."""
    sc = SCANNERS[center]
    nx, ny, nz = sc.shape
    a = np.diag([sc.inplane_mm, sc.inplane_mm, sc.slice_mm, 1.0])
    a[0, 3] = -(nx - 1) / 2 * sc.inplane_mm
    a[1, 3] = -(ny - 1) / 2 * sc.inplane_mm - 4.0
    a[2, 3] = Z_BOTTOM_MM + sc.slice_mm / 2
    return a


def _rotation(angles_deg) -> np.ndarray:
    rx, ry, rz = np.deg2rad(angles_deg)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


class _Pose:
    """The subject's head pose: head frame h (mm, GP centre level at z = 0) <-> world w (RAS mm)."""

    def __init__(self, pose: dict):
        R = _rotation(pose["angles_deg"])
        S = pose["size"] * np.asarray(pose["aspect"])
        # w = R (S h) + t ;  h = S^-1 R^T (w - t)
        self.M = (np.diag(1.0 / S) @ R.T).astype(np.float32)
        self.t = np.asarray(pose["shift"], dtype=np.float64)
        self.Minv = R @ np.diag(S)


class _Grid:
    """Axis-aligned world sample points (zs, ys, xs in mm) seen in a subject's head frame."""

    def __init__(self, pose: _Pose, zs, ys, xs):
        self.p = pose
        self.zs = np.asarray(zs, dtype=np.float32)
        self.ys = np.asarray(ys, dtype=np.float32)
        self.xs = np.asarray(xs, dtype=np.float32)

    @property
    def shape(self):
        return (len(self.zs), len(self.ys), len(self.xs))

    def coords(self, box=(slice(None), slice(None), slice(None))) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head-frame coordinates (hx, hy, hz), float32 arrays of shape (z, y, x) of the box."""
        zsl, ysl, xsl = box
        wz = self.zs[zsl] - np.float32(self.p.t[2])
        wy = self.ys[ysl] - np.float32(self.p.t[1])
        wx = self.xs[xsl] - np.float32(self.p.t[0])
        M = self.p.M
        hx, hy, hz = (M[r, 0] * wx[None, None, :] + M[r, 1] * wy[None, :, None] + M[r, 2] * wz[:, None, None]
                      for r in range(3))
        return hx, hy, hz

    def box(self, center_h, radius):
        """Index slices (z, y, x) of the sample points within a head-frame sphere's bounding box."""
        c = self.p.Minv @ np.asarray(center_h, float) + self.p.t
        r = radius * float(np.max(np.abs(self.p.Minv).sum(axis=1))) + 1.0

        def rng1(arr, lo, hi):
            return slice(int(np.searchsorted(arr, lo, side="left")), int(np.searchsorted(arr, hi, side="right")))

        return (rng1(self.zs, c[2] - r, c[2] + r), rng1(self.ys, c[1] - r, c[1] + r),
                rng1(self.xs, c[0] - r, c[0] + r))


def _soft(d, w):
    """Soft inside-membership in [0, 1] from signed depth d (mm, > 0 inside): a linear ramp of width 2w."""
    m = d * np.float32(0.5 / w)
    m += np.float32(0.5)
    np.clip(m, 0.0, 1.0, out=m)
    return m


def _ellipsoid_depth(hx, hy, hz, c, semi, rot_deg=0.0):
    """Approximate signed depth (mm, > 0 inside) of points in a z-rotated ellipsoid; also local x, y."""
    dx, dy, dz = hx - np.float32(c[0]), hy - np.float32(c[1]), hz - np.float32(c[2])
    if rot_deg:
        a = math.radians(rot_deg)
        ca, sa = np.float32(math.cos(a)), np.float32(math.sin(a))
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    q = (dx / np.float32(semi[0])) ** 2 + (dy / np.float32(semi[1])) ** 2 + (dz / np.float32(semi[2])) ** 2
    rho = np.sqrt(q)
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    return r * (1.0 - rho) / np.maximum(rho, np.float32(1e-3)), dx, dy


def _paint(img, box, m, value):
    sub = img[box]
    sub *= 1.0 - m
    sub += m * value


# deep grey structures of the right hemisphere (mirrored for the left): centre, semi-axes (mm), z-rotation (deg)
_DEEP = {
    "thalamus": ((7.0, -12.0, 2.0), (6.0, 10.0, 8.5), 10.0),
    "vl": ((11.0, -12.0, 3.0), (2.5, 4.5, 4.0), 15.0),
    "caudate_head": ((10.0, 12.0, 4.0), (4.0, 7.0, 8.0), 0.0),
    "caudate_body": ((11.0, -4.0, 14.0), (2.5, 12.0, 3.0), 10.0),
    "putamen": ((22.0, 0.0, 0.5), (4.0, 11.0, 8.0), 15.0),
    "gp": ((17.0, -4.0, -0.5), (3.0, 6.5, 6.5), 24.0),
    "plic": ((14.0, -9.0, 0.0), (1.6, 10.0, 8.0), 24.0),
}
_VENTRICLES = {  # right side (mirrored), centre, semi, rot
    "frontal": ((5.5, 16.0, 9.0), (2.6, 10.0, 6.0), -10.0),
    "body": ((7.0, -5.0, 17.0), (3.0, 16.0, 3.5), 0.0),
    "trigone": ((15.0, -30.0, 9.0), (3.5, 8.0, 5.5), -30.0),
    "temporal": ((27.0, -8.0, -16.0), (1.6, 9.0, 2.2), 10.0),
}
_DEEP_BOX = ((-34.0, 34.0), (-42.0, 30.0), (-20.0, 26.0))  # head-frame box rendered at DEEP_SUPERSAMPLE
DEEP_SUPERSAMPLE = 4
_BRAIN_C = (0.0, -4.0, 8.0)
_BRAIN_SEMI = (42.0, 55.0, 42.0)  # z semi-axis below the centre: _BRAIN_LOW
_BRAIN_LOW = 36.0
_CB_C, _CB_SEMI = (0.0, -36.0, -24.0), (32.0, 17.0, 12.5)


def _brain_depth(hx, hy, hz, shape):
    """Signed depth (mm, > 0 inside) below the (egg-shaped) cerebral surface; also offsets and radius."""
    dx, dy, dz = hx - np.float32(_BRAIN_C[0]), hy - np.float32(_BRAIN_C[1]), hz - np.float32(_BRAIN_C[2])
    ax = _BRAIN_SEMI[0] * (1.0 - 0.07 * dy / _BRAIN_SEMI[1] + shape[0] * dz / _BRAIN_SEMI[2])
    ay = _BRAIN_SEMI[1] * (1.0 + shape[1] * dx / _BRAIN_SEMI[0])
    az = np.where(dz > 0, np.float32(_BRAIN_SEMI[2]), np.float32(_BRAIN_LOW)) * (1.0 + shape[2] * dy / _BRAIN_SEMI[1])
    rho = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2 + (dz / az) ** 2)
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    return r * (1.0 - rho) / np.maximum(rho, np.float32(1e-3)), dx, dy, dz, r


def _sulcal_field(dx, dy, dz, r, seed):
    """Distance-like field (mm) to the nearest sulcus: sulci run roughly radially and bend with depth."""
    rng = np.random.default_rng(seed)
    n = 12
    k = rng.normal(size=(n, 3))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    lam = np.concatenate([rng.uniform(14.0, 22.0, n - 4), rng.uniform(7.0, 10.0, 4)])  # along the surface (mm)
    amp = np.concatenate([rng.uniform(0.7, 1.0, n - 4), rng.uniform(0.2, 0.35, 4)]).astype(np.float32)
    R0 = 48.0
    kk = (k * (2 * np.pi / lam)[:, None]).astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    # position scaled towards the sphere of radius R0, but not fully: the pattern drifts with depth
    f = np.float32(R0 ** 0.35) / np.maximum(r, np.float32(1e-3)) ** np.float32(0.35)
    ux, uy, uz = dx * f, dy * f, dz * f
    g = np.zeros_like(dx)
    for i in range(n):
        arg = kk[i, 0] * ux + kk[i, 1] * uy
        arg += kk[i, 2] * uz + ph[i]
        np.sin(arg, out=arg)
        arg *= amp[i]
        g += arg
    grad = math.sqrt(float(np.sum(amp.astype(float) ** 2 * (2 * np.pi / lam) ** 2)) / 2.0)
    np.abs(g, out=g)
    g *= np.float32(1.0 / grad)
    return g


def _smooth_field(rng, z, y, x, n=6, wavelength=(25.0, 45.0)):
    """A smooth random field (about unit sd) at the points z, y, x (mm; 1-D, broadcast to (z, y, x))."""
    out = None
    for _ in range(n):
        k = rng.normal(size=3)
        k *= 2 * np.pi / rng.uniform(*wavelength) / np.linalg.norm(k)
        ph = rng.uniform(0, 2 * np.pi, 3)
        term = (np.cos(k[0] * x + ph[0])[None, None, :] * np.cos(k[1] * y + ph[1])[None, :, None]
                * np.cos(k[2] * z + ph[2])[:, None, None]).astype(np.float32)
        out = term if out is None else out + term
    return out * np.float32(2.0 * math.sqrt(2.0 / n))


def render_subject(subject, center: str | None = None, seed: int = 0, index: int | None = None):
    """Render one subject's volumes in memory.

    Parameters
    ----------
    subject : mapping (a row of :func:`draw_cohort`) with ``center``, ``index``,
        ``gp_delta``, ``gp_base``, ``asym``, ``pose``.
    seed : the cohort seed (selects the subject's image and ROI noise streams).

    Returns
    -------
    dict with ``t1`` (int16, shape (X, Y, Z), stored intensity units), ``roi`` (int16,
    the rater's mask, 1 = left GP, 2 = right GP), ``gp_true`` (int16, the true GP on the
    acquisition grid: voxels more than half inside it, same codes), ``affine`` (4x4
    float64, voxel -> RAS mm).
    """
    center = center or subject["center"]
    index = int(subject["index"] if index is None else index)
    sc = SCANNERS[center]
    pose_d = subject["pose"]
    _, rng_img, rng_roi = _subject_streams(seed, center, index)
    T = {k: np.float32(v) for k, v in sc.tissue.items()}
    pose = _Pose(pose_d)
    affine = center_affine(center)
    nx, ny, nz = sc.shape
    xs = affine[0, 3] + np.arange(nx) * sc.inplane_mm
    ys = affine[1, 3] + np.arange(ny) * sc.inplane_mm
    zc = affine[2, 3] + np.arange(nz) * sc.slice_mm
    grid = _Grid(pose, zc, ys, xs)
    edge = 0.45 * sc.inplane_mm
    img = np.zeros((nz, ny, nx), dtype=np.float32)

    # ---- head, scalp, skull, extra-axial CSF, cortex, sulci, white matter (slice centres) ----
    hx, hy, hz = grid.coords()
    shape = pose_d["shape"]
    ea = float(pose_d["extra_axial"])
    d_cer, dx, dy, dz, r = _brain_depth(hx, hy, hz, shape)
    cb_box = grid.box(_CB_C, max(_CB_SEMI) + 4.0)
    cbx, cby, cbz = hx[cb_box], hy[cb_box], hz[cb_box]
    d_cb, _, _ = _ellipsoid_depth(cbx, cby, cbz, _CB_C, _CB_SEMI)
    d_brain = d_cer.copy()
    np.maximum(d_brain[cb_box], d_cb, out=d_brain[cb_box])
    d_head = d_brain + np.float32(ea + 5.5)  # depth below the skin
    # layers below the skin: skin 0-1 mm, fat 1-3.5, skull 3.5-5.5, CSF below
    img += _soft(d_head, edge) * np.where(d_head < 1.0, T["skin"], np.where(
        d_head < 3.5, T["fat"], np.where(d_head < 5.5, T["skull"], T["csf"])))
    del d_head
    # cortical shell: sulci (radial clefts, deep at the vertex) and the interhemispheric fissure
    depth_lim = np.float32(10.0) + np.float32(3.0) * np.clip(dz / np.float32(40.0), -1.0, 1.0)
    shell = (d_cer > -1.5) & (d_cer < depth_lim + 4.0)
    g = np.full(img.shape, 100.0, dtype=np.float32)
    g[shell] = _sulcal_field(dx[shell], dy[shell], dz[shell], r[shell], pose_d["sulci_seed"])
    g /= np.maximum(_soft(depth_lim - d_cer, 1.5), np.float32(1e-2))  # sulci taper off at their depth
    fis_zone = np.clip(_soft(dz - np.float32(12.0), 2.0)
                       + _soft(np.abs(dy + np.float32(2.0)) - np.float32(33.0), 2.0), 0, 1)
    g_fis = np.abs(hx) + (1.0 - fis_zone) * np.float32(100.0)
    np.minimum(g, g_fis, out=g)
    del g_fis, fis_zone, shell, dx, dy, r
    m_cortex = np.maximum(_soft(np.float32(2.4) - d_cer, 0.6), _soft(np.float32(2.9) - g, 0.6))
    wm = T["wm"] * (1.0 + np.float32(0.035) * _smooth_field(rng_img, zc, ys, xs))  # unmyelinated WM texture
    # myelinating central corona radiata: faint bright bands high up
    for side in (-1.0, 1.0):
        box = grid.box((side * 16.0, -8.0, 30.0), 16.0)
        cr = np.sqrt(((hx[box] - np.float32(side * 16.0)) / 1.0) ** 2 + ((hy[box] + 8.0) / 2.5) ** 2
                     + ((hz[box] - 30.0) / 2.0) ** 2)
        wm[box] += np.float32(0.45) * (T["plic"] - T["wm"]) * _soft(np.float32(4.0) - cr, 2.0)
    val = wm + (T["cortex"] - wm) * m_cortex
    val += (T["csf"] - val) * _soft(np.float32(0.5) - g, 0.35)
    del g, wm, m_cortex
    m_cer = _soft(d_cer, edge)
    img *= 1.0 - m_cer
    img += m_cer * val
    del m_cer, val
    # posterior fossa: tentorium / cisterna magna, cerebellum with folia parallel to its surface
    folia = np.abs(np.sin(d_cb * np.float32(2 * np.pi / 2.6) + np.float32(0.3) * np.sin(cbx * np.float32(0.25))))
    cb_val = T["cb_gm"] + (T["cb_wm"] - T["cb_gm"]) * _soft(d_cb - np.float32(6.0), 1.5)
    cb_val = np.where((folia < 0.22) & (d_cb < 6.0), T["csf"] * 0.6 + cb_val * 0.4, cb_val)
    cb_val = np.where(np.abs(cbx) < 0.8, T["csf"], cb_val)  # vallecula
    _paint(img, cb_box, _soft(d_cb + np.float32(1.8), edge), T["csf"])
    _paint(img, cb_box, _soft(d_cb, edge), cb_val)
    del folia, cb_val, d_cb, d_cer, hx, hy, hz, dz, cbx, cby, cbz
    for side in (-1.0, 1.0):  # insula and Sylvian fissure
        for c, semi, rot, value in (((31.5, 2.0, 0.0), (3.0, 15.0, 11.0), 0.0, T["cortex"]),
                                    ((34.0, 2.0, 0.0), (0.8, 13.0, 9.0), 0.0, T["csf"]),
                                    ((38.0, 9.0, 0.0), (5.0, 0.8, 7.0), 20.0, T["csf"])):
            cc = (side * c[0], c[1], c[2])
            box = grid.box(cc, max(semi) + 2)
            d, _, _ = _ellipsoid_depth(*grid.coords(box), cc, semi, side * rot)
            _paint(img, box, _soft(d, edge), value)
    for c, semi, value in (((0.0, -14.0, -22.0), (8.0, 9.0, 15.0), T["brainstem"]),
                           ((0.0, -27.0, -24.0), (3.0, 2.5, 4.0), T["csf"]),
                           ((0.0, 6.0, -16.0), (11.0, 8.0, 3.5), T["csf"])):
        box = grid.box(c, max(semi) + 2)
        d, _, _ = _ellipsoid_depth(*grid.coords(box), c, semi)
        _paint(img, box, _soft(d, edge), value)

    # ---- deep grey nuclei, internal capsule, ventricles: rendered with a slice profile ----
    ns = DEEP_SUPERSAMPLE
    corners = np.array([[x, y, z] for x in _DEEP_BOX[0] for y in _DEEP_BOX[1] for z in _DEEP_BOX[2]])
    wc = corners @ pose.Minv.T + pose.t
    k0 = max(0, int(np.floor((wc[:, 2].min() - zc[0]) / sc.slice_mm)))
    k1 = min(nz, int(np.ceil((wc[:, 2].max() - zc[0]) / sc.slice_mm)) + 1)
    ysl = slice(max(0, int(np.searchsorted(ys, wc[:, 1].min()))), int(np.searchsorted(ys, wc[:, 1].max())))
    xsl = slice(max(0, int(np.searchsorted(xs, wc[:, 0].min()))), int(np.searchsorted(xs, wc[:, 0].max())))
    sub_off = ((np.arange(ns) + 0.5) / ns - 0.5) * sc.slice_mm
    zsub = (zc[k0:k1, None] + sub_off[None, :]).ravel()
    dgrid = _Grid(pose, zsub, ys[ysl], xs[xsl])
    deep = np.repeat(img[k0:k1, ysl, xsl], ns, axis=0)
    gp_m = {}
    for side, code in ((-1.0, 1), (1.0, 2)):
        for name in ("thalamus", "vl", "caudate_head", "caudate_body", "putamen", "gp", "plic"):
            c, semi, rot = _DEEP[name]
            cc = (side * c[0], c[1], c[2])
            box = dgrid.box(cc, max(semi) + 2)
            d, lx, ly = _ellipsoid_depth(*dgrid.coords(box), cc, semi, side * rot)
            m = _soft(d, edge)
            if name == "gp":
                # the T1 shortening is strongest in the posteromedial GP
                w = np.clip(0.76 - 0.16 * ly / semi[1] - 0.12 * side * lx / semi[0], 0.5, 1.0)
                delta = sc.gp_gain * float(subject["gp_delta"]) * (1.0 + side * float(subject["asym"]))
                value = T["gp"] + np.float32(float(subject["gp_base"])) + np.float32(delta) * w
                gp_m[code] = (box, m)
            else:
                value = T["caudate"] if name.startswith("caudate") else T[name]
            _paint(deep, box, m, value)
    vs = float(pose_d["ventricles"])
    cavities = []
    for side in (-1.0, 1.0):
        for c, semi, rot in _VENTRICLES.values():
            cavities.append(((side * (c[0] + (vs - 1.0) * 1.5), c[1], c[2]),
                             (semi[0] * vs, semi[1], semi[2] * (0.7 + 0.3 * vs)), side * rot))
    cavities.append(((0.0, -10.0, 1.0), (0.9 * vs, 9.0, 7.0), 0.0))  # third ventricle
    if pose_d["csp"] > 0:  # cavum septi pellucidi (a normal variant)
        cavities.append(((0.0, 14.0, 10.0), (pose_d["csp"] * 0.8, 8.0, 5.0), 0.0))
    for cc, semi, rot in cavities:
        box = dgrid.box(cc, max(semi) + 2)
        d, _, _ = _ellipsoid_depth(*dgrid.coords(box), cc, semi, rot)
        _paint(deep, box, _soft(d, edge), T["csf"])
    nzb = k1 - k0
    img[k0:k1, ysl, xsl] = deep.reshape(nzb, ns, deep.shape[1], deep.shape[2]).mean(axis=1)
    del deep
    # the true GP: voxels more than half inside it (over the slice profile)
    gp_true = np.zeros((nz, ny, nx), dtype=np.int16)
    gp_blk = gp_true[k0:k1, ysl, xsl]
    for code, (box, m) in gp_m.items():
        full = np.zeros(dgrid.shape, dtype=np.float32)
        full[box] = m
        frac = full.reshape(nzb, ns, full.shape[1], full.shape[2]).mean(axis=1)
        gp_blk[frac > 0.5] = code
    roi = np.zeros_like(gp_true)
    roi[k0:k1, ysl, xsl] = _rater_mask(dgrid, gp_blk, rng_roi)

    # ---- acquisition: in-plane PSF, bias field, Rician noise, intensity scale ------------
    from scipy.ndimage import gaussian_filter

    vol = gaussian_filter(img, sigma=(0.0, sc.psf_px, sc.psf_px), mode="nearest")
    del img
    X = (xs[None, None, :] / 70.0).astype(np.float32)
    Y = (ys[None, :, None] / 70.0).astype(np.float32)
    Z = (zc[:, None, None] / 60.0).astype(np.float32)
    b = (rng_img.normal(0.0, 1.0, 6) * sc.bias).astype(np.float32)
    logbias = (b[0] * X + b[1] * Y + b[2] * Z + 0.6 * b[3] * (X * X - Y * Y) + 0.6 * b[4] * X * Y
               + 0.6 * b[5] * Z * Z + np.float32(sc.bias * 0.8) * Y)  # plus a coil tilt per center
    vol *= np.exp(logbias)
    sd = np.float32(sc.noise_sd)
    n1 = rng_img.standard_normal(vol.shape, dtype=np.float32)
    n1 *= sd
    vol += n1
    np.square(vol, out=vol)
    rng_img.standard_normal(out=n1, dtype=np.float32)
    n1 *= sd
    np.square(n1, out=n1)
    vol += n1
    np.sqrt(vol, out=vol)
    vol *= np.float32(sc.scale)
    t1 = np.clip(np.rint(vol), 0, 32767).astype(np.int16)
    # (z, y, x) -> (x, y, z)
    return {
        "t1": np.ascontiguousarray(t1.transpose(2, 1, 0)),
        "roi": np.ascontiguousarray(roi.transpose(2, 1, 0)),
        "gp_true": np.ascontiguousarray(gp_true.transpose(2, 1, 0)),
        "affine": affine,
    }


def _rater_mask(dgrid: _Grid, gp_true: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rater's GP outline on the deep block: a perturbed, wobbly ellipse per slice where the GP is seen.

    ``gp_true`` is the true GP of the block at slice resolution (z, y, x); returns the same shape.
    """
    ns = DEEP_SUPERSAMPLE
    nzb = gp_true.shape[0]
    roi = np.zeros_like(gp_true)
    size_bias = rng.normal(1.0, 0.07)  # this rater's tendency to draw large / small
    thr = rng.uniform(0.35, 0.6)
    for side, code in ((-1.0, 1), (1.0, 2)):
        c, semi, rot = _DEEP["gp"]
        cc = np.array([side * c[0], c[1], c[2]]) + rng.normal(0.0, [0.45, 0.6, 0.8])
        sm = np.array(semi) * np.array([size_bias * rng.normal(1.0, 0.07), size_bias * rng.normal(1.0, 0.07),
                                        rng.normal(1.0, 0.08)])
        rt = side * (rot + rng.normal(0.0, 5.0))
        jit = rng.normal(0.0, 0.35, (nzb, 2)).astype(np.float32)  # per-slice hand jitter (mm)
        ph = rng.uniform(0, 2 * np.pi, 2)
        zb, ysl, xsl = dgrid.box(tuple(cc), float(max(sm)) + 3.0)
        z0, z1 = zb.start // ns, min(nzb, -(-zb.stop // ns))
        if z1 <= z0:
            continue
        hx, hy, hz = dgrid.coords((slice(z0 * ns, z1 * ns), ysl, xsl))
        hx = hx + np.repeat(jit[z0:z1, 0], ns)[:, None, None]
        hy = hy + np.repeat(jit[z0:z1, 1], ns)[:, None, None]
        d, lx, ly = _ellipsoid_depth(hx, hy, hz, tuple(cc), tuple(sm), rt)
        ang = np.arctan2(ly, lx)
        d = d + 0.35 * np.sin(3 * ang + ph[0]) + 0.25 * np.sin(5 * ang + ph[1])  # wobbly hand-drawn outline
        frac = (d > 0).reshape(z1 - z0, ns, *d.shape[1:]).mean(axis=1)
        seen = (gp_true[z0:z1, ysl, xsl] == code).sum(axis=(1, 2)) >= 4  # outlined only where clearly seen
        tgt = roi[z0:z1, ysl, xsl]
        tgt[(frac > thr) & seen[:, None, None]] = code
    return roi


# ----------------------------------------------------------------------------------------
# Writing a cohort
# ----------------------------------------------------------------------------------------
_MANIFEST_COLUMNS = ["subject_id", "center", "t1", "roi", "nbna", "label", "reader_1", "reader_2", "sex",
                     "gestational_age_weeks", "postnatal_age_days", "tsb_umol_l"]
_TRUTH_COLUMNS = ["subject_id", "center", "label", "severity", "oracle_p", "gp_delta", "variant", "gp_base",
                  "visible"]


def _save(data, affine, path):
    """save_nifti with fast deterministic gzip (level 1: 7x faster than 6 on noisy int16, as small)."""
    from nhb_core.io import save_nifti

    try:
        return save_nifti(data, affine, path, dtype=np.int16, compresslevel=1)
    except TypeError:  # an io.save_nifti without the compresslevel option
        return save_nifti(data, affine, path, dtype=np.int16)


def _write_subject(args) -> dict[str, Any]:
    """Worker: render one subject and write its NIfTI files (top-level for pickling)."""
    out_dir, subject, seed, write_truth = args
    vols = render_subject(subject, seed=seed)
    sid = subject["subject_id"]
    img_dir = Path(out_dir) / "images"
    _save(vols["t1"], vols["affine"], img_dir / f"{sid}_t1.nii.gz")
    _save(vols["roi"], vols["affine"], img_dir / f"{sid}_roi.nii.gz")
    if write_truth:
        _save(vols["gp_true"], vols["affine"], Path(out_dir) / "truth" / f"{sid}_gp_true.nii.gz")
    return {"subject_id": sid}


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        n = os.cpu_count() or 1
    return max(1, min(2, n))


def synthesize(out_dir, preset: str = "paper", seed: int = 0, n=None,
               progress: ProgressCallback | None = None, workers: int | None = None,
               write_truth: bool = False, readings: bool = True) -> Path:
    """Write a synthetic two-center neonatal T1WI cohort and return its manifest path.

    Parameters
    ----------
    out_dir : folder to write (created; existing files of the same names are replaced).
    preset : "paper" (A 106 + 119, B 34 + 18 subjects, label 1 + label 0) or "small"
        (A 8 + 8, B 5 + 5).
    seed : int, fixes every random choice; equal arguments give byte-identical files.
    n : None (preset sizes), int (total subjects split like the preset), or dict
        ``{center: (n_label1, n_label0)}``.
    progress : optional callback, called with ``{"stage": "synth", "done", "total", "eta_s",
        "message"}`` after every subject.
    workers : processes (default min(2, CPUs)); results do not depend on it.
    write_truth : also write the true GP masks to ``out_dir/truth/<id>_gp_true.nii.gz``
        (for debugging and teaching; never referenced by the manifest).
    readings : also write the simulated reader study ``readings.csv`` (:func:`reader_study`: five
        readers, 1-5 ratings of every subject, unaided arm; its own random streams, so nothing
        else in the cohort depends on it).

    Writes
    ------
    ``images/<id>_t1.nii.gz`` (int16, (X, Y, Z), RAS+, anisotropic voxels in mm),
    ``images/<id>_roi.nii.gz`` (int16, 1 = left GP, 2 = right GP), ``manifest.csv``
    (see docs/manifest.md; paths relative to the folder), ``truth.csv`` (latent
    severity, oracle probability per subject) and ``cohort.json`` (oracle AUC per
    center, counts, preset, seed, generator version, acquisition of each center).

    Returns
    -------
    pathlib.Path of ``out_dir/manifest.csv`` (written last: a cohort folder with a
    manifest is complete).
    """
    out_dir = Path(out_dir)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise ConfigError("--seed", f"'{seed}' is not an integer", "Give a whole number such as 0") from None
    if seed < 0:
        raise ConfigError("--seed", f"seed {seed} is negative", "Give a whole number >= 0")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder", "Choose a folder path for --out")
    df = draw_cohort(preset, seed, n)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    total = len(df)
    emit(progress, "synth", done=0, total=total, message="drawing subjects")
    jobs = [(str(out_dir), row, seed, write_truth) for row in df.to_dict("records")]
    workers = _default_workers() if workers is None else max(1, int(workers))
    eta = EtaEstimator()
    if workers == 1 or total < 4:
        for i, job in enumerate(jobs, 1):
            r = _write_subject(job)
            emit(progress, "synth", done=i, total=total, eta_s=eta.eta(i, total), message=r["subject_id"])
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        try:
            for i, r in enumerate(ex.map(_write_subject, jobs, chunksize=2), 1):
                emit(progress, "synth", done=i, total=total, eta_s=eta.eta(i, total), message=r["subject_id"])
        except BaseException:  # a failing worker or a cancelling progress callback: stop the rest now
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        ex.shutdown(wait=True)

    # tables
    man = df.copy()
    man["t1"] = "images/" + man["subject_id"] + "_t1.nii.gz"
    man["roi"] = "images/" + man["subject_id"] + "_roi.nii.gz"
    truth = df[_TRUTH_COLUMNS].copy()
    oracle = {}
    visible = {}
    counts = {}
    readers = {}
    for c in CENTERS:
        sub = df[df.center == c]
        if len(sub) == 0:
            continue
        oracle[c] = auc_score(sub.label, sub.oracle_p)
        visible[c] = auc_score(sub.label, sub.visible)
        counts[c] = {"1": int((sub.label == 1).sum()), "0": int((sub.label == 0).sum())}
    for reader in READERS:
        y, x = df.label.to_numpy(), df[reader].to_numpy()
        readers[reader] = {"sensitivity": float(x[y == 1].mean()) if (y == 1).any() else None,
                           "specificity": float(1 - x[y == 0].mean()) if (y == 0).any() else None}
    meta = {
        "generator": "nhb_core.synth",
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "seed": seed,
        "n_subjects": int(total),
        "counts": counts,
        "label_rule": f"label = 1 if nbna <= {NBNA_THRESHOLD}",
        "oracle_auc": oracle,
        "oracle_definition": "AUC of P(label=1 | latent severity) under the generative model, per center, "
                             "on the drawn cohort (subject level)",
        "visible_auc": visible,
        "visible_definition": "AUC of the image-visible GP signal (truth.csv 'visible': the GP excess as the "
                              "scanner shows it, normal variation and a little noise) per center: the ceiling an "
                              "image model can approach",
        "readers": readers,
        "centers": {c: {"field_T": SCANNERS[c].field_T, "shape": list(SCANNERS[c].shape),
                        "spacing_mm": [SCANNERS[c].inplane_mm, SCANNERS[c].inplane_mm, SCANNERS[c].slice_mm],
                        "noise_sd": SCANNERS[c].noise_sd, "intensity_scale": SCANNERS[c].scale}
                    for c in counts},
        "files": {"manifest": "manifest.csv", "truth": "truth.csv", "images": "images/"},
    }
    if readings:
        study = reader_study(df, seed)
        meta["reader_study"] = {"file": "readings.csv", "readers": {r: dict(v, cuts=list(v["cuts"]))
                                                                    for r, v in STUDY_READERS.items()},
                                "positive_rating": RATING_POSITIVE, "summary": reader_study_summary(study)}
        atomic_write_text(out_dir / "readings.csv", study.to_csv(index=False, lineterminator="\n"))
    atomic_write_text(out_dir / "truth.csv", truth.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    atomic_write_json(out_dir / "cohort.json", meta)
    man_path = out_dir / "manifest.csv"
    atomic_write_text(man_path, man[_MANIFEST_COLUMNS].to_csv(index=False, lineterminator="\n"))
    emit(progress, "synth", done=total, total=total, eta_s=0.0, message="done")
    return man_path


def _redraw(cohort_dir: Path) -> tuple[dict[str, Any], Any]:
    """``cohort.json`` of a written cohort and its tabular draw (:func:`draw_cohort`), redrawn from the
    preset, seed and counts it records; a one-line InputError when it is missing or from another
    generator version."""
    meta_path = cohort_dir / "cohort.json"
    if not meta_path.is_file():
        raise InputError(meta_path, "is missing", "Point to a folder written by `nhb_core synth`")
    meta = read_json(meta_path)
    if meta.get("generator_version") != GENERATOR_VERSION:
        raise InputError(meta_path, f"was written by generator {meta.get('generator_version')}, "
                                    f"this is {GENERATOR_VERSION}", "Regenerate the cohort with this version")
    counts = {c: (v["1"], v["0"]) for c, v in meta["counts"].items()}
    return meta, draw_cohort(meta["preset"], meta["seed"], counts)


def subject_truth(cohort_dir, subject_id: str) -> dict[str, Any]:
    """Regenerate a written subject's ground truth from ``cohort_dir/cohort.json``.

    Returns a dict with ``gp_true`` (int16 (X, Y, Z), 1 = left GP, 2 = right GP, at the
    image grid), ``affine``, ``severity``, ``oracle_p``, ``gp_delta`` and the other
    latent variables of :func:`draw_cohort`.
    """
    cohort_dir = Path(cohort_dir)
    meta, df = _redraw(cohort_dir)
    row = df[df.subject_id == subject_id]
    if row.empty:
        raise InputError(cohort_dir / "cohort.json", f"has no subject '{subject_id}'",
                         "Use a subject_id of its manifest.csv")
    subj = row.iloc[0].to_dict()
    vols = render_subject(subj, seed=meta["seed"])
    return {"gp_true": vols["gp_true"], "affine": vols["affine"], **{k: subj[k] for k in _TRUTH_COLUMNS}}


def write_reader_study(cohort_dir, network=None, aid_weight: float = AID_WEIGHT, out=None) -> Path:
    """(Re)write a synthetic cohort's reader study, optionally with an aided arm.

    The readers' draws are regenerated from ``cohort_dir/cohort.json`` (the unaided ratings are the
    ones :func:`synthesize` wrote); with ``network`` (subject_id -> probability, e.g. a trained
    network's subject-level predictions) the aided arm is added for the subjects that have a score
    and both arms are restricted to them (:func:`reader_study`).

    Parameters
    ----------
    cohort_dir : a folder written by :func:`synthesize`.
    network : None or mapping subject_id -> probability in [0, 1].
    aid_weight : w of the aided arm, in [0, 1].
    out : destination CSV (default ``cohort_dir/readings.csv``, which the study reads).

    Returns
    -------
    pathlib.Path of the written readings CSV (atomic write).

    Examples
    --------
    >>> write_reader_study("data/cohort_paper", network={"A001": 0.91, "A002": 0.12})  # doctest: +SKIP
    """
    cohort_dir = Path(cohort_dir)
    meta, df = _redraw(cohort_dir)
    study = reader_study(df, meta["seed"], network=network,
                         aid_weight=aid_weight)
    dest = Path(out) if out is not None else cohort_dir / "readings.csv"
    atomic_write_text(dest, study.to_csv(index=False, lineterminator="\n"))
    return dest


def render_montage(path, seed: int = 0, tile_px: int = 176) -> Path:
    """Write a PNG montage of axial slices through the GP: one row per center, a control and an
    injured neonate, each as the whole slice and as a 64 mm zoom on the basal ganglia.

    Subjects come from the paper preset's draw (``seed``): per center the label-0 subject with the
    lowest latent severity and the label-1 subject at the 75th severity percentile of the injured.
    Radiological orientation (the patient's left on the image's right). Returns the path.
    """
    from PIL import Image, ImageDraw

    df = draw_cohort("paper", seed)
    rows = []
    for center in CENTERS:
        sub = df[df.center == center].sort_values("severity")
        ctrl = sub[sub.label == 0].iloc[0]
        inj = sub[sub.label == 1]
        inj = inj.iloc[int(0.75 * (len(inj) - 1))]
        sp = SCANNERS[center].inplane_mm
        tiles = []
        for subj in (ctrl, inj):
            v = render_subject(subj.to_dict(), seed=seed)
            t1, gp = v["t1"].astype(np.float32), v["gp_true"]
            z = int(np.argmax((gp > 0).sum(axis=(0, 1))))
            sl = t1[:, :, z].T[::-1, ::-1]  # rows: anterior at the top; columns: patient's left on the right
            hi = float(np.percentile(t1[t1 > 0], 99.5))
            yy, xx = np.nonzero(gp[:, :, z].T[::-1, ::-1])
            gy, gx = int(yy.mean()), int(xx.mean())
            for half_mm, cy, cx, what in ((63.0, sl.shape[0] // 2 - int(round(4.0 / sp)), sl.shape[1] // 2, "slice"),
                                          (32.0, gy, gx, "zoom")):
                half = int(round(half_mm / sp))
                crop = np.zeros((2 * half, 2 * half), np.float32)
                y0, x0 = cy - half, cx - half
                src = sl[max(0, y0): cy + half, max(0, x0): cx + half]
                crop[max(0, -y0): max(0, -y0) + src.shape[0], max(0, -x0): max(0, -x0) + src.shape[1]] = src
                im = Image.fromarray(np.clip(crop / hi * 255.0, 0, 255).astype(np.uint8)).resize(
                    (tile_px, tile_px), Image.Resampling.BILINEAR)
                d = ImageDraw.Draw(im)
                d.text((4, 3), f"{center} {'injured' if subj.label else 'control'}", fill=255)
                d.text((4, tile_px - 13), f"NBNA {subj.nbna}" + (" (GP zoom)" if what == "zoom" else ""), fill=255)
                tiles.append(np.asarray(im))
        rows.append(np.concatenate(tiles, axis=1))
    out = Path(path)
    from nhb_core.fileio import atomic_path

    with atomic_path(out) as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG", optimize=True)
    return out


__all__ = ["synthesize", "draw_cohort", "render_subject", "subject_truth", "render_montage",
           "oracle_probability", "gp_signal", "auc_score", "center_affine", "PRESETS", "SCANNERS",
           "GENERATOR_VERSION", "reader_study", "reader_study_summary", "write_reader_study", "STUDY_READERS",
           "RATING_POSITIVE"]
