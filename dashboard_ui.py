"""Streamlit helpers shared by ``app.py`` and ``pages/`` (the only dashboard module
besides the pages; the data logic lives in :mod:`nhb_core.dashboard_data`).

- :func:`page` sets the page config and returns the runs folder.
- :func:`guard` wraps a page body: an :class:`~nhb_core.errors.NHBError` becomes
  ``st.error(err.line())``, anything else one line too; never a traceback.
- Cached loaders keyed on file mtime (``st.cache_data``) and models
  (``st.cache_resource``).
- User strings (subject ids, file names, center names) are shown through
  ``st.text``/``st.code``/tables/widget labels only, never as HTML; :func:`md_escape`
  neutralises Markdown where a user string must sit in Markdown.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

_ROOT = Path(__file__).resolve().parent
if str(_ROOT) not in sys.path:  # pages import this module and nhb_core from the repo
    sys.path.insert(0, str(_ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from nhb_core import dashboard_data as dd  # noqa: E402
from nhb_core import jobs  # noqa: E402
from nhb_core.errors import NHBError  # noqa: E402

POLL_S = float(os.environ.get("NHB_POLL_S", "2") or 2)


def page(title: str, icon: str = ":material/neurology:") -> Path:
    """Page config + the runs folder (``$NHB_RUNS_DIR`` or ``./runs``)."""
    st.set_page_config(page_title=f"NHB Lab - {title}", page_icon=icon, layout="wide")
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


def md_escape(s: Any) -> str:
    """A user string made inert inside Markdown (no links, no HTML, no formatting)."""
    return _MD_SPECIAL.sub(r"\\\1", str(s)).replace("\n", " ")


# ----------------------------------------------------------------- cached loaders
@st.cache_data(show_spinner=False, max_entries=256)
def _metrics(key: tuple) -> Optional[dict]:
    return dd.load_metrics(Path(key[0]).parent)


def metrics(run_dir: str | os.PathLike) -> Optional[dict]:
    """metrics.json, cached until the file changes."""
    return _metrics(dd.file_key(Path(run_dir) / "metrics.json"))


@st.cache_data(show_spinner=False, max_entries=512)
def _predictions(key: tuple, set_name: str, level: str) -> pd.DataFrame:
    p = Path(key[0])
    return dd.load_predictions(p.parent.parent, set_name, level)


def predictions(run_dir: str | os.PathLike, set_name: str, level: str = "subjects") -> pd.DataFrame:
    return _predictions(dd.file_key(dd.predictions_path(run_dir, set_name, level)), set_name, level)


@st.cache_data(show_spinner=False, max_entries=256)
def _history(key: tuple, model: str) -> pd.DataFrame:
    return dd.load_history(Path(key[0]).parents[2], model)


def history(run_dir: str | os.PathLike, model: str) -> pd.DataFrame:
    return _history(dd.file_key(Path(run_dir) / "models" / model / "history.csv"), model)


@st.cache_data(show_spinner=False, max_entries=64, ttl=5)
def _runs_table(runs: str, keys: tuple) -> pd.DataFrame:  # noqa: ARG001 - keys are the cache key
    return dd.runs_table(runs)


def runs_table(runs: Path) -> pd.DataFrame:
    """The runs table, re-read when any run's status/metrics file changes."""
    from nhb_core.runs import list_runs

    keys = tuple((dd.file_key(r / "status.json"), dd.file_key(r / "metrics.json")) for r in list_runs(runs))
    return _runs_table(str(runs), keys)


def run_index(names: list[str]) -> int:
    """Default position in a run list: the ``?run=NAME`` query parameter when it names one, else 0."""
    qp = st.query_params.get("run")
    return names.index(qp) if qp in names else 0


def show_table(df: pd.DataFrame, **kw: Any) -> None:
    """A dataframe (its cells are text, never HTML)."""
    st.dataframe(df, hide_index=True, width="stretch", **kw)
