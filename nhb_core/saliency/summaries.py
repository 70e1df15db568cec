"""Run-level saliency: cached maps per case of a finished run (``<run>/saliency/cache/``),
the per-case table and per-model means, and the study's saliency overview."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nhb_core.errors import DatasetError, InputError, RunError
from nhb_core.fileio import atomic_path, sha256_bytes
from nhb_core.progress import EtaEstimator, ProgressCallback, emit
from nhb_core.runs import RunFolder
from nhb_core.saliency.computation import DEFAULT_FRACTIONS, compute_cams, normalize_method
from nhb_core.saliency.rendering import crop_geometry, display_slice, overlay_png, paste_back
from nhb_core.saliency.scores import cam_energy_in_roi, faithfulness, pointing_game

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


# ---------------------------------------------------------------------------------------------
# the study's saliency stage


def _gallery_cases(subj: Any, slices: Any, model: str, thr: float, n_cases: int) -> list[dict[str, Any]]:
    """Cases for the Grad-CAM gallery: about half confident correct calls (both classes), half the
    most confident errors (subject-level call vs the model's threshold); one slice per subject (the
    slice whose probability is closest to the subject's)."""
    d = subj.copy()
    d["pred"] = (d[model] >= thr).astype(int)
    d["correct"] = d["pred"] == d["label"].astype(int)
    d["margin"] = (d[model] - thr).abs()
    wrong = d[~d["correct"]].sort_values(["margin", "subject_id"], ascending=[False, True]).head(n_cases // 2)
    right = d[d["correct"]].sort_values(["margin", "subject_id"], ascending=[False, True])
    n_right = n_cases - len(wrong)
    by_label = [right[right["label"] == k] for k in (1, 0)]
    picks: list[dict[str, Any]] = []
    i = 0
    while len(picks) < n_right and any(len(b) > i for b in by_label):
        for b in by_label:
            if len(b) > i and len(picks) < n_right:
                picks.append(b.iloc[i])
        i += 1
    out = []
    for r in picks + [r for _, r in wrong.iterrows()]:
        sl = slices[slices["subject_id"].astype(str) == str(r["subject_id"])]
        if not len(sl):
            continue
        z = int(sl.iloc[int((sl[model] - r[model]).abs().to_numpy().argmin())]["slice_index"])
        out.append({"subject_id": str(r["subject_id"]), "slice_index": z, "label": int(r["label"]),
                    "prob": float(r[model]), "correct": bool(r["correct"]), "center": str(r.get("center", ""))})
    return out


def saliency_overview(run_dir: Path, models: list[str], out_dir: Path, n_cases: int = 4,
                      method: str = "gradcam", set_name: str = "test", seed: int = 0,
                      with_faithfulness: bool = True,
                      progress: ProgressCallback | None = None) -> Path:
    """The study's saliency stage, over :mod:`nhb_core.saliency`.

    Per model: attention means over ``2 * n_cases`` cases of ``set_name``
    (:func:`nhb_core.saliency.saliency_summary`: energy in the GP ROI, pointing game, ROAD
    faithfulness vs random maps), and a gallery of ``n_cases`` correct and wrong subject-level
    calls (:func:`nhb_core.saliency.cam_for_case`, cached) as PNG overlays. Writes
    ``out_dir/summary.json``::

        {"method", "set", "models": {m: {"summary": {"n", "energy_in_roi", "pointing_hit_rate",
                                                     "faithfulness", "random_baseline", "faithfulness_gain"},
                                         "cases": [{"subject_id", "slice_index", "label", "prob" (subject),
                                                    "slice_prob", "correct", "set", "png", "roi_energy", "pointing"}]}}}

    plus ``out_dir/cases.csv`` (the summary's per-case table) and ``out_dir/gallery/<k>/<j>.png``
    (file names never come from user strings).
    """
    import pandas as pd

    from nhb_core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

    out_dir.mkdir(parents=True, exist_ok=True)
    table = saliency_summary(run_dir, models=list(models), set_name=set_name, method=method,
                             n_cases=max(2 * n_cases, 2), seed=seed, with_faithfulness=with_faithfulness,
                             progress=progress)
    atomic_write_text(out_dir / "cases.csv", table.to_csv(index=False))
    means = saliency_means(table)
    run = RunFolder(run_dir)
    subj = pd.read_csv(run.predictions_path(set_name, "subject"), dtype={"subject_id": str})
    slices = pd.read_csv(run.predictions_path(set_name, "slice"), dtype={"subject_id": str})
    out: dict[str, Any] = {"method": method, "set": set_name, "models": {}}
    for k, m in enumerate(models):
        mj = read_json(run.model_json_path(m))
        cases = _gallery_cases(subj, slices, m, float(mj.get("threshold", 0.5)), n_cases)
        for j, c in enumerate(cases):
            emit(progress, "saliency", model=m, message=f"gallery {j + 1}/{len(cases)}")
            r = cam_for_case(run_dir, m, set_name, c["subject_id"], c["slice_index"], method=method)
            rel = f"gallery/{k:02d}/{j:02d}.png"
            atomic_write_bytes(out_dir / rel, overlay_png(r["image"][0], r["cam"], r["roi"]))
            e = r.get("energy_in_roi")
            c.update({"set": set_name, "png": rel, "slice_prob": float(r["prob"]),
                      "roi_energy": None if e is None or e != e else float(e),
                      "pointing": bool(r.get("pointing_hit"))})
        row = means[means["model"] == m]
        summary = {col: (None if pd.isna(row.iloc[0][col]) else
                         int(row.iloc[0][col]) if col == "n" else float(row.iloc[0][col]))
                   for col in means.columns if col != "model"} if len(row) else {}
        out["models"][m] = {"summary": summary, "cases": cases}
    atomic_write_json(out_dir / "summary.json", out)
    return out_dir / "summary.json"
