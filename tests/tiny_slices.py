"""A tiny prepared slice dataset written directly in the nhb_core.slices format, for the
train / evaluate / DDP tests (seconds to build, learnable: positives carry two bright blobs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def make_tiny_dataset(out: Path, size: int = 32, n_a: int = 16, n_b: int = 6, slices: int = 3,
                      in_chans: int = 1, seed: int = 0) -> tuple[Path, dict]:
    """Write index.csv, slices.npy, subjects.csv, prepare.json under ``out``.

    Center A has ``n_a`` subjects (half positive), center B ``n_b``. Returns
    (dataset dir, split dict) with sets train / val / test / external:B.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subj, rows, imgs = [], [], []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for center, n in (("A", n_a), ("B", n_b)):
        for i in range(n):
            sid = f"{center}{i + 1:03d}"
            label = int(i % 2 == 1)
            subj.append({"subject_id": sid, "center": center, "label": label, "nbna": 30.0 if label else 38.0,
                         "reader_1": float(label if i % 4 else 1 - label), "reader_2": float(label),
                         "n_slices": slices})
            for z in range(slices):
                img = 0.3 + 0.05 * rng.standard_normal((size, size))
                img += 0.4 * np.exp(-(((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.08))  # "brain"
                if label:
                    for cx in (0.38, 0.62):
                        img += 0.35 * np.exp(-(((xx - cx) ** 2 + (yy - 0.55) ** 2) / 0.004))
                ch = [img]
                if in_chans == 2:
                    ch.append(((((xx - 0.5) ** 2 + (yy - 0.55) ** 2) < 0.03)).astype(float))
                imgs.append(np.stack(ch).astype(np.float32))
                rows.append({"subject_id": sid, "center": center, "label": label, "slice_index": 10 + z,
                             "source_sha256": "0" * 64, "row": len(rows)})
    np.save(out / "slices.npy", np.stack(imgs))
    pd.DataFrame(rows).to_csv(out / "index.csv", index=False)
    pd.DataFrame(subj).to_csv(out / "subjects.csv", index=False)
    cfg = {"crop_mm": 64.0, "size": size, "slice_select": "min_voxels", "min_roi_voxels": 10, "n_central": 3,
           "norm": "percentile", "p_low": 0.5, "p_high": 99.5, "z_clip": 5.0, "clip": True, "head_threshold": 0.05,
           "roi_channel": in_chans == 2, "antialias": True}
    meta = {"format": "nhb-slices", "format_version": 1, "config": cfg,
            "channels": ["t1", "roi"][:in_chans], "in_chans": in_chans, "size": size, "input_size": [size, size],
            "n_subjects": len(subj), "n_slices": len(rows)}
    (out / "prepare.json").write_text(json.dumps(meta, indent=2))
    a_ids = [s["subject_id"] for s in subj if s["center"] == "A"]
    b_ids = [s["subject_id"] for s in subj if s["center"] == "B"]
    n_val = n_test = max(2, n_a // 4)
    split = {"unit": "subject", "leaky": False, "seed": seed,
             "sets": {"train": a_ids[:n_a - n_val - n_test], "val": a_ids[n_a - n_val - n_test:n_a - n_test],
                      "test": a_ids[n_a - n_test:], "external:B": b_ids}}
    return out, split


class SimulatedCrash(RuntimeError):
    """Raised by :func:`crash_after_epoch` to interrupt a training run from its progress callback."""


def crash_after_epoch(epoch: int):
    """A ``train_model`` progress callback that raises :class:`SimulatedCrash` once epoch ``epoch`` has
    ended (its checkpoint is written), as a killed process would leave the run folder."""
    def progress(ev: dict) -> None:
        if ev.get("metrics") and ev["epoch"] == epoch:
            raise SimulatedCrash("simulated crash")
    return progress


def same_weights(a: Path, b: Path) -> bool:
    """Whether two trained model folders hold bit-identical ``model.safetensors``."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
