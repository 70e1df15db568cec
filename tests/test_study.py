"""The one-command study: layout, status/events, stage cache, resume after SIGTERM, leakage flag,
failures, config resolution and the CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from nhb_core.config import DEFAULTS, load_yaml, resolve_config, save_config
from nhb_core.errors import ConfigError, NHBError
from nhb_core.fileio import read_json
from nhb_core.runs import read_events, read_status

STAGE_NAMES = {"validate", "prepare", "split", "train", "baseline", "evaluate", "stats", "saliency", "report"}


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _new_events(run: Path, since: int) -> list[dict]:
    return read_events(run)[since:]


# ----------------------------------------------------------------------------- config

def test_config_defaults_yaml_and_overrides(tmp_path):
    cfg = resolve_config(None)
    assert cfg["models"] == ["resnet18", "densenet121", "efficientnet_b0"]
    assert cfg["split"]["seed"] == cfg["train"]["seed"] == 0
    f = tmp_path / "s.yaml"
    f.write_text("models: resnet18, densenet121\nseed: 3\ntrain: {epochs: 2}\nsplit: {unit: slice}\n")
    cfg = resolve_config(f, {"epochs": 5, "models": "resnet18", "split_unit": None})
    assert cfg["models"] == ["resnet18"] and cfg["train"]["epochs"] == 5 and cfg["seed"] == 3
    assert cfg["split"]["unit"] == "slice" and cfg["split"]["seed"] == 3 and cfg["train"]["seed"] == 3
    save_config(cfg, tmp_path / "config.yaml")
    again = resolve_config(tmp_path / "config.yaml")
    assert again == cfg  # a saved config resolves to itself
    for bad, word in (("modles: [resnet18]\n", "modles"), ("split: {unit: patient}\n", "unit"),
                      ("split: {foo: 1}\n", "split.foo"), ("train: {epochs: 0}\n", "epochs"),
                      ("models: [a, a]\n", "twice"), ("- a\n", "mapping"), ("a: [\n", "YAML")):
        f.write_text(bad)
        with pytest.raises(ConfigError) as ei:
            resolve_config(f)
        assert word in ei.value.line() and "\n" not in ei.value.line()
    assert set(DEFAULTS) >= {"models", "prepare", "split", "train", "stats", "saliency", "seed", "device", "n_gpus"}
    assert load_yaml(tmp_path / "config.yaml")["models"] == ["resnet18"]


# ----------------------------------------------------------------------------- a finished run

def test_layout_status_and_events(small_run, tiny_study_config):
    run = small_run
    st = read_status(run)
    assert st["state"] == "done" and st["error"] is None
    for p in ("config.yaml", "split.json", "metrics.json", "report.html", "status.json", "events.jsonl", "log.txt",
              "stages.json", "validation.json", "tables/metrics.csv", "tables/cohort.csv", "tables/flow.csv",
              "tables/delong.csv", "tables/readers.csv", "saliency/summary.json", "dataset/prepare.json"):
        assert (run / p).exists(), p
    for m in tiny_study_config["models"]:
        for f in ("model.safetensors", "model.json", "history.csv"):
            assert (run / "models" / m / f).exists()
    preds = sorted(p.name for p in (run / "predictions").iterdir())
    assert "test__subjects.csv" in preds and "test__slices.csv" in preds and "external_B__subjects.csv" in preds
    sub = pd.read_csv(run / "predictions" / "test__subjects.csv")
    assert set(tiny_study_config["models"]) <= set(sub.columns)
    events = read_events(run)
    assert STAGE_NAMES <= {e.get("stage") for e in events}
    assert {e.get("model") for e in events if e.get("stage") == "train"} >= set(tiny_study_config["models"])
    assert {e.get("model") for e in events if e.get("stage") == "evaluate"} >= set(tiny_study_config["models"])
    assert events[-1]["stage"] == "study" and events[-1]["state"] == "done"
    cfg = load_yaml(run / "config.yaml")
    assert cfg["train"]["epochs"] == 2 and Path(cfg["manifest"]).is_file()
    stages = read_json(run / "stages.json")
    assert {"validate", "prepare", "split", "evaluate", "stats", "saliency", "report"} <= set(stages)
    assert all(v["state"] == "done" and v["fingerprint"] for v in stages.values())


def test_metrics_shape_and_tables(small_run, tiny_study_config):
    m = read_json(small_run / "metrics.json")
    assert m["leaky"] is False
    assert set(m["oracle_auc"]) == {"A", "B"}  # the synthetic cohort's cohort.json
    assert {"test", "external:B", "val"} <= set(m["sets"])
    blk = m["sets"]["test"]["level"]["subject"]
    for name in tiny_study_config["models"]:
        mm = blk["models"][name]
        assert 0 <= mm["auc"] <= 1 and len(mm["auc_ci_delong"]) == 2
        thr = read_json(small_run / "models" / name / "model.json")["threshold"]
        assert mm["threshold"] == pytest.approx(thr)
    assert {"subject", "slice"} <= set(m["sets"]["test"]["level"])
    run = m["run"]
    assert run["seed"] == 0 and run["versions"]["torch"] and run["sha256"]["dataset"] and run["sha256"]["split"]
    assert set(run["sha256"]["models"]) == set(tiny_study_config["models"])
    # every AUC in metrics.json is in the tidy CSV
    tidy = pd.read_csv(small_run / "tables" / "metrics.csv")
    row = tidy[(tidy["set"] == "test") & (tidy["level"] == "subject") & (tidy["model"] == "resnet18")
               & (tidy["center"] == "all")]
    assert row["auc"].iloc[0] == pytest.approx(blk["models"]["resnet18"]["auc"])
    # table 1 and flow agree with the split
    split = read_json(small_run / "split.json")
    flow = m["cohort"]["flow"]
    assert flow["sets"]["test"]["subjects"] == len(split["sets"]["test"])
    assert sum(v["subjects"] for v in flow["sets"].values()) == flow["dataset"]["subjects"]
    sal = read_json(small_run / "saliency" / "summary.json")
    assert set(sal["models"]) == set(tiny_study_config["models"])
    for blk in sal["models"].values():
        for c in blk["cases"]:
            assert (small_run / "saliency" / c["png"]).read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_everything_and_config_change_reruns_downstream(small_run, tiny_study_config, tmp_path):
    from nhb_core.study import run_study

    run = _copy_run(small_run, tmp_path / "run")
    manifest = load_yaml(run / "config.yaml")["manifest"]
    before = read_json(run / "stages.json")
    n0 = len(read_events(run))
    run_study(manifest, run, tiny_study_config)
    new = _new_events(run, n0)
    skipped = {(e["stage"], e.get("model")) for e in new if e.get("skipped")}
    assert {("validate", None), ("prepare", None), ("split", None), ("evaluate", None), ("stats", None),
            ("saliency", None), ("report", None)} <= skipped
    assert {("train", m) for m in tiny_study_config["models"]} <= skipped
    assert not any(e.get("message") == "started" for e in new)
    assert read_json(run / "stages.json") == before
    assert read_status(run)["state"] == "done"

    # a stats option changes: only stats and report rerun
    n1 = len(read_events(run))
    cfg = {**tiny_study_config, "stats": {"n_boot": 50}}
    run_study(manifest, run, cfg)
    started = {e["stage"] for e in _new_events(run, n1) if e.get("message") == "started"}
    assert started == {"stats", "report"}
    # an output deleted by hand is recomputed
    (run / "report.html").unlink()
    n2 = len(read_events(run))
    run_study(manifest, run, cfg)
    assert {e["stage"] for e in _new_events(run, n2) if e.get("message") == "started"} == {"report"}
    assert (run / "report.html").exists()


def test_sigterm_cancels_and_rerun_resumes_training(small_run, tiny_study_config, tmp_path):
    from nhb_core.study import run_study

    run = _copy_run(small_run, tmp_path / "run")
    manifest = load_yaml(run / "config.yaml")["manifest"]
    cfg = {**tiny_study_config, "models": ["resnet18"], "train": {**tiny_study_config["train"], "epochs": 3,
                                                                  "keep_checkpoint": True},
           "saliency": {"enabled": False}}
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    n0 = len(read_events(run))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "nhb_core", "study", "--manifest", manifest, "--out", str(run),
                             "--config", str(cfg_file), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 600
    try:
        # wait until the first epoch of the new training has ended (its checkpoint is on disk)
        while time.monotonic() < deadline:
            ev = _new_events(run, n0)
            if any(e.get("stage") == "train" and e.get("metrics") and e.get("epoch", 0) >= 1 for e in ev):
                break
            if proc.poll() is not None:
                pytest.fail(f"the study ended before training: {proc.stderr.read()}")
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "cancelled" in err and "Traceback" not in err
    st = read_status(run)
    assert st["state"] == "cancelled" and st["stage"] == "train"
    # training runs in models/.resnet18.new and is swapped in when done (the old model is kept meanwhile)
    assert (run / "models" / ".resnet18.new" / "checkpoint.pt").exists()
    assert (run / "models" / "resnet18" / "model.safetensors").exists()
    # rerun in-process: validate/prepare/split skipped, training resumes from the checkpoint
    n1 = len(read_events(run))
    run_study(manifest, run, cfg)
    new = _new_events(run, n1)
    assert {e["stage"] for e in new if e.get("skipped")} >= {"validate", "prepare", "split"}
    assert any("resum" in str(e.get("message", "")) for e in new if e.get("stage") == "train"), new
    assert read_json(run / "stages.json")["train:resnet18"]["resumable"] is True
    hist = pd.read_csv(run / "models" / "resnet18" / "history.csv")
    assert list(hist["epoch"]) == sorted(set(hist["epoch"]))  # no epoch trained twice
    assert read_status(run)["state"] == "done"


def test_slice_split_is_flagged_leaky(small_run, tiny_study_config, tmp_path):
    from nhb_core.study import run_study

    run = _copy_run(small_run, tmp_path / "run")
    manifest = load_yaml(run / "config.yaml")["manifest"]
    cfg = {**tiny_study_config, "models": ["resnet18"], "train": {**tiny_study_config["train"], "epochs": 1},
           "saliency": {"enabled": False}}
    run_study(manifest, run, cfg, overrides={"split_unit": "slice"})
    m = read_json(run / "metrics.json")
    assert m["leaky"] is True and m["n_shared_subjects"] > 0
    assert m["run"]["split_unit"] == "slice"
    html = (run / "report.html").read_text()
    assert 'id="leakage-banner"' in html and f"{m['n_shared_subjects']} subjects shared" in html


def test_bad_manifest_fails_with_one_line(tmp_path, small_cohort):
    from nhb_core.study import run_study

    bad = tmp_path / "manifest.csv"
    df = pd.read_csv(small_cohort)
    df.loc[0, "label"] = 7
    t1col = "t1" if "t1" in df.columns else "t1_path"
    df[t1col] = [str((small_cohort.parent / p).resolve()) for p in df[t1col]]
    roicol = "roi" if "roi" in df.columns else "roi_path"
    df[roicol] = [str((small_cohort.parent / p).resolve()) for p in df[roicol]]
    df.to_csv(bad, index=False)
    with pytest.raises(NHBError):
        run_study(bad, tmp_path / "run", {"models": ["resnet18"], "validate": {"check_images": False}})
    st = read_status(tmp_path / "run")
    assert st["state"] == "failed" and st["stage"] == "validate" and "\n" not in st["error"]
    assert "manifest.csv" in st["error"]
    r = subprocess.run([sys.executable, "-m", "nhb_core", "study", "--manifest", str(bad), "--out",
                        str(tmp_path / "run2"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "nhb_core", "study", "--manifest", str(tmp_path / "nope.csv"),
                        "--out", str(tmp_path / "run3"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr


def test_cli_rerun_prints_auc_table(small_run, tmp_path):
    run = _copy_run(small_run, tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "nhb_core", "study", "--config", str(run / "config.yaml"),
                        "--out", str(run), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "AUC [95% CI]" in r.stdout and "resnet18" in r.stdout and "internal test" in r.stdout
    assert "external center B" in r.stdout


def test_demo_command_small_preset(tmp_path):
    """`demo` synthesises the cohort into RUNDIR/cohort, runs the study and ends with the AUC table."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("models: [resnet18]\nprepare: {size: 32}\ntrain: {epochs: 1, batch_size: 16}\n"
                   "stats: {n_boot: 100}\nsaliency: {enabled: false}\n")
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "nhb_core", "demo", "--out", str(out), "--preset", "small",
                        "--config", str(cfg), "--quiet"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert (out / "cohort" / "manifest.csv").exists() and (out / "report.html").exists()
    assert read_status(out)["state"] == "done"
    assert "AUC [95% CI]" in r.stdout and "resnet18" in r.stdout
    m = read_json(out / "metrics.json")
    assert m["oracle_auc"] and m["run"]["name"] == "demo (small preset)"
