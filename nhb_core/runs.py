"""Run folders: the one accessor of a study run's layout (:class:`RunFolder`), set names and
labels, and status.json, events.jsonl and log.txt (see docs/runs.md and docs/design-shared.md).

Every module, page and notebook reads a run through :class:`RunFolder` (paths, trained models,
sets and their labels, predictions, metrics, status, saliency cache) rather than spelling the
layout out by hand.

``status.json`` is rewritten atomically; ``events.jsonl`` is append-only, one
JSON object per line, and readers tolerate a torn last line (a writer killed
mid-line).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nhb_core.fileio import atomic_write_json, to_json
from nhb_core.progress import ProgressCallback

if TYPE_CHECKING:
    import pandas as pd

STATES = ("queued", "running", "done", "failed", "cancelled")

#: the two prediction tables of a set (``predictions/<set>__subjects.csv`` / ``__slices.csv``)
LEVELS = ("subject", "slice")


# ----------------------------------------------------------------- sets
def set_file_stem(set_name: str) -> str:
    """``"external:B"`` -> ``"external_B"`` (file-name form of a set name).

    A set name that is not one plain file-name component (a center with ``/``, ``..``,
    a control character) is a :class:`~nhb_core.errors.DatasetError`: it would write
    outside the predictions folder or silently drop the set.
    """
    from nhb_core.errors import DatasetError
    from nhb_core.safety import check_label

    check_label(str(set_name).split(":", 1)[-1], "center (set) name", "split.json", error=DatasetError)
    return str(set_name).replace(":", "_")


def set_label(set_name: str) -> str:
    """Human name of a set, the same everywhere (report, CLI, dashboard): ``test`` -> internal test,
    ``val`` -> validation, ``train`` -> training, ``external:B`` -> external center B."""
    s = str(set_name)
    if s.startswith("external:"):
        return f"external center {s.split(':', 1)[1]}"
    return {"test": "internal test", "val": "validation", "train": "training"}.get(s, s)


def sort_sets(sets: Iterable[str]) -> list[str]:
    """Display order of sets: ``test``, the external centers, ``val``, then the rest (by name)."""
    def key(s: str) -> tuple[int, str]:
        s = str(s)
        return (0 if s == "test" else 1 if s.startswith("external") else 2 if s == "val" else 3, s)

    return sorted(sets, key=key)


def _level_word(level: str) -> str:
    """``subject``/``subjects`` -> ``subjects`` (the file suffix); same for slices."""
    lv = str(level).rstrip("s")
    if lv not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return lv + "s"


class RunFolder:
    """A study run folder (``runs/<name>/``): the one place that knows its layout.

    Paths are properties (nothing is created); readers return None / {} / an empty table when a
    file is absent or unreadable, so a page can show a half-finished run. The layout::

        config.yaml split.json status.json events.jsonl log.txt metrics.json report.html
        models/<model>/{model.json, model.safetensors, history.csv}
        predictions/<set>__subjects.csv, <set>__slices.csv
        baselines/<name>.json   cohorts/<name>/   seeds/ + seeds.json
        saliency/{summary.json, cases.csv, gallery/, cache/<model>/<method>/...}
    """

    def __init__(self, path: str | os.PathLike | RunFolder) -> None:
        self.path: Path = Path(path.path if isinstance(path, RunFolder) else path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------- paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def split_path(self) -> Path:
        return self.path / "split.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    @property
    def predictions_dir(self) -> Path:
        return self.path / "predictions"

    @property
    def baselines_dir(self) -> Path:
        return self.path / "baselines"

    @property
    def cohorts_dir(self) -> Path:
        return self.path / "cohorts"

    @property
    def seeds_dir(self) -> Path:
        return self.path / "seeds"

    @property
    def seeds_path(self) -> Path:
        return self.path / "seeds.json"

    @property
    def saliency_dir(self) -> Path:
        return self.path / "saliency"

    @property
    def saliency_cache_dir(self) -> Path:
        return self.saliency_dir / "cache"

    @property
    def saliency_summary_path(self) -> Path:
        return self.saliency_dir / "summary.json"

    def model_dir(self, model: str) -> Path:
        return self.models_dir / str(model)

    def model_json_path(self, model: str) -> Path:
        return self.model_dir(model) / "model.json"

    def weights_path(self, model: str) -> Path:
        return self.model_dir(model) / "model.safetensors"

    def history_path(self, model: str) -> Path:
        return self.model_dir(model) / "history.csv"

    def predictions_path(self, set_name: str, level: str = "subject") -> Path:
        """``predictions/<set>__subjects.csv`` (``level`` subject/subjects) or ``__slices.csv``."""
        return self.predictions_dir / f"{set_file_stem(set_name)}__{_level_word(level)}.csv"

    # ------------------------------------------------------------- small files
    def status(self) -> dict[str, Any] | None:
        return read_status(self.path)

    def events(self, last: int | None = None) -> list[dict[str, Any]]:
        return read_events(self.path, last)

    def config(self) -> dict[str, Any]:
        """``config.yaml`` ({} when absent or unreadable)."""
        import yaml

        try:
            with open(self.config_path, encoding="utf-8") as fh:
                out = yaml.safe_load(fh)
            return out if isinstance(out, dict) else {}
        except (OSError, yaml.YAMLError):
            return {}

    def split(self) -> dict[str, Any] | None:
        return _read_json_or_none(self.split_path)

    def metrics(self) -> dict[str, Any] | None:
        """``metrics.json`` (None when absent or unreadable)."""
        return _read_json_or_none(self.metrics_path)

    def seeds(self) -> dict[str, Any] | None:
        """``seeds.json`` (repeated seeds), or None."""
        return _read_json_or_none(self.seeds_path)

    def model_json(self, model: str) -> dict[str, Any]:
        """``models/<model>/model.json`` ({} when absent or unreadable)."""
        return _read_json_or_none(self.model_json_path(model)) or {}

    # ------------------------------------------------------------- models
    def configured_models(self) -> list[str]:
        """The models the run's config.yaml asks for, in its order (also while they train)."""
        return [str(m) for m in (self.config().get("models") or []) if isinstance(m, str)]

    def trained_models(self) -> list[str]:
        """The one rule for a trained model: a folder ``models/<name>/`` (not hidden) with
        ``model.json`` and ``model.safetensors``. In the config's order, then by name."""
        d = self.models_dir
        if not d.is_dir():
            return []
        found = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and (p / "model.json").is_file() and (p / "model.safetensors").is_file())
        order = self.configured_models()
        return [m for m in order if m in found] + [m for m in found if m not in order]

    def models(self) -> list[str]:
        """The run's models for display: the configured ones, else the trained ones."""
        return self.configured_models() or self.trained_models()

    def check(self) -> RunFolder:
        """``self`` when it is a run folder with a ``models/`` folder, else a ``RunError``."""
        from nhb_core.errors import RunError

        if not self.path.is_dir():
            raise RunError(self.path, "run folder not found", "Give a run folder made by `python -m nhb_core study`")
        if not self.models_dir.is_dir():
            raise RunError(self.path, "not a run folder with trained models (no models/ folder)",
                           "Give a finished run made by `python -m nhb_core study`")
        return self

    def require_trained_models(self) -> list[str]:
        """:meth:`trained_models` of a checked run; a ``RunError`` when there is none."""
        from nhb_core.errors import RunError

        found = self.check().trained_models()
        if not found:
            raise RunError(self.models_dir, "no trained model (model.json + model.safetensors) in the run",
                           "Wait for the run to finish training, or rerun the study")
        return found

    # ------------------------------------------------------------- sets and predictions
    def prediction_sets(self, level: str = "subject") -> list[str]:
        """Set names that have a predictions table at ``level``, in :func:`sort_sets` order."""
        d = self.predictions_dir
        if not d.is_dir():
            return []
        suffix = f"__{_level_word(level)}.csv"
        known = list(((self.metrics() or {}).get("sets") or {}).keys())
        split_sets = list(((self.split() or {}).get("sets") or {}).keys())
        stems = {str(s).replace(":", "_"): s for s in split_sets + known}
        out = []
        for f in sorted(d.glob(f"*{suffix}")):
            stem = f.name[: -len(suffix)]
            name = stems.get(stem)
            if name is None:
                name = "external:" + stem[len("external_"):] if stem.startswith("external_") else stem
            out.append(name)
        return sort_sets(out)

    def load_predictions(self, set_name: str, level: str = "subject") -> pd.DataFrame:
        """A predictions table (``subject_id`` and ``center`` as text); an empty DataFrame when absent."""
        import pandas as pd

        p = self.predictions_path(set_name, level)
        if not p.exists():
            return pd.DataFrame()
        return pd.read_csv(p, dtype={"subject_id": str, "center": str})

    def load_history(self, model: str) -> pd.DataFrame:
        """``models/<model>/history.csv`` (empty DataFrame when absent)."""
        import pandas as pd

        p = self.history_path(model)
        return pd.read_csv(p) if p.exists() else pd.DataFrame()

    def histories(self, models: Iterable[str] | None = None) -> dict[str, pd.DataFrame]:
        """model -> history table, for the models that have one."""
        models = self.models() if models is None else models
        return {m: h for m in models if not (h := self.load_history(m)).empty}


def _read_json_or_none(p: Path) -> dict[str, Any] | None:
    from nhb_core.fileio import read_json

    try:
        out = read_json(p)
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's status dict, or None when it has none (or it is unreadable)."""
    p = Path(run_dir) / "status.json"
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def write_status(run_dir: str | os.PathLike, state: str, **fields: Any) -> dict[str, Any]:
    """Update status.json (merging with what is there) and return the new dict.

    ``state`` is one of :data:`STATES`. ``error`` is a single line or None.
    ``started`` is set on the first "running", ``ended`` on done/failed/cancelled.
    """
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}")
    run_dir = Path(run_dir)
    status = read_status(run_dir) or {}
    status.update(fields)
    status["state"] = state
    status.setdefault("error", None)
    if state == "running":
        status.setdefault("started", now_iso())
        status["ended"] = None
        if fields.get("error") is None:
            status["error"] = None
    if state in ("done", "failed", "cancelled"):
        status["ended"] = now_iso()
    if state == "done":
        status["error"] = None
    if status.get("error"):
        status["error"] = " ".join(str(status["error"]).split())
    status["updated"] = now_iso()
    atomic_write_json(run_dir / "status.json", status)
    return status


def append_event(run_dir: str | os.PathLike, event: dict[str, Any]) -> None:
    """Append one event line to events.jsonl (adds ``t`` when missing)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ev = {"t": now_iso(), **event}
    line = to_json(ev, indent=None) + "\n"
    # one write() of one line: concurrent appenders never interleave within a line
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line)


def read_events(run_dir: str | os.PathLike, last: int | None = None) -> list[dict[str, Any]]:
    """All (or the ``last`` n) events; a torn or corrupt line is skipped."""
    p = Path(run_dir) / "events.jsonl"
    if not p.exists():
        return []
    out: list[dict[str, Any]] = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        lines = fh.readlines()
    if last is not None:
        lines = lines[-last:]
    for ln in lines:
        ln = ln.strip()
        if not ln:
            continue
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return out


def event_logger(run_dir: str | os.PathLike, min_interval_s: float = 0.5, **extra: Any) -> ProgressCallback:
    """A progress callback that appends events to ``run_dir/events.jsonl``.

    Updates of the same stage/model closer than ``min_interval_s`` are dropped,
    except the first and last of a stage (done == total) and those carrying
    metrics or a message, so a fast loop does not flood the file.
    """
    import time

    last_t: dict[str, float] = {}

    def _cb(ev: dict[str, Any]) -> None:
        key = f"{ev.get('stage')}/{ev.get('model')}"
        t = time.monotonic()
        important = (
            key not in last_t
            or ev.get("metrics")
            or ev.get("message")
            or (ev.get("done") is not None and ev.get("done") == ev.get("total"))
        )
        if not important and t - last_t.get(key, 0.0) < min_interval_s:
            return
        last_t[key] = t
        append_event(run_dir, {**extra, **ev})

    return _cb


def append_log(run_dir: str | os.PathLike, text: str) -> None:
    """Append a line to the run's human-readable log.txt."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a", encoding="utf-8") as fh:
        fh.write(f"{now_iso()} {text.rstrip()}\n")


def list_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """Run folders under ``runs_dir`` (those with a status.json or config.yaml), newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and ((p / "status.json").exists() or (p / "config.yaml").exists())]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def auc_table(run_dir: str | os.PathLike, level: str = "subject") -> list[dict[str, Any]]:
    """Rows ``{"model", "set", "auc", "ci": [lo, hi], "n"}`` from a run's metrics.json (the demo's table)."""
    from nhb_core.fileio import read_json

    m = read_json(RunFolder(run_dir).metrics_path)
    rows = []
    for set_name, s in m["sets"].items():
        blk = (s.get("level") or {}).get(level)
        if not blk:
            continue
        for model, mm in (blk.get("models") or {}).items():
            rows.append({"model": model, "set": set_name, "auc": mm.get("auc"),
                         "ci": mm.get("auc_ci_delong") or mm.get("auc_ci_bootstrap"), "n": blk.get("n")})
    return rows
