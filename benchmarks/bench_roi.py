"""Benchmark: GP ROI proposals (``roi propose``) on the synthetic paper preset.

Keeps the rater masks of N randomly chosen center-A subjects (the "manual" masks), hides
every other mask, runs :func:`nhb_core.roi_propose.propose_rois` and measures, per center,
the Dice of the proposals against the true GP and against the hidden rater masks, and
whether QC flagged every proposal with Dice < 0.4 against the truth. Dice is the
bilateral Dice of docs/synth.md (labels merged); ``dice_lr`` is the mean of the left and
right label Dice (a swapped side scores 0). Prints one JSON object.

The proposals may include no failure at all; ``qc_on_corrupted_proposals`` therefore also
checks QC on corrupted copies of 30 proposals (shifted 8 / 15 mm in-plane, moved 2 slices up or
down, right side dropped, dilated, eroded): the share flagged, overall and among those with
Dice < 0.4 against the truth.

Targets (20 masks): mean Dice vs the truth >= 0.75 at A and >= 0.70 at B, no proposal
with Dice < 0.4 unflagged, wall time under 360 s on 2 CPU cores. ``cpu_seconds`` (this
process's CPU time) and ``cpu_share`` (CPU time / wall time, about 2 on 2 idle cores) tell
a slow wall time on a shared machine from a slow program.

    python benchmarks/bench_roi.py [--cohort DIR] [--n-manual 20[,10,40]] [--seed 0] [--threads 2]
                                   [--epochs N] [--keep DIR]

``--cohort`` reuses a paper cohort written with ``--truth`` (else one is synthesised in a
temporary folder, not timed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2.0 * (a & b).sum() / max(1, a.sum() + b.sum()))


def _dice_lr(a, b) -> float:
    return float(np.mean([_dice(np.asarray(a) == k, np.asarray(b) == k) for k in (1, 2)]))


def _hide_masks(cohort: Path, work: Path, n_manual: int, seed: int) -> tuple[Path, list[str]]:
    """A manifest with absolute paths, roi kept for n_manual center-A subjects, empty elsewhere."""
    with open(cohort / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    a_ids = sorted(r["subject_id"] for r in rows if r["center"] == "A")
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(a_ids, size=min(n_manual, len(a_ids)), replace=False).tolist())
    work.mkdir(parents=True, exist_ok=True)
    out = work / "manifest_hidden.csv"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()), lineterminator="\n")
        w.writeheader()
        for r in rows:
            r = dict(r)
            r["t1"] = str((cohort / r["t1"]).resolve())
            r["roi"] = str((cohort / r["roi"]).resolve()) if r["subject_id"] in keep else ""
            w.writerow(r)
    return out, sorted(keep)


CORRUPTIONS = ("shift_8mm", "shift_15mm", "slices_up_2", "slices_down_2", "drop_right", "dilate_3", "erode_2")


def _corrupt(mask: np.ndarray, kind: str, spacing, rng: np.random.Generator) -> np.ndarray:
    """A plausible failure made from a good mask (in-plane shift in a random direction, the
    mask on the wrong slices, one side lost, grown or shrunk in-plane)."""
    from scipy import ndimage

    if kind.startswith("shift_"):
        mm = float(kind[6:-2])
        ang = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(ang), np.sin(ang)]) * mm / np.asarray(spacing[:2], dtype=float)
        return ndimage.shift(mask, (d[0], d[1], 0), order=0)
    if kind.startswith("slices_"):
        return np.roll(mask, 2 if "up" in kind else -2, axis=2)
    if kind == "drop_right":
        return np.where(mask == 2, 0, mask)
    st = np.ones((3, 3, 1), bool)
    if kind == "dilate_3":
        grown = ndimage.binary_dilation(mask > 0, st, 3)
        near = ndimage.grey_dilation(mask, footprint=np.ones((7, 7, 1), bool))
        return np.where(grown, np.where(mask > 0, mask, near), 0)
    return np.where(ndimage.binary_erosion(mask > 0, st, 2), mask, 0)  # erode_2


def qc_on_corrupted(cohort: Path, out: Path, n: int, seed: int) -> dict:
    """QC of corrupted copies of n proposals (the network's proposals here have no failure to
    catch): share flagged per corruption, and of those with Dice < 0.4 vs the truth."""
    import pandas as pd

    from nhb_core.io import load_roi
    from nhb_core.roi_propose import _load_subject, _measures, _qc

    ref = json.loads((out / "roi_model.json").read_text())["reference"]
    man = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False).set_index("subject_id")
    prop = pd.read_csv(out / "proposals.csv", dtype={"subject_id": str})
    ids = prop.loc[prop["roi_source"] == "proposed", "subject_id"].sample(n, random_state=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for sid in ids:
        s = _load_subject(sid, str((out / man.loc[sid, "t1"]).resolve()), None)
        m = np.asarray(load_roi(out / man.loc[sid, "roi"], allow_empty=True).data)
        truth = load_roi(cohort / "truth" / f"{sid}_gp_true.nii.gz").data
        for kind in CORRUPTIONS:
            c = _corrupt(m, kind, s.spacing, rng).astype(np.int16)
            flags, _ = _qc(_measures(s, c), ref)
            rows.append({"kind": kind, "dice": _dice(c, truth), "flagged": bool(flags)})
    d = pd.DataFrame(rows)
    low = d[d["dice"] < 0.4]
    return {"n_subjects": int(n),
            "per_corruption": {k: {"dice_truth_mean": round(float(g["dice"].mean()), 3),
                                   "flagged": round(float(g["flagged"].mean()), 3)} for k, g in d.groupby("kind")},
            "n_dice_below_0.4": int(len(low)), "flagged_dice_below_0.4": round(float(low["flagged"].mean()), 3)
            if len(low) else None}


def requalify(out: Path) -> None:
    """Recompute the QC flags and confidences of an existing propose folder with the current QC
    code (the masks, the soft Dice and not_found stay): for ``--reuse`` after a QC change."""
    import pandas as pd

    from nhb_core.fileio import atomic_write_json, atomic_write_text
    from nhb_core.io import load_roi
    from nhb_core.roi_propose import _load_subject, _measures, _plausibility, _qc, _reference

    man = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False).set_index("subject_id")
    prop = pd.read_csv(out / "proposals.csv", dtype={"subject_id": str, "qc_flags": str}, keep_default_na=False,
                       na_values={"confidence": [""], "soft_dice": [""], "mean_prob": [""]})
    meas = {}
    for sid in prop["subject_id"]:
        r = man.loc[sid]
        s = _load_subject(sid, str((out / r["t1"]).resolve()), None)
        meas[sid] = _measures(s, np.asarray(load_roi((out / r["roi"]).resolve(), allow_empty=True).data))
    ref = _reference([meas[sid] for sid in prop.loc[prop["roi_source"] != "proposed", "subject_id"]])
    for i, r in prop.iterrows():
        proposed = r["roi_source"] == "proposed"
        flags, extra = _qc(meas[r["subject_id"]], ref, r["soft_dice"] if proposed else float("nan"), 0.6)
        if "not_found" in str(r["qc_flags"]).split(";"):
            flags.append("not_found")
        for k, v in {**extra, **{k: meas[r["subject_id"]][k] for k in ("ring_contrast", "intensity_sd")}}.items():
            prop.loc[i, k] = v
        prop.loc[i, "qc_flags"] = ";".join(flags)
        prop.loc[i, "qc_ok"] = not flags
        if proposed:
            prop.loc[i, "confidence"] = r["soft_dice"] * _plausibility(flags) * (0.5 if "not_found" in flags else 1.0)
    atomic_write_text(out / "proposals.csv", prop.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    meta = json.loads((out / "roi_model.json").read_text())
    meta["reference"] = ref
    meta["requalified"] = True
    atomic_write_json(out / "roi_model.json", meta)


def run_one(cohort: Path, work: Path, n_manual: int, seed: int, config: dict, n_corrupt: int = 30,
            reuse: bool = False) -> dict:
    import pandas as pd

    from nhb_core.io import load_roi
    from nhb_core.roi_propose import propose_rois

    manifest, keep = _hide_masks(cohort, work, n_manual, seed)
    out = work / f"propose_{n_manual}"
    load0 = os.getloadavg()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if reuse and (out / "proposals.csv").is_file():  # the masks of an earlier run, QC recomputed
        requalify(out)
        wall = cpu = float("nan")
    else:
        propose_rois(manifest, out, {**config, "seed": seed})
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    load1 = os.getloadavg()
    prop = pd.read_csv(out / "proposals.csv", dtype={"subject_id": str})
    prop = prop[prop["roi_source"] == "proposed"].copy()
    orig = pd.read_csv(cohort / "manifest.csv", dtype={"subject_id": str}).set_index("subject_id")
    rows = []
    for r in prop.itertuples():
        pm = load_roi(out / r.roi, allow_empty=True).data
        truth = load_roi(cohort / "truth" / f"{r.subject_id}_gp_true.nii.gz").data
        rater = load_roi(cohort / orig.loc[r.subject_id, "roi"]).data
        rows.append({"subject_id": r.subject_id, "center": r.center, "dice_truth": _dice(pm, truth),
                     "dice_lr_truth": _dice_lr(pm, truth), "dice_rater": _dice(pm, rater),
                     "rater_vs_truth": _dice(rater, truth), "confidence": r.confidence,
                     "qc_ok": bool(r.qc_ok), "qc_flags": "" if pd.isna(r.qc_flags) else r.qc_flags})
    res = pd.DataFrame(rows)
    res.to_csv(out / "bench_dice.csv", index=False)
    per_center = {}
    for c, d in res.groupby("center"):
        low = d[d["dice_truth"] < 0.4]
        per_center[c] = {
            "n": int(len(d)),
            "dice_truth_mean": round(float(d["dice_truth"].mean()), 4),
            "dice_truth_p5": round(float(d["dice_truth"].quantile(0.05)), 4),
            "dice_lr_truth_mean": round(float(d["dice_lr_truth"].mean()), 4),
            "dice_rater_mean": round(float(d["dice_rater"].mean()), 4),
            "rater_vs_truth_mean": round(float(d["rater_vs_truth"].mean()), 4),
            "n_flagged": int((~d["qc_ok"]).sum()),
            "n_dice_below_0.4": int(len(low)),
            "n_dice_below_0.4_unflagged": int(low["qc_ok"].sum()),
            "spearman_confidence_dice": round(float(d["confidence"].corr(d["dice_truth"], method="spearman")), 3),
        }
    meta = json.loads((out / "roi_model.json").read_text())
    corrupted = qc_on_corrupted(cohort, out, min(n_corrupt, len(res)), seed) if n_corrupt else None
    return {"n_manual": n_manual, "manual_subjects": keep, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "cpu_share": round(cpu / wall, 2),
            "seconds_parts": meta["seconds"], "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in load1], "per_center": per_center,
            "qc_on_corrupted_proposals": corrupted,
            "targets_met": {
                "dice_A>=0.75": per_center.get("A", {}).get("dice_truth_mean", 0) >= 0.75,
                "dice_B>=0.70": per_center.get("B", {}).get("dice_truth_mean", 0) >= 0.70,
                "no_unflagged_dice<0.4": all(v["n_dice_below_0.4_unflagged"] == 0 for v in per_center.values()),
                "under_360s": bool(wall < 360) if wall == wall else None}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", default=None, help="paper cohort written with --truth (default: synthesise one)")
    ap.add_argument("--n-manual", default="20", help="comma-separated numbers of manual masks, e.g. 10,20,40")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--keep", default=None, help="work folder kept (default: temporary)")
    ap.add_argument("--n-corrupt", type=int, default=30, help="proposals corrupted for the QC check (0: none)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the masks in --keep DIR/propose_N (QC recomputed with the current code; not timed)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_roi_"))
    if args.cohort:
        cohort = Path(args.cohort)
        if not (cohort / "truth").is_dir():
            raise SystemExit(f"{cohort}: no truth/ folder; synthesise it with --truth")
    else:
        from nhb_core.synth import synthesize

        cohort = work / "cohort"
        synthesize(cohort, preset="paper", seed=0, write_truth=True)
    config: dict = {"device": args.device}
    if args.epochs:
        config["epochs"] = args.epochs
    if args.encoder:
        config["encoder"] = args.encoder
    runs = [run_one(cohort, work, int(n), args.seed, config, args.n_corrupt, args.reuse)
            for n in args.n_manual.split(",")]
    import segmentation_models_pytorch as smp

    print(json.dumps({"benchmark": "roi_propose", "cohort": str(cohort), "seed": args.seed, "threads": args.threads,
                      "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                      "smp": smp.__version__, "config": config, "runs": runs, "work": str(work)}, indent=1))


if __name__ == "__main__":
    main()
