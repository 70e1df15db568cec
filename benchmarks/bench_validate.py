"""Benchmark: validating the synthetic 'paper' cohort (277 subjects), every T1 and ROI loaded.

Usage: python benchmarks/bench_validate.py [COHORT_DIR]
(without COHORT_DIR a paper-preset cohort is synthesised into a temporary folder first).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("cohort", nargs="?", type=Path, default=None,
                    help="cohort folder with manifest.csv (default: synthesise the paper preset)")
    args = ap.parse_args()
    if args.cohort is not None and not (args.cohort / "manifest.csv").is_file():
        ap.error(f"{args.cohort}: no manifest.csv; give a folder written by python -m nhb_core synth")
    from nhb_core.manifest import validate_manifest

    with tempfile.TemporaryDirectory() as tmp:
        if args.cohort is not None:
            manifest = args.cohort / "manifest.csv"
            synth_s = None
        else:
            from nhb_core.synth import synthesize

            t0 = time.perf_counter()
            manifest = Path(synthesize(Path(tmp) / "paper", preset="paper", seed=0))
            synth_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = validate_manifest(manifest, check_images=False)
        parse_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        rep = validate_manifest(manifest, check_images=True)
        full_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        validate_manifest(manifest, check_images=True, workers=1)
        seq_s = time.perf_counter() - t0
        n = len(rep.manifest) if rep.manifest is not None else 0
        print(json.dumps({
            "benchmark": "validate_manifest", "subjects": n, "ok": rep.ok,
            "seconds_no_images": round(parse_s, 3), "seconds_with_images": round(full_s, 3),
            "cpu_seconds_with_images": round(cpu_s, 3), "seconds_with_images_1_thread": round(seq_s, 3),
            "ms_per_subject": round(1000 * full_s / max(n, 1), 2), "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "synth_seconds": None if synth_s is None else round(synth_s, 1),
        }))


if __name__ == "__main__":
    main()
