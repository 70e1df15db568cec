"""DistributedDataParallel on CPU: 2 gloo processes under torchrun train and write a model
folder of the same format as one process (only rank 0 writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_slices import make_tiny_dataset  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def test_two_process_ddp_matches_single_process_format(tmp_path):
    from safetensors.torch import load_file

    from nhb_core.runs import read_status
    from nhb_core.train import HISTORY_COLUMNS, load_checkpoint, train_model

    ds, split = make_tiny_dataset(tmp_path / "ds", size=32, n_a=12, n_b=2, slices=2)
    split_path = tmp_path / "split.json"
    split_path.write_text(json.dumps(split))
    args = ["--dataset", str(ds), "--split", str(split_path), "--model", "resnet18", "--epochs", "1",
            "--batch-size", "4", "--no-progress"]
    ddp_out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cfg = tmp_path / "train.yaml"
    cfg.write_text("keep_checkpoint: true\neval_batch_size: 16\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "nhb_core", "train", *args, "--out", str(ddp_out), "--config", str(cfg)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    one = train_model(ds, split, "resnet18", tmp_path / "one",
                      {"epochs": 1, "batch_size": 4, "keep_checkpoint": True, "eval_batch_size": 16})
    assert read_status(ddp_out)["state"] == "done"
    mj2, mj1 = (json.loads((p / "model.json").read_text()) for p in (ddp_out, one))
    assert mj2.keys() == mj1.keys()
    assert mj2["world_size"] == 2 and mj1["world_size"] == 1
    assert mj2["data_sha256"] == mj1["data_sha256"] and mj2["split_sha256"] == mj1["split_sha256"]
    w2, w1 = load_file(str(ddp_out / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert w2.keys() == w1.keys() and all(w2[k].shape == w1[k].shape for k in w1)
    assert all(torch.isfinite(v.float()).all() for v in w2.values())
    h2 = pd.read_csv(ddp_out / "history.csv")
    assert list(h2.columns) == HISTORY_COLUMNS and list(h2["epoch"]) == [1]
    c2, c1 = load_checkpoint(ddp_out / "checkpoint.pt"), load_checkpoint(one / "checkpoint.pt")
    assert c2.keys() == c1.keys() and c2["model"].keys() == c1["model"].keys()
    # one writer: one set of run files, the events of rank 0 only (one epoch-end line)
    ends = [json.loads(ln) for ln in (ddp_out / "events.jsonl").read_text().splitlines() if '"metrics"' in ln]
    assert len(ends) == 1
    # the loaded model predicts like any other
    from nhb_core.evaluate import evaluate_model

    res = evaluate_model(ddp_out, ds, split, tmp_path / "pred")
    assert set(res) == {"val", "test", "external:B"}
