"""The Reading page in a real browser: `streamlit run app.py` on a free port, headless Chromium
(Playwright, Debian's chromium). Two readers read at the same time in separate browser contexts
(their clicks interleaved on one server), one reloads mid-session, the server restarts, both
finish every case (20); the
written readings are exactly what was clicked, and neither the page source nor the websocket
frames a reader receives hold a subject id, the run, the other reader or a model output.
Skips where chromium or Playwright is missing (`make browser` installs chromium)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser_util import DashboardServer, chromium
from reading_run import build_reading_run

from nhb_core import reading as R

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_reading")
    run = build_reading_run(root, n_per_class=10)  # 20 subjects, all in the test set
    # restartable on the same port (the test restarts the server mid-session)
    srv = DashboardServer({"NHB_RUNS_DIR": str(run.parent), "NHB_DATA_DIR": str(root / "data"),
                           "OMP_NUM_THREADS": "1"}, root / "streamlit.log")
    srv.start()
    try:
        yield srv, run.parent, run
    finally:
        srv.stop()


class Reader:
    """One reader's browser context: the page, every websocket frame it received, its clicks."""

    def __init__(self, browser, url: str, token: str, name: str):
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 1400})
        self.page = self.ctx.new_page()
        self.frames: list[bytes] = []
        self.sources: list[str] = []
        self.clicks: dict[str, int] = {}
        self.times: list[float] = []
        self.times_text: list[float] = []
        self.name = name
        self.page.on("websocket", lambda ws: ws.on("framereceived", self._frame))
        self.url = f"{url}/Reading?token={token}"

    def _frame(self, payload) -> None:
        self.frames.append(payload if isinstance(payload, bytes) else str(payload).encode("utf-8", "replace"))

    def _settle(self, timeout_ms: int = 120_000) -> None:
        self.page.wait_for_selector('[data-test-script-state="notRunning"]', timeout=timeout_ms)
        # a case is on screen with both images decoded, or the reader is done
        self.page.wait_for_function("""() => {
            if (document.body.innerText.includes('All your cases are read')) return true;
            const h = document.querySelector('h3');
            const imgs = Array.from(document.querySelectorAll('[data-testid="stImage"] img'));
            return !!h && imgs.length >= 2 && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
                                    timeout=timeout_ms)

    def open(self) -> None:
        self.page.goto(self.url)
        self.page.wait_for_selector("h1", timeout=240_000)
        self.page.wait_for_function("""() => document.querySelector('h3') ||
                                       document.body.innerText.includes('All your cases are read')""", timeout=240_000)
        self._settle()
        self.sources.append(self.page.content())

    def code(self) -> str | None:
        h = self.page.locator("h3")
        if h.count() == 0:
            return None
        t = h.first.inner_text().strip()
        return t[len("Case "):] if t.startswith("Case ") else None

    def answer(self, rating: int) -> str:
        code = self.code()
        assert code, "no case shown"
        self.page.get_by_text(R.RATING_LABELS[rating], exact=True).click()
        t0 = time.perf_counter()
        self.page.get_by_role("button", name="Save and next case").click()
        self.page.wait_for_function(
            """(c) => { const h = document.querySelector('h3');
                        return (h && h.innerText.trim() !== 'Case ' + c) ||
                               document.body.innerText.includes('All your cases are read'); }""",
            arg=code, timeout=60_000)
        self.times_text.append(time.perf_counter() - t0)  # the next case's code on screen
        self._settle()
        self.times.append(time.perf_counter() - t0)  # ... and both its images decoded
        self.clicks[code] = rating
        self.sources.append(self.page.content())
        return code

    def imgs_ok(self) -> int:
        return self.page.evaluate("""() => Array.from(document.querySelectorAll('[data-testid="stImage"] img'))
                                     .filter(i => i.complete && i.naturalWidth > 0).length""")


def test_two_readers_concurrently_with_reload_and_restart(browser, server):
    srv, runs, run = server
    url = srv.url
    sdir = R.create_session(runs, run, ["Dr Ann Example", "Dr Bob Sample"], seed=7)
    sess = R.load_session(sdir)
    n = sess["n_cases"]
    assert n == 20
    ann_r, bob_r = sess["readers"]
    ann = Reader(browser, url, ann_r["token"], ann_r["name"])
    bob = Reader(browser, url, bob_r["token"], bob_r["name"])
    rng = np.random.default_rng(0)
    try:
        ann.open()
        bob.open()
        assert ann.imgs_ok() >= 2 and bob.imgs_ok() >= 2
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        ann.page.screenshot(path=str(ARTIFACTS / "reading_case.png"), full_page=True)
        assert ann.code() == ann_r["order"]["unaided"][0] and bob.code() == bob_r["order"]["unaided"][0]
        for i in range(n):
            for rd in (ann, bob):
                rd.answer(int(rng.integers(1, 6)))
            if i == 5:  # Ann reloads mid-session: she continues where she was, nothing lost
                ann.page.reload()
                ann.open()
                assert ann.code() == ann_r["order"]["unaided"][6]
                assert f"6 of {n} readings done" in ann.page.inner_text("body")
            if i == 11:  # the server restarts: both continue from the files
                srv.stop()
                srv.start()
                for rd, r in ((ann, ann_r), (bob, bob_r)):
                    rd.open()
                    assert rd.code() == r["order"]["unaided"][12]
                    assert f"12 of {n} readings done" in rd.page.inner_text("body")
        for rd in (ann, bob):
            assert "All your cases are read" in rd.page.inner_text("body")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            rd.page.screenshot(path=str(ARTIFACTS / f"reading_{rd.name.split()[1].lower()}.png"), full_page=True)
        # the answers on disk are exactly the clicks, in each reader's order
        assert list(ann.clicks) == ann_r["order"]["unaided"] and list(bob.clicks) == bob_r["order"]["unaided"]
        res = R.close_session(sdir)
        assert res["complete"] and res["n_rows"] == 2 * n
        by_code = {c["code"]: c for c in sess["cases"]}
        for rd, rid in ((ann, "r1"), (bob, "r2")):
            df = pd.read_csv(sdir / "readings" / f"{rid}__unaided.csv", dtype={"code": str, "case_id": str})
            assert dict(zip(df["code"], df["rating"])) == rd.clicks
            assert all(df["case_id"][k] == by_code[c]["subject_id"] for k, c in enumerate(df["code"]))
            assert (df["seconds"] > 0).all()
        long = pd.read_csv(sdir / "readings.csv", dtype={"case_id": str})
        assert list(long.columns) == ["reader", "modality", "case_id", "truth", "rating"] and len(long) == 2 * n
        # nothing identifying reached either browser: page source and websocket frames
        subjects = [c["subject_id"] for c in sess["cases"]]
        for rd, other in ((ann, bob), (bob, ann)):
            assert len(rd.frames) > 2 * n
            blob = b"\n".join(rd.frames)
            html = "\n".join(rd.sources)
            for s in subjects + [other.name, str(run), run.name + "/", "resnet18", sess["id"], "truth", "nbna"]:
                assert s.encode() not in blob, (rd.name, "websocket", s)
                assert s not in html, (rd.name, "page source", s)
            assert rd.name.encode() in blob  # (the check does see the frames' text)
        tt, ti = ann.times_text + bob.times_text, ann.times + bob.times
        print(f"\nclick (save + next case shown) in chromium, {len(ti)} clicks: next code on screen median "
              f"{np.median(tt):.3f} s (max {np.max(tt):.3f}); with both images decoded median {np.median(ti):.3f} s "
              f"(max {np.max(ti):.3f}); load average {os.getloadavg()[0]:.1f}")
    finally:
        ann.ctx.close()
        bob.ctx.close()
