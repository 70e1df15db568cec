"""The dashboard's pages, declared once.

``app.py`` builds ``st.navigation`` from :data:`PAGES`; the Home page's "Pages" list, the
tests (``tests/test_app.py``, ``tests/test_browser.py``) and ``benchmarks/bench_pages.py``
read the same tuple. To add a page: write ``dashboard_pages/<n>_<Name>.py`` and add one
:class:`PageSpec` here (docs/extending.md, "A dashboard page").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

APP_TITLE = "NHB Lab"
APP_ICON = ":material/neurology:"


@dataclass(frozen=True)
class PageSpec:
    """One page of the dashboard.

    ``path``: the page script, relative to ``app.py`` (the repository root); ``title``: its name in
    the sidebar and the browser tab; ``icon``: a Material icon (``:material/<name>:``) or an emoji;
    ``url_path``: the URL (``http://host:8501/<url_path>``; the default page lives at ``/``);
    ``help``: one line on the Home page's list of pages.
    """

    path: str
    title: str
    icon: str
    help: str
    url_path: str = ""
    default: bool = False


PAGES: tuple[PageSpec, ...] = (
    PageSpec("dashboard_pages/0_Home.py", "Home", ":material/home:", default=True,
             help="Runs table (status, models, sets, leakage flag), subject-level AUC per run, set and model, "
                  "and the cohort summary of the default study."),
    PageSpec("dashboard_pages/1_Cohort.py", "Cohort", ":material/groups:", url_path="Cohort",
             help="Validate a manifest (problems by row), center x label counts, slice browser with the GP ROI "
                  "contour and the crops the models see, and a montage of controls vs injured per center."),
    PageSpec("dashboard_pages/2_Launch.py", "Launch", ":material/rocket_launch:", url_path="Launch",
             help="Start a study in the background (it survives reloads and restarts), follow live progress per "
                  "stage and model with ETA and the last log lines, cancel it."),
    PageSpec("dashboard_pages/3_Results.py", "Results", ":material/monitoring:", url_path="Results",
             help="One run or two side by side: ROC per site with DeLong bands and reader operating points, AUC "
                  "table, DeLong p-values, reader comparisons (McNemar), confusion matrices, calibration, "
                  "decision curves, training curves and downloads."),
    PageSpec("dashboard_pages/4_Saliency.py", "Saliency", ":material/visibility:", url_path="Saliency",
             help="Grad-CAM (GradCAM, GradCAM++, EigenCAM, LayerCAM) over the GP crop and on the full slice, the "
                  "models side by side, CAM energy inside the ROI and faithfulness vs a random map."),
    PageSpec("dashboard_pages/5_Predict.py", "Predict", ":material/upload_file:", url_path="Predict",
             help="Upload a T1 (NIfTI or zipped DICOM series) and its ROI mask: probability per model and for the "
                  "ensemble, the decision at the run's threshold, Grad-CAM overlays."),
    PageSpec("dashboard_pages/6_ROIs.py", "ROIs", ":material/draw:", url_path="ROIs",
             help="GP ROI proposals of `roi propose`: every subject's mask on its GP slice, sortable by confidence "
                  "and QC flags; correct one with a brush (paint left/right, erase, undo) and save it as a new file "
                  "marked corrected."),
    PageSpec("dashboard_pages/6_Reading.py", "Reading", ":material/rate_review:", url_path="Reading",
             help="Reader studies: create a reading session on a finished run, send each reader a private link "
                  "(blinded 1-5 ratings of cases under random codes, unaided and optionally aided), follow "
                  "progress, close it to write the readings for the MRMC analysis."),
)


def page_specs() -> list[PageSpec]:
    """Every page, in sidebar order (the default page first)."""
    return list(PAGES)


def page_paths(include_default: bool = False) -> list[str]:
    """The page scripts (relative to ``app.py``), as ``AppTest.switch_page`` wants them."""
    return [p.path for p in PAGES if include_default or not p.default]


def pages_help() -> list[tuple[str, str]]:
    """(title, one line) per page, for the Home page."""
    return [(p.title, p.help) for p in PAGES]


def st_pages() -> list[Any]:
    """The ``st.Page`` objects for ``st.navigation`` (imports Streamlit)."""
    import streamlit as st

    return [st.Page(p.path, title=p.title, icon=p.icon, default=True) if p.default
            else st.Page(p.path, title=p.title, icon=p.icon, url_path=p.url_path) for p in PAGES]
