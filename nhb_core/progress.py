"""Progress reporting shared by the CLI, the study runner and the dashboard.

Every long library call takes an optional ``progress`` callback, called with one
``dict`` per update. Keys (all optional except ``stage``)::

    {"stage": "prepare"|"train"|..., "model": "resnet18", "done": 12, "total": 90,
     "epoch": 3, "epochs": 30, "step": 12, "steps": 18,
     "metrics": {"loss": 0.41, "val_auc": 0.83}, "eta_s": 95.0, "message": "text"}

The CLI renders updates with a rich progress bar (:func:`rich_progress`), the
study runner appends them to ``events.jsonl`` (:mod:`nhb_core.runs`), and the
dashboard reads that file. Callbacks must be cheap; a callback's exception
propagates (a cancelled dashboard job raises from it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

ProgressCallback = Callable[[dict[str, Any]], None]


def emit(progress: ProgressCallback | None, stage: str, **fields: Any) -> None:
    """Call ``progress`` with ``{"stage": stage, **fields}`` if a callback was given."""
    if progress is not None:
        progress({"stage": stage, **fields})


def chain(*callbacks: ProgressCallback | None) -> ProgressCallback | None:
    """One callback that forwards each update to every non-None callback."""
    cbs = [c for c in callbacks if c is not None]
    if not cbs:
        return None

    def _cb(event: dict[str, Any]) -> None:
        for c in cbs:
            c(event)

    return _cb


class EtaEstimator:
    """Remaining-time estimate from the rate so far (seconds)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def eta(self, done: float, total: float) -> float | None:
        if done <= 0 or total <= 0:
            return None
        elapsed = time.monotonic() - self.t0
        return max(0.0, elapsed / done * (total - done))


@contextlib.contextmanager
def rich_progress(enabled: bool = True) -> Iterator[ProgressCallback | None]:
    """A callback that renders updates as rich progress bars (one task per stage/model).

    Yields None when disabled, so library code pays nothing; draws nothing when
    stderr is not a terminal.
    """
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        tasks: dict[str, Any] = {}

        def _cb(ev: dict[str, Any]) -> None:
            key = ev.get("stage", "") + (f" {ev['model']}" if ev.get("model") else "")
            done = ev.get("done", ev.get("step"))
            total = ev.get("total", ev.get("steps"))
            if "epoch" in ev and "epochs" in ev and ev.get("steps"):
                # training: one bar over all steps of all epochs
                total = ev["epochs"] * ev["steps"]
                done = (ev["epoch"] - 1) * ev["steps"] + (ev.get("step") or 0)
            info = ""
            if ev.get("metrics"):
                info = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in ev["metrics"].items())
            elif ev.get("message"):
                info = str(ev["message"])[:60]
            if key not in tasks:
                tasks[key] = bar.add_task(key, total=total, info=info)
            bar.update(tasks[key], completed=done, total=total, info=info)

        yield _cb
