"""A small finished-looking run for the reading-session tests: a synthetic cohort of
``n_per_class`` controls and injured at center A, prepared at 32 px, every subject in the test set,
predictions/test__subjects.csv with a made-up network column, optionally a resnet18 with seeded
random weights (for the aided arm's Grad-CAM). No training."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_reading_run(root: Path, n_per_class: int = 6, with_model: bool = False, model: str = "resnet18") -> Path:
    import yaml

    from nhb_core.fileio import atomic_write_json
    from nhb_core.slices import PrepareConfig, load_dataset, prepare
    from nhb_core.synth import synthesize

    cohort = root / "cohort"
    manifest = synthesize(cohort, preset="small", seed=0, n={"A": (n_per_class, n_per_class)}, workers=1)
    run = root / "runs" / "tiny"
    cfg = PrepareConfig(size=32)
    prepare(manifest, run / "dataset", cfg, workers=1)
    ds = load_dataset(run / "dataset")
    subjects = sorted(ds.index["subject_id"].astype(str).unique())
    atomic_write_json(run / "split.json", {"unit": "subject", "leaky": False, "seed": 0,
                                           "sets": {"train": [], "val": [], "test": subjects}})
    (run / "config.yaml").write_text(yaml.safe_dump({"models": [model], "manifest": str(manifest), "seed": 0}))
    preds = ds.index.assign(subject_id=ds.index["subject_id"].astype(str)).groupby("subject_id", sort=True).agg(
        center=("center", "first"), label=("label", "first")).reset_index()
    rng = np.random.default_rng(0)
    preds[model] = np.clip(0.3 + 0.4 * preds["label"] + rng.normal(0, 0.15, len(preds)), 0.01, 0.99).round(4)
    (run / "predictions").mkdir(parents=True, exist_ok=True)
    preds.to_csv(run / "predictions" / "test__subjects.csv", index=False)
    if with_model:
        import torch

        from nhb_core.models import create_model, save_weights

        torch.set_num_threads(1)
        torch.manual_seed(0)
        net = create_model(model, in_chans=ds.in_chans).eval()
        mdir = run / "models" / model
        save_weights(net, mdir / "model.safetensors")
        atomic_write_json(mdir / "model.json", {"architecture": model, "timm_name": model, "in_chans": ds.in_chans,
                                                "input_size": [32, 32], "preprocessing": cfg.to_dict(),
                                                "threshold": 0.5, "threshold_level": "subject", "seed": 0})
    atomic_write_json(run / "status.json", {"state": "done"})
    atomic_write_json(run / "metrics.json", {"run": {"manifest": str(manifest), "config": {"models": [model]}},
                                             "sets": {}})
    return run
