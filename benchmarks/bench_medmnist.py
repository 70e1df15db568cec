"""Real images: ResNet-18 on PneumoniaMNIST (28 px) through the project's own pipeline.

Converts ``../shared/data/medmnist/pneumoniamnist.npz`` into a prepared slice
dataset (one image = one subject, pixel values / 255), trains ResNet-18 with
``nhb_core.train.train_model`` (train split; early stopping on val), predicts
the official test split with ``nhb_core.evaluate.evaluate_model`` and prints one
JSON object: test AUC and accuracy (``score > 0.5``, as ``medmnist.Evaluator``)
next to the published MedMNIST v2 ResNet-18 (28) figures (AUC 0.944, ACC 0.854).

Note: the shared copy's training split lacks 826 of the 1,214 normal images
(see its README); the val and test splits are the official ones.

Usage: python benchmarks/bench_medmnist.py [--epochs 5] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NPZ = REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
PUBLISHED = {"resnet18_28": {"auc": 0.944, "acc": 0.854}, "resnet18_224": {"auc": 0.956, "acc": 0.864}}


def write_dataset(npz: Path, out: Path) -> tuple[Path, dict]:
    """The npz as a prepared slice dataset (index.csv, slices.npy, subjects.csv, prepare.json) + split."""
    import pandas as pd

    z = np.load(npz)  # allow_pickle=False by default
    out.mkdir(parents=True, exist_ok=True)
    imgs, rows, subj, sets = [], [], [], {}
    for part in ("train", "val", "test"):
        x = z[f"{part}_images"].astype(np.float32) / 255.0
        y = z[f"{part}_labels"].reshape(-1).astype(int)
        ids = [f"{part}{i:05d}" for i in range(len(y))]
        sets[part] = ids
        for sid, lab in zip(ids, y):
            rows.append({"subject_id": sid, "center": "pneumoniamnist", "label": int(lab), "slice_index": 0,
                         "source_sha256": "", "row": len(rows)})
            subj.append({"subject_id": sid, "center": "pneumoniamnist", "label": int(lab)})
        imgs.append(x[:, None])
    np.save(out / "slices.npy", np.concatenate(imgs))
    pd.DataFrame(rows).to_csv(out / "index.csv", index=False)
    pd.DataFrame(subj).to_csv(out / "subjects.csv", index=False)
    meta = {"format": "nhb-slices", "format_version": 1, "source": "pneumoniamnist.npz",
            "config": {"size": 28, "norm": "x/255", "roi_channel": False}, "channels": ["xray"], "in_chans": 1,
            "size": 28, "input_size": [28, 28]}
    (out / "prepare.json").write_text(json.dumps(meta))
    return out, {"unit": "subject", "leaky": False, "seed": 0, "sets": sets}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not NPZ.exists():
        print(json.dumps({"skipped": f"{NPZ} is absent"}))
        return 0
    import pandas as pd
    import torch
    from sklearn.metrics import roc_auc_score

    from nhb_core.evaluate import evaluate_model
    from nhb_core.train import TrainConfig, train_model

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(tmp.name) if tmp else args.out
    ds, split = write_dataset(NPZ, root / "dataset")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.epochs,
                      warmup_epochs=0.5, seed=args.seed, device="auto")
    t0 = time.monotonic()
    ticks = []
    mdir = train_model(ds, split, "resnet18", root / "models" / "resnet18", cfg,
                       progress=lambda ev: ticks.append(ev) if ev.get("metrics") else None)
    t_train = time.monotonic() - t0
    res = evaluate_model(mdir, ds, split, root / "predictions", sets=["val", "test"])
    test = pd.read_csv(res["test"])
    mj = json.loads((mdir / "model.json").read_text())
    y, p = test["label"].to_numpy(), test["resnet18"].to_numpy()
    auc = float(roc_auc_score(y, p))
    acc = float(((p > 0.5).astype(int) == y).mean())
    acc_y = float(((p >= mj["threshold"]).astype(int) == y).mean())
    out = {
        "benchmark": "medmnist_pneumonia_resnet18_28px",
        "data": "shared pneumoniamnist.npz (official val/test; train lacks 826 normal images)",
        "n_train": len(split["sets"]["train"]), "n_val": len(split["sets"]["val"]), "n_test": len(test),
        "epochs_max": args.epochs, "epochs_run": mj["epochs_run"], "best_epoch": mj["best_epoch"],
        "batch_size": args.batch_size, "lr": args.lr, "balance": cfg.balance, "augment": cfg.augment,
        "device": mj["device"], "threads": args.threads,
        "val_auc": round(mj["val_auc"], 4),
        "test_auc": round(auc, 4), "test_acc_at_0.5": round(acc, 4),
        "test_acc_at_val_youden": round(acc_y, 4), "val_youden_threshold": round(mj["threshold"], 4),
        "published": PUBLISHED,
        "auc_minus_published_resnet18_28": round(auc - PUBLISHED["resnet18_28"]["auc"], 4),
        "target_met": bool(auc >= PUBLISHED["resnet18_28"]["auc"] - 0.02),
        "train_seconds": round(t_train, 1),
        "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in t["metrics"].items()} for t in ticks],
    }
    print(json.dumps(out))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
