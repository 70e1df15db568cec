"""A small run folder in the documented layout, built without training (for the saliency,
predict and export tests): a 6-subject synthetic cohort prepared at 32 px, three timm models
with seeded random weights saved as model.safetensors + model.json, split.json, config.yaml
and predictions/test__subjects.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

MODELS = ("resnet18", "densenet121", "efficientnet_b0")


def build_run(root: Path, models=MODELS, size: int = 32) -> Path:
    import torch
    import yaml

    from nhb_core.fileio import atomic_write_json
    from nhb_core.models import create_model, save_weights
    from nhb_core.predict import predict_probs
    from nhb_core.slices import PrepareConfig, load_dataset, prepare
    from nhb_core.synth import synthesize

    torch.set_num_threads(1)
    cohort = root / "cohort"
    manifest = synthesize(cohort, preset="small", seed=0, n={"A": (3, 3)}, workers=1)
    run = root / "run"
    ds_dir = run / "dataset"
    cfg = PrepareConfig(size=size)
    prepare(manifest, ds_dir, cfg, workers=1)
    ds = load_dataset(ds_dir)
    subjects = sorted(ds.index["subject_id"].astype(str).unique())
    split = {"unit": "subject", "leaky": False, "seed": 0,
             "sets": {"train": subjects[:2], "val": subjects[2:3], "test": subjects[3:]}}
    atomic_write_json(run / "split.json", split)
    (run / "config.yaml").write_text(yaml.safe_dump({"models": list(models), "manifest": str(manifest), "seed": 0}))
    test_rows = ds.index[ds.index["subject_id"].astype(str).isin(split["sets"]["test"])]
    preds = test_rows.groupby("subject_id", sort=True).agg(center=("center", "first"), label=("label", "first"))
    for k, name in enumerate(models):
        torch.manual_seed(k)
        model = create_model(name, in_chans=ds.in_chans).eval()
        mdir = run / "models" / name
        save_weights(model, mdir / "model.safetensors")
        thr = 0.4 + 0.1 * k
        atomic_write_json(mdir / "model.json", {
            "architecture": name, "timm_name": name, "in_chans": ds.in_chans, "input_size": [size, size],
            "preprocessing": cfg.to_dict(), "threshold": thr, "threshold_level": "subject", "seed": k})
        p = predict_probs(model, np.asarray(ds.images)[test_rows["row"].to_numpy()])
        preds[name] = pd.Series(p, index=test_rows["subject_id"].to_numpy()).groupby(level=0).mean()
    (run / "predictions").mkdir(parents=True, exist_ok=True)
    preds.reset_index().to_csv(run / "predictions" / "test__subjects.csv", index=False)
    return run


def cohort_case(run: Path, subject_id: str | None = None) -> tuple[Path, Path, str]:
    """(t1 path, roi path, subject id) of one subject of the run's synthetic cohort."""
    cohort = run.parent / "cohort"
    man = pd.read_csv(cohort / "manifest.csv", dtype={"subject_id": str})
    row = man.iloc[0] if subject_id is None else man[man["subject_id"] == subject_id].iloc[0]
    return cohort / row["t1"], cohort / row["roi"], str(row["subject_id"])


def shared_run(tmp_path_factory) -> Path:
    """One :func:`build_run` per test session (per worker), shared by the test modules that use it."""
    root = Path(tmp_path_factory.getbasetemp()) / "fake_run_shared"
    done = root / "BUILT"
    if not done.exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        build_run(root)
        done.write_text("ok\n")
    return root / "run"
