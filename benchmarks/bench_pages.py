"""Per-page render time of the dashboard (cold and warm), printed as one JSON object.

Usage::

    .venv/bin/python benchmarks/bench_pages.py [--runs RUNS_DIR] [--run NAME] [--repeat 3]

Renders every page with ``streamlit.testing.v1.AppTest`` (the script's own work:
reading files, statistics tables, figures, saliency; not the browser's drawing)
against the newest finished run in ``RUNS_DIR`` (default ``$NHB_RUNS_DIR`` or
``./runs``; ``make demo`` makes the paper-size synthetic run ``runs/demo``).
``cold`` is the first render in a fresh process (caches empty, saliency maps
possibly computed; pages run in the order listed, so Predict finds the models
that Saliency loaded), ``warm`` the best of ``--repeat`` renders after it. Target:
every page warm < 2 s on the paper-size run.

When the folder has no finished run, a tiny study on the small synthetic cohort
is run first (``"preset": "small"`` in the output) so that the script always
measures something.

``--browser`` measures what a user waits for instead: ``streamlit run app.py`` on a
free port and headless Chromium (Playwright, ``/usr/bin/chromium`` or ``$CHROMIUM``),
the app loaded once with ``?run=NAME``, then each page opened from the sidebar; a
page has *settled* when its script has run and stopped and every chart and image is
drawn. ``cold`` is the first visit, ``warm`` the best of ``--repeat`` visits after
going elsewhere; ``home.first_load_s`` is the first load of the app (JavaScript
bundle included). The pages are those of ``nhb_dashboard.nav``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from nhb_dashboard import nav
from nhb_dashboard.serve import PLOTS_DRAWN

REPO = Path(__file__).resolve().parents[1]
# every page as app.py's st.navigation declares them (None: the default page, Home)
PAGES = {p.title.lower(): (None if p.default else p.path) for p in nav.page_specs()}
TARGET_S = 2.0


def _ensure_run(runs: Path) -> tuple[Path, str]:
    from nhb_core.runs import RunFolder
    from nhb_dashboard import data as dd

    done = dd.finished_runs(runs)
    if done:
        r = next((x for x in done if x.name == "demo"), done[0])
        preset = "paper" if (RunFolder(r).metrics() or {}).get("cohort", {}).get("flow", {}).get("dataset", {}).get(
            "subjects", 0) >= 200 else "small"
        return r, preset
    from nhb_core.study import run_study
    from nhb_core.synth import synthesize

    data = Path(tempfile.mkdtemp(prefix="nhb-bench-"))
    manifest = synthesize(data / "cohort", preset="small", seed=0)
    cfg = {"models": ["resnet18", "densenet121", "efficientnet_b0"], "prepare": {"size": 32},
           "train": {"epochs": 2, "batch_size": 16}, "saliency": {"n_cases": 2}, "seed": 0}
    return run_study(manifest, runs / "bench-small", cfg), "small"


# every change of the app's script state, with its time (installed before the app's own scripts)
_OBSERVER = """window.__states = [];
new MutationObserver(() => {
  const e = document.querySelector('[data-test-script-state]');
  const s = e ? e.getAttribute('data-test-script-state') : null;
  const last = window.__states[window.__states.length - 1];
  if (!last || last[1] !== s) window.__states.push([performance.now(), s]);
}).observe(document, {subtree: true, childList: true, attributes: true, attributeFilter: ['data-test-script-state']});"""

# settled: the script ran after t0 and has stopped, every chart is drawn, every image decoded
_SETTLED = f"""(t0) => window.__states.some(([t, s]) => t >= t0 && s === 'running')
    && document.querySelector('[data-test-script-state="notRunning"]') !== null
    && {PLOTS_DRAWN}
    && Array.from(document.querySelectorAll('[data-testid="stImage"] img')).every(i => i.complete)"""


def _browser(runs: Path, run: Path, repeat: int) -> dict:
    """Per page: seconds from a click on its sidebar link until it has settled in headless Chromium
    (the app loaded once, as a user moves between pages)."""
    from nhb_dashboard.serve import chromium, dashboard_server

    pages: dict = {}
    specs = nav.page_specs()
    with dashboard_server({}, runs / ".bench_pages_streamlit.log", timeout_s=240) as base, chromium() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script(_OBSERVER)
        t0 = page.evaluate("performance.now()")
        page.goto(f"{base}/?run={run.name}")
        page.wait_for_function(_SETTLED, arg=t0, timeout=600_000, polling=50)
        load_s = (page.evaluate("performance.now()") - t0) / 1000

        def visit(spec) -> float:
            t0 = page.evaluate("performance.now()")
            page.locator('[data-testid="stSidebarNav"] a', has_text=spec.title).first.click()
            page.wait_for_function(_SETTLED, arg=t0, timeout=600_000, polling=50)
            return (page.evaluate("performance.now()") - t0) / 1000

        order = specs[1:] + specs[:1]  # Home last: it was loaded first
        for spec in order:
            times = [visit(spec)]
            for _ in range(max(1, repeat)):
                visit(specs[0] if spec is not specs[0] else specs[1])
                times.append(visit(spec))
            errors = page.locator('[data-testid="stException"]').all_inner_texts()
            pages[spec.title.lower()] = {"cold_s": round(times[0], 3), "warm_s": round(min(times[1:]), 3),
                                         "ok": not errors and min(times[1:]) < TARGET_S, "errors": errors[:3]}
            print(spec.title, pages[spec.title.lower()], file=sys.stderr, flush=True)
        pages["home"]["first_load_s"] = round(load_s, 3)
    return {k: pages[k] for k in [s.title.lower() for s in specs] if k in pages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--runs", default=os.environ.get("NHB_RUNS_DIR", "runs"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--browser", action="store_true", help="time the pages in headless Chromium")
    args = ap.parse_args()
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    os.environ["NHB_RUNS_DIR"] = str(runs)
    run, preset = _ensure_run(runs)
    if args.browser:
        pages = _browser(runs, run, args.repeat)
        print(json.dumps({"benchmark": "dashboard_pages_browser", "run": run.name, "preset": preset,
                          "target_warm_s": TARGET_S, "pages": pages,
                          "all_warm_under_target": all(p["ok"] for p in pages.values())}))
        return

    from streamlit.testing.v1 import AppTest

    out: dict = {"benchmark": "dashboard_pages", "run": run.name, "preset": preset, "target_warm_s": TARGET_S,
                 "pages": {}}
    for name, path in PAGES.items():
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=900)
        at.query_params["run"] = run.name
        if path:
            at.run()
            at.switch_page(path)
        t0 = time.perf_counter()
        at.run()
        cold = time.perf_counter() - t0
        if name == "cohort":  # the run's own manifest (the synthetic default may not exist here)
            sb = at.selectbox(key="cohort_manifest")
            pick = [o for o in sb.options if o.endswith(f"run {run.name}")]
            if pick and sb.value != pick[0]:
                t0 = time.perf_counter()
                sb.select(pick[0]).run()
                cold += time.perf_counter() - t0
        warm = []
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - t0)
        errors = [e.value for e in at.exception] + [e.value for e in at.error]
        out["pages"][name] = {"cold_s": round(cold, 3), "warm_s": round(min(warm), 3),
                              "ok": not errors and min(warm) < TARGET_S, "errors": errors[:3]}
    out["all_warm_under_target"] = all(p["ok"] for p in out["pages"].values())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
