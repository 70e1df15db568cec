"""Evaluate a finished run on a new cohort (a third hospital, a larger test set).

:func:`evaluate_cohort` takes a run folder and the manifest of a cohort the run
has never seen, and:

1. validates the manifest (every problem, images opened);
2. prepares it with **the run's own preprocessing** (its ``prepare`` config, so the
   networks see exactly what they were trained on) into ``RUN/cohorts/<name>/dataset``;
3. predicts it with every trained network and every fitted baseline of the run and
   writes the set ``external:<name>`` to ``RUN/predictions/external_<name>__slices.csv``
   and ``__subjects.csv`` (readers' columns included when the manifest has them);
4. recomputes ``metrics.json`` and ``tables/`` (AUC with CIs, DeLong comparisons,
   readers, per center) and rewrites ``report.html``, so that the Results page and
   the report show the new set next to the run's own.

``RUN/cohorts/<name>/cohort.json`` records the manifest, its SHA-256, the subject
count, the time and, for a synthetic cohort, its oracle and image-visible AUCs.
Nothing of the run's own sets is touched; evaluating the same name again replaces
that set's files only after the new predictions are ready.

>>> # evaluate_cohort("runs/demo", "data/hospital_c/manifest.csv", "C")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nhb_core.errors import ConfigError, ManifestError, RunError
from nhb_core.fileio import atomic_write_json, read_json, sha256_file
from nhb_core.progress import ProgressCallback, emit
from nhb_core.runs import RunFolder

#: A cohort name becomes part of a set name (``external:<name>``) and of file names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


def check_cohort_name(name: Any) -> str:
    """``name`` when it is a safe cohort name (letters, digits, ``_ . -``, at most 40), else ConfigError."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError("--name", f"cohort name {name!r} is not allowed",
                          "Use 1-40 letters, digits, '_', '.' or '-', starting with a letter or digit (e.g. C)")
    return name


def cohort_dir(run_dir: str | os.PathLike, name: str) -> Path:
    """``RUN/cohorts/<name>`` (checked to lie inside the run folder)."""
    rd = Path(run_dir).resolve()
    d = (rd / "cohorts" / check_cohort_name(name)).resolve()
    if rd not in d.parents:
        raise ConfigError("--name", f"cohort name {name!r} leaves the run folder", "Use a plain name such as C")
    return d


def external_cohorts(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """name -> ``cohort.json`` of every cohort evaluated on the run (``{}`` when none)."""
    base = Path(run_dir) / "cohorts"
    out: dict[str, dict[str, Any]] = {}
    if not base.is_dir():
        return out
    for f in sorted(base.glob("*/cohort.json")):
        try:
            out[f.parent.name] = read_json(f)
        except (OSError, ValueError):
            continue
    return out


def evaluate_cohort(run_dir: str | os.PathLike, manifest: str | os.PathLike, name: str,
                    progress: ProgressCallback | None = None, device: str = "auto",
                    workers: int | None = None, batch_size: int = 128) -> dict[str, Any]:
    """Evaluate every model and baseline of a finished run on a new cohort (see the module doc).

    Parameters
    ----------
    run_dir : path
        A finished study run (``status.json`` done, ``config.yaml``, ``models/``).
    manifest : path
        The new cohort's manifest (``docs/manifest.md``); labels are needed for AUCs.
    name : str
        The set is called ``external:<name>`` (e.g. ``C``).
    progress : callable or None
        Progress events (stages ``validate``, ``prepare``, ``evaluate``, ``stats``, ``report``).
    device, workers, batch_size
        Prediction device, prepare worker processes, slices per forward pass.

    Returns
    -------
    dict: the cohort record (``cohort.json``) with ``"set"`` and ``"auc"``: model -> subject-level
    AUC on the new set (pooled over its centers).
    """
    import pandas as pd

    from nhb_core.config import dataclass_kwargs, resolve_config
    from nhb_core.device import resolve_device
    from nhb_core.evaluate import predict_slices, write_predictions
    from nhb_core.manifest import validate_manifest
    from nhb_core.models import load_trained
    from nhb_core.runs import now_iso, read_status, set_file_stem
    from nhb_core.slices import PrepareConfig, load_dataset, prepare
    from nhb_core.splits import load_split
    from nhb_core.study import _Study, evaluate_baselines, oracle_auc_for

    rd = Path(run_dir).expanduser().resolve()
    name = check_cohort_name(name)
    set_name = f"external:{name}"
    st = read_status(rd) or {}
    if st.get("state") != "done" or not (rd / "config.yaml").is_file():
        raise RunError(rd, "not a finished study run (status.json is not 'done')",
                       "Finish the study first (python -m nhb_core study ...), then evaluate new cohorts")
    man = Path(manifest).expanduser().resolve()
    if not man.is_file():
        raise ConfigError(man, "manifest file not found", "Give the path of the new cohort's manifest.csv")
    cfg = resolve_config(rd / "config.yaml")
    split = load_split(rd / "split.json")
    if set_name in split["sets"]:
        raise ConfigError("--name", f"{set_name} is one of the run's own sets", "Choose another name for the new cohort")
    dev = resolve_device(device)  # an unusable device fails here, before anything is written
    run = RunFolder(rd)
    models = [m for m in cfg["models"] if run.model_json_path(m).is_file()]
    if not models:
        raise RunError(run.models_dir, "the run has no trained model", "Finish the study first")

    emit(progress, "validate", message=f"checking {man.name}")
    rep = validate_manifest(man, nbna_threshold=cfg["validate"].get("nbna_threshold", 37), check_images=True)
    if not rep.ok:
        first = rep.problems[0]
        more = f" (and {len(rep.problems) - 1} more problems)" if len(rep.problems) > 1 else ""
        raise ManifestError(first.file, first.problem + more, first.fix, row=first.row)

    cdir = cohort_dir(rd, name)
    ds_dir = cdir / "dataset"
    pcfg = dict(cfg["prepare"])
    pcfg.pop("workers", None)
    pkw = dataclass_kwargs(PrepareConfig, pcfg, "prepare", source=str(rd / "config.yaml"))
    prepare(man, ds_dir, PrepareConfig(**pkw), workers=workers, progress=_tag(progress, "prepare"))
    ds = load_dataset(ds_dir)
    split_c = {"unit": "subject", "leaky": False,
               "sets": {set_name: sorted(ds.index["subject_id"].astype(str).unique().tolist())}}

    # predictions are written to a staging folder, then moved over the set's files
    pred_dir = run.predictions_dir
    stage_dir = cdir / "predictions.tmp"
    if stage_dir.exists():
        import shutil

        shutil.rmtree(stage_dir)
    for k, m in enumerate(models):
        model, mj = load_trained(run.model_dir(m), device="cpu")
        model.to(dev)
        if list(ds.images.shape[1:]) != [int(mj.get("in_chans", 1)), *map(int, mj.get("input_size", []))]:
            raise RunError(ds_dir, f"prepared slices {list(ds.images.shape[1:])} do not fit {m} "
                           f"({mj.get('in_chans')} x {mj.get('input_size')})", "Rerun the study, then evaluate again")
        emit(progress, "evaluate", model=m, done=k, total=len(models), message=set_name)
        write_predictions(lambda rows, model=model: predict_slices(model, ds.images[rows], batch_size=batch_size,
                                                                  device=dev),
                          m, ds, split_c, stage_dir, aggregate=cfg["evaluate"].get("aggregate", "mean"))
    evaluate_baselines(rd, ds_dir, split_c, stage_dir, aggregate=cfg["evaluate"].get("aggregate", "mean"))
    pred_dir.mkdir(parents=True, exist_ok=True)
    stem = set_file_stem(set_name)
    for kind in ("slices", "subjects"):
        os.replace(stage_dir / f"{stem}__{kind}.csv", pred_dir / f"{stem}__{kind}.csv")
    stage_dir.rmdir()

    sub = pd.read_csv(pred_dir / f"{stem}__subjects.csv", dtype={"subject_id": str})
    record = {"name": name, "set": set_name, "manifest": str(man), "manifest_sha256": sha256_file(man),
              "n_subjects": int(len(sub)), "n_slices": int(len(ds.index)),
              "centers": sorted(sub["center"].astype(str).unique().tolist()),
              "oracle_auc": oracle_auc_for(man), "visible_auc": oracle_auc_for(man, "visible_auc"),
              "evaluated": now_iso(), "dataset_dir": str(ds_dir)}
    atomic_write_json(cdir / "cohort.json", record)

    # statistics and report over every set, the new one included
    emit(progress, "stats", message="computing AUCs, CIs and tests")
    study = _Study(Path(cfg["manifest"]), rd, cfg, progress)
    old = {}
    try:
        old = read_json(run.metrics_path)
    except (OSError, ValueError):
        pass
    hashes = ((old.get("run") or {}).get("sha256")) or {}
    study._write_metrics(run.metrics_path, _run_dataset(rd, cfg), run.split_path, pred_dir, hashes)
    if cfg["report"].get("enabled", True):
        from nhb_core import report as _report

        emit(progress, "report", message="writing report.html")
        _report.write_report(rd)
    from sklearn.metrics import roc_auc_score

    aucs = {}
    for m in models + [b for b in cfg.get("baselines") or [] if b in sub.columns]:
        y = sub["label"].astype(int)
        aucs[m] = float(roc_auc_score(y, sub[m])) if y.nunique() == 2 else None
    return {**record, "auc": aucs}


def _run_dataset(rd: Path, cfg: dict[str, Any]) -> Path:
    """The run's own prepared dataset (``RUN/dataset`` or the shared cache recorded in stages.json)."""
    try:
        rec = read_json(rd / "stages.json").get("prepare") or {}
    except (OSError, ValueError):
        rec = {}
    if rec.get("dataset_dir") and Path(rec["dataset_dir"]).is_dir():
        return Path(rec["dataset_dir"])
    return rd / "dataset"


def _tag(progress: ProgressCallback | None, stage: str) -> ProgressCallback | None:
    from nhb_core.study import _tag as tag

    return tag(progress, stage)
