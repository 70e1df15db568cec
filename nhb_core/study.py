"""The one-command study: validate, prepare, split, train, evaluate, stats, saliency, report.

:func:`run_study` runs every stage of a study into one run folder (layout in
``docs/study.md``)::

    RUNDIR/config.yaml     the resolved config (rerun with --config RUNDIR/config.yaml)
    RUNDIR/stages.json     per stage: fingerprint, state, seconds, output hash (the cache)
    RUNDIR/validation.json the manifest check (problems, cohort table)
    RUNDIR/dataset/        the prepared slice dataset (or a shared cache, see ``cache_dir``)
    RUNDIR/split.json      the split
    RUNDIR/models/<name>/  one trained model each (model.safetensors, model.json, history.csv, ...)
    RUNDIR/predictions/    <set>__slices.csv / <set>__subjects.csv, one probability column per model
    RUNDIR/metrics.json    every number of the report (shape: docs/design-shared.md)
    RUNDIR/tables/         the same numbers as CSV (tidy metrics, cohort table, flow, DeLong, readers)
    RUNDIR/saliency/       Grad-CAM summary and overlays
    RUNDIR/report.html     the self-contained report
    RUNDIR/status.json, events.jsonl, log.txt

Caching: each stage's fingerprint is the hash of its config section and the
hashes of its inputs (the outputs of the stages before it). A rerun skips a
stage whose fingerprint is unchanged and whose recorded output hash still
matches the files; a model whose training was interrupted (fingerprint
unchanged, not done) resumes from its checkpoint. SIGTERM (the dashboard's
Cancel) marks the run cancelled; an :class:`~nhb_core.errors.NHBError` marks it
failed with the one-line error.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nhb_core.config import dataclass_kwargs, resolve_config, save_config
from nhb_core.errors import ConfigError, InputError, ManifestError, NHBError, RunError
from nhb_core.fileio import atomic_write_json, read_json, sha256_file, sha256_json
from nhb_core.progress import ProgressCallback, chain, emit

# auc_table (the run's AUC rows), saliency_overview (the saliency stage) and cohort_summary (table 1 and
# the flow counts) live next to what they read; still importable from here
from nhb_core.runs import RunFolder, append_log, event_logger, now_iso, read_status, write_status
from nhb_core.runs import auc_table as auc_table
from nhb_core.saliency.summaries import saliency_overview
from nhb_core.splits import cohort_summary

STAGES = ("validate", "prepare", "split", "train", "baseline", "evaluate", "stats", "saliency", "report")

#: Bump when a stage's code changes what it writes, so old caches are redone.
STAGE_VERSION = {"validate": 1, "prepare": 1, "split": 1, "train": 1, "baseline": 1, "evaluate": 1,
                 "stats": 1, "saliency": 1, "report": 1}


#: The files of a prepared dataset whose hash identifies it (its ``cache/`` folder is not part of it).
DATASET_FILES = ("prepare.json", "index.csv", "subjects.csv", "slices.npy")


class StudyCancelled(BaseException):
    """Raised inside the study when it receives SIGTERM (a BaseException so no
    stage's ``except Exception`` swallows it)."""


# ----------------------------------------------------------------------------- stage cache

class StageCache:
    """``RUNDIR/stages.json``: per stage key ``{"fingerprint", "state", "seconds", "output_sha256", ...}``."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "stages.json"
        try:
            self.data: dict[str, dict[str, Any]] = read_json(self.path)
            if not isinstance(self.data, dict):
                self.data = {}
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            self.data = {}

    def get(self, key: str) -> dict[str, Any]:
        return self.data.get(key) or {}

    def is_fresh(self, key: str, fingerprint: str, output_sha: Callable[[], str | None]) -> bool:
        rec = self.get(key)
        if rec.get("state") != "done" or rec.get("fingerprint") != fingerprint:
            return False
        try:
            return rec.get("output_sha256") is not None and output_sha() == rec.get("output_sha256")
        except (FileNotFoundError, OSError):
            return False

    def mark(self, key: str, **fields: Any) -> None:
        rec = self.data.setdefault(key, {})
        rec.update(fields)
        rec["updated"] = now_iso()
        atomic_write_json(self.path, self.data)

    def seconds(self) -> dict[str, float]:
        return {k: float(v.get("seconds") or 0.0) for k, v in self.data.items()}


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children."""
    import resource

    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _sha_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.exists() else None


def _sha_many(paths: list[Path]) -> str | None:
    parts = []
    for p in paths:
        if not p.exists():
            return None
        parts.append(sha256_file(p))
    return sha256_json(parts)


# ----------------------------------------------------------------------------- provenance

def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers (:func:`nhb_core.versions.run_versions`)."""
    from nhb_core.versions import run_versions

    return run_versions()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def oracle_auc_for(manifest: Path, key: str = "oracle_auc") -> dict[str, float] | None:
    """The synthetic cohort's per-center oracle AUC (``cohort.json`` next to the manifest), else None.

    ``key="visible_auc"``: the AUC of the image-visible GP signal (the image models' ceiling)."""
    p = Path(manifest).parent / "cohort.json"
    try:
        data = read_json(p)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
    oa = data.get(key) if isinstance(data, dict) else None
    if isinstance(oa, dict) and oa:
        return {str(k): float(v) for k, v in oa.items() if v is not None}
    return None


# ----------------------------------------------------------------------------- signals

class _SigtermGuard:
    """Turn SIGTERM into :class:`StudyCancelled` while the study runs (main thread only)."""

    def __init__(self) -> None:
        self.prev: Any = None  # the SIGTERM handler to restore
        self.active = False

    def __enter__(self) -> _SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            def _handler(signum, frame):  # noqa: ARG001
                raise StudyCancelled(f"received signal {signum}")
            self.prev = signal.signal(signal.SIGTERM, _handler)
            self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self.prev if self.prev is not None else signal.SIG_DFL)


# ----------------------------------------------------------------------------- the runner

def _file_signature(paths: list[str]) -> str:
    """Cheap signature of the image files a manifest references (path, size, mtime)."""
    sig = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append([p, st.st_size, st.st_mtime_ns])
        except OSError:
            sig.append([p, None, None])
    return sha256_json(sig)


def _referenced_files(manifest: Path) -> list[str]:
    """The T1/ROI files a manifest points to (empty when it cannot be read: validation says why)."""
    from nhb_core.manifest import load_manifest

    try:
        df = load_manifest(manifest).df
    except Exception:  # noqa: BLE001 - an unreadable manifest is reported by the validate stage
        return []
    files: list[str] = []
    for col in ("t1_path", "roi_path"):
        for v in df.get(col, []):
            if not str(v):  # a row without an ROI (prepare refuses it)
                continue
            p = Path(str(v))
            if p.is_dir():
                files.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file())
            else:
                files.append(str(p))
    return files


class _Study:
    def __init__(self, manifest: Path, run_dir: Path, cfg: dict[str, Any], progress: ProgressCallback | None):
        self.manifest = manifest
        self.run_dir = run_dir
        self.folder = RunFolder(run_dir)  # the layout it writes
        self.cfg = cfg
        self.cache = StageCache(run_dir)
        self.events = event_logger(run_dir)
        self.progress = chain(self.events, progress)
        self.current: dict[str, Any] = {"stage": None, "model": None}

    # -- helpers
    def log(self, text: str) -> None:
        append_log(self.run_dir, text)

    def status(self, stage: str, model: str | None = None) -> None:
        self.current = {"stage": stage, "model": model}
        write_status(self.run_dir, "running", stage=stage, model=model, pid=os.getpid())

    def stage(self, key: str, stage: str, fingerprint: str, outputs: Callable[[], str | None],
              fn: Callable[[], Any], model: str | None = None, **info: Any) -> bool:
        """Run ``fn`` as stage ``key`` unless cached; returns True when it ran."""
        fp = sha256_json({"v": STAGE_VERSION[stage], "fp": fingerprint})
        extra = {"model": model} if model else {}
        if self.cache.is_fresh(key, fp, outputs):
            emit(self.progress, stage, message="skipped (unchanged)", skipped=True, done=1, total=1, **extra)
            self.log(f"{key}: unchanged, skipped")
            return False
        self.status(stage, model)
        self.log(f"{key}: started")
        emit(self.progress, stage, message="started", **extra)
        prev = self.cache.get(key)
        self.cache.mark(key, state="running", fingerprint=fp, started=now_iso(),
                        resumable=prev.get("fingerprint") == fp)
        t0 = time.monotonic()
        c0 = _cpu_seconds()
        fn()
        secs = time.monotonic() - t0
        cpu = _cpu_seconds() - c0
        out_sha = outputs()
        if out_sha is None:
            raise RunError(self.run_dir, f"stage {key} finished without writing its outputs",
                           "Rerun with --debug and report the problem")
        self.cache.mark(key, state="done", fingerprint=fp, seconds=round(secs, 3), cpu_seconds=round(cpu, 3),
                        output_sha256=out_sha, ended=now_iso(), **info)
        self.log(f"{key}: done in {secs:.1f} s")
        emit(self.progress, stage, message=f"done in {secs:.1f} s", done=1, total=1, seconds=round(secs, 3), **extra)
        return True

    # -- the stages
    def run(self) -> Path:
        cfg = self.cfg
        rd = self.run_dir

        # validate ---------------------------------------------------------------
        from nhb_core.manifest import validate_manifest

        vcfg = cfg["validate"]
        validation = rd / "validation.json"
        man_sha = sha256_file(self.manifest)
        files_sig = _file_signature(_referenced_files(self.manifest))

        def do_validate() -> None:
            rep = validate_manifest(self.manifest, nbna_threshold=vcfg.get("nbna_threshold", 37),
                                    check_images=bool(vcfg.get("check_images", True)),
                                    progress=_tag(self.progress, "validate"))
            problems = [p.line() for p in rep.problems]
            ct = getattr(rep, "cohort_table", None)
            atomic_write_json(validation, {
                "manifest": str(self.manifest), "manifest_sha256": man_sha, "ok": bool(rep.ok),
                "problems": problems, "warnings": [w.line() for w in getattr(rep, "warnings", []) or []],
                "cohort_table": None if ct is None else json.loads(ct.to_json(orient="split")),
            })
            if not rep.ok:
                first = rep.problems[0]
                more = f" (and {len(rep.problems) - 1} more problems, listed in {validation})" if len(rep.problems) > 1 else ""
                raise ManifestError(first.file, first.problem + more, first.fix, row=first.row)

        def validation_ok() -> str | None:
            if not validation.exists():
                return None
            return sha256_file(validation) if read_json(validation).get("ok") else None

        self.stage("validate", "validate", sha256_json([man_sha, files_sig, vcfg]), validation_ok, do_validate)

        # prepare ----------------------------------------------------------------
        from nhb_core.slices import PrepareConfig, prepare

        pcfg = dict(cfg["prepare"])
        workers = pcfg.pop("workers", None)
        pkw = dataclass_kwargs(PrepareConfig, pcfg, "prepare", source=str(self.folder.config_path))
        prep_fp = sha256_json([man_sha, files_sig, pkw])
        if cfg.get("cache_dir"):
            ds_dir = Path(cfg["cache_dir"]).expanduser().resolve() / f"dataset-{prep_fp[:16]}"
        else:
            ds_dir = rd / "dataset"
        self.dataset_dir = ds_dir

        def do_prepare() -> None:
            prepare(self.manifest, ds_dir, PrepareConfig(**pkw), workers=workers,
                    progress=_tag(self.progress, "prepare"))

        ds_files = [ds_dir / n for n in DATASET_FILES]
        self.stage("prepare", "prepare", prep_fp, lambda: _sha_many(ds_files), do_prepare, dataset_dir=str(ds_dir))
        ds_sha = self.cache.get("prepare")["output_sha256"]

        # split ------------------------------------------------------------------
        from nhb_core.slices import load_dataset
        from nhb_core.splits import make_split, save_split

        scfg = dict(cfg["split"])
        split_path = self.folder.split_path

        def do_split() -> None:
            ds = load_dataset(ds_dir)
            split = make_split(ds, dev_centers=scfg.get("dev_centers"), test_size=scfg.get("test_size", 0.2),
                               val_size=scfg.get("val_size", 0.15), seed=int(scfg["seed"]),
                               unit=scfg.get("unit", "subject"))
            save_split(split, split_path)

        self.stage("split", "split", sha256_json([ds_sha, scfg]), lambda: _sha_or_none(split_path), do_split)
        split_sha = self.cache.get("split")["output_sha256"]

        # train ------------------------------------------------------------------
        from nhb_core.train import TrainConfig

        tcfg = dict(cfg["train"])
        if cfg.get("device") and cfg["device"] != "auto" and "device" not in tcfg:
            tcfg["device"] = cfg["device"]
        if cfg.get("device") == "auto":
            tcfg.setdefault("device", None)
        tkw = dataclass_kwargs(TrainConfig, tcfg, "train", source=str(self.folder.config_path),
                               drop=() if "device" in {f for f in TrainConfig.__dataclass_fields__} else ("device",))
        model_shas: dict[str, str] = {}
        for name in cfg["models"]:
            mdir = self.folder.model_dir(name)
            key = f"train:{name}"
            fp = sha256_json([ds_sha, split_sha, name, tkw, int(cfg.get("n_gpus") or 1) > 1])

            def model_sha(mdir: Path = mdir) -> str | None:
                st = _read_json_or_none(mdir / "status.json")
                if st is not None and st.get("state") not in (None, "done"):
                    return None
                return _sha_many([mdir / "model.safetensors", mdir / "model.json"])

            def do_train(name: str = name, mdir: Path = mdir, key: str = key, fp: str = fp) -> None:
                # train into models/.<name>.new and swap it in only when done: a failed or
                # cancelled training never deletes the model it was to replace
                from nhb_core.safety import inside, safe_rmtree

                inside(rd, mdir, "model folder")
                new = inside(rd, self.folder.models_dir / f".{name}.new", "model folder")
                rec = self.cache.get(key)
                resume = bool(rec.get("resumable")) and new.exists()
                if not resume and new.exists():
                    safe_rmtree(new, rd)  # another config's leftovers
                if int(cfg.get("n_gpus") or 1) > 1:
                    self._train_torchrun(name, new, split_path, tkw, resume)
                else:
                    from nhb_core.train import train_model
                    train_model(ds_dir, split_path, name, new, TrainConfig(**tkw),
                                progress=_tag(self.progress, "train", model=name), resume=resume)
                _swap_in(new, mdir, rd)

            self.stage(key, "train", fp, model_sha, do_train, model=name)
            model_shas[name] = self.cache.get(key)["output_sha256"]

        # baselines (si_ratio): fitted on the train set, threshold on val ----------
        from nhb_core.baselines import BASELINES

        base_dir = self.folder.baselines_dir
        base_shas: dict[str, str] = {}
        for bname in cfg.get("baselines") or []:
            bpath = base_dir / f"{bname}.json"

            def do_baseline(bname: str = bname, bpath: Path = bpath) -> None:
                from nhb_core.slices import load_dataset
                from nhb_core.splits import load_split, set_rows

                ds = load_dataset(ds_dir)
                split = load_split(split_path)
                val = set_rows(split, ds.index, "val") if "val" in split["sets"] else None
                b = BASELINES[bname]().fit(ds.index, set_rows(split, ds.index, "train"), val,
                                           aggregate=cfg["evaluate"].get("aggregate", "mean"))
                atomic_write_json(bpath, b.to_dict())

            self.stage(f"baseline:{bname}", "baseline", sha256_json([ds_sha, split_sha, bname]),
                       functools.partial(_sha_or_none, bpath), do_baseline, model=bname)
            base_shas[bname] = self.cache.get(f"baseline:{bname}")["output_sha256"]

        # evaluate ---------------------------------------------------------------
        from nhb_core.evaluate import evaluate_model

        ecfg = dict(cfg["evaluate"])
        pred_dir = self.folder.predictions_dir

        def own_prediction_files() -> list[Path]:
            # the run's own sets only: sets of new cohorts (nhb_core.cohorts) live beside them and survive reruns
            from nhb_core.runs import set_file_stem
            from nhb_core.splits import load_split, set_names

            stems = [set_file_stem(s) for s in set_names(load_split(split_path)) if s != "train"]
            return [pred_dir / f"{st}__{kind}.csv" for st in stems for kind in ("slices", "subjects")]

        def preds_sha() -> str | None:
            files = [f for f in own_prediction_files() if f.is_file()]
            if not any(f.name.endswith("__subjects.csv") for f in files):
                return None
            return _sha_many(files)

        def do_evaluate() -> None:
            from nhb_core.safety import safe_rmtree

            new = rd / ".predictions.new"  # written in full, then swapped in
            safe_rmtree(new, rd)
            for name in cfg["models"]:
                self.status("evaluate", name)
                evaluate_model(self.folder.model_dir(name), ds_dir, split_path, new,
                               aggregate=ecfg.get("aggregate", "mean"), batch_size=int(ecfg.get("batch_size", 128)),
                               device=str(cfg.get("device") or "auto"), model_name=name,
                               progress=_tag(self.progress, "evaluate", model=name))
            evaluate_baselines(rd, ds_dir, split_path, new, aggregate=ecfg.get("aggregate", "mean"),
                               progress=_tag(self.progress, "evaluate"))
            # sets of cohorts evaluated later (nhb_core.cohorts) are not the stage's: carry them over
            own = {f.name for f in own_prediction_files()}
            if pred_dir.is_dir():
                for f in pred_dir.glob("*.csv"):
                    if f.name not in own and not (new / f.name).exists():
                        shutil.copy2(f, new / f.name)
            _swap_in(new, pred_dir, rd)

        self.stage("evaluate", "evaluate", sha256_json([ds_sha, split_sha, model_shas, base_shas, ecfg]), preds_sha,
                   do_evaluate)
        pred_sha = self.cache.get("evaluate")["output_sha256"]

        # stats ------------------------------------------------------------------
        stcfg = dict(cfg["stats"])
        readings = Path(self.manifest).parent / "readings.csv"  # a reader study next to the manifest: MRMC
        if readings.is_file():  # in the stats fingerprint only: new readings redo the stats stage
            stcfg["readings_sha256"] = _sha_or_none(readings)
        metrics_path = self.folder.metrics_path

        def do_stats() -> None:
            self._write_metrics(metrics_path, ds_dir, split_path, pred_dir,
                                {"manifest": man_sha, "dataset": ds_sha, "split": split_sha,
                                 "models": model_shas, "predictions": pred_sha})

        self.stage("stats", "stats", sha256_json([pred_sha, split_sha, model_shas, base_shas, stcfg, cfg["seed"]]),
                   lambda: _sha_many([metrics_path, rd / "tables"]), do_stats)
        metrics_sha = self.cache.get("stats")["output_sha256"]

        # saliency ---------------------------------------------------------------
        sal_cfg = dict(cfg["saliency"])
        sal_dir = self.folder.saliency_dir
        if sal_cfg.get("enabled", True):
            def do_saliency() -> None:
                self._saliency(sal_dir, ds_dir, split_path, sal_cfg)

            self.stage("saliency", "saliency", sha256_json([ds_sha, split_sha, model_shas, pred_sha, sal_cfg]),
                       lambda: _sha_or_none(sal_dir / "summary.json"), do_saliency)
        sal_sha = self.cache.get("saliency").get("output_sha256")

        # report -----------------------------------------------------------------
        if cfg["report"].get("enabled", True):
            from nhb_core import report as _report

            report_path = rd / "report.html"

            def do_report() -> None:
                _report.write_report(rd)

            self.stage("report", "report",
                       sha256_json([metrics_sha, sal_sha, model_shas, _report.REPORT_VERSION]),
                       lambda: _sha_or_none(report_path), do_report)
        return rd

    # -- stage bodies that need more room
    def _train_torchrun(self, name: str, mdir: Path, split_path: Path, tcfg: dict[str, Any], resume: bool) -> None:
        """Train one model under ``torchrun`` with ``n_gpus`` processes (progress via its events.jsonl)."""
        n = int(self.cfg["n_gpus"])
        cfg_file = self.folder.models_dir / f".{name}.train.yaml"
        from nhb_core.config import to_yaml
        from nhb_core.fileio import atomic_write_text

        atomic_write_text(cfg_file, to_yaml(tcfg))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "nhb_core", "train", "--dataset", str(self.dataset_dir), "--split", str(split_path),
               "--model", name, "--out", str(mdir), "--config", str(cfg_file), "--no-progress"]
        if resume:
            cmd.append("--resume")
        self.log("torchrun: " + " ".join(cmd))
        log_path = self.folder.models_dir / f".{name}.torchrun.log"
        ev_path = mdir / "events.jsonl"
        offset = ev_path.stat().st_size if ev_path.exists() else 0
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                while True:
                    rc = proc.poll()
                    offset = self._forward_events(ev_path, offset, name)
                    if rc is not None:
                        break
                    time.sleep(1.0)
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        if rc != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
            last = next((t for t in reversed(tail) if t.startswith("error:")), tail[-1] if tail else "")
            raise RunError(mdir, f"distributed training of {name} failed (exit {rc}): {last}",
                           f"See {log_path}; or set n_gpus: 1 to train in one process")

    def _forward_events(self, ev_path: Path, offset: int, name: str) -> int:
        """Forward complete new lines of a model's events.jsonl to the study's progress; new offset."""
        if not ev_path.exists() or self.progress is None:
            return offset
        with open(ev_path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev.pop("t", None)
            ev["stage"] = "train"
            ev["model"] = name
            self.progress(ev)
        return offset + end

    def _write_metrics(self, metrics_path: Path, ds_dir: Path, split_path: Path, pred_dir: Path,
                       hashes: dict[str, Any]) -> None:
        import pandas as pd

        from nhb_core import stats
        from nhb_core.cohorts import external_cohorts
        from nhb_core.splits import load_split

        rd = self.run_dir
        split = load_split(split_path)
        thresholds: dict[str, float] = {}
        model_info: dict[str, Any] = {}
        for name in self.cfg["models"]:
            mj = read_json(self.folder.model_json_path(name))
            thresholds[name] = float(mj["threshold"])
            model_info[name] = {k: mj.get(k) for k in ("architecture", "timm_name", "in_chans", "input_size",
                                                       "threshold", "threshold_level", "best_epoch", "val_auc",
                                                       "seed") if k in mj}
        baselines: dict[str, Any] = {}
        for bname in self.cfg.get("baselines") or []:
            bj = read_json(self.folder.baselines_dir / f"{bname}.json")
            if bj.get("threshold") is not None:
                thresholds[bname] = float(bj["threshold"])
            baselines[bname] = {k: bj.get(k) for k in ("kind", "features", "model", "threshold", "val_auc")}
        subjects = pd.read_csv(ds_dir / "subjects.csv")
        readers = [c for c in subjects.columns if c.startswith("reader_")]
        scfg = self.cfg["stats"]
        emit(self.progress, "stats", message="computing AUCs, CIs and tests")
        sets = stats.study_metrics(pred_dir, thresholds, readers, **_stats_kwargs(stats.study_metrics, scfg,
                                                                                   self.cfg["seed"]))
        readings = Path(self.manifest).parent / "readings.csv"
        if readings.is_file():  # networks vs readers, MRMC (docs/stats.md): sets[<set>]["mrmc"]
            emit(self.progress, "stats", message="MRMC reader study")
            for set_name, blk in stats.mrmc.study_mrmc(pred_dir, readings, list(self.cfg["models"])).items():
                if set_name in sets:
                    sets[set_name]["mrmc"] = blk
        metrics = {
            "run": {
                "name": self.cfg.get("name") or rd.name,
                "created": now_iso(),
                "manifest": str(self.manifest),
                "dataset_dir": str(ds_dir),
                "config": self.cfg,
                "seed": self.cfg["seed"],
                "versions": versions(),
                "git_commit": _git_commit(),
                "sha256": hashes,
                "models": model_info,
                "baselines": baselines,
                "readers": readers,
                "split_unit": split.get("unit"),
            },
            "leaky": bool(split.get("leaky", split.get("unit") == "slice")),
            "n_shared_subjects": split.get("n_shared_subjects"),
            "external_cohorts": external_cohorts(rd),
            "oracle_auc": oracle_auc_for(self.manifest),
            "visible_auc": oracle_auc_for(self.manifest, "visible_auc"),
            "cohort": cohort_summary(ds_dir, split),
            "sets": sets,
        }
        tables = rd / "tables"
        write_tables(metrics, tables)
        atomic_write_json(metrics_path, metrics)

    def _saliency(self, sal_dir: Path, ds_dir: Path, split_path: Path, sal_cfg: dict[str, Any]) -> None:
        saliency_overview(self.run_dir, self.cfg["models"], sal_dir, n_cases=int(sal_cfg.get("n_cases", 4)),
                          method=sal_cfg.get("method", "gradcam"), seed=int(self.cfg["seed"]),
                          with_faithfulness=bool(sal_cfg.get("faithfulness", True)),
                          progress=_tag(self.progress, "saliency"))


def _swap_in(new: Path, dest: Path, run_dir: Path) -> None:
    """Replace folder ``dest`` by the finished folder ``new`` (both inside ``run_dir``): the old
    one is renamed aside, the new one renamed in, then the old one removed."""
    from nhb_core.safety import inside, safe_rmtree

    inside(run_dir, new, "folder")
    inside(run_dir, dest, "folder")
    old = dest.parent / f".{dest.name}.old"
    safe_rmtree(old, run_dir)
    if dest.exists() or dest.is_symlink():
        os.replace(dest, old)
    os.replace(new, dest)
    safe_rmtree(old, run_dir)


def _stats_kwargs(fn: Callable, scfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    import inspect

    params = inspect.signature(fn).parameters
    kw = {k: v for k, v in scfg.items() if k in params and v is not None}
    bad = sorted(set(scfg) - set(params))
    if bad and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise ConfigError("config.yaml", f"unknown option(s) {', '.join(repr('stats.' + b) for b in bad)}",
                          "Remove them from the stats section")
    if "seed" in params and "seed" not in kw:
        kw["seed"] = seed
    return kw


def _read_json_or_none(p: Path) -> dict[str, Any] | None:
    try:
        return read_json(p)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def _tag(progress: ProgressCallback | None, stage: str, **fields: Any) -> ProgressCallback | None:
    """A callback that forces ``stage`` (and e.g. ``model``) on every update it forwards."""
    if progress is None:
        return None

    def _cb(ev: dict[str, Any]) -> None:
        sub = ev.get("stage")
        out = {**ev, **fields, "stage": stage}
        if sub and sub != stage:
            out.setdefault("substage", sub)
        progress(out)

    return _cb


def write_tables(metrics: Mapping[str, Any], tables: Path) -> list[Path]:
    """Write every number of ``metrics`` as CSV files under ``tables`` (atomic)."""
    import pandas as pd

    from nhb_core import stats
    from nhb_core.fileio import atomic_path

    tables.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []

    def _csv(df: pd.DataFrame, name: str) -> None:
        from nhb_core.safety import neutralise_csv

        with atomic_path(tables / name) as tmp:  # for people: no cell a spreadsheet would run as a formula
            neutralise_csv(df).to_csv(tmp, index=False)
        out.append(tables / name)

    _csv(stats.tidy_table(metrics), "metrics.csv")
    _csv(pd.DataFrame(metrics["cohort"]["table1"]), "cohort.csv")
    flow = metrics["cohort"]["flow"]
    _csv(pd.DataFrame([{"set": k, **{kk: (", ".join(vv) if isinstance(vv, list) else vv) for kk, vv in v.items()}}
                       for k, v in [("dataset", flow["dataset"])] + list(flow["sets"].items())]), "flow.csv")
    comp_rows, reader_rows = [], []
    for set_name, s in metrics["sets"].items():
        for level, blk in (s.get("level") or {}).items():
            for c in blk.get("comparisons") or []:
                comp_rows.append({"set": set_name, "level": level, **{k: v for k, v in c.items() if not isinstance(v, (list, dict))},
                                  "ci_lower": (c.get("ci") or [None, None])[0], "ci_upper": (c.get("ci") or [None, None])[1]})
            for rname, r in (blk.get("readers") or {}).items():
                base = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
                for mname, vs in (r.get("vs") or {}).items():
                    reader_rows.append({"set": set_name, "level": level, "reader": rname, "model": mname,
                                        **{f"reader_{k}": v for k, v in base.items()},
                                        **{k: v for k, v in vs.items() if not isinstance(v, (dict, list))}})
    _csv(pd.DataFrame(comp_rows), "delong.csv")
    _csv(pd.DataFrame(reader_rows), "readers.csv")
    return out


# ----------------------------------------------------------------------------- public API

def evaluate_baselines(run_dir: Path, ds_dir: Path, split: Any, pred_dir: Path, aggregate: str = "mean",
                       progress: ProgressCallback | None = None, names: list[str] | None = None,
                       sets: list[str] | None = None) -> list[str]:
    """Write the predictions columns of the run's fitted baselines (``RUN/baselines/*.json``).

    ``split`` is a split dict or path; ``names`` default: every fitted baseline of the run.
    Returns the names written.
    """
    from nhb_core.baselines import load_baseline
    from nhb_core.evaluate import write_predictions
    from nhb_core.slices import load_dataset
    from nhb_core.splits import load_split

    bdir = RunFolder(run_dir).baselines_dir
    files = sorted(bdir.glob("*.json")) if bdir.is_dir() else []
    done: list[Any] = []
    if not files:
        return done
    ds = load_dataset(ds_dir)
    split_d = split if isinstance(split, dict) else load_split(split)
    for f in files:
        b = load_baseline(read_json(f))
        if names is not None and b.name not in names:
            continue
        write_predictions(lambda rows, b=b: b.predict(ds.index, rows), b.name, ds, split_d, pred_dir,
                          aggregate=aggregate, progress=progress, sets=sets)
        done.append(b.name)
    return done


def run_study(manifest: str | os.PathLike | None, out_dir: str | os.PathLike,
              config: Mapping[str, Any] | str | os.PathLike | None = None,
              progress: ProgressCallback | None = None,
              overrides: Mapping[str, Any] | None = None) -> Path:
    """Run (or resume) a whole study into ``out_dir``.

    Parameters
    ----------
    manifest : path or None
        The cohort manifest CSV (``docs/manifest.md``); None to take ``manifest`` from the config
        (e.g. a run's own ``config.yaml``).
    out_dir : path
        The run folder (created). An existing run folder is resumed: unchanged stages are skipped.
    config : dict, YAML path or None
        Partial study config merged over :data:`nhb_core.config.DEFAULTS`.
    progress : callable or None
        Called with every progress update (``nhb_core.progress``); updates also go to ``events.jsonl``.
    overrides : dict or None
        CLI-style overrides (see :func:`nhb_core.config.resolve_config`).

    Returns
    -------
    Path
        ``out_dir``; ``status.json`` says ``done``.

    Raises
    ------
    NHBError
        Bad input (status ``failed`` with the one-line error).
    StudyCancelled
        SIGTERM received (status ``cancelled``).
    """
    run_dir = Path(out_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    status = read_status(run_dir)
    _check_run_folder(run_dir)  # before anything is written there
    try:
        cfg = resolve_config(config, overrides)
        if manifest is None:
            manifest = cfg.get("manifest")
        if manifest is None:
            raise ConfigError("command line", "no manifest given", "Pass --manifest M.csv (or a config with manifest:)")
        man = Path(manifest).expanduser().resolve()
        from nhb_core.safety import check_regular_file, max_manifest_bytes

        check_regular_file(man, max_manifest_bytes(), "manifest", "NHB_MAX_MANIFEST_BYTES", error=ManifestError)
        if not man.is_file():
            raise InputError(man, "manifest file not found", "Give the path of the cohort's manifest.csv")
        cfg["manifest"] = str(man)
        if str(cfg.get("device") or "auto") not in ("auto", "cpu"):
            from nhb_core.device import resolve_device

            try:
                resolve_device(str(cfg["device"]))  # before anything in the run folder changes
            except ConfigError as err:
                src = "--device" if (overrides or {}).get("device") else (str(config) if isinstance(
                    config, (str, os.PathLike)) else "config")
                raise ConfigError(src, err.problem, err.fix) from None
    except NHBError as err:
        # a bad option never touches a finished or running run: its results stay as they were
        mine = {os.getpid(), os.getppid(), os.getpgid(0)}  # the launcher (jobs) records the study's own pid
        if not (status and (status.get("state") == "done" or
                            (status.get("state") == "running" and status.get("pid") not in mine
                             and _pid_alive(status.get("pid"))))):
            write_status(run_dir, "failed", stage="config", error=err.line(), pid=os.getpid())
            append_log(run_dir, f"failed: {err.line()}")
        raise
    from nhb_core.safety import run_lock

    with run_lock(run_dir):
        return _run_locked(run_dir, status, cfg, man, progress)


def _run_locked(run_dir: Path, status: dict[str, Any] | None, cfg: dict[str, Any], man: Path,
                progress: ProgressCallback | None) -> Path:
    """The body of :func:`run_study`, run while the run folder's lock is held."""
    status = read_status(run_dir) or status
    mine = {os.getpid(), os.getppid(), os.getpgid(0)}  # a launcher (jobs, torchrun) may have written its pid
    if status and status.get("state") == "running" and status.get("pid") not in (None, *mine):
        pid = status.get("pid")
        if _pid_alive(pid):
            raise RunError(run_dir, f"the run is already running (process {pid})",
                           "Wait for it to finish or cancel it first")
    from nhb_core.fileio import remove_stale_temps

    remove_stale_temps(run_dir)  # left by a process killed mid-write (we hold the lock: none is ours)
    save_config(cfg, run_dir / "config.yaml")
    write_status(run_dir, "running", stage="validate", pid=os.getpid(), error=None)
    append_log(run_dir, f"study started (pid {os.getpid()}), manifest {man}")
    study = _Study(man, run_dir, cfg, progress)
    t0 = time.monotonic()
    with _SigtermGuard():
        try:
            study.run()
            if len(cfg.get("seeds") or []) > 1:
                run_seed_repeats(man, run_dir, cfg, progress)
        except StudyCancelled:
            write_status(run_dir, "cancelled", stage=study.current["stage"], error="cancelled by the user")
            append_log(run_dir, "cancelled")
            emit(study.events, study.current["stage"] or "study", message="cancelled", state="cancelled")
            raise
        except KeyboardInterrupt:
            write_status(run_dir, "cancelled", stage=study.current["stage"], error="interrupted")
            append_log(run_dir, "interrupted")
            emit(study.events, study.current["stage"] or "study", message="interrupted", state="cancelled")
            raise
        except NHBError as err:
            write_status(run_dir, "failed", stage=study.current["stage"], model=study.current["model"],
                         error=err.line())
            append_log(run_dir, f"failed: {err.line()}")
            emit(study.events, study.current["stage"] or "study", message=f"failed: {err.line()}",
                 state="failed", error=err.line())
            raise
        except Exception as err:
            line = " ".join(f"internal error: {type(err).__name__}: {err}".split())
            write_status(run_dir, "failed", stage=study.current["stage"], model=study.current["model"], error=line)
            append_log(run_dir, f"failed: {line}")
            emit(study.events, study.current["stage"] or "study", message=f"failed: {line}", state="failed",
                 error=line)
            raise
    secs = time.monotonic() - t0
    write_status(run_dir, "done", stage="report", model=None, seconds=round(secs, 1))
    append_log(run_dir, f"study done in {secs:.1f} s")
    emit(study.events, "study", message="done", state="done", seconds=round(secs, 1))
    return run_dir


def run_seed_repeats(manifest: Path, run_dir: Path, cfg: Mapping[str, Any],
                     progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Repeat a finished study with each further seed of ``cfg["seeds"]``; write ``RUN/seeds.json``.

    The run folder itself holds the first seed's study. Every other seed ``s`` runs the same
    study (split and training seeded with ``s``; no saliency or report) in ``RUN/seeds/seed_<s>/``,
    sharing one prepared dataset in ``RUN/seeds/cache/``. Finished repeats are skipped on a rerun
    (each is a resumable study). ``seeds.json`` (:func:`seed_summary`) holds the subject-level AUC
    of every model and baseline on every set per seed, with mean and SD; the report is rewritten
    with it.
    """
    import copy

    seeds = list(cfg.get("seeds") or [])
    runs: dict[int, Path] = {seeds[0]: run_dir}
    for s in seeds[1:]:
        sub_cfg = copy.deepcopy(dict(cfg))
        sub_cfg.update(seed=int(s), seeds=None, name=f"{cfg.get('name') or run_dir.name} (seed {s})",
                       cache_dir=cfg.get("cache_dir") or str(RunFolder(run_dir).seeds_dir / "cache"))
        sub_cfg["split"]["seed"] = sub_cfg["train"]["seed"] = None
        sub_cfg["saliency"]["enabled"] = False
        sub_cfg["report"]["enabled"] = False
        sub = RunFolder(run_dir).seeds_dir / f"seed_{int(s)}"
        emit(progress, "seeds", message=f"repeat with seed {s} ({seeds.index(s) + 1} of {len(seeds)})",
             done=seeds.index(s), total=len(seeds))
        run_study(manifest, sub, sub_cfg, progress=progress)
        runs[int(s)] = sub
    summary = seed_summary(runs)
    atomic_write_json(run_dir / "seeds.json", summary)
    if cfg["report"].get("enabled", True):
        from nhb_core import report as _report

        _report.write_report(run_dir)
    emit(progress, "seeds", message="done", done=len(seeds), total=len(seeds))
    return summary


def seed_summary(runs: Mapping[int, Path]) -> dict[str, Any]:
    """Subject-level AUC per seed, model and set (pooled and per center), with mean and SD.

    Returns ``{"seeds": [...], "runs": {seed: path relative to the first run}, "sets": {set: {model:
    {"auc": [per seed], "mean", "sd" (sample SD, ddof 1), "min", "max"}}}, "centers": {set: {center:
    {model: {...}}}}}``; a set or model missing from a seed's run is left out of that seed's list.
    """
    import numpy as np

    first = Path(next(iter(runs.values())))
    per: dict[str, dict[str, list[float]]] = {}
    per_c: dict[str, dict[str, dict[str, list[float]]]] = {}
    for _, rd in runs.items():
        sets = (read_json(RunFolder(rd).metrics_path).get("sets") or {})
        for set_name, entry in sets.items():
            blk = ((entry.get("level") or {}).get("subject") or {}).get("models") or {}
            for m, mm in blk.items():
                if mm.get("auc") is not None:
                    per.setdefault(set_name, {}).setdefault(m, []).append(float(mm["auc"]))
            for c, ce in (entry.get("centers") or {}).items():
                cblk = ((ce.get("level") or {}).get("subject") or {}).get("models") or {}
                for m, mm in cblk.items():
                    if mm.get("auc") is not None:
                        per_c.setdefault(set_name, {}).setdefault(c, {}).setdefault(m, []).append(float(mm["auc"]))

    def stats_of(v: list[float]) -> dict[str, Any]:
        a = np.asarray(v, dtype=float)
        return {"auc": v, "n": len(v), "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(v) > 1 else None,
                "min": float(a.min()), "max": float(a.max())}

    return {"seeds": [int(s) for s in runs],
            "runs": {str(s): os.path.relpath(Path(p), first) for s, p in runs.items()},
            "sets": {s: {m: stats_of(v) for m, v in d.items()} for s, d in per.items()},
            "centers": {s: {c: {m: stats_of(v) for m, v in dd.items()} for c, dd in d.items()}
                        for s, d in per_c.items()}}


#: what a study writes (and may replace) in its run folder
_RUN_ENTRIES = ("models", "predictions", "dataset", "tables", "saliency", "metrics.json", "report.html",
                "split.json", "validation.json")


def _check_run_folder(run_dir: Path) -> None:
    """Refuse an ``--out`` folder that is not a run folder but holds something a study would
    replace (a user's own ``models/`` or ``predictions/``): a study never deletes what it did not create."""
    if (run_dir / "stages.json").exists() or (run_dir / "status.json").exists():
        return
    clash = [n for n in _RUN_ENTRIES if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    if clash:
        raise RunError(run_dir, f"the folder is not a run folder but holds {', '.join(clash)}, which a study "
                       "would replace", "Give a new or empty folder as --out")


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def stage_seconds(run_dir: str | os.PathLike, cpu: bool = False) -> dict[str, float]:
    """Wall seconds (or CPU seconds with ``cpu=True``) each stage took when it last ran (``stages.json``)."""
    c = StageCache(Path(run_dir))
    if cpu:
        return {k: float(v.get("cpu_seconds") or 0.0) for k, v in c.data.items()}
    return c.seconds()
