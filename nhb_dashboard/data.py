"""Plain-Python data access for the dashboard pages (no Streamlit here).

The pages in ``dashboard_pages/`` stay thin: they call these functions to turn a run folder
(see ``docs/design-shared.md``) into tables, and cache the results with
``st.cache_data`` keyed on :func:`file_key` (path + mtime + size), so an edited file
is re-read and an unchanged one never is. (Formerly ``nhb_core.dashboard_data``.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nhb_core.fileio import read_json
from nhb_core.runs import RunFolder, list_runs, read_events, read_status, set_label, sort_sets

STAGE_ORDER = ("queued", "starting", "validate", "prepare", "split", "train", "baseline", "evaluate", "stats", "saliency", "report")

# ----------------------------------------------------------------- files
def default_runs_dir() -> Path:
    """The runs folder: ``$NHB_RUNS_DIR`` or ``./runs``."""
    return Path(os.environ.get("NHB_RUNS_DIR") or "runs")


def file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(path, mtime_ns, size)``: a cache key that changes when the file does
    (``(path, 0, -1)`` when it does not exist)."""
    p = Path(path)
    try:
        s = p.stat()
        return (str(p), s.st_mtime_ns, s.st_size)
    except OSError:
        return (str(p), 0, -1)


# ----------------------------------------------------------------- runs table
def _fmt_created(st: dict, run_dir: Path) -> str:
    for k in ("submitted", "started"):
        if st.get(k):
            return str(st[k]).replace("T", " ")[:19]
    try:
        import datetime as dt

        return dt.datetime.fromtimestamp(run_dir.stat().st_mtime, dt.UTC).isoformat(" ", "seconds")[:19]
    except OSError:
        return ""


def run_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """One row of the runs table as a dict: name, status, stage, models, sets,
    leakage flag, created, error and ``auc`` = {(set, model): subject-level AUC}."""
    run = RunFolder(run_dir)
    run_dir = run.path
    st = run.status() or {}
    metrics = run.metrics() or {}
    split = run.split() or {}
    cfg = run.config()
    sets_m = metrics.get("sets") or {}
    aucs: dict[tuple[str, str], float] = {}
    for s, block in sets_m.items():
        lvl = ((block or {}).get("level") or {}).get("subject") or {}
        for m, mm in (lvl.get("models") or {}).items():
            if isinstance(mm, dict) and mm.get("auc") is not None:
                aucs[(s, m)] = float(mm["auc"])
    leaky = metrics.get("leaky")
    if leaky is None:
        leaky = split.get("leaky")
    if leaky is None:
        leaky = ((cfg.get("split") or {}).get("unit") == "slice") if cfg else None
    sets = sort_sets(sets_m.keys()) if sets_m else sort_sets(k for k in (split.get("sets") or {}) if k != "train")
    return {
        "name": run_dir.name,
        "status": st.get("state", "unknown"),
        "stage": st.get("stage") or "",
        "models": run.models(),
        "sets": sets,
        "leaky": bool(leaky) if leaky is not None else None,
        "created": _fmt_created(st, run_dir),
        "error": st.get("error") or "",
        "auc": aucs,
        "path": str(run_dir),
    }


def runs_table(runs_dir: str | os.PathLike) -> pd.DataFrame:
    """The Home page's runs table, newest first: name, status, stage, models, sets, leakage,
    created, error. One row per run and a fixed set of columns (the AUCs are in
    :func:`auc_overview`), so the table fits a normal browser width however many sets and models."""
    cols = ["name", "status", "stage", "models", "sets", "leakage", "created", "error"]
    rows = []
    for r in list_runs(runs_dir):
        s = run_summary(r)
        status = s["status"] + (f" ({s['stage']})" if s["stage"] and s["status"] in ("running", "failed") else "")
        rows.append({"name": s["name"], "status": status, "stage": s["stage"],
                     "models": ", ".join(s["models"]),
                     "sets": ", ".join(set_label(x) for x in s["sets"] if x != "val"),
                     "leakage": ("LEAKY (slice split)" if s["leaky"] else "no") if s["leaky"] is not None else "",
                     "created": s["created"], "error": s["error"]})
    return pd.DataFrame(rows, columns=cols)


#: the columns the Home page shows and their widths in pixels: together under 800 px, the main
#: area of a 1280 px wide browser next to the sidebar (the sets are the AUC table's rows)
RUNS_TABLE_WIDTHS = {"name": 150, "status": 110, "models": 230, "leakage": 130, "created": 150}
RUNS_TABLE_HELP = {"status": "queued / running (stage) / done / failed / cancelled",
                   "leakage": "LEAKY: slices of one subject in both train and test"}

#: shorter headers for the cohort table's usual covariates
PRETTY_COLUMNS = {"nbna": "NBNA", "gestational_age_weeks": "GA (weeks)", "postnatal_age_days": "age (days)",
                  "tsb_umol_l": "TSB (µmol/L)", "birth_weight_g": "birth weight (g)"}


def pretty_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the usual covariate columns renamed for display (:data:`PRETTY_COLUMNS`)."""
    return df.rename(columns={c: PRETTY_COLUMNS[c] for c in df.columns if c in PRETTY_COLUMNS})


def auc_overview(runs_dir: str | os.PathLike) -> pd.DataFrame:
    """Subject-level AUC of every finished run: one row per (run, held-out set), one column per
    model (``run, set, <model>...``; models in the order the runs list them). The validation set
    (model selection) is left out."""
    rows, models = [], []
    for r in list_runs(runs_dir):
        s = run_summary(r)
        for m in s["models"] + sorted({m for _, m in s["auc"]} - set(s["models"])):
            if m not in models:
                models.append(m)
        for set_name in s["sets"]:
            if set_name == "val":
                continue
            aucs = {m: round(a, 3) for (sn, m), a in s["auc"].items() if sn == set_name}
            if aucs:
                rows.append({"run": s["name"], "set": set_label(set_name), **aucs})
    df = pd.DataFrame(rows, columns=["run", "set"] + models)
    return df[["run", "set"] + [m for m in models if df[m].notna().any()]] if len(df) else df[["run", "set"]]


def finished_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """Runs with a metrics.json (done, or finished enough to show results)."""
    return [r for r in list_runs(runs_dir) if RunFolder(r).metrics_path.exists()]


# ----------------------------------------------------------------- progress
def _fraction(ev: dict) -> float | None:
    try:
        if ev.get("epoch") is not None and ev.get("epochs"):
            steps = ev.get("steps")
            if steps:
                done = (float(ev["epoch"]) - 1) * float(steps) + float(ev.get("step") or 0)
                return min(1.0, max(0.0, done / (float(ev["epochs"]) * float(steps))))
            return min(1.0, float(ev["epoch"]) / float(ev["epochs"]))
        if ev.get("done") is not None and ev.get("total"):
            return min(1.0, max(0.0, float(ev["done"]) / float(ev["total"])))
        if ev.get("step") is not None and ev.get("steps"):
            return min(1.0, float(ev["step"]) / float(ev["steps"]))
    except (TypeError, ValueError):
        return None
    return None


def _split_stage(ev: dict) -> tuple[str, str]:
    stage = str(ev.get("stage") or "")
    model = ev.get("model") or ""
    if ":" in stage and not model and not stage.startswith("external"):
        stage, model = stage.split(":", 1)
    return stage, str(model)


def progress_rows(run_dir: str | os.PathLike, status: dict | None = None) -> list[dict[str, Any]]:
    """Latest progress per (stage, model) from events.jsonl, in pipeline order.

    Each row: ``stage, model, fraction`` (0-1 or None), ``text`` (epoch/step,
    metrics), ``eta_s``, ``t``. A stage later than the current one is complete.
    """
    events = read_events(run_dir)
    latest: dict[tuple[str, str], dict] = {}
    first_seen: dict[tuple[str, str], int] = {}
    first_t: dict[tuple[str, str], Any] = {}
    for i, ev in enumerate(events):
        key = _split_stage(ev)
        if not key[0]:
            continue
        prev = latest.get(key, {})
        merged = {**prev, **{k: v for k, v in ev.items() if v is not None}}
        latest[key] = merged
        first_seen.setdefault(key, i)
        first_t.setdefault(key, ev.get("t"))
    status = status if status is not None else (read_status(run_dir) or {})
    state = status.get("state")
    order = sorted(latest, key=lambda k: first_seen[k])
    rows = []
    for n, key in enumerate(order):
        ev = latest[key]
        frac = _fraction(ev)
        later_started = n < len(order) - 1 and key[0] != "train"
        if state == "done" or (later_started and frac is None):
            frac = 1.0 if state == "done" or later_started else frac
        parts = []
        if ev.get("epoch") is not None and ev.get("epochs"):
            parts.append(f"epoch {ev['epoch']}/{ev['epochs']}")
        elif ev.get("done") is not None and ev.get("total"):
            parts.append(f"{ev['done']}/{ev['total']}")
        for k, v in (ev.get("metrics") or {}).items():
            parts.append(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}")
        if ev.get("message"):
            parts.append(str(ev["message"])[:120])
        eta = ev.get("eta_s")
        t0, t1 = _parse_t(first_t.get(key)), _parse_t(ev.get("t"))
        secs = (t1 - t0) if (t0 is not None and t1 is not None) else None
        if eta is None and frac is not None and 0.0 < frac < 1.0 and secs:
            eta = secs * (1.0 - frac) / frac
        rows.append({"stage": key[0], "model": key[1], "fraction": frac, "text": " ".join(parts),
                     "eta_s": eta, "t": ev.get("t"), "seconds": secs})
    return rows


def _parse_t(t: Any) -> float | None:
    if not t:
        return None
    try:
        import datetime as dt

        return dt.datetime.fromisoformat(str(t)).timestamp()
    except ValueError:
        return None


def overall_eta(rows: list[dict], status: dict | None = None, models: list[str] | None = None) -> float | None:
    """A rough ETA (s) of the whole run: the running rows' ETA plus, for models not
    yet trained, the mean training time of those already trained."""
    if status and status.get("state") in ("done", "failed", "cancelled"):
        return 0.0
    etas = [float(r["eta_s"]) for r in rows if r.get("eta_s") is not None and (r.get("fraction") or 0) < 1.0]
    eta = max(etas) if etas else None
    trained = [r for r in rows if r["stage"] == "train" and (r.get("fraction") or 0) >= 1.0 and r.get("seconds")]
    seen = {r["model"] for r in rows if r["stage"] == "train"}
    todo = [m for m in (models or []) if m not in seen]
    if trained and todo:
        per = sum(r["seconds"] for r in trained) / len(trained)
        eta = (eta or 0.0) + per * len(todo)
    return eta


def fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "unknown"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def log_tail(run_dir: str | os.PathLike, n: int = 15, max_bytes: int = 64_000) -> str:
    """The last ``n`` lines of the run's log.txt (progress-bar redraws dropped)."""
    p = Path(run_dir) / "log.txt"
    try:
        with open(p, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.split("\r")[-1].rstrip() for ln in text.splitlines()]
    return "\n".join([ln for ln in lines if ln.strip()][-n:])


# ----------------------------------------------------------------- launch form
def study_config(models: list[str], epochs: int, batch_size: int, input_size: int, split_unit: str,
                 external_centers: list[str], seed: int, device: str, n_gpus: int = 1,
                 centers: list[str] | None = None) -> dict:
    """The study config dict (``nhb_core.config`` keys) the Launch form writes to ``config.yaml``.

    ``external_centers`` are held out of training (every subject of them is an
    external test set); the development centers are ``centers`` minus those.
    ``n_gpus`` > 1 makes the study train under torchrun.
    """
    if split_unit not in ("subject", "slice"):
        raise ValueError(f"split unit must be 'subject' or 'slice', got {split_unit!r}")
    cfg: dict[str, Any] = {
        "models": list(models),
        "seed": int(seed),
        "device": str(device),
        "n_gpus": max(1, int(n_gpus)),
        "prepare": {"size": int(input_size)},
        "split": {"unit": split_unit, "seed": int(seed)},
        "train": {"epochs": int(epochs), "batch_size": int(batch_size)},
    }
    ext = [str(c) for c in (external_centers or [])]
    if ext and centers:
        dev = [str(c) for c in centers if str(c) not in ext]
        cfg["split"]["dev_centers"] = dev
    return cfg


# ----------------------------------------------------------------- results helpers
def run_saliency_method(run_dir: str | os.PathLike) -> str:
    """The saliency method of a run's config (``saliency.method``, canonical name), ``"gradcam"`` when the
    run names none or an unknown one: what the Saliency page preselects.

    >>> run_saliency_method("/nonexistent")
    'gradcam'
    """
    from nhb_core.errors import NHBError
    from nhb_core.saliency import normalize_method

    sal = RunFolder(run_dir).config().get("saliency")
    name = sal.get("method") if isinstance(sal, dict) else None
    try:
        return normalize_method(str(name)) if name else "gradcam"
    except NHBError:
        return "gradcam"


def outcome_table(df: pd.DataFrame, model: str, threshold: float) -> pd.DataFrame:
    """Per-case outcome at ``threshold``: adds ``prob``, ``pred``, ``outcome``
    (TP/FP/FN/TN) and ``confidence`` = |prob - threshold|."""
    if df.empty or model not in df.columns:
        return pd.DataFrame(columns=["subject_id", "prob", "pred", "outcome", "confidence"])
    out = df.copy()
    out["prob"] = out[model].astype(float)
    out["pred"] = (out["prob"] >= float(threshold)).astype(int)
    y = out["label"].astype(int)
    out["outcome"] = np.select([(y == 1) & (out.pred == 1), (y == 0) & (out.pred == 1), (y == 1) & (out.pred == 0)],
                               ["TP", "FP", "FN"], "TN")
    out["confidence"] = (out["prob"] - float(threshold)).abs()
    return out


def confusion(df: pd.DataFrame, model: str, threshold: float) -> np.ndarray:
    """2x2 confusion matrix [[TN, FP], [FN, TP]] at ``threshold``."""
    t = outcome_table(df, model, threshold)
    c = t["outcome"].value_counts() if not t.empty else {}
    return np.array([[int(c.get("TN", 0)), int(c.get("FP", 0))], [int(c.get("FN", 0)), int(c.get("TP", 0))]])


def level_block(metrics: dict | None, set_name: str, level: str = "subject") -> dict:
    """``metrics["sets"][set]["level"][level]`` or {}."""
    return (((metrics or {}).get("sets") or {}).get(set_name) or {}).get("level", {}).get(level) or {}


def auc_table(metrics: dict, level: str = "subject") -> pd.DataFrame:
    """One row per (set, model): AUC with DeLong and bootstrap CIs, clustered AUC,
    threshold metrics."""
    rows = []
    for s in sort_sets(((metrics or {}).get("sets") or {}).keys()):
        blk = level_block(metrics, s, level)
        for m, mm in (blk.get("models") or {}).items():
            row = {"set": set_label(s), "model": m, "n": blk.get("n"), "n_pos": blk.get("n_pos"),
                   "AUC": mm.get("auc")}
            for k, lab in (("auc_ci_delong", "DeLong 95% CI"), ("auc_ci_bootstrap", "bootstrap 95% CI")):
                ci = mm.get(k)
                row[lab] = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and None not in ci[:2] else ""
            if mm.get("auc_clustered") is not None:
                ac = mm["auc_clustered"]
                row["clustered AUC"] = ac.get("auc") if isinstance(ac, dict) else ac
            for k in ("threshold", "accuracy", "sensitivity", "specificity", "ppv", "npv", "brier"):
                v = mm.get(k)
                if isinstance(v, dict):
                    v = v.get("value")
                if v is not None:
                    row[k] = v
            at5 = mm.get("at_0.5") or {}
            if isinstance(at5.get("accuracy"), dict) and at5["accuracy"].get("value") is not None:
                row["accuracy at 0.5"] = at5["accuracy"]["value"]
            cal = mm.get("calibration") or {}
            if cal.get("slope") is not None:
                row["calibration slope"] = cal["slope"]
            rows.append(row)
    return pd.DataFrame(rows)


def delong_table(metrics: dict, set_name: str, level: str = "subject") -> pd.DataFrame:
    """:func:`nhb_core.figures.delong_matrix` (the one DeLong p-value matrix) as a square DataFrame."""
    from nhb_core.figures import delong_matrix

    names, p = delong_matrix(metrics or {}, set_name, level)
    return pd.DataFrame(p, index=names, columns=names)


def reader_table(metrics: dict, set_name: str, level: str = "subject") -> pd.DataFrame:
    """Readers' threshold metrics and, per model, McNemar p-values."""
    blk = level_block(metrics, set_name, level)
    rows = []
    for r, rr in (blk.get("readers") or {}).items():
        row = {"reader": r}
        for k in ("sensitivity", "specificity", "accuracy", "ppv", "npv"):
            v = rr.get(k)
            if isinstance(v, dict):
                v = v.get("value")
            if v is not None:
                row[k] = v
        if rr.get("auc") is not None:  # a reader with 1-5 ratings has an AUC
            row["auc"] = rr["auc"]
        for m, vs in (rr.get("vs") or {}).items():
            if isinstance(vs, dict) and vs.get("mcnemar_p") is not None:
                row[f"McNemar p vs {m}"] = vs["mcnemar_p"]
        rows.append(row)
    return pd.DataFrame(rows)


def mrmc_tables(metrics: dict, set_name: str) -> tuple[dict | None, pd.DataFrame, pd.DataFrame]:
    """The set's reader study (``sets[<set>]["mrmc"]``, docs/stats.md): the block (None without a
    study), one row per comparison (``nhb_core.stats.mrmc.study_mrmc_table``), and the reader AUCs
    (one row per reader, one column per reader arm, plus each network's AUC)."""
    from nhb_core.stats.mrmc import study_mrmc_table

    blk = (((metrics or {}).get("sets") or {}).get(set_name) or {}).get("mrmc")
    if not blk:
        return None, pd.DataFrame(), pd.DataFrame()
    comp = study_mrmc_table(blk)
    aucs: dict[str, dict[str, Any]] = {}
    for res in (blk.get("comparisons") or {}).values():
        for key, v in (res.get("reader_auc") or {}).items():
            arm, reader = key.split("|", 1)
            if arm in (blk.get("arms") or []):
                aucs.setdefault(reader, {"reader": reader})[arm] = v
    for m in blk.get("models") or []:
        for res in (blk.get("comparisons") or {}).values():
            if m in (res.get("modality_auc") or {}):
                aucs.setdefault("(network)", {"reader": "(network)"})[m] = res["modality_auc"][m]
                break
    return blk, comp, pd.DataFrame(list(aucs.values()))


def model_threshold(run_dir: str | os.PathLike, model: str, metrics: dict | None = None) -> float:
    """The model's decision threshold (model.json, else metrics, else 0.5)."""
    mj = RunFolder(run_dir).model_json(model)
    if mj.get("threshold") is not None:
        return float(mj["threshold"])
    for s in ((metrics or {}).get("sets") or {}):
        mm = (level_block(metrics, s).get("models") or {}).get(model) or {}
        if mm.get("threshold") is not None:
            return float(mm["threshold"])
    return 0.5


# ----------------------------------------------------------------- manifests
def data_dir() -> Path:
    """Where the dashboard keeps generated synthetic cohorts: ``$NHB_DATA_DIR`` or ``./data``."""
    return Path(os.environ.get("NHB_DATA_DIR") or "data")


def synthetic_manifest_path(preset: str = "small") -> Path:
    return data_dir() / f"synthetic-{preset}" / "manifest.csv"


def known_manifests(runs_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """(label, path) of manifests the dashboard can offer: the synthetic presets
    (generated on demand) and those used by existing runs."""
    out: list[tuple[str, Path]] = [
        ("synthetic cohort, small preset (generated on first use)", synthetic_manifest_path("small")),
        ("synthetic cohort, paper preset (generated on first use)", synthetic_manifest_path("paper")),
    ]
    seen = {p.resolve() for _, p in out}
    for r in list_runs(runs_dir):
        st = read_status(r) or {}
        m = st.get("manifest") or RunFolder(r).config().get("manifest")
        if not m:
            continue
        p = Path(m)
        if p.resolve() in seen or not p.is_file():
            continue
        seen.add(p.resolve())
        out.append((f"manifest of run {r.name}", p))
    return out


def synthetic_preset(manifest: str | os.PathLike | None) -> str | None:
    """``"small"`` / ``"paper"`` when ``manifest`` is the dashboard's synthetic cohort of that preset."""
    if manifest is None:
        return None
    p = Path(manifest).expanduser().resolve()
    return next((k for k in ("small", "paper") if synthetic_manifest_path(k).expanduser().resolve() == p), None)


def ensure_synthetic(preset: str = "small", seed: int = 0, progress=None) -> Path:
    """The synthetic cohort's manifest, generated with :func:`nhb_core.synth.synthesize` if absent."""
    p = synthetic_manifest_path(preset)
    if p.exists():
        return p
    from nhb_core.synth import synthesize

    return Path(synthesize(p.parent, preset=preset, seed=seed, progress=progress))


def manifest_centers(manifest: str | os.PathLike) -> list[str]:
    """Sorted center names of a manifest ([] when unreadable)."""
    try:
        df = pd.read_csv(manifest, dtype=str, usecols=lambda c: c == "center", keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return []
    if "center" not in df.columns:
        return []
    return sorted({c for c in df["center"] if c})


# ----------------------------------------------------------------- images


def axial_display(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` of an (X, Y, Z) RAS+ volume oriented for display like the
    model crops: row 0 anterior, column 0 the patient's right (radiological)."""
    return np.asarray(volume[::-1, ::-1, int(z)]).T


def slice_with_contours(image2d: np.ndarray, labels2d: np.ndarray | None = None, scale: int = 1) -> np.ndarray:
    """RGB uint8 [H*scale, W*scale, 3]: the slice in grayscale with the outline of
    each ROI label in its colour (:func:`nhb_core.figures.contour_rgb`)."""
    from nhb_core.figures import contour_rgb
    from nhb_core.saliency import gray_u8

    return contour_rgb(gray_u8(image2d), labels2d, scale)


def montage_picks(df: pd.DataFrame, n_per_group: int = 4, seed: int = 0) -> dict[tuple[str, int], list[str]]:
    """Subject ids for a controls-vs-injured montage: up to ``n_per_group`` per
    (center, label), drawn reproducibly with ``seed``."""
    out: dict[tuple[str, int], list[str]] = {}
    if df.empty:
        return out
    for (c, lab), g in df.groupby(["center", "label"], sort=True):
        ids = sorted(g["subject_id"].astype(str))
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(ids), size=min(n_per_group, len(ids)), replace=False)
        out[(str(c), int(lab))] = [ids[i] for i in sorted(pick)]
    return out


# ----------------------------------------------------------------- uploads
_MAX_ZIP_FILES = 5000
_MAX_ZIP_BYTES = 4 << 30


def csv_download(path: str | os.PathLike) -> bytes:
    """A CSV file's bytes for a download button, every formula-like text cell neutralised
    (``nhb_core.safety.csv_for_people``); the file on disk is not changed."""
    from nhb_core.safety import csv_for_people

    return csv_for_people(Path(path).read_bytes())


def save_upload(data: bytes, shown_name: str, folder: str | os.PathLike, role: str, allow_zip: bool = True) -> Path:
    """Write an uploaded file into ``folder`` under a fixed name chosen from its
    *content* (the uploaded name is never used as a path) and return that path.

    gzip -> ``<role>.nii.gz``; NIfTI-1/2 header -> ``<role>.nii``; zip (when
    ``allow_zip``) -> the members extracted flat into ``<role>_dicom/00001.dcm``...
    (directories, links and absolute/parent paths inside the zip are ignored;
    size and member count are limited). Anything else raises ``ImageError`` naming
    the upload as the user called it.
    """
    from nhb_core.errors import ImageError

    folder = Path(folder)
    label = f"uploaded {role.upper() if role in ('t1', 'roi') else role} file {shown_name!r}"
    if not data:
        raise ImageError(label, "the file is empty", "Upload the image again")
    if data[:2] == b"\x1f\x8b":
        p = folder / f"{role}.nii.gz"
        p.write_bytes(data)
        return p
    if len(data) >= 348 and int.from_bytes(data[:4], "little") in (348, 540) or (
            len(data) >= 348 and int.from_bytes(data[:4], "big") in (348, 540)):
        p = folder / f"{role}.nii"
        p.write_bytes(data)
        return p
    if data[:4] == b"PK\x03\x04":
        if not allow_zip:
            raise ImageError(label, "a zip archive is not accepted here", "Upload the ROI mask as a NIfTI file")
        import io
        import zipfile

        out = folder / f"{role}_dicom"
        out.mkdir()
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            members = [i for i in zf.infolist() if not i.is_dir() and not i.filename.endswith("/")]
            members = [i for i in members if not Path(i.filename).name.startswith(".")
                       and "__MACOSX" not in i.filename]
            if not members:
                raise ImageError(label, "the zip archive holds no files", "Zip the folder of one DICOM series")
            from nhb_core.safety import copy_limited, max_image_bytes

            limit = min(_MAX_ZIP_BYTES, max_image_bytes())
            if len(members) > _MAX_ZIP_FILES or sum(i.file_size for i in members) > limit:
                raise ImageError(label, f"the zip archive is too large ({len(members)} files, "
                                 f"{sum(i.file_size for i in members):,} bytes unpacked)",
                                 f"Zip one DICOM series (at most {_MAX_ZIP_FILES} files, {limit:,} bytes; "
                                 "NHB_MAX_IMAGE_BYTES raises the size limit)")
            used = 0
            for k, info in enumerate(sorted(members, key=lambda i: i.filename), start=1):
                # streamed with a running count: the sizes a zip declares can lie
                with zf.open(info) as src, open(out / f"{k:05d}.dcm", "wb") as dst:
                    used += copy_limited(src, dst, limit - used, label, "the zip archive")
        except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, __import__("zlib").error):
            raise ImageError(label, "the zip archive is corrupt, encrypted or uses an unsupported compression",
                             "Zip the DICOM series again (plain zip, no password)") from None
        return out
    raise ImageError(label, "not a NIfTI file (.nii/.nii.gz)" + (" or a zip of a DICOM series" if allow_zip else ""),
                     "Upload a NIfTI volume" + (" or a .zip of one DICOM series" if allow_zip else ""))


def upload_error(err, tmp: str | os.PathLike, shown: dict[str, str]):
    """The same error with temporary paths replaced by the uploads' names (as text)."""
    from nhb_core.errors import NHBError

    tmp = str(Path(tmp))

    def fix(s: str | None) -> str | None:
        if s is None:
            return None
        for role, name in shown.items():
            for cand in (f"{tmp}/{role}_dicom", f"{tmp}/{role}.nii.gz", f"{tmp}/{role}.nii"):
                s = s.replace(cand, f"uploaded {role.upper()} {name!r}")
        return s.replace(tmp + "/out", "output").replace(tmp, "upload folder")

    return type(err)(fix(err.file), fix(err.problem) or "", fix(err.fix) or "", row=err.row) \
        if isinstance(err, NHBError) else err


# ----------------------------------------------------------------- saliency page
def dataset_index_path(run_dir: str | os.PathLike) -> Path:
    """``index.csv`` of the slice dataset the run was trained on (``DatasetError`` when none)."""
    from nhb_core.saliency import run_dataset_dir

    return run_dataset_dir(run_dir) / "index.csv"


def load_slice_index(index_csv: str | os.PathLike) -> pd.DataFrame:
    """The dataset's slices: ``subject_id, center, label, slice_index, roi_voxels`` (those present)."""
    cols = ["subject_id", "center", "label", "slice_index", "roi_voxels"]
    df = pd.read_csv(index_csv, dtype={"subject_id": str, "center": str})
    return df[[c for c in cols if c in df.columns]]


def subject_slices(index: pd.DataFrame, subject_id: str) -> list[int]:
    """A subject's slice indices, the most ROI voxels first (else in slice order)."""
    key = "roi_voxels" if "roi_voxels" in index.columns else "slice_index"
    sub = index[index["subject_id"].astype(str) == str(subject_id)]
    return sub.sort_values(key, ascending=key != "roi_voxels")["slice_index"].astype(int).tolist()


def saliency_summary_path(run_dir: str | os.PathLike) -> Path:
    return RunFolder(run_dir).saliency_summary_path


def load_saliency_summary(summary_json: str | os.PathLike) -> tuple[dict, pd.DataFrame]:
    """The study's saliency summary (``saliency/summary.json``) and its per-case table
    (``cases.csv`` next to it, else the summary's ``cases``)."""
    s = read_json(summary_json)
    cases_csv = Path(summary_json).parent / "cases.csv"
    cases = (pd.read_csv(cases_csv, dtype={"subject_id": str}) if cases_csv.exists()
             else pd.DataFrame(s.get("cases") or []))
    return s, cases


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(float(v)))


#: Why a saliency number can be missing, as the page says it.
NO_MAP = "no map: the CAM is all zero (nothing in the image pushes this slice towards injury)"
NO_FAITHFULNESS = "not computed for this case"


def energy_text(energy: Any, digits: int = 0) -> str:
    """Share of CAM energy in the ROI as a percentage, or why there is none."""
    return "no map (all-zero CAM)" if _missing(energy) else f"{float(energy):.{digits}%}"


def prob_text(p: Any, digits: int = 2) -> str:
    return "no probability" if _missing(p) else f"{float(p):.{digits}f}"


def _num(v: Any, missing: str, digits: int = 3) -> str:
    return missing if _missing(v) else f"{float(v):.{digits}f}"


def saliency_rows(results: dict[str, dict]) -> pd.DataFrame:
    """The "All models, same slice" table: one row per model, numbers as text with 3 decimals; a
    missing number says why (never "None" / "nan")."""
    rows = []
    for mod, rr in results.items():
        faith_ok = not (_missing(rr.get("faithfulness")) or _missing(rr.get("random_baseline")))
        rows.append({"model": mod,
                     "slice probability": _num(rr.get("prob"), "no probability"),
                     "energy in ROI": _num(rr.get("energy_in_roi"), "no map (all-zero CAM)"),
                     "pointing game": ("no map" if _missing(rr.get("energy_in_roi"))
                                       else "hit" if rr.get("pointing_hit") else "miss"),
                     "faithfulness": _num(rr.get("faithfulness"), NO_FAITHFULNESS) if faith_ok else NO_FAITHFULNESS,
                     "random baseline": _num(rr.get("random_baseline"), NO_FAITHFULNESS) if faith_ok
                     else NO_FAITHFULNESS})
    return pd.DataFrame(rows, columns=["model", "slice probability", "energy in ROI", "pointing game",
                                       "faithfulness", "random baseline"])


#: what a missing per-model mean means (a column where no case had a value), and shorter headers
_MEANS_MISSING = {"energy_in_roi": "no map in any case", "energy_x_chance": "no map in any case",
                  "energy_chance": "no ROI", "pointing_hit_rate": "no map in any case",
                  "faithfulness": "not computed", "random_baseline": "not computed",
                  "faithfulness_gain": "not computed", "pointing_chance": "no ROI"}
_MEANS_HEADERS = {"energy_in_roi": "energy in ROI", "energy_chance": "chance", "energy_x_chance": "x chance",
                  "pointing_hit_rate": "pointing hits", "pointing_chance": "pointing chance",
                  "faithfulness": "faithfulness", "random_baseline": "random baseline", "faithfulness_gain": "gain"}


def means_table(means: pd.DataFrame) -> pd.DataFrame:
    """``nhb_core.saliency.saliency_means`` for display: numbers as text with 3 decimals, a missing
    mean says why (no case of that model had a map / a faithfulness value) instead of "None"."""
    out = means.copy()
    for c in out.columns:
        if c in ("model", "n"):
            continue
        out[c] = [_num(v, _MEANS_MISSING.get(c, "not computed")) for v in out[c]]
    return out.rename(columns=_MEANS_HEADERS)


def seed_summary(run_dir: Path) -> dict | None:
    """The run's ``seeds.json`` (repeated seeds, ``nhb_core.study.seed_summary``), or None."""
    return RunFolder(run_dir).seeds()


def seed_table(seeds: dict) -> pd.DataFrame:
    """One row per (set, model): subject-level AUC mean, SD, min, max over the seeds."""
    rows = []
    for s in sort_sets((seeds.get("sets") or {}).keys()):
        for m, v in seeds["sets"][s].items():
            rows.append({"set": set_label(s), "model": m, "seeds": v.get("n"), "mean": v.get("mean"),
                         "SD": v.get("sd"), "min": v.get("min"), "max": v.get("max")})
    return pd.DataFrame(rows, columns=["set", "model", "seeds", "mean", "SD", "min", "max"])
