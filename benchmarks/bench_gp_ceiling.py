"""Benchmark: how far can ANY measurement of GP brightness go on a synthetic cohort? An empirical ceiling.

The synthetic generator knows the true globus pallidus (GP) of every neonate
(``nhb_core.synth.subject_truth``). This script measures, on the written images at their native
resolution, the GP / surroundings signal-intensity ratio (GP mean over the mean of a ring of
``--ring-mm`` mm around it, per slice, averaged over slices weighted by GP area, or the maximum
over slices) once on the rater's ROI (what ``si_ratio`` and the networks are given) and once on the
TRUE GP, and prints their subject-level AUCs per center as JSON, next to the cohort's
``visible_auc`` and ``oracle_auc`` (cohort.json). The true-GP ratio is the best that a perfectly
drawn ROI can do with a ratio; ``visible_auc`` also carries the synthetic readers' view and is not
reachable from the pixels alone.

    python benchmarks/bench_gp_ceiling.py --cohort DIR [--ring-mm 6] [--limit N]

DIR is a folder written by ``python -m nhb_core synth`` (e.g. ``--n-subjects 600 --seed 1``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def slice_ratio(img, mask, px_mm: float, ring_mm: float) -> float:
    """GP mean / ring mean of one 2D slice (NaN when the mask has fewer than 4 pixels).

    ``img`` float [X, Y], ``mask`` bool [X, Y]; the ring is the pixels more than one pixel and at
    most ``ring_mm`` mm outside the mask (as ``nhb_core.slices.reference_ring``).
    """
    from scipy import ndimage

    if mask.sum() < 4:
        return float("nan")
    d = ndimage.distance_transform_edt(~mask) * px_mm
    ring = (d > px_mm) & (d <= ring_mm)
    ref = float(img[ring].mean()) if ring.any() else float("nan")
    return float(img[mask].mean()) / ref if ref > 0 else float("nan")


def subject_ratios(t1, masks: dict, px_mm: float, ring_mm: float) -> dict:
    """Per mask name: area-weighted mean and max over slices of :func:`slice_ratio`."""
    import numpy as np

    out = {}
    for name, mask in masks.items():
        vals, w = [], []
        for k in range(t1.shape[2]):
            m = mask[:, :, k] > 0
            if m.sum() >= 4:
                vals.append(slice_ratio(t1[:, :, k], m, px_mm, ring_mm))
                w.append(int(m.sum()))
        ok = [i for i, v in enumerate(vals) if np.isfinite(v)]
        out[f"{name}_wmean"] = float(np.average([vals[i] for i in ok], weights=[w[i] for i in ok])) if ok else np.nan
        out[f"{name}_max"] = float(max(vals[i] for i in ok)) if ok else np.nan
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", required=True, help="folder written by `python -m nhb_core synth`")
    ap.add_argument("--ring-mm", type=float, default=6.0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N subjects (0 = all)")
    a = ap.parse_args()

    import nibabel as nib
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from nhb_core import synth

    cdir = Path(a.cohort)
    meta = json.loads((cdir / "cohort.json").read_text())
    counts = {c: (v["1"], v["0"]) for c, v in meta["counts"].items()}
    cohort = synth.draw_cohort(meta["preset"], meta["seed"], counts)
    man = pd.read_csv(cdir / "manifest.csv", dtype={"subject_id": str}).set_index("subject_id")
    if a.limit:
        cohort = cohort.head(a.limit)
    t0 = time.time()
    rows = []
    for _, s in cohort.iterrows():
        vols = synth.render_subject(s.to_dict(), seed=meta["seed"])
        t1 = np.asarray(nib.load(cdir / man.loc[s.subject_id, "t1"]).get_fdata(), dtype=np.float32)
        roi = np.asarray(nib.load(cdir / man.loc[s.subject_id, "roi"]).dataobj)
        px = float(synth.SCANNERS[s.center].inplane_mm)
        r = subject_ratios(t1, {"rater_roi": roi, "true_gp": vols["gp_true"]}, px, a.ring_mm)
        rows.append({"subject_id": s.subject_id, "center": s.center, "label": int(s.label), **r})
    df = pd.DataFrame(rows)
    res: dict = {"cohort": str(cdir), "n_subjects": int(len(df)), "ring_mm": a.ring_mm, "centers": {}}
    for c, g in df.groupby("center"):
        if g["label"].nunique() < 2:
            continue
        aucs = {k: round(float(roc_auc_score(g["label"], g[k].fillna(g[k].median()))), 4)
                for k in ("rater_roi_wmean", "rater_roi_max", "true_gp_wmean", "true_gp_max")}
        res["centers"][c] = {"n": int(len(g)), "ratio_auc": aucs,
                             "visible_auc": round(float(meta.get("visible_auc", {}).get(c, np.nan)), 4),
                             "oracle_auc": round(float(meta.get("oracle_auc", {}).get(c, np.nan)), 4)}
    res["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
