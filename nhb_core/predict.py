"""Single-case prediction with a finished run's models: probabilities, decisions, Grad-CAM.

:func:`predict_case` takes one subject's T1 volume and its globus pallidus (GP) ROI mask,
cuts the ROI slices with each model's own preprocessing (``model.json`` ``"preprocessing"``,
the prepare config the model was trained on), and returns per model the subject probability
(mean of its slice probabilities, as the evaluation aggregates them), the decision at the
model's threshold (``model.json`` ``"threshold"``, Youden on the validation set), and the
ensemble: the mean of the models' probabilities, decided at the mean of their thresholds.
With ``out_dir`` it writes ``prediction.json`` and one Grad-CAM PNG per model and slice
(the CAM placed back on the full axial slice, with the ROI contour).

Privacy: the outputs hold no input file name except a sanitised stem of a NIfTI file's name
(none for a DICOM folder, whose name may identify the patient), no DICOM header field, and the
inputs' SHA-256.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from nhb_core.errors import RunError
from nhb_core.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from nhb_core.models import MODEL_LOCK, load_run_model
from nhb_core.progress import ProgressCallback, emit
from nhb_core.runs import RunFolder

PathLike = str | os.PathLike

#: The ensemble's decision threshold is the mean of the member models' thresholds.
ENSEMBLE_THRESHOLD_RULE = "mean of the models' thresholds"


# ---------------------------------------------------------------------------------- run models


def predict_probs(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Injury probability of each crop, ``sigmoid(logit)``: float64 [N] for images [N, C, H, W]."""
    import torch

    dev = next(model.parameters()).device
    out = []
    with MODEL_LOCK, torch.no_grad():  # never interleaved with a CAM's hooks on a shared model
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)).to(dev)
            out.append(torch.sigmoid(model(x).reshape(len(x), -1)[:, 0]).cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


# ---------------------------------------------------------------------------------- inputs


def safe_stem(path: PathLike, max_len: int = 40) -> str:
    """A file-system-safe stem of a NIfTI file name (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``).

    Only ``[A-Za-z0-9_-]`` survive (others become ``_``), at most ``max_len`` characters; an
    empty result becomes ``case``.
    """
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".gz"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-")[:max_len].strip("_-")
    return stem or "case"


def _load_inputs(t1, roi):
    """(t1 Volume, roi Volume, descriptors) from paths or already loaded Volumes."""
    from nhb_core.io import Volume, load_roi, load_t1

    desc: dict[str, Any] = {}
    if isinstance(t1, Volume):
        t1v = t1
        desc["t1_sha256"] = None
        stem = None
    else:
        p = Path(t1)
        t1v = load_t1(p)
        desc["t1_sha256"] = sha256_file(p)
        # a DICOM folder's name can be the patient's name or ID: never reuse it
        stem = None if p.is_dir() else safe_stem(p)
    if isinstance(roi, Volume):
        from nhb_core.io import check_same_grid

        roiv = roi
        check_same_grid(roiv, t1v)
        if not np.asarray(roiv.data).any():
            from nhb_core.errors import ImageError

            raise ImageError(roiv.source or "ROI", "ROI mask is empty (every voxel is 0)", "Give the GP ROI of this subject")
        desc["roi_sha256"] = None
    else:
        roiv = load_roi(Path(roi), reference=t1v)
        desc["roi_sha256"] = sha256_file(Path(roi))
    if stem is None:
        stem = "case-" + (desc["t1_sha256"] or "volume")[:12]
    desc["stem"] = stem
    desc["shape"] = [int(s) for s in t1v.data.shape]
    desc["spacing_mm"] = [float(s) for s in t1v.spacing]
    return t1v, roiv, desc


# ---------------------------------------------------------------------------------- predict


def predict_case(run_dir: PathLike, t1, roi, out_dir: PathLike | None = None, with_cam: bool = True,
                 progress: ProgressCallback | None = None, method: str = "gradcam", device: str = "cpu",
                 models: list[str] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Predict one subject with every model of a run (and their ensemble).

    Parameters
    ----------
    run_dir : path
        A finished study run (``models/<name>/model.safetensors`` + ``model.json``).
    t1 : path or nhb_core.io.Volume
        The T1 volume (NIfTI file or DICOM series folder).
    roi : path or nhb_core.io.Volume
        The bilateral GP ROI mask drawn on that T1 (same grid).
    out_dir : path, optional
        When given: ``prediction.json`` and, with ``with_cam``, ``cam/<model>__z<slice>.png`` (and
        ``cam/ensemble__z<slice>.png``) are written there (atomically).
    with_cam : bool
        Compute Grad-CAM maps (crop space), their share of energy in the ROI and the
        pointing-game hit per model and slice.
    progress : callable, optional
        ``{"stage": "predict", "done", "total", "model"}`` per model.
    method : str
        Saliency method (see :data:`nhb_core.saliency.METHODS`).
    device : str
        Torch device for the models.
    models : list of str, optional
        A subset of the run's models (default: all).
    threads : int, optional
        Torch CPU threads for this call (restored afterwards; process-wide while it runs). One
        subject's few 64 px crops are fastest on 1 thread: intra-op parallelism on such small
        tensors costs more than it saves, badly so on a busy machine (see bench_predict.py).
        None: leave torch's setting as it is.

    Returns
    -------
    dict
        ``input`` (stem, SHA-256 of the files, shape, spacing), ``slices`` (slice indices along
        the RAS+ axis 2), ``models`` ({name: {prob, threshold, decision, slice_probs,
        cam: [{slice_index, energy_in_roi, pointing_hit, png}]}}), ``ensemble`` ({prob,
        threshold, decision, threshold_rule, models}), ``seconds``, ``warnings``, ``files``
        (paths written, relative to ``out_dir``). Probabilities are of label 1 (injury);
        ``decision`` is 1 when ``prob >= threshold``.
    """
    if threads is not None:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(max(1, int(threads)))
        try:
            return predict_case(run_dir, t1, roi, out_dir=out_dir, with_cam=with_cam, progress=progress,
                                method=method, device=device, models=models, threads=None)
        finally:
            torch.set_num_threads(before)

    from nhb_core import saliency
    from nhb_core.slices import PrepareConfig, extract_slices

    t0 = time.monotonic()
    run = RunFolder(run_dir)
    rd = run.path
    names = run.require_trained_models()
    if models:
        unknown = [m for m in models if m not in names]
        if unknown:
            raise RunError(rd, f"model {unknown[0]!r} is not in this run", f"Use one of: {', '.join(names)}")
        names = [m for m in names if m in models]
    t1v, roiv, desc = _load_inputs(t1, roi)
    total = len(names)
    emit(progress, "predict", done=0, total=total, message="inputs loaded")
    extracted: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    per_model: dict[str, dict[str, Any]] = {}
    cams: dict[str, dict[int, np.ndarray]] = {}
    geo_by_cfg: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(names):
        model, mj = load_run_model(rd, name, device=device)
        cfg = PrepareConfig.from_dict(mj.get("preprocessing") or {}, source=str(run.model_json_path(name)))
        key = cfg.sha256()
        if key not in extracted:
            res = extract_slices(t1v.data, roiv.data, tuple(t1v.spacing), cfg, affine=t1v.affine)
            extracted[key] = res
            geo_by_cfg[key] = saliency.crop_geometry(res["centroid_vox"], t1v.spacing, t1v.data.shape, cfg,
                                                     affine=t1v.affine)
            for w in res["warnings"]:
                if w not in warnings:
                    warnings.append(w)
        res = extracted[key]
        images = res["images"]
        in_chans = int(mj.get("in_chans", images.shape[1]))
        if images.shape[1] != in_chans:
            raise RunError(run.model_json_path(name),
                           f"the model takes {in_chans} channel(s) but its preprocessing gives {images.shape[1]}",
                           "Retrain the model; its model.json does not match its weights")
        arch = mj.get("architecture") or name
        if with_cam:
            maps, probs = saliency.compute_cams(model, images, method=method, model_name=arch, return_probs=True)
        else:
            probs = predict_probs(model, images)
        thr = float(mj.get("threshold", 0.5)) if mj.get("threshold") is not None else 0.5
        prob = float(np.mean(probs))
        entry: dict[str, Any] = {
            "prob": prob, "threshold": thr, "decision": int(prob >= thr),
            "slice_probs": [float(p) for p in probs],
            "slice_index": [int(z) for z in res["slice_index"]],
            "preprocessing_sha256": key,
        }
        if mj.get("threshold") is None:
            entry["threshold_note"] = "model.json has no threshold; 0.5 used"
        if with_cam:
            cams[name] = {int(z): maps[i] for i, z in enumerate(res["slice_index"])}
            entry["cam"] = [{"slice_index": int(z),
                             "energy_in_roi": saliency.cam_energy_in_roi(maps[i], res["masks"][i]),
                             "pointing_hit": saliency.pointing_game(maps[i], res["masks"][i])}
                            for i, z in enumerate(res["slice_index"])]
            entry["cam_method"] = saliency.normalize_method(method)
            entry["_cfg"] = key
        per_model[name] = entry
        emit(progress, "predict", done=k + 1, total=total, model=name)

    probs_m = [per_model[n]["prob"] for n in names]
    thrs_m = [per_model[n]["threshold"] for n in names]
    ens_prob = float(np.mean(probs_m))
    ens_thr = float(np.mean(thrs_m))
    ensemble = {"prob": ens_prob, "threshold": ens_thr, "decision": int(ens_prob >= ens_thr),
                "threshold_rule": ENSEMBLE_THRESHOLD_RULE, "models": list(names)}
    all_slices = sorted({z for r in extracted.values() for z in (int(v) for v in r["slice_index"])})
    result: dict[str, Any] = {
        "run": rd.name,
        "input": desc,
        "slices": all_slices,
        "models": per_model,
        "ensemble": ensemble,
        "warnings": warnings,
        "files": [],
    }

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if with_cam:
            files = _write_cam_pngs(out, t1v, roiv, names, per_model, cams, extracted, geo_by_cfg)
            result["files"].extend(files)
    for e in per_model.values():
        e.pop("_cfg", None)
    result["seconds"] = round(time.monotonic() - t0, 3)
    if out_dir is not None:
        result["files"].append("prediction.json")
        atomic_write_json(Path(out_dir) / "prediction.json", result)
    return result


def _write_cam_pngs(out: Path, t1v, roiv, names, per_model, cams, extracted, geo_by_cfg) -> list[str]:
    """One full-slice overlay PNG per model and slice, plus the ensemble (mean of model maps)."""
    from nhb_core import saliency

    files: list[str] = []
    roi_mask = np.asarray(roiv.data) > 0
    ens: dict[int, list[np.ndarray]] = {}
    for name in names:
        key = per_model[name]["_cfg"]
        geo = geo_by_cfg[key]
        for cam_entry in per_model[name]["cam"]:
            z = cam_entry["slice_index"]
            img2d = saliency.display_slice(t1v.data, z)
            roi2d = saliency.display_slice(roi_mask, z)
            full = saliency.paste_back(cams[name][z], geo, img2d.shape)
            full = full / full.max() if full.max() > 0 else full  # normalised per slice
            ens.setdefault(z, []).append(full)
            rel = f"cam/{name}__z{z:03d}.png"
            atomic_write_bytes(out / rel, saliency.overlay_png(img2d, full, roi2d))
            cam_entry["png"] = rel
            files.append(rel)
    for z, maps in sorted(ens.items()):
        m = np.mean(maps, axis=0)
        m = m / m.max() if m.max() > 0 else m
        rel = f"cam/ensemble__z{z:03d}.png"
        atomic_write_bytes(out / rel, saliency.overlay_png(saliency.display_slice(t1v.data, z), m,
                                                          saliency.display_slice(roi_mask, z)))
        files.append(rel)
    return files
