"""The dashboard's background job runner (nhb_core.jobs): queue, detached start,
dead-process detection, cancel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nhb_core import jobs
from nhb_core.errors import ConfigError, RunError
from nhb_core.runs import read_status, write_status


def _wait_final(runs_dir: Path, run_dir: Path, timeout: float = 120.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        jobs.refresh(runs_dir, max_running=1)
        st = read_status(run_dir)
        if st and st["state"] in jobs.FINAL_STATES:
            return st
        time.sleep(0.3)
    raise AssertionError(f"run did not finish in {timeout}s: {read_status(run_dir)}")


def _wait_state(run_dir: Path, pred, timeout: float = 120.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = read_status(run_dir) or {}
        if pred(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"state not reached in {timeout}s: {read_status(run_dir)}")


@pytest.mark.parametrize("raw,expected", [
    ("../../etc/passwd", "etc-passwd"),
    ("my run: <script>alert(1)</script>", "my-run-script-alert-1-script"),
    ("", "run"),
    ("///", "run"),
    ("ok_name-1", "ok_name-1"),
    ("-rf", "rf"),
])
def test_sanitize_name(raw, expected):
    s = jobs.sanitize_name(raw)
    assert s == expected
    assert all(c.isalnum() or c in "_-" for c in s)


def test_submit_writes_config_and_queues(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,center\n")
    runs = tmp_path / "runs"
    cfg = {"models": ["resnet18"], "train": {"epochs": 1}}
    a = jobs.submit_study(runs, "../evil name", manifest, cfg, start=False)
    b = jobs.submit_study(runs, "../evil name", manifest, cfg, start=False)
    assert a.parent == runs and a.name == "evil-name" and b.name == "evil-name-2"
    assert yaml.safe_load((a / "config.yaml").read_text()) == cfg
    st = read_status(a)
    assert st["state"] == "queued" and st["pid"] is None
    assert st["manifest"] == str(manifest.resolve())
    assert jobs.queue_position(runs, a) == 1 and jobs.queue_position(runs, b) == 2
    # max_running=0 starts nothing
    assert jobs.start_queued(runs, max_running=0) == []
    # cancelling a queued run needs no process
    st = jobs.cancel(b)
    assert st["state"] == "cancelled"
    assert jobs.queue_position(runs, b) is None
    with pytest.raises(RunError):
        jobs.cancel(b)


def test_submit_rejects_missing_manifest(tmp_path):
    with pytest.raises(ConfigError):
        jobs.submit_study(tmp_path / "runs", "x", tmp_path / "nope.csv", {})


def test_study_command_torchrun(tmp_path):
    cmd = jobs.study_command(tmp_path / "r", "m.csv", nproc=1)
    assert cmd[:4] == [sys.executable, "-m", "nhb_core", "study"]
    assert cmd[cmd.index("--config") + 1] == str(tmp_path / "r" / "config.yaml")
    cmd2 = jobs.study_command(tmp_path / "r", "m.csv", nproc=2)
    assert "torch.distributed.run" in cmd2 and "--nproc_per_node=2" in cmd2


def test_refresh_marks_dead_process_failed(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "ghost"
    run.mkdir(parents=True)
    p = subprocess.Popen([sys.executable, "-c", "print('error: boom.txt: it broke. Fix it.')"],
                         stdout=open(run / "log.txt", "wb"), stderr=subprocess.STDOUT)
    p.wait()
    write_status(run, "running", stage="train", pid=p.pid, pgid=p.pid)
    changed = jobs.refresh(runs)
    assert run in changed
    st = read_status(run)
    assert st["state"] == "failed"
    assert "\n" not in st["error"] and "boom.txt: it broke" in st["error"] and "train" in st["error"]


def test_failed_study_shows_one_line_error(tmp_path):
    """A study on a broken manifest runs detached and ends failed with a one-line error."""
    manifest = tmp_path / "bad.csv"
    manifest.write_text("this,is,not\na,manifest,at all\n")
    runs = tmp_path / "runs"
    run = jobs.submit_study(runs, "bad", manifest, {"models": ["resnet18"], "train": {"epochs": 1}})
    st = read_status(run)
    assert st["state"] in ("running", "failed", "done") and st["pid"]
    assert st["pgid"] == st["pid"]
    # its own session / process group: survives the parent's terminal and restarts
    st = _wait_final(runs, run)
    assert st["state"] == "failed"
    assert st["error"] and "\n" not in st["error"]
    assert (run / "log.txt").read_text().strip()


def test_queue_runs_one_at_a_time_and_cancel(tmp_path, small_cohort, tiny_study_config):
    """Two submissions with max_running=1: the second waits; cancelling the running
    one kills its process group and the queue moves on."""
    runs = tmp_path / "runs"
    long_cfg = {**tiny_study_config, "models": ["resnet18"], "train": {**tiny_study_config["train"], "epochs": 200,
                                                                        "patience": 1000}}
    a = jobs.submit_study(runs, "long", small_cohort, long_cfg, max_running=1)
    b = jobs.submit_study(runs, "next", small_cohort, {**tiny_study_config, "models": ["resnet18"]}, max_running=1)
    assert read_status(a)["state"] == "running"
    assert read_status(b)["state"] == "queued" and jobs.queue_position(runs, b) == 1
    jobs.refresh(runs, max_running=1)
    assert read_status(b)["state"] == "queued"
    # wait until the study process runs its stages (its SIGTERM handler is installed)
    _wait_state(a, lambda s: s.get("stage") not in (None, "starting", "queued"), timeout=180)
    pid = read_status(a)["pid"]
    st = jobs.cancel(a, grace_s=5)
    assert st["state"] == "cancelled"
    assert not jobs.is_alive(pid)
    time.sleep(1.0)
    assert read_status(a)["state"] == "cancelled"
    jobs.refresh(runs, max_running=1)
    assert read_status(b)["state"] in ("running", "done", "failed")
    jobs.cancel(b, grace_s=2) if read_status(b)["state"] == "running" else None


def test_cancel_a_study_started_elsewhere_signals_only_its_process(tmp_path):
    """A running run without a recorded process group (e.g. a CLI study): cancel stops
    that process and never signals a group it does not lead."""
    run = tmp_path / "runs" / "cli"
    run.mkdir(parents=True)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_status(run, "running", stage="train", pid=p.pid)
        st = jobs.cancel(run, grace_s=2)
        assert st["state"] == "cancelled"
        assert not jobs.is_alive(p.pid)  # (reaped by cancel, so Popen sees no exit code)
        assert os.getpgid(0) == os.getpgrp()  # the test's own group is untouched (we are alive)
    finally:
        if p.poll() is None:
            p.kill()
