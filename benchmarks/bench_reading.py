"""Reading page: time of one reader's click (save the answer + the next case shown), printed as
one JSON object.

Usage::

    .venv/bin/python benchmarks/bench_reading.py [--run RUN_DIR] [--set test] [--cases 20]

Creates a reading session (unaided, one reader) on ``--run`` (a finished run; default: a
synthetic 20-subject run built in a temporary folder, no training), opens the reader's link in
``streamlit.testing.v1.AppTest`` (the page script's own work: the save under the file lock, reading
the worklist, the two PNGs of the next case rendered server-side; not the browser's drawing), and
clicks through every case with a rating after ``--think`` seconds (the reader looking at the case;
meanwhile the page pre-renders the next case in a background thread; ``--think 0`` measures a click
that finds nothing ready: the next case's T1 volume read from disk and both PNGs rendered). ``cold``
is the first render in the process; ``click_*`` the clicks after it. Also the library alone: ``save_answer`` and rendering.
Target: a click under 1 s warm on 2 cores. The browser test prints the same figure in chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
TARGET_S = 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="a finished run folder (default: a synthetic one)")
    ap.add_argument("--set", default="test")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--think", type=float, default=1.0, help="seconds the reader looks at a case before clicking "
                    "(the next case is pre-rendered meanwhile); 0 = click at once")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="nhb-bench-reading-"))
    t0 = time.perf_counter()
    if a.run:
        run = Path(a.run).resolve()
        runs = tmp / "runs"
    else:
        from reading_run import build_reading_run

        run = build_reading_run(tmp, n_per_class=(a.cases + 1) // 2)
        runs = run.parent
    build_s = time.perf_counter() - t0
    os.environ["NHB_RUNS_DIR"] = str(runs)

    from streamlit.testing.v1 import AppTest

    from nhb_core import reading as R

    sdir = R.create_session(runs, run, ["Bench Reader"], set_name=a.set, n_cases=a.cases, seed=0)
    sess = R.load_session(sdir)
    order = sess["readers"][0]["order"]["unaided"]
    at = AppTest.from_file(str(REPO / "dashboard_pages" / "6_Reading.py"), default_timeout=300)
    at.query_params["token"] = sess["readers"][0]["token"]
    t = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t
    assert not at.exception and not at.error, [e.value for e in list(at.exception) + list(at.error)]
    clicks = []
    for i, code in enumerate(order):
        assert at.subheader[0].value == f"Case {code}", at.subheader[0].value
        at.radio(key=f"rd_rating_{code}").set_value(1 + i % 5)
        at.button[0].click()
        time.sleep(a.think)
        t = time.perf_counter()
        at.run()
        clicks.append(time.perf_counter() - t)
        assert not at.exception and not at.error
    assert len(R.load_answers(sdir, "r1", "unaided")) == len(order)

    # the library alone, on a second session
    s2 = R.create_session(runs, run, ["Lib Reader"], set_name=a.set, n_cases=a.cases, seed=1)
    o2 = R.load_session(s2)["readers"][0]["order"]["unaided"]
    saves, renders = [], []
    for code in o2:
        t = time.perf_counter()
        R.save_answer(s2, "r1", code, 3)
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        R.render_slice_png(s2, code, 0, "full")
        R.render_slice_png(s2, code, 0, "crop")
        renders.append(time.perf_counter() - t)
    warm = clicks[1:] if len(clicks) > 1 else clicks
    q = statistics.quantiles(warm, n=10) if len(warm) >= 2 else warm
    out = {
        "run": "synthetic" if not a.run else str(run), "cases": len(order), "think_s": a.think, "cpus": os.cpu_count(),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "build_s": round(build_s, 2), "cold_s": round(cold, 3),
        "click_median_s": round(statistics.median(warm), 3), "click_p90_s": round(q[-1], 3),
        "click_max_s": round(max(warm), 3), "click_first_s": round(clicks[0], 3),
        "save_answer_median_s": round(statistics.median(saves), 4),
        "render_two_pngs_median_s": round(statistics.median(renders), 4),
        "target_s": TARGET_S, "ok": statistics.median(warm) < TARGET_S,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
