"""Benchmark: synthesise the paper preset (277 subjects, two centers) with 2 worker processes.
Prints one JSON object (wall seconds, CPU seconds of the workers, bytes written, load average).

Target: under 60 s on 2 cores.

    python benchmarks/bench_synth.py [--preset paper] [--workers 2] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
    args = ap.parse_args()

    from nhb_core.synth import synthesize

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_synth_"))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    manifest = synthesize(out, preset=args.preset, seed=args.seed, workers=args.workers)
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    cohort = json.loads((manifest.parent / "cohort.json").read_text())
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {
        "benchmark": "synth",
        "preset": args.preset,
        "workers": args.workers,
        "n_subjects": cohort["n_subjects"],
        "seconds": round(wall, 2),
        "seconds_per_subject": round(wall / cohort["n_subjects"], 4),
        "cpu_seconds": round(children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime, 2),
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
