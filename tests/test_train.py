"""Training: config, schedule, sampling, the run folder files, reproducibility, resume
(after an exception and after kill -9), status on failure, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from nhb_core import train as T  # noqa: E402
from nhb_core.errors import ConfigError, DatasetError, RunError  # noqa: E402
from nhb_core.runs import read_events, read_status, write_status  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_slices import SimulatedCrash, crash_after_epoch, make_tiny_dataset, same_weights  # noqa: E402

FAST = {"epochs": 1, "batch_size": 8, "eval_batch_size": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    ds, split = make_tiny_dataset(d / "ds", size=32, n_a=12, n_b=4)
    (d / "split.json").write_text(json.dumps(split))
    return ds, split, d / "split.json"


# --------------------------------------------------------------------------- pure parts

def test_config_roundtrip_and_errors():
    c = T.TrainConfig.from_dict({"epochs": 3, "balance": "sampler", "seed": None, "augment_params": {"rotate_deg": 5}})
    assert c.epochs == 3 and c.seed == 0 and c.balance == "sampler"
    assert T.TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown train option"):
        T.TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="balance"):
        T.TrainConfig(balance="weights")
    with pytest.raises(ConfigError):
        T.TrainConfig(epochs=0)
    with pytest.raises(ConfigError):
        T.TrainConfig(augment_params={"spin": 1})
    assert T.TrainConfig(device="cpu").fingerprint() == T.TrainConfig(device="auto").fingerprint()
    assert T.TrainConfig(lr=1e-4).fingerprint() != T.TrainConfig().fingerprint()


def test_lr_schedule_warmup_then_cosine():
    total, warm = 100, 10
    f = [T.lr_factor(s, total, warm, 0.01) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warm-up
    assert f[-1] == pytest.approx(0.01, abs=0.01)


def test_epoch_positions_sharding_and_balance():
    labels = np.array([0] * 18 + [1] * 5)
    full = T.epoch_positions(23, labels, epoch=0, seed=0, balance="loss")
    assert sorted(full) == list(range(23))
    assert not np.array_equal(full, T.epoch_positions(23, labels, epoch=1, seed=0, balance="loss"))
    r0 = T.epoch_positions(23, labels, 0, 0, "loss", world_size=2, rank=0)
    r1 = T.epoch_positions(23, labels, 0, 0, "loss", world_size=2, rank=1)
    assert len(r0) == len(r1) == 12 and set(r0) | set(r1) == set(range(23))
    many = np.concatenate([T.epoch_positions(23, labels, e, 0, "sampler") for e in range(200)])
    assert abs(labels[many].mean() - 0.5) < 0.05  # class-balanced draws
    assert [len(b) for b in T.make_batches(np.arange(17), 8)] == [8, 8]  # a lone last image is dropped


def test_device_and_precision_selection():
    cpu = torch.device("cpu")
    assert T.resolve_device("cpu") == cpu
    assert T.amp_settings(cpu, True) == (None, False)
    if not torch.cuda.is_available():
        assert T.resolve_device("auto") == cpu
        with pytest.raises(ConfigError, match="no CUDA"):
            T.resolve_device("cuda")
    else:  # pragma: no cover - GPU machines
        dev = T.resolve_device("auto")
        dtype, scaler = T.amp_settings(dev, True)
        assert dtype in (torch.bfloat16, torch.float16) and scaler == (dtype == torch.float16)


# --------------------------------------------------------------------------- training runs

def _hist(p):
    return pd.read_csv(p / "history.csv").drop(columns=["seconds"])


def test_train_writes_run_folder_and_is_reproducible(tiny, tmp_path):
    ds, split, _ = tiny
    events = []
    out1 = T.train_model(ds, split, "resnet18", tmp_path / "a", dict(FAST, epochs=2), progress=events.append)
    out2 = T.train_model(ds, split, "resnet18", tmp_path / "b", dict(FAST, epochs=2))
    for name in ("model.safetensors", "model.json", "history.csv", "status.json", "events.jsonl"):
        assert (out1 / name).exists(), name
    assert not (out1 / "checkpoint.pt").exists()  # removed after success
    mj = json.loads((out1 / "model.json").read_text())
    for key in ("architecture", "timm_name", "in_chans", "input_size", "preprocessing", "threshold",
                "threshold_slice", "threshold_level", "data_sha256", "split_sha256", "versions", "seed",
                "best_epoch", "val_auc"):
        assert key in mj, key
    assert mj["in_chans"] == 1 and mj["input_size"] == [32, 32] and mj["threshold_level"] == "subject"
    assert 0.0 <= mj["threshold"] <= 1.0
    h = pd.read_csv(out1 / "history.csv")
    assert list(h.columns) == T.HISTORY_COLUMNS and list(h["epoch"]) == [1, 2]
    assert read_status(out1)["state"] == "done"
    # same seed on CPU: identical history and weights
    pd.testing.assert_frame_equal(_hist(out1), _hist(out2))
    assert same_weights(out1, out2)
    # progress: per-step events with epoch, step, ETA; epoch-end events with metrics
    steps = [e for e in events if e.get("step") and not e.get("metrics") and not e.get("message")]
    assert steps and all({"epoch", "epochs", "step", "steps", "eta_s", "model"} <= set(e) for e in steps)
    ends = [e for e in events if e.get("metrics")]
    assert [e["epoch"] for e in ends] == [1, 2] and "val_auc" in ends[0]["metrics"]
    logged = read_events(out1)
    assert any(e.get("metrics") for e in logged) and all(e["stage"] == "train" for e in logged)


def test_resume_after_interruption_equals_uninterrupted(tiny, tmp_path):
    ds, split, _ = tiny
    cfg = dict(FAST, epochs=2, balance="sampler")
    full = T.train_model(ds, split, "resnet18", tmp_path / "full", cfg)

    with pytest.raises(SimulatedCrash):
        T.train_model(ds, split, "resnet18", tmp_path / "cut", cfg, progress=crash_after_epoch(1))
    cut = tmp_path / "cut"
    st = read_status(cut)
    assert st["state"] == "failed" and "simulated crash" in st["error"]
    ck = T.load_checkpoint(cut / "checkpoint.pt")  # weights_only=True
    assert ck["epoch"] == 1 and isinstance(ck["rng"]["torch"], torch.Tensor)
    events = []
    T.train_model(ds, split, "resnet18", cut, cfg, resume=True, progress=events.append)
    assert any("resuming after epoch 1" in str(e.get("message")) for e in events)
    assert [e["epoch"] for e in events if e.get("metrics")] == [2]
    assert read_status(cut)["state"] == "done"
    pd.testing.assert_frame_equal(_hist(cut), _hist(full))
    assert same_weights(cut, full)
    # resuming a finished run does nothing
    before = (cut / "model.json").read_text()
    T.train_model(ds, split, "resnet18", cut, cfg, resume=True)
    assert (cut / "model.json").read_text() == before
    # a checkpoint from another config is refused
    T.train_model(ds, split, "resnet18", tmp_path / "k", dict(cfg, keep_checkpoint=True))
    write_status(tmp_path / "k", "running")  # as if it had been killed
    with pytest.raises(RunError, match="another model, config"):
        T.train_model(ds, split, "resnet18", tmp_path / "k", dict(cfg, lr=0.1, keep_checkpoint=True), resume=True)


def test_kill9_then_resume_cli(tiny, tmp_path):
    ds, _, split_path = tiny
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "nhb_core", "train", "--dataset", str(ds), "--split", str(split_path),
           "--model", "resnet18", "--out", str(out), "--epochs", "2", "--batch-size", "8", "--no-progress",
           "--patience", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not (out / "checkpoint.pt").exists():
        pytest.fail("no checkpoint was written before the kill: " + proc.stderr.read().decode()[-500:])
    assert read_status(out)["state"] == "running"  # killed: nobody could update it
    done_before = len(pd.read_csv(out / "history.csv"))
    assert done_before >= 1
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    h = pd.read_csv(out / "history.csv")
    assert list(h["epoch"]) == [1, 2]
    assert read_status(out)["state"] == "done"
    assert (out / "config.yaml").exists() and (out / "split.json").exists()


def test_failures_are_one_line_status(tiny, tmp_path):
    ds, split, _ = tiny
    bad = dict(split, sets={k: v for k, v in split["sets"].items() if k != "val"})
    with pytest.raises(DatasetError, match="no val set"):
        T.train_model(ds, bad, "resnet18", tmp_path / "x", FAST)
    st = read_status(tmp_path / "x")
    assert st["state"] == "failed" and "no val set" in st["error"] and "\n" not in st["error"]
    r = subprocess.run([sys.executable, "-m", "nhb_core", "train", "--dataset", str(ds), "--split",
                        str(tiny[2]), "--model", "resnet18", "--out", str(tmp_path / "y"), "--epochs", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "epochs" in r.stderr
    assert "Traceback" not in r.stderr


def test_two_channel_dataset_and_other_models(tmp_path):
    ds, split = make_tiny_dataset(tmp_path / "ds2", size=32, n_a=8, n_b=2, slices=2, in_chans=2)
    out = T.train_model(ds, split, "efficientnet_b0", tmp_path / "e", dict(FAST, augment=True))
    mj = json.loads((out / "model.json").read_text())
    assert mj["in_chans"] == 2 and mj["architecture"] == "efficientnet_b0"
