"""Benchmark: fast paired DeLong (Sun & Xu 2014, O(n log n)) on n = 1,000,000 cases, against a
straightforward pairwise-comparison DeLong (O(n_pos * n_neg) psi matrix, chunked numpy) on
n = 20,000, timed in the same run. Prints one JSON object.

Target: the fast paired DeLong on 1e6 cases in under 2 s on 2 cores.

    python benchmarks/bench_delong.py [--n 1000000] [--n-ref 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
from _machine import best_of
from scipy.special import ndtr


def naive_paired_delong(y: np.ndarray, s1: np.ndarray, s2: np.ndarray, chunk: int = 1000) -> dict:
    """Textbook DeLong: psi(x, y) for every (positive, negative) pair, placements by row/column means."""
    yb = y.astype(bool)
    out = []
    for s in (s1, s2):
        x, z = s[yb], s[~yb]
        v10 = np.empty(x.size)
        v01 = np.zeros(z.size)
        for i in range(0, x.size, chunk):
            psi = (x[i:i + chunk, None] > z[None, :]) + 0.5 * (x[i:i + chunk, None] == z[None, :])
            v10[i:i + chunk] = psi.mean(axis=1)
            v01 += psi.sum(axis=0)
        out.append((v10, v01 / x.size))
    (a10, a01), (b10, b01) = out
    m, n = a10.size, a01.size
    auc_a, auc_b = a10.mean(), b10.mean()
    va = np.var(a10, ddof=1) / m + np.var(a01, ddof=1) / n
    vb = np.var(b10, ddof=1) / m + np.var(b01, ddof=1) / n
    c = np.cov(a10, b10)[0, 1] / m + np.cov(a01, b01)[0, 1] / n
    z = (auc_a - auc_b) / np.sqrt(va + vb - 2 * c)
    return {"auc_a": auc_a, "auc_b": auc_b, "z": z, "p_value": 2 * ndtr(-abs(z))}


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int8)
    latent = rng.normal(size=n) + 1.2 * y
    s1 = np.round(latent + rng.normal(scale=0.5, size=n), 4)  # rounded: ties present
    s2 = np.round(latent + rng.normal(scale=0.6, size=n), 4)
    return y, s1, s2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--n-ref", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from nhb_core import stats

    y, s1, s2 = make_data(args.n)
    stats.delong_paired(y[:1000], s1[:1000], s2[:1000])  # warm-up (imports)
    t_fast = best_of(lambda: stats.delong_paired(y, s1, s2), args.repeats)
    r_fast = stats.delong_paired(y, s1, s2)

    yr, r1, r2 = make_data(args.n_ref, seed=1)
    t_naive = best_of(lambda: naive_paired_delong(yr, r1, r2), 1)
    t_fast_ref = best_of(lambda: stats.delong_paired(yr, r1, r2), args.repeats)
    naive = naive_paired_delong(yr, r1, r2)
    fast_ref = stats.delong_paired(yr, r1, r2)
    agree = max(abs(naive["z"] - fast_ref["z"]), abs(naive["auc_a"] - fast_ref["auc_a"]),
                abs(naive["p_value"] - fast_ref["p_value"]))
    print(json.dumps({
        "benchmark": "paired DeLong",
        "n": args.n, "n_pos": int(y.sum()),
        "fast_seconds": round(t_fast, 4),
        "target_seconds": 2.0,
        "meets_target": bool(t_fast < 2.0),
        "fast_z": r_fast["z"], "fast_p": r_fast["p_value"],
        "reference_n": args.n_ref,
        "reference_naive_seconds": round(t_naive, 4),
        "reference_fast_seconds": round(t_fast_ref, 6),
        "speedup_at_reference_n": round(t_naive / t_fast_ref, 1),
        "naive_vs_fast_max_abs_diff": agree,
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }))


if __name__ == "__main__":
    main()
