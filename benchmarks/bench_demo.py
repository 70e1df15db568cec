"""Benchmark: the demo study (paper preset, default config) end to end.

Target: after installation the demo completes in under 15 minutes on 2 CPU cores.

    python benchmarks/bench_demo.py [--out DIR] [--cores 2] [--preset paper] [--cohort DIR] [--keep]

``--cores N`` pins this process (and its workers) to N CPU cores (Linux sched_setaffinity) and sets
torch to N threads, so a bigger machine measures the 2-core figure. ``--cohort DIR`` reuses an
already synthesised cohort (its synthesis time is then not measured). Prints one JSON object:
total seconds, synthesis seconds, per-stage seconds (from RUNDIR/stages.json), the dataset size,
CPU seconds (user + system, this process and its children: on a loaded machine wall time
overstates the cost, and CPU seconds / cores is the unloaded wall-time estimate), the subject-level
AUC per model and set, the machine's load average before and after, and whether the 15-minute
target was met.
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
from _machine import pin_cores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary folder, removed)")
    ap.add_argument("--cores", type=int, default=2, help="CPU cores to pin to (0 = no pinning)")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cohort", type=Path, default=None, help="reuse this synthesised cohort folder")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    ap.add_argument("--epochs", type=int, default=None,
                    help="override the epochs (for a quick extrapolation; then target_met is null)")
    args = ap.parse_args()

    pin_cores(args.cores)
    import torch

    from nhb_core.config import resolve_config
    from nhb_core.fileio import read_json
    from nhb_core.runs import auc_table
    from nhb_core.study import run_study, stage_seconds

    load_before = os.getloadavg()
    tmp = None
    out = args.out
    if out is None:
        tmp = Path(tempfile.mkdtemp(prefix="nhb_bench_demo_"))
        out = tmp / "demo"
    out = out.resolve()
    t0 = time.monotonic()
    synth_s = None
    if args.cohort is not None:
        manifest = args.cohort.resolve() / "manifest.csv"
    else:
        from nhb_core.synth import synthesize

        manifest = Path(synthesize(out / "cohort", preset=args.preset, seed=args.seed))
        synth_s = time.monotonic() - t0
    t1 = time.monotonic()
    c1 = _cpu()
    run_study(manifest, out, None, overrides={"seed": args.seed, "name": f"demo ({args.preset} preset)",
                                              "epochs": args.epochs})
    study_cpu = _cpu() - c1
    study_s = time.monotonic() - t1
    total = time.monotonic() - t0
    m = read_json(out / "metrics.json")
    flow = m["cohort"]["flow"]
    cfg = resolve_config(None)
    result = {
        "benchmark": "demo",
        "preset": args.preset,
        "cores": args.cores or os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "config": {"models": cfg["models"], "size": cfg["prepare"]["size"], "epochs": cfg["train"]["epochs"]},
        "n_subjects": flow["dataset"]["subjects"],
        "n_slices": flow["dataset"]["slices"],
        "synth_s": None if synth_s is None else round(synth_s, 1),
        "study_s": round(study_s, 1),
        "total_s": round(total, 1),
        "study_cpu_s": round(study_cpu, 1),
        "stages_s": {k: round(v, 1) for k, v in stage_seconds(out).items()},
        "stages_cpu_s": {k: round(v, 1) for k, v in stage_seconds(out, cpu=True).items()},
        "auc_subject": {f"{r['model']}|{r['set']}": None if r["auc"] is None else round(r["auc"], 3)
                        for r in auc_table(out)},
        "target_s": 900,
        "epochs_override": args.epochs,
        "target_met": (total < 900) if synth_s is not None and args.epochs is None else None,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
    }
    print(json.dumps(result))
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
