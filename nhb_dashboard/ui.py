"""Streamlit helpers shared by the pages (the data logic lives in :mod:`nhb_dashboard.data`).

- :func:`page` sets the page's browser title and returns the runs folder.
- :func:`guard` wraps a page body: an :class:`~nhb_core.errors.NHBError` becomes
  ``st.error(err.line())``, anything else one line too; never a traceback.
- Cached loaders keyed on file mtime (``st.cache_data``) and models
  (``st.cache_resource``).
- :func:`manifest_picker`: the manifest choice of the Cohort and Launch pages.
- :func:`steps`: a progress bar for a cold computation made of several steps.
- User strings (subject ids, file names, center names) are shown through
  ``st.text``/``st.code``/tables/widget labels only, never as HTML; :func:`md_escape`
  neutralises Markdown where a user string must sit in Markdown.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from nhb_core.errors import NHBError
from nhb_core.runs import RunFolder
from nhb_dashboard import data as dd

POLL_S = float(os.environ.get("NHB_POLL_S", "2") or 2)


def page(title: str) -> Path:
    """The page's browser title + the runs folder (``$NHB_RUNS_DIR`` or ``./runs``).

    Layout, icon and the sidebar entry come from ``app.py`` / :mod:`nhb_dashboard.nav`."""
    st.set_page_config(page_title=f"NHB Lab - {title}", layout="wide")
    return runs_dir()


def runs_dir() -> Path:
    return dd.default_runs_dir().expanduser().resolve()


def max_running() -> int:
    try:
        return max(1, int(os.environ.get("NHB_MAX_RUNNING", "1")))
    except ValueError:
        return 1


def error_line(err: BaseException) -> str:
    if isinstance(err, NHBError):
        return err.line()
    msg = " ".join(f"{type(err).__name__}: {err}".split())
    return f"internal error: {msg[:400]}. Reload the page; if it persists, report it with the run's log.txt."


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Show any error as one line in an error box (Streamlit's own stop/rerun pass through)."""
    try:
        yield
    except NHBError as err:
        st.error(md_escape(err.line()), icon=":material/error:")
    except Exception as err:  # noqa: BLE001 - the policy: one line, never a traceback
        st.error(md_escape(error_line(err)), icon=":material/error:")


def error_box(text: str) -> None:
    """An error box holding a user-influenced line as plain text."""
    st.error(md_escape(text), icon=":material/error:")


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def ceilings_caption(metrics: dict) -> str:
    """One line for a synthetic run: the oracle AUC and the image-visible signal AUC per center
    (metrics.json ``oracle_auc`` / ``visible_auc``); "" for a run without them. Keys are escaped."""
    oracle, visible = metrics.get("oracle_auc") or {}, metrics.get("visible_auc") or {}
    if not oracle:
        return ""

    def per_center(d: dict) -> str:
        return ", ".join(f"{md_escape(str(k))} {v:.3f}" for k, v in d.items())

    return ("Synthetic cohort: oracle AUC (latent severity, the best achievable) per center: " + per_center(oracle)
            + ("; image-visible signal AUC (the ceiling an image model can approach): " + per_center(visible)
               if visible else ""))


def md_escape(s: Any) -> str:
    """A user string made inert inside Markdown (no links, no HTML, no formatting)."""
    return _MD_SPECIAL.sub(r"\\\1", str(s)).replace("\n", " ")


# ----------------------------------------------------------------- cached loaders
# each cached on the run folder and the file's key (path, mtime, size): re-read when the file changes
@st.cache_data(show_spinner=False, max_entries=256)
def _metrics(run_dir: str, key: tuple) -> dict | None:
    return RunFolder(run_dir).metrics()


def metrics(run_dir: str | os.PathLike) -> dict | None:
    """metrics.json, cached until the file changes."""
    return _metrics(str(run_dir), dd.file_key(RunFolder(run_dir).metrics_path))


@st.cache_data(show_spinner=False, max_entries=512)
def _predictions(run_dir: str, key: tuple, set_name: str, level: str) -> pd.DataFrame:
    return RunFolder(run_dir).load_predictions(set_name, level)


def predictions(run_dir: str | os.PathLike, set_name: str, level: str = "subject") -> pd.DataFrame:
    """A predictions table (``level`` subject(s) / slice(s)), cached until the file changes."""
    key = dd.file_key(RunFolder(run_dir).predictions_path(set_name, level))
    return _predictions(str(run_dir), key, set_name, level)


@st.cache_data(show_spinner=False, max_entries=256)
def _history(run_dir: str, key: tuple, model: str) -> pd.DataFrame:
    return RunFolder(run_dir).load_history(model)


def history(run_dir: str | os.PathLike, model: str) -> pd.DataFrame:
    return _history(str(run_dir), dd.file_key(RunFolder(run_dir).history_path(model)), model)


@st.cache_data(show_spinner=False, max_entries=64, ttl=5)
def _runs_table(runs: str, keys: tuple) -> tuple[pd.DataFrame, pd.DataFrame]:  # noqa: ARG001 - keys are the cache key
    return dd.runs_table(runs), dd.auc_overview(runs)


def runs_table(runs: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs table and the subject-level AUC overview (:func:`nhb_dashboard.data.runs_table`,
    :func:`~nhb_dashboard.data.auc_overview`), re-read when any run's status/metrics file changes."""
    from nhb_core.runs import list_runs

    keys = tuple((dd.file_key(RunFolder(r).status_path), dd.file_key(RunFolder(r).metrics_path)) for r in list_runs(runs))
    return _runs_table(str(runs), keys)


def run_index(names: list[str]) -> int:
    """Default position in a run list: the ``?run=NAME`` query parameter when it names one, else 0."""
    qp = st.query_params.get("run")
    return names.index(qp) if qp in names else 0


def show_table(df: pd.DataFrame, **kw: Any) -> None:
    """A dataframe (its cells are text, never HTML)."""
    st.dataframe(df, hide_index=True, width="stretch", **kw)


# ----------------------------------------------------------------- manifest picker
OTHER_MANIFEST = "another manifest (path)"


@dataclass(frozen=True)
class ManifestChoice:
    """What :func:`manifest_picker` returns: ``path`` (None until a path is typed), the chosen label,
    and ``preset`` when the choice is one of the synthetic cohorts (generated on first use)."""

    path: Path | None
    label: str
    preset: str | None = None

    @property
    def missing_synthetic(self) -> bool:
        """A synthetic cohort that has not been generated yet."""
        return self.preset is not None and self.path is not None and not self.path.is_file()

    def generate(self) -> Path:
        """Generate the synthetic cohort (with a spinner) and return its manifest."""
        with st.spinner("Generating the synthetic cohort..."):
            return dd.ensure_synthetic(self.preset or "small")


def manifest_picker(runs: Path, key: str) -> ManifestChoice:
    """The "Manifest" select box (synthetic presets, the manifests of existing runs, or a typed path;
    widget keys ``key`` and ``key + "_path"``). Preselects the first manifest that exists."""
    choices = dd.known_manifests(runs)
    labels = [lab for lab, _ in choices] + [OTHER_MANIFEST]
    first_existing = next((i for i, (_, mp) in enumerate(choices) if mp.is_file()), 0)
    pick = st.selectbox("Manifest", labels, index=first_existing, key=key)
    if pick == OTHER_MANIFEST:
        typed = st.text_input("Path of a manifest CSV", key=f"{key}_path")
        return ManifestChoice(Path(typed).expanduser() if typed.strip() else None, pick)
    path = dict(choices)[pick]
    return ManifestChoice(path, pick, dd.synthetic_preset(path))


# ----------------------------------------------------------------- progress
class Steps:
    """A progress bar over ``total`` steps of a cold computation, shown only while it runs
    (see :func:`steps`)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, max(1, int(total)), 0
        self.t0 = time.perf_counter()
        self._bar = st.progress(0.0, text=md_escape(f"{label} (0/{self.total})"))

    def advance(self, what: str = "") -> None:
        self.done += 1
        frac = min(1.0, self.done / self.total)
        text = f"{self.label} ({self.done}/{self.total})" + (f": {what}" if what else "")
        self._bar.progress(frac, text=md_escape(text))

    def set(self, done: int, total: int) -> None:
        """Jump to ``done`` of ``total`` (a computation that reports its own counts)."""
        self.done, self.total = int(done), max(1, int(total))
        self._bar.progress(min(1.0, self.done / self.total), text=md_escape(f"{self.label} ({self.done}/{self.total})"))

    def close(self) -> None:
        self._bar.empty()


@contextlib.contextmanager
def steps(label: str, total: int, show: bool = True) -> Iterator[Steps | None]:
    """``with ui.steps("Computing the saliency maps", n, show=cold) as s: ... s.advance("resnet18")``:
    a progress bar with the step count (removed at the end). ``show=False`` (warm: everything cached)
    draws nothing and yields None."""
    if not show:
        yield None
        return
    s = Steps(label, total)
    try:
        yield s
    finally:
        s.close()


def advance(s: Steps | None, what: str = "") -> None:
    """``s.advance(what)`` when a progress bar is shown."""
    if s is not None:
        s.advance(what)


# what this process has already computed (st.cache_data / st.cache_resource are process-wide too):
# a page shows a progress bar only the first time, not on every warm rerun
_WARM: set[tuple] = set()


def is_warm(*key: Any) -> bool:
    """Whether :func:`mark_warm` was called with this key in this process."""
    return tuple(key) in _WARM


def mark_warm(*key: Any) -> None:
    _WARM.add(tuple(key))
