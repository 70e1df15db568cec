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
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from nhb_dashboard import nav

REPO = Path(__file__).resolve().parents[1]
# every page as app.py's st.navigation declares them (None: the default page, Home)
PAGES = {p.title.lower(): (None if p.default else p.path) for p in nav.page_specs()}
TARGET_S = 2.0


def _ensure_run(runs: Path) -> tuple[Path, str]:
    from nhb_dashboard import data as dd

    done = dd.finished_runs(runs)
    if done:
        r = next((x for x in done if x.name == "demo"), done[0])
        preset = "paper" if (dd.load_metrics(r) or {}).get("cohort", {}).get("flow", {}).get("dataset", {}).get(
            "subjects", 0) >= 200 else "small"
        return r, preset
    from nhb_core.study import run_study
    from nhb_core.synth import synthesize

    data = Path(tempfile.mkdtemp(prefix="nhb-bench-"))
    manifest = synthesize(data / "cohort", preset="small", seed=0)
    cfg = {"models": ["resnet18", "densenet121", "efficientnet_b0"], "prepare": {"size": 32},
           "train": {"epochs": 2, "batch_size": 16}, "saliency": {"n_cases": 2}, "seed": 0}
    return run_study(manifest, runs / "bench-small", cfg), "small"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=os.environ.get("NHB_RUNS_DIR", "runs"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    os.environ["NHB_RUNS_DIR"] = str(runs)
    run, preset = _ensure_run(runs)

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
