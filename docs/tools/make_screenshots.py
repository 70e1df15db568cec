"""Regenerate the README screenshots (docs/img/results.png, docs/img/saliency.png) from a finished run.

    python docs/tools/make_screenshots.py --runs-dir RUNS [--run demo] [--out docs/img]

RUNS is a folder of run folders (the dashboard's NHB_RUNS_DIR); the named run is selected on the
Results and Saliency pages in Debian's headless Chromium (Playwright), and a 1400 x 1000 view of
each page is written. Look at the pictures before committing them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", type=Path, required=True)
    ap.add_argument("--run", default="demo")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    a = ap.parse_args()
    if not (a.runs_dir / a.run / "metrics.json").is_file():
        sys.exit(f"{a.runs_dir / a.run}: no metrics.json (not a finished run). Point --runs-dir/--run at one")

    from nhb_dashboard import nav
    from nhb_dashboard.serve import chromium, dashboard_server, wait_until_drawn

    urls = {p.title: p.url_path for p in nav.page_specs()}
    with tempfile.TemporaryDirectory() as tmp, chromium() as browser:
        env = {"NHB_RUNS_DIR": str(a.runs_dir.resolve()), "NHB_DATA_DIR": tmp}
        with dashboard_server(env, Path(tmp) / "streamlit.log") as url:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(url + "/")  # the app once (as a user arrives), then each page
            page.wait_for_selector("h1", timeout=240_000)
            page.wait_for_timeout(3000)
            for title, fname in (("Results", "results.png"), ("Saliency", "saliency.png")):
                page.goto(f"{url}/{urls[title]}?run={a.run}")
                wait_until_drawn(page)
                # the declared navigation (Home first, no entry script named "app") before the picture
                page.wait_for_function("""() => { const n = document.querySelector('[data-testid="stSidebarNav"]');
                                                  return n && n.innerText.includes('Home')
                                                         && !n.innerText.split(/\\s+/).includes('app'); }""",
                                       timeout=240_000)
                page.wait_for_timeout(2500)
                a.out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(a.out / fname))
                print(a.out / fname)


if __name__ == "__main__":
    main()
