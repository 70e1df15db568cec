"""The dashboard in a real browser: `streamlit run app.py` on a free port against a
small finished run, driven by headless Chromium (Playwright, Debian's chromium).

Checks every page for exception/error boxes, the ROC panels' plotly data (one
model curve per model and set), the Grad-CAM images, and that an HTML run name /
error line shows as text (no dialog). Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from browser_util import chromium, streamlit_server, wait_until_drawn

from nhb_core.runs import write_status
from nhb_dashboard import nav

URLS = {p.title: p.url_path for p in nav.page_specs()}  # the pages as app.py's st.navigation declares them
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
EVIL = "<script>alert(1)</script>"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def server(small_run, tmp_path_factory):
    """`streamlit run app.py` against a copy of the small run plus a failed run whose
    name-like error line holds HTML."""
    runs = tmp_path_factory.mktemp("browser_runs")
    shutil.copytree(small_run, runs / small_run.name)
    bad = runs / "evil_run"
    bad.mkdir()
    write_status(bad, "failed", error=f"manifest.csv:2: subject id {EVIL} is not valid. Rename it")
    env = {"NHB_RUNS_DIR": str(runs), "NHB_DATA_DIR": str(tmp_path_factory.mktemp("data")), "NHB_POLL_S": "2"}
    with streamlit_server(env, runs.parent / "streamlit.log") as url:
        yield url, runs


def _open(page, url: str, timeout_ms: int = 240_000) -> None:
    page.goto(url)
    wait_until_drawn(page, timeout_ms)
    page.wait_for_timeout(1500)


def _check_clean(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    assert page.locator('[data-testid="stException"]').count() == 0, f"{name}: exception box"
    errs = page.locator('[data-testid="stAlertContentError"]').all_inner_texts()
    return errs


def test_deep_link_shows_the_declared_navigation(browser, server):
    """A page opened by its URL (a bookmark, a link in a report) has the declared sidebar: Home first
    and no entry script called "app" (a folder named pages/ used to be auto-discovered beside it)."""
    url, _ = server
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    _open(page, f"{url}/{URLS['Cohort']}")
    page.wait_for_timeout(2000)
    side = page.locator('[data-testid="stSidebarNav"]').inner_text()
    assert "app" not in side.split() and side.split()[:2] == ["home", "Home"], side


def test_every_page_in_chromium(browser, server, small_run):
    url, runs = server
    ctx = browser.new_context(viewport={"width": 1400, "height": 1800})
    page = ctx.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    metrics = json.loads((small_run / "metrics.json").read_text())
    models = list(metrics["run"]["config"]["models"])
    sets = [s for s in metrics["sets"] if s != "val"]
    try:
        # Home: the runs table; the failed run's error shows its HTML as text
        _open(page, url + "/")
        errs = _check_clean(page, "home")
        assert any(EVIL in e for e in errs), errs
        assert page.locator("script", has_text="alert(1)").count() == 0
        assert EVIL in page.inner_text("body")
        # the sidebar names the home page (not "app") and lists every declared page
        side = page.locator('[data-testid="stSidebarNav"]').inner_text()
        assert "app" not in side.split() and all(t in side for t in URLS), side

        # a normal browser width: no table of the Home page runs off its right edge (the AUC columns
        # of the runs table used to be hidden behind a horizontal scroll)
        page.set_viewport_size({"width": 1280, "height": 1000})
        page.wait_for_timeout(1500)
        widths = page.evaluate("""() => Array.from(document.querySelectorAll('[data-testid="stDataFrame"] .dvn-scroller'))
                                        .map(s => [s.scrollWidth, s.clientWidth])""")
        page.screenshot(path=str(ARTIFACTS / "home_1280.png"), full_page=True)
        assert len(widths) >= 2 and all(sw <= cw + 2 for sw, cw in widths), widths
        page.set_viewport_size({"width": 1400, "height": 1800})

        _open(page, f"{url}/{URLS['Cohort']}")
        assert not _check_clean(page, "cohort")
        _open(page, f"{url}/{URLS['Launch']}")  # lists recent jobs: only the failed run's line may be an error
        errs = _check_clean(page, "launch")
        assert errs and all(EVIL in e for e in errs), errs

        # Results: one ROC curve per model and set in the plotly data
        _open(page, f"{url}/{URLS['Results']}")
        assert not _check_clean(page, "results")
        page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot').length >= {len(sets)}",
                               timeout=60_000)
        traces = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
                                       .map(gd => (gd.data || []).map(t => t.name || ''))""")
        curves = [n for fig in traces for n in fig if any(n.startswith(f"{m}: AUC") for m in models)]
        assert len(curves) == len(models) * len(sets), (curves, sets)
        for m in models:
            assert sum(n.startswith(f"{m}: AUC") for n in curves) == len(sets)

        # Saliency: the Grad-CAM images are shown (decoded, non-empty)
        _open(page, f"{url}/{URLS['Saliency']}")
        assert not _check_clean(page, "saliency")
        page.wait_for_function("""() => Array.from(document.querySelectorAll('[data-testid="stImage"] img'))
                                  .filter(i => i.complete && i.naturalWidth > 0).length >= 3""", timeout=120_000)
        caps = page.locator('[data-testid="stImageCaption"]').all_inner_texts()
        assert any("GP crop" in c for c in caps) and any("full axial slice" in c for c in caps), caps
        body = page.inner_text("body")
        assert "nan%" not in body and "None" not in body  # a missing value says why

        for title in URLS:  # a page registered later (e.g. Reading) renders cleanly too
            if title not in ("Home", "Cohort", "Launch", "Results", "Saliency", "Predict"):
                _open(page, f"{url}/{URLS[title]}")
                assert not _check_clean(page, title.lower())
        _open(page, f"{url}/{URLS['Predict']}")
        assert not _check_clean(page, "predict")
        assert dialogs == [], dialogs
    finally:
        ctx.close()
