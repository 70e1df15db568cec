"""Benchmark: does the default recipe learn the globus pallidus sign? Measured beyond a 45-subject test set.

Trains the default study on the synthetic paper preset (seed 0), evaluates the finished run on a large
synthetic cohort of ANOTHER seed (default 600 subjects, seed 1) with the run's own preprocessing
(``nhb_core.cohorts.evaluate_cohort``: the same path a user takes for a third hospital), and prints one
JSON object with, per model and center of the large cohort:

* subject-level AUC with its 95% DeLong CI, and the si_ratio baseline's AUC on the same subjects;
* Grad-CAM and LayerCAM on the true-positive subjects (the slice with the most ROI voxels each, at most
  ``--cam-cases`` per center): mean share of CAM energy inside the GP ROI, its chance level (the ROI's
  share of the crop), their ratio, and the pointing-game hit rate;

plus the wall and CPU seconds of every stage of the study, the whole demo time (synthesis + study),
the large cohort's oracle and image-visible AUCs (the ceilings), and the machine's load average.
With ``--seeds 0,1,2`` the study is repeated (``study --seeds``) and every repeat is evaluated on the
large cohort: mean and SD of each model's AUC per center.

    python benchmarks/bench_recipe.py [--work DIR] [--cores 2] [--seeds 0,1,2] [--n-big 600] [--big-seed 1]

Targets (issue "Models that learn the globus pallidus sign"): resnet18 AUC >= 0.86 at A and >= 0.80
at B, every network >= si_ratio at each center, 3-seed SD of resnet18 <= 0.03, CAM energy in the GP
>= 5 x chance and pointing >= 60 % on true positives, the whole demo <= 600 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _machine import cpu_seconds as _cpu
from _machine import pin_cores


def cam_scores(run_dir: Path, cohort: str, models: list[str], max_cases: int) -> dict:
    """Grad-CAM attention on the true-positive subjects of an evaluated cohort, per model and center."""
    import numpy as np
    import pandas as pd

    from nhb_core import saliency as S
    from nhb_core.models import load_trained
    from nhb_core.runs import RunFolder
    from nhb_core.slices import load_dataset

    rf = RunFolder(run_dir)
    ds = load_dataset(rf.cohorts_dir / cohort / "dataset")
    subj = pd.read_csv(rf.predictions_path(f"external:{cohort}"), dtype={"subject_id": str})
    idx = ds.index.copy()
    idx["row"] = np.arange(len(idx))
    best = idx.sort_values(["roi_voxels", "slice_index"], ascending=[False, True]).groupby("subject_id").head(1)
    out: dict = {}
    for m in models:
        model, mj = load_trained(rf.model_dir(m))
        thr = float(mj.get("threshold") if mj.get("threshold") is not None else 0.5)
        out[m] = {}
        for c in sorted(subj["center"].astype(str).unique()):
            tp = subj[(subj["center"].astype(str) == c) & (subj["label"] == 1) & (subj[m] >= thr)]["subject_id"]
            rows = best[best["subject_id"].astype(str).isin(set(tp))].sort_values("subject_id").head(max_cases)
            if len(rows) == 0:
                out[m][c] = {"n": 0}
                continue
            r = rows["row"].to_numpy()
            imgs = np.asarray(ds.images[r], dtype=np.float32)
            masks = np.asarray(ds.masks[r]) > 0
            chance = float(masks.mean())
            layer = S.resolve_target_layer(model, m, imgs.shape[-2:], imgs.shape[1])
            out[m][c] = {"n": int(len(r)), "chance": round(chance, 4),
                         "layer": next((n for n, mod in model.named_modules() if mod is layer), None),
                         "map_grid": list(S._output_hw(model, layer, imgs.shape[1], tuple(imgs.shape[-2:])) or [])}
            for method in ("gradcam", "layercam"):
                cams = S.compute_cams(model, imgs, method=method, model_name=m)
                energy = np.array([S.cam_energy_in_roi(a, b) for a, b in zip(cams, masks)])
                hit = np.array([S.pointing_game(a, b) for a, b in zip(cams, masks)])
                e = float(np.nanmean(energy))
                out[m][c][method] = {"energy_in_gp": round(e, 4), "energy_x_chance": round(e / chance, 2),
                                     "pointing_rate": round(float(hit.mean()), 3)}
    return out


def big_cohort_aucs(metrics: dict, set_name: str) -> dict:
    sets = metrics["sets"][set_name]
    out: dict = {}
    for c, entry in (sets.get("centers") or {}).items():
        blk = entry["level"]["subject"]
        for m, mm in blk["models"].items():
            ci = mm.get("auc_ci_delong") or [None, None]
            out.setdefault(m, {})[c] = {"auc": round(mm["auc"], 4), "ci": [round(v, 4) for v in ci],
                                        "n": blk["n"], "n_pos": blk["n_pos"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nhb_bench_recipe"), help="working folder (reused)")
    ap.add_argument("--cores", type=int, default=2, help="CPU cores to pin to (0 = no pinning)")
    ap.add_argument("--seeds", default="0", help="study seeds, e.g. 0,1,2 (the first is the main run)")
    ap.add_argument("--n-big", type=int, default=600)
    ap.add_argument("--big-seed", type=int, default=1)
    ap.add_argument("--cam-cases", type=int, default=40)
    ap.add_argument("--config", type=Path, default=None, help="study config (default: the defaults)")
    ap.add_argument("--fresh", action="store_true", help="remove the run folder first (time the whole demo)")
    args = ap.parse_args()

    pin_cores(args.cores)
    import numpy as np

    from nhb_core.cohorts import evaluate_cohort
    from nhb_core.fileio import read_json
    from nhb_core.study import run_study, stage_seconds
    from nhb_core.synth import synthesize

    load0 = os.getloadavg()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    if args.fresh and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    t0, c0 = time.time(), _cpu()
    man = work / "paper" / "manifest.csv"
    if not man.exists():
        synthesize(work / "paper", preset="paper", seed=0)
    synth_s = time.time() - t0
    t1 = time.time()
    overrides = {"seeds": ",".join(map(str, seeds))} if len(seeds) > 1 else {"seed": seeds[0]}
    run_study(man, run_dir, args.config, overrides=overrides)
    study_s = time.time() - t1
    demo_cpu = _cpu() - c0
    big = work / f"big_{args.n_big}_seed{args.big_seed}" / "manifest.csv"
    if not big.exists():
        synthesize(big.parent, preset="paper", seed=args.big_seed, n=args.n_big)
    cohort_meta = read_json(big.parent / "cohort.json")
    t2 = time.time()
    runs = {seeds[0]: run_dir, **{s: run_dir / "seeds" / f"seed_{s}" for s in seeds[1:]}}
    per_seed = {}
    for s, rd in runs.items():
        evaluate_cohort(rd, big, "big", device="cpu")
        per_seed[s] = big_cohort_aucs(read_json(rd / "metrics.json"), "external:big")
    eval_s = time.time() - t2
    main_aucs = per_seed[seeds[0]]
    metrics = read_json(run_dir / "metrics.json")
    models = [m for m in metrics["run"]["models"]]
    t3 = time.time()
    cams = cam_scores(run_dir, "big", models, args.cam_cases)
    cam_s = time.time() - t3
    spread = {}
    if len(seeds) > 1:
        for m in main_aucs:
            for c in main_aucs[m]:
                v = [per_seed[s][m][c]["auc"] for s in seeds if m in per_seed[s] and c in per_seed[s][m]]
                spread.setdefault(m, {})[c] = {"auc": v, "mean": round(float(np.mean(v)), 4),
                                               "sd": round(float(np.std(v, ddof=1)), 4)}
    internal = {}
    for set_name in ("test", "external:B"):
        blk = metrics["sets"].get(set_name, {}).get("level", {}).get("subject", {})
        internal[set_name] = {m: round(mm["auc"], 4) for m, mm in (blk.get("models") or {}).items()
                              if mm.get("auc") is not None}
    per_model = {}
    for m in models:
        per_model[m] = {}
        for c, v in main_aucs.get(m, {}).items():
            si = main_aucs.get("si_ratio", {}).get(c, {}).get("auc")
            per_model[m][c] = {**v, "si_ratio_auc": si, "beats_si_ratio": None if si is None else v["auc"] >= si,
                               "cam": cams.get(m, {}).get(c)}
    r18 = per_model.get("resnet18", {})
    res = {
        "bench": "recipe",
        "config": str(args.config) if args.config else "defaults",
        "seeds": seeds,
        "big_cohort": {"n": args.n_big, "seed": args.big_seed, "oracle_auc": cohort_meta.get("oracle_auc"),
                       "visible_auc": cohort_meta.get("visible_auc")},
        "per_model": per_model,
        "si_ratio": main_aucs.get("si_ratio"),
        "seed_spread": spread or None,
        "internal_subject_auc": internal,
        "time_s": {"synth": round(synth_s, 1), "study": round(study_s, 1), "demo_total": round(synth_s + study_s, 1),
                   "demo_cpu": round(demo_cpu, 1), "evaluate_big": round(eval_s, 1), "cam": round(cam_s, 1),
                   "stages": stage_seconds(run_dir), "stages_cpu": stage_seconds(run_dir, cpu=True)},
        "load_avg_before": [round(x, 2) for x in load0], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "targets": {
            "resnet18_A_ge_0.86": bool(r18.get("A", {}).get("auc", 0) >= 0.86),
            "resnet18_B_ge_0.80": bool(r18.get("B", {}).get("auc", 0) >= 0.80),
            "every_network_ge_si_ratio": all(v.get("beats_si_ratio") for m in per_model for v in per_model[m].values()
                                             if v.get("beats_si_ratio") is not None),
            "resnet18_cam_ge_5x_chance": {meth: all(((v.get("cam") or {}).get(meth) or {}).get("energy_x_chance", 0) >= 5
                                                    for v in r18.values()) for meth in ("gradcam", "layercam")},
            "resnet18_pointing_ge_0.6": {meth: all(((v.get("cam") or {}).get(meth) or {}).get("pointing_rate", 0) >= 0.6
                                                   for v in r18.values()) for meth in ("gradcam", "layercam")},
            "demo_le_600s": (synth_s + study_s) <= 600 if len(seeds) == 1 else None,
            "resnet18_seed_sd_le_0.03": (all(v["sd"] <= 0.03 for v in spread.get("resnet18", {}).values())
                                         if spread else None),
        },
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
