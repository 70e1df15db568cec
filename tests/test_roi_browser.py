"""The "ROIs" page in headless Chromium: paint a known square through the canvas
(streamlit-drawable-canvas, rectangle tool), apply, accept; the saved NIfTI holds exactly
those voxels on the T1's grid, the original mask and the other files are unchanged, and a
reload shows the subject as corrected."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from browser_util import chromium, streamlit_server
from test_roi_page import _hashes, roi_out  # noqa: F401 - the shared fixture

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    import importlib.util

    if importlib.util.find_spec("streamlit_drawable_canvas") is None:  # importing it needs a streamlit runtime
        pytest.skip("streamlit-drawable-canvas is not installed")
    with chromium() as b:
        yield b


@pytest.fixture
def server(roi_out, tmp_path):  # noqa: F811 - the imported fixture, by name
    roi_dir = roi_out.parent / f"{roi_out.name}_browser"
    shutil.copytree(roi_out, roi_dir, dirs_exist_ok=True)
    env = {"NHB_RUNS_DIR": str(tmp_path / "runs"), "NHB_DATA_DIR": str(tmp_path / "data"),
           "NHB_ROI_DIR": str(roi_dir), "NHB_POLL_S": "2"}
    with streamlit_server(env, tmp_path / "streamlit.log") as url:
        yield url, roi_dir


def _idle(page, timeout_ms: int = 180_000) -> None:
    page.wait_for_timeout(400)
    page.wait_for_selector('[data-test-script-state="notRunning"]', timeout=timeout_ms)
    page.wait_for_timeout(600)


def test_paint_square_through_the_canvas(browser, server):
    from nhb_core.roi_edit import CANVAS_SCALE, load_case

    url, roi_dir = server
    before = _hashes(roi_dir)
    ctx = browser.new_context(viewport={"width": 1500, "height": 2400})
    page = ctx.new_page()
    try:
        page.goto(url + "/ROIs")
        page.wait_for_selector("h1", timeout=240_000)
        _idle(page)
        body = page.inner_text("body")
        m = re.search(r"(\S+): source (\w+);", body)
        assert m, body[-2000:]
        sid = m.group(1)
        case = load_case(roi_dir, sid)
        z = case["slices"][len(case["slices"]) // 2]
        page.get_by_text("paint right GP (2)", exact=True).click()
        _idle(page)
        page.get_by_text("rectangle", exact=True).click()
        _idle(page)
        canvas = page.locator("canvas.upper-canvas").first
        canvas.wait_for(timeout=60_000)
        box = canvas.bounding_box()
        x0, x1, y0, y1 = case["box"]
        w, h = x1 - x0, y1 - y0
        s = box["width"] / (w * CANVAS_SCALE)
        page.mouse.move(box["x"] + 60 * s, box["y"] + 60 * s)
        page.mouse.down()
        for k in range(1, 11):
            page.mouse.move(box["x"] + (60 + 3 * k) * s, box["y"] + (60 + 3 * k) * s)
        page.mouse.up()
        _idle(page)
        page.get_by_role("button", name="Apply brush strokes").click()
        _idle(page)
        page.get_by_role("button", name="Accept and save").click()
        _idle(page)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "rois_saved.png"), full_page=True)
        assert "marked corrected" in page.inner_text("body")
        saved = roi_dir / "corrected" / f"{sid}_roi_corrected.nii.gz"
        img = nib.load(str(saved))
        expect = case["mask"].copy()
        for r in range(10, 15):  # canvas px 60..90 = display pixels 10..14 (6 canvas px per pixel)
            for c in range(10, 15):
                expect[x0 + w - 1 - c, y0 + h - 1 - r, z] = 2
        np.testing.assert_array_equal(np.asarray(img.dataobj), expect)
        np.testing.assert_array_equal(img.affine, nib.load(case["t1_path"]).affine)
        assert {k: v for k, v in _hashes(roi_dir).items() if not k.startswith("corrected/")} == before
        # a reload keeps what was saved
        page.reload()
        page.wait_for_selector("h1", timeout=240_000)
        _idle(page)
        assert f"{sid}: source corrected;" in page.inner_text("body")
    finally:
        ctx.close()
