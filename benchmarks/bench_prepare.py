"""Benchmark of ``prepare`` on the synthetic paper preset; prints one JSON object.

Targets (issue 5): the paper preset prepared in under 60 s on 2 cores, and a cold
prepare taking at most 1.5x the time it takes to merely read the same NIfTI files
(``nibabel.load`` + ``get_fdata`` of every T1 and ROI, one process).

Usage::

    python benchmarks/bench_prepare.py [--preset paper] [--workers 2] [--size 64] [--cohort DIR]

``--cohort DIR`` reuses a synthesized cohort (its manifest.csv); otherwise one is
synthesized into a temporary folder first (not timed). Reported times are wall
clock seconds: ``read_s`` (reference read), ``prepare_cold_s`` (empty cache),
``prepare_warm_s`` (unchanged rerun), ``prepare_one_changed_s`` (one T1 rewritten),
and ``ratio_cold_to_read``; ``*_cpu_s`` are CPU seconds (all processes), which stay
meaningful on a machine shared with other jobs (``load_avg_1min_at_start``): on an
idle 2-core machine the cold wall time is about ``prepare_cold_cpu_s / 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_seconds as _cpu


def _read_all(manifest: Path) -> tuple[float, float, int]:
    import nibabel as nib

    from nhb_core.manifest import load_manifest

    df = load_manifest(manifest).df
    t0, c0 = time.perf_counter(), _cpu()
    nbytes = 0
    for t1, roi in zip(df["t1_path"], df["roi_path"]):
        for p in (t1, roi):
            a = nib.load(p).get_fdata()
            nbytes += a.nbytes
    return time.perf_counter() - t0, _cpu() - c0, nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--cohort", type=Path, default=None, help="folder holding a synthesized manifest.csv")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)

    from nhb_core.fileio import read_json
    from nhb_core.slices import PrepareConfig, prepare

    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        if args.cohort:
            manifest = args.cohort / "manifest.csv"
            synth_s = None
        else:
            from nhb_core.synth import synthesize

            t0 = time.perf_counter()
            manifest = Path(synthesize(tmp / "cohort", preset=args.preset, seed=args.seed))
            synth_s = time.perf_counter() - t0
        cfg = PrepareConfig(size=args.size)
        # warm the OS file cache the same way for both measurements: read once untimed
        _read_all(manifest)
        read_s, read_cpu, nbytes = _read_all(manifest)
        out = tmp / "ds"
        load1 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), _cpu()
        prepare(manifest, out, cfg, workers=args.workers)
        cold = time.perf_counter() - t0
        cold_cpu = _cpu() - c0
        meta = read_json(out / "prepare.json")
        t0 = time.perf_counter()
        prepare(manifest, out, cfg, workers=args.workers)
        warm = time.perf_counter() - t0
        # rewrite one T1 (same voxels, new bytes) -> one subject recomputed
        import nibabel as nib
        import numpy as np

        from nhb_core.manifest import load_manifest

        p = load_manifest(manifest).df["t1_path"].iloc[0]
        img = nib.load(p)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine, img.header), p)
        t0 = time.perf_counter()
        prepare(manifest, out, cfg, workers=args.workers)
        one = time.perf_counter() - t0
        n_recomputed = read_json(out / "prepare.json")["n_computed"]
        result = {
            "benchmark": "prepare",
            "preset": args.preset,
            "n_subjects": meta["n_subjects"],
            "n_slices": meta["n_slices"],
            "size": args.size,
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "synthesize_s": None if synth_s is None else round(synth_s, 2),
            "read_bytes_float64": nbytes,
            "load_avg_1min_at_start": round(load1, 2),
            "read_s": round(read_s, 3),
            "read_cpu_s": round(read_cpu, 3),
            "prepare_cold_s": round(cold, 3),
            "prepare_cold_cpu_s": round(cold_cpu, 3),
            "prepare_warm_s": round(warm, 4),
            "prepare_one_changed_s": round(one, 3),
            "one_changed_recomputed": n_recomputed,
            "ratio_cold_to_read": round(cold / read_s, 3),
            "ratio_cold_cpu_to_read_cpu": round(cold_cpu / read_cpu, 3),
            "target_cold_under_60s": cold < 60,
            "target_ratio_at_most_1_5": cold <= 1.5 * read_s,
        }
        print(json.dumps(result))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
