"""Single-subject prediction speed: three models, Grad-CAM and PNGs, on 2 CPU threads.

Target (issue 9): under 3 s per subject with three models on 2 CPU cores. Builds a run with the
paper's three architectures (seeded random weights: speed does not depend on training) on a
synthetic cohort at the default 64 px, then times ``predict_case`` per subject: the first call
(model loading included) and warm calls (models kept in memory, as in the dashboard or a batch).

Prints one JSON object. ``--size`` and ``--subjects`` change the setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=64, help="crop size in px (default 64, the study default)")
    ap.add_argument("--subjects", type=int, default=4, help="subjects timed (default 4)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in predict_case (default 1, as the CLI; try 2 to compare)")
    ap.add_argument("--no-cam", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    from nhb_core import predict as P
    from nhb_core.fileio import atomic_write_json
    from nhb_core.models import create_model, save_weights
    from nhb_core.runs import RunFolder
    from nhb_core.slices import PrepareConfig
    from nhb_core.synth import synthesize

    models = ["resnet18", "densenet121", "efficientnet_b0"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = max(2, args.subjects)
        manifest = synthesize(tmp / "cohort", preset="small", seed=0, n={"A": (n - n // 2, n // 2)}, workers=1)
        man = pd.read_csv(manifest, dtype={"subject_id": str})
        run = tmp / "run"
        cfg = PrepareConfig(size=args.size)
        for k, name in enumerate(models):
            torch.manual_seed(k)
            mdir = RunFolder(run).model_dir(name)
            save_weights(create_model(name, in_chans=1), mdir / "model.safetensors")
            atomic_write_json(mdir / "model.json", {"architecture": name, "timm_name": name, "in_chans": 1,
                                                    "input_size": [args.size, args.size],
                                                    "preprocessing": cfg.to_dict(), "threshold": 0.5})
        P._MODEL_CACHE.clear()
        times = []
        cpu = []
        n_slices = []
        for i, row in man.head(args.subjects).iterrows():
            t0 = time.perf_counter()
            c0 = time.process_time()
            res = P.predict_case(run, tmp / "cohort" / row["t1"], tmp / "cohort" / row["roi"],
                                 out_dir=tmp / "out" / str(i), with_cam=not args.no_cam, threads=args.threads)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            n_slices.append(len(res["slices"]))
        warm = times[1:] or times
        warm_cpu = cpu[1:] or cpu
        out = {
            "benchmark": "predict_case",
            "models": models,
            "size_px": args.size,
            "threads": args.threads,
            "with_cam": not args.no_cam,
            "subjects": len(times),
            "slices_per_subject": n_slices,
            "first_call_s": round(times[0], 3),
            "warm_mean_s": round(float(np.mean(warm)), 3),
            "warm_max_s": round(float(np.max(warm)), 3),
            "first_call_cpu_s": round(cpu[0], 3),
            "warm_mean_cpu_s": round(float(np.mean(warm_cpu)), 3),
            "target_s": 3.0,
            "meets_target_warm": bool(np.max(warm) < 3.0),
            "meets_target_cold": bool(times[0] < 3.0),
            "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
