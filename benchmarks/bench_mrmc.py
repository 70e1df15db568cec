"""Benchmark: Obuchowski-Rockette MRMC (nhb_core.stats.mrmc) on 10 readers x 2 arms x 1000 cases
(5-point ratings, so many ties), both covariance methods, from the long-format CSV (read, checked,
analysed: what ``python -m nhb_core mrmc`` does) and from the rating array alone. Prints one JSON object.

Target: the whole analysis from the CSV in under 2 s on 2 cores.

    python benchmarks/bench_mrmc.py [--readers 10] [--arms 2] [--cases 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from _machine import best_of


def make_readings(readers: int, arms: int, cases: int, seed: int = 0):
    """Ratings 1-5 from a shared case signal, each reader's own noise and criteria, arm effect 0.3."""
    rng = np.random.default_rng(seed)
    y = (np.arange(cases) < int(0.4 * cases)).astype(int)
    signal = 1.2 * y + rng.normal(size=cases)
    R = np.empty((arms, readers, cases))
    for i in range(arms):
        for j in range(readers):
            cut = np.sort(rng.normal(size=4)) + 0.6
            R[i, j] = np.digitize(signal + 0.3 * i * y + rng.normal(scale=0.8, size=cases), cut) + 1
    return R, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--readers", type=int, default=10)
    ap.add_argument("--arms", type=int, default=2)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import pandas as pd

    from nhb_core import stats

    R, y = make_readings(args.readers, args.arms, args.cases)
    t, r, n = R.shape
    ii, jj, kk = np.meshgrid(np.arange(t), np.arange(r), np.arange(n), indexing="ij")
    df = pd.DataFrame({"reader": (jj.ravel() + 1), "modality": (ii.ravel() + 1), "case_id": kk.ravel() + 1,
                       "truth": y[kk.ravel()], "rating": R.ravel().astype(int)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "readings.csv"
        df.to_csv(path, index=False)
        stats.mrmc(path)  # warm-up (imports)
        t_csv = {cov: best_of(lambda cov=cov: stats.mrmc(path, cov=cov), args.repeats) for cov in ("jackknife", "delong")}
    t_arr = {cov: best_of(lambda cov=cov: stats.mrmc_arrays(R, y, cov=cov), args.repeats) for cov in ("jackknife", "delong")}
    res = stats.mrmc_arrays(R, y)
    worst = max(t_csv.values())
    print(json.dumps({
        "benchmark": "MRMC Obuchowski-Rockette (Hillis ddf), RRRC + FRRC + RRFC",
        "readers": r, "arms": t, "cases": n, "rows": int(df.shape[0]),
        "csv_seconds": {k: round(v, 4) for k, v in t_csv.items()},
        "array_seconds": {k: round(v, 5) for k, v in t_arr.items()},
        "target_seconds": 2.0,
        "meets_target": bool(worst < 2.0),
        "rrrc_F": res["RRRC"]["F"], "rrrc_df2": res["RRRC"]["df2"], "rrrc_p": res["RRRC"]["p"],
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }))


if __name__ == "__main__":
    main()
