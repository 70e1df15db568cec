"""Run folders: status.json, events.jsonl and log.txt (see docs/runs.md).

``status.json`` is rewritten atomically; ``events.jsonl`` is append-only, one
JSON object per line, and readers tolerate a torn last line (a writer killed
mid-line).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from nhb_core.fileio import atomic_write_json, to_json
from nhb_core.progress import ProgressCallback

STATES = ("queued", "running", "done", "failed", "cancelled")


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
