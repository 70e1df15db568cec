"""Benchmark: does the default study lose AUC when its ROIs are proposed instead of drawn by hand?

The issue "GP ROIs without drawing every neonate by hand" asks that the default study trained on
proposed ROIs stays within 0.03 subject-level AUC of the same study on the rater's manual ROIs. One
split of the paper preset cannot show that (its 45 test neonates give an AUC standard error near
0.06), so this script measures it the way ``bench_recipe.py`` measures the recipe:

1. Keeps the rater masks of N randomly chosen center-A neonates of the paper preset (the lab's manual
   masks, the same choice as ``bench_roi.py``) and hides every other mask, of the paper preset AND of
   a large synthetic cohort of another seed (default 600 neonates, seed 1: the "next cohort" a lab
   would outline with the same tool).
2. Runs ``roi propose`` once over both (one network trained on the N masks; the large cohort's rows
   are renamed ``E_<id>`` in that one manifest and renamed back after).
3. Runs the default study with ``--seeds`` on the paper preset twice: with the rater's ROIs ("manual")
   and with the proposals + the N manual masks ("proposed"); the splits are the same (they depend on
   the seed and the subjects, not on the ROIs).
4. Evaluates every repeat on the large cohort with ITS matching ROIs (rater ROIs for the manual arm,
   proposals for the proposed arm: each arm as a lab would use it end to end), and prints one JSON
   object: per model (and si_ratio), center and seed the subject-level AUC of both arms and their
   difference, the mean and SD of the difference over seeds, the Dice of the large cohort's proposals
   against the true GP when ``truth/`` exists, and wall / CPU seconds of every step.

    python benchmarks/bench_roi_study.py --cohort PAPER_DIR [--big BIG_DIR] [--n-manual 20] [--seeds 0,1,2]
                                         [--work DIR] [--cores 2] [--manual-run RUN]

PAPER_DIR is ``python -m nhb_core synth --preset paper --seed 0 --truth``; BIG_DIR is
``synth --preset paper --seed 1 --n-subjects 600`` (synthesised into --work when absent).
``--manual-run`` starts the manual arm from a copy of an existing default run on the same manifest
(e.g. ``bench_recipe.py``'s): its unchanged stages are reused by the study's stage cache.

Target: |AUC(proposed) - AUC(manual)| <= 0.03 for every network at each center, mean over the seeds
(``every_network_within_0.03``); ``no_network_loses_more_than_0.03`` is the one-sided reading (proposed
ROIs may do better).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

from _machine import cpu_seconds as _cpu
from _machine import pin_cores
from bench_recipe import big_cohort_aucs
from bench_roi import _dice, _hide_masks

BIG_PREFIX = "E_"


def _read_rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def combined_manifest(paper: Path, big: Path, work: Path, n_manual: int, seed: int) -> tuple[Path, list[str]]:
    """The paper preset with N manual masks kept + the large cohort without masks, in one manifest."""

    hidden, keep = _hide_masks(paper, work, n_manual, seed)
    rows = _read_rows(hidden)
    for r in _read_rows(big / "manifest.csv"):
        r = {k: r.get(k, "") for k in rows[0]}
        r["subject_id"] = BIG_PREFIX + r["subject_id"]
        r["t1"] = str((big / r["t1"]).resolve())
        r["roi"] = ""
        rows.append(r)
    return _write_rows(work / "manifest_combined.csv", rows), keep


def split_proposals(propose_dir: Path, work: Path) -> tuple[Path, Path]:
    """``roi propose``'s manifest cut back into the paper preset's and the large cohort's (absolute paths)."""
    paper_rows, big_rows = [], []
    for r in _read_rows(propose_dir / "manifest.csv"):
        r["t1"] = str((propose_dir / r["t1"]).resolve())
        r["roi"] = str((propose_dir / r["roi"]).resolve())
        if r["subject_id"].startswith(BIG_PREFIX):
            r["subject_id"] = r["subject_id"][len(BIG_PREFIX):]
            big_rows.append(r)
        else:
            paper_rows.append(r)
    return (_write_rows(work / "proposed" / "paper_manifest.csv", paper_rows),
            _write_rows(work / "proposed" / "big_manifest.csv", big_rows))


def big_dice(propose_dir: Path, big: Path) -> dict | None:
    """Mean Dice of the large cohort's proposals against its true GP (None without ``truth/``)."""
    if not (big / "truth").is_dir():
        return None
    import numpy as np

    from nhb_core.io import load_roi

    out: dict = {}
    for r in _read_rows(propose_dir / "manifest.csv"):
        if not r["subject_id"].startswith(BIG_PREFIX):
            continue
        sid = r["subject_id"][len(BIG_PREFIX):]
        out.setdefault(r["center"], []).append(_dice(load_roi(propose_dir / r["roi"], allow_empty=True).data,
                                                     load_roi(big / "truth" / f"{sid}_gp_true.nii.gz").data))
    return {c: {"n": len(v), "dice_truth_mean": round(float(np.mean(v)), 4)} for c, v in out.items()}


def subject_aucs(run_dir: Path, set_name: str) -> dict:
    """model -> center -> subject-level AUC of one evaluated set of a run (``bench_recipe.big_cohort_aucs``)."""
    from nhb_core.fileio import read_json

    aucs = big_cohort_aucs(read_json(run_dir / "metrics.json"), set_name)
    return {m: {c: v["auc"] for c, v in per_c.items()} for m, per_c in aucs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--cohort", type=Path, required=True, help="paper preset (seed 0) written by synth")
    ap.add_argument("--big", type=Path, default=None, help="large cohort of another seed (default: synthesised)")
    ap.add_argument("--n-big", type=int, default=600)
    ap.add_argument("--big-seed", type=int, default=1)
    ap.add_argument("--n-manual", type=int, default=20)
    ap.add_argument("--mask-seed", type=int, default=0, help="which center-A masks are kept (as bench_roi --seed)")
    ap.add_argument("--seeds", default="0,1,2", help="study seeds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nhb_bench_roi_study"))
    ap.add_argument("--cores", type=int, default=2, help="CPU cores to pin to (0 = no pinning)")
    ap.add_argument("--manual-run", type=Path, default=None, help="existing default run on --cohort to start from")
    args = ap.parse_args()

    pin_cores(args.cores)
    import numpy as np

    from nhb_core.cohorts import evaluate_cohort
    from nhb_core.roi_propose import propose_rois
    from nhb_core.study import run_study
    from nhb_core.synth import synthesize

    load0 = os.getloadavg()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    paper = args.cohort.expanduser().resolve()
    big = args.big.expanduser().resolve() if args.big else work / f"big_{args.n_big}_seed{args.big_seed}"
    if not (big / "manifest.csv").exists():
        synthesize(big, preset="paper", seed=args.big_seed, n=args.n_big, write_truth=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    seconds: dict = {}
    cpu: dict = {}

    def timed(name, fn, *a, **kw):
        t, c = time.time(), _cpu()
        out = fn(*a, **kw)
        seconds[name] = round(time.time() - t, 1)
        cpu[name] = round(_cpu() - c, 1)
        print(f"[bench_roi_study] {name}: {seconds[name]} s", file=sys.stderr, flush=True)
        return out

    combined, keep = combined_manifest(paper, big, work, args.n_manual, args.mask_seed)
    propose_dir = work / "propose"
    if not (propose_dir / "manifest.csv").exists():
        timed("roi_propose", propose_rois, combined, propose_dir, {"seed": args.mask_seed})
    paper_prop, big_prop = split_proposals(propose_dir, work)

    arms = {"manual": (paper / "manifest.csv", big / "manifest.csv"), "proposed": (paper_prop, big_prop)}
    overrides = {"seeds": ",".join(map(str, seeds))} if len(seeds) > 1 else {"seed": seeds[0]}
    aucs: dict = {}
    for arm, (man, big_man) in arms.items():
        run_dir = work / f"run_{arm}"
        if arm == "manual" and args.manual_run and not run_dir.exists():
            shutil.copytree(args.manual_run, run_dir)
        timed(f"study_{arm}", run_study, man, run_dir, None, overrides=overrides)
        runs = {seeds[0]: run_dir, **{s: run_dir / "seeds" / f"seed_{s}" for s in seeds[1:]}}
        for s, rd in runs.items():
            timed(f"evaluate_{arm}_seed{s}", evaluate_cohort, rd, big_man, "big", device="cpu")
            aucs.setdefault(arm, {})[s] = subject_aucs(rd, "external:big")

    per_model: dict = {}
    for m in aucs["manual"][seeds[0]]:
        for c in aucs["manual"][seeds[0]][m]:
            man_v = [aucs["manual"][s][m][c] for s in seeds]
            prop_v = [aucs["proposed"][s][m][c] for s in seeds]
            diff = np.subtract(prop_v, man_v)
            per_model.setdefault(m, {})[c] = {
                "manual": [round(v, 4) for v in man_v], "proposed": [round(v, 4) for v in prop_v],
                "manual_mean": round(float(np.mean(man_v)), 4), "proposed_mean": round(float(np.mean(prop_v)), 4),
                "diff_mean": round(float(diff.mean()), 4),
                "diff_sd": round(float(diff.std(ddof=1)), 4) if len(seeds) > 1 else None}
    networks = [m for m in per_model if m != "si_ratio"]
    res = {
        "bench": "roi_study",
        "paper_cohort": str(paper), "big_cohort": str(big), "n_manual": args.n_manual, "manual_subjects": keep,
        "seeds": seeds,
        "per_model": per_model,
        "big_proposals_dice_vs_truth": big_dice(propose_dir, big),
        "time_s": seconds, "cpu_s": cpu,
        "load_avg_before": [round(x, 2) for x in load0], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "targets": {"every_network_within_0.03": all(abs(per_model[m][c]["diff_mean"]) <= 0.03
                                                     for m in networks for c in per_model[m]),
                    "no_network_loses_more_than_0.03": all(per_model[m][c]["diff_mean"] >= -0.03
                                                           for m in networks for c in per_model[m])},
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
