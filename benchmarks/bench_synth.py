"""Benchmark: synthesise the paper preset (277 subjects, two centers) with 2 worker processes.
Prints one JSON object: wall seconds, bytes written, the load average, and the CPU seconds per
subject (render + write, measured in-process on a sample of subjects of both centers) with the
wall time that implies on 2 idle cores (a shared, loaded machine inflates the wall time).

Target: under 60 s on 2 cores.

    python benchmarks/bench_synth.py [--preset paper] [--workers 2] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="write the cohort here (kept) instead of a temporary folder")
    ap.add_argument("--sample", type=int, default=16, help="subjects timed in-process for the CPU cost")
    args = ap.parse_args()

    import pandas as pd

    from nhb_core.synth import _write_subject, draw_cohort, synthesize

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_synth_"))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    manifest = synthesize(out, preset=args.preset, seed=args.seed, workers=args.workers)
    wall = time.perf_counter() - t0
    cohort = json.loads((manifest.parent / "cohort.json").read_text())
    # CPU cost per subject, in this process (pool workers' CPU time is not visible from here)
    table = draw_cohort(args.preset, args.seed)
    pick = pd.concat([d.head(max(1, round(args.sample * len(d) / len(table))))
                      for _, d in table.groupby("center")])
    sample_dir = Path(tempfile.mkdtemp(prefix="bench_synth_cpu_"))
    t_cpu = time.process_time()
    for row in pick.to_dict("records"):
        _write_subject((str(sample_dir), row, args.seed, False))
    cpu_per_subject = (time.process_time() - t_cpu) / len(pick)
    shutil.rmtree(sample_dir, ignore_errors=True)
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {
        "benchmark": "synth",
        "preset": args.preset,
        "workers": args.workers,
        "n_subjects": cohort["n_subjects"],
        "seconds": round(wall, 2),
        "seconds_per_subject": round(wall / cohort["n_subjects"], 4),
        "cpu_seconds_per_subject": round(cpu_per_subject, 4),
        "cpu_sample_subjects": int(len(pick)),
        "projected_seconds_2_idle_cores": round(cpu_per_subject * cohort["n_subjects"] / 2, 1),
        "target_seconds": 60,
        "meets_target": wall < 60,
        "megabytes": round(nbytes / 1e6, 1),
        "oracle_auc": cohort["oracle_auc"],
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
