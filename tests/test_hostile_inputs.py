"""Hostile and careless inputs (issue 14, ``docs/security.md``): no input deletes, overwrites or
writes outside its run folder, exhausts memory, or fails with more than one clear line.

Each CLI case asserts the one-line message (``error: <file>: <problem>. <fix>.``), exit code 2,
no traceback, that nothing outside the run folder changed and that no file was deleted; the
bombs run in a subprocess whose peak RSS is measured.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_dicom import write_series
from test_manifest import AFFINE, edit_manifest, make_cohort

from nhb_core.errors import ConfigError, DatasetError, DicomError, ImageError, NHBError, RunError
from nhb_core.io import load_t1

SHARED_ENHANCED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "siemens_xa30_enhanced"

#: the issue's bound: any input up to 50 MB keeps the peak memory under 2 GB; these small bombs stay far below
RSS_LIMIT_KB = 1_000_000


# ----------------------------------------------------------------------------- helpers

def run_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "nhb_core", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=600)


#: the peak RSS of this process (KiB): VmHWM, which starts afresh at exec (getrusage's ru_maxrss
#: would carry over the parent's peak from the fork)
_HWM = ("def _hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1])\n"
        "    import resource\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n")


def run_measured(code: str, env=None) -> tuple[str, int]:
    """Run ``code`` in a fresh Python; returns (its stdout, its peak RSS in KiB).

    ``code`` may raise an NHBError: its line is printed as ``ERR <line>``."""
    script = ("import sys\nfrom nhb_core.errors import NHBError\ntry:\n"
              + textwrap.indent(textwrap.dedent(code), "    ")
              + "\nexcept NHBError as err:\n    print('ERR', err.line())\n"
              + _HWM + "print('MAXRSS', _hwm())\n")
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=e, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    rss = int(next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("MAXRSS")))
    return r.stdout, rss


def cli_measured(*args, env=None) -> tuple[int, str, int]:
    """The real CLI in a subprocess that reports its own peak RSS: (exit code, stderr, KiB)."""
    code = (_HWM + "import runpy, sys\nsys.argv = ['nhb_core', *sys.argv[1:]]\ntry:\n"
            "    runpy.run_module('nhb_core', run_name='__main__', alter_sys=True)\nfinally:\n"
            "    sys.stderr.write(f\"\\nMAXRSS {_hwm()}\\n\")\n")
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=e,
                       timeout=600, cwd=Path(__file__).resolve().parents[1])
    rss = int(next(ln.split()[1] for ln in r.stderr.splitlines() if ln.startswith("MAXRSS")))
    return r.returncode, r.stderr, rss


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def errors_of(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def assert_one_line(r, expected: str, where: str | None = None) -> str:
    """Exit 2, no traceback, an ``error:`` line holding ``expected`` (and starting with ``where``)."""
    out = r.stderr if hasattr(r, "stderr") else r[1]
    rc = r.returncode if hasattr(r, "returncode") else r[0]
    assert rc == 2, out
    assert "Traceback" not in out
    errs = errors_of(out)
    hits = [ln for ln in errs if expected in ln and (where is None or ln.startswith(f"error: {where}"))]
    assert hits, out
    assert hits[0].endswith(".")
    return hits[0]


def tiny_cohort(root: Path) -> Path:
    m = make_cohort(root, n=3, label=True)
    edit_manifest(m, lambda df: df.assign(label=["0", "1", "0"], nbna=["38", "30", "39"]))
    return m


def nifti_header_bytes(shape, dtype=np.float32) -> bytes:
    """A valid NIfTI-1 header + 4 extension bytes declaring ``shape`` (no voxel data)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(AFFINE, code=1)
    hdr.set_sform(AFFINE, code=1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\x00" * 4


@pytest.fixture(scope="module")
def one_model_run(small_cohort, tmp_path_factory) -> Path:
    """A finished one-model study (resnet18, 1 epoch, 32 px) on the small cohort: read-only, copy it."""
    from nhb_core.study import run_study

    run = tmp_path_factory.mktemp("hostile") / "run"
    cfg = {"models": ["resnet18"], "prepare": {"size": 32}, "train": {"epochs": 1, "batch_size": 16},
           "stats": {"n_boot": 20}, "saliency": {"enabled": False}, "seed": 0}
    run_study(small_cohort, run, cfg)
    return run


@pytest.fixture
def run_copy(one_model_run, tmp_path) -> Path:
    dst = tmp_path / "area" / "run"
    shutil.copytree(one_model_run, dst)
    (tmp_path / "area" / "victim").mkdir()
    (tmp_path / "area" / "victim" / "precious.txt").write_text("keep me")
    return dst


# ----------------------------------------------------------------------------- 1-3 data loss and path escapes

@pytest.mark.parametrize("models", ["..", "VICTIM", "../victim", "a/b", ".hidden"])
def test_path_like_model_names_are_refused_before_anything_is_deleted(run_copy, models):
    area = run_copy.parent
    models = str(area / "victim") if models == "VICTIM" else models
    before = snapshot(area)
    r = run_cli("study", "--out", run_copy, "--config", run_copy / "config.yaml", "--models", models, "--quiet")
    assert_one_line(r, "is not a plain name", where="--models: model name")
    assert snapshot(area) == before  # the finished run and the folder next to it are untouched


def test_model_name_in_a_config_file_is_refused_naming_the_file(run_copy, tmp_path):
    area = run_copy.parent
    cfg = tmp_path / "user.yaml"
    from nhb_core.config import load_yaml

    man = load_yaml(run_copy / "config.yaml")["manifest"]
    cfg.write_text(f"manifest: {json.dumps(man)}\nmodels: [../victim]\n")
    before = snapshot(area)
    r = run_cli("study", "--out", run_copy, "--config", cfg, "--quiet")
    assert_one_line(r, "model name '../victim' is not a plain name", where=f"{cfg}: ")
    assert snapshot(area) == before


def test_device_without_gpu_keeps_the_finished_run(run_copy):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    area = run_copy.parent
    before = snapshot(area)
    r = run_cli("study", "--out", run_copy, "--config", run_copy / "config.yaml", "--device", "cuda", "--epochs", "2",
                "--quiet")
    assert_one_line(r, "no CUDA GPU is available", where="--device: ")
    assert snapshot(area) == before  # models, metrics.json and report.html are all still there


def test_malformed_device_is_refused(run_copy):
    before = snapshot(run_copy.parent)
    r = run_cli("study", "--out", run_copy, "--config", run_copy / "config.yaml", "--device", "cuda;rm -rf ~", "--quiet")
    assert_one_line(r, "is not one of auto, cpu, cuda, cuda:N, mps", where="--device: ")
    assert snapshot(run_copy.parent) == before


def test_failed_retraining_keeps_the_old_model(run_copy, monkeypatch):
    """A retraining that fails (here: train_model raises) never deletes the model it was to replace."""
    import nhb_core.train
    from nhb_core.config import load_yaml
    from nhb_core.study import run_study

    weights = run_copy / "models" / "resnet18" / "model.safetensors"
    old = weights.read_bytes()
    metrics = (run_copy / "metrics.json").read_bytes()

    def boom(*a, **k):
        out = Path(a[3])
        out.mkdir(parents=True, exist_ok=True)
        (out / "partial.bin").write_bytes(b"x")
        raise RunError(out, "simulated failure", "none")

    monkeypatch.setattr(nhb_core.train, "train_model", boom)
    cfg = load_yaml(run_copy / "config.yaml")
    cfg["train"]["epochs"] = 2
    with pytest.raises(RunError, match="simulated failure"):
        run_study(None, run_copy, cfg)
    assert weights.read_bytes() == old
    assert (run_copy / "metrics.json").read_bytes() == metrics
    assert (run_copy / "models" / ".resnet18.new" / "partial.bin").exists()  # the new one stays aside


def test_swap_in_replaces_a_folder_only_with_a_finished_one(tmp_path):
    from nhb_core.study import _swap_in

    run = tmp_path / "run"
    (run / "models" / "m").mkdir(parents=True)
    (run / "models" / "m" / "old.txt").write_text("old")
    (run / "models" / ".m.new").mkdir()
    (run / "models" / ".m.new" / "new.txt").write_text("new")
    _swap_in(run / "models" / ".m.new", run / "models" / "m", run)
    assert sorted(p.name for p in (run / "models").iterdir()) == ["m"]
    assert (run / "models" / "m" / "new.txt").read_text() == "new"
    with pytest.raises(RunError, match="outside the run folder"):
        _swap_in(run / "models" / ".m.new", tmp_path / "elsewhere", run)


def test_safe_rmtree_refuses_outside_and_the_run_itself(tmp_path):
    from nhb_core.safety import safe_rmtree

    run = tmp_path / "run"
    (run / "models" / "x").mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    with pytest.raises(RunError, match="outside the run folder"):
        safe_rmtree(run / "models" / ".." / ".." / "victim", run)
    with pytest.raises(RunError, match="run folder itself"):
        safe_rmtree(run / "models" / "..", run)
    (run / "models" / "link").symlink_to(tmp_path / "victim")
    safe_rmtree(run / "models" / "link", run)  # a link is unlinked, its target kept
    assert (tmp_path / "victim").is_dir() and not (run / "models" / "link").exists()
    safe_rmtree(run / "models" / "x", run)
    assert not (run / "models" / "x").exists()


@pytest.mark.parametrize("center, text", [
    ("x/../../../../PWNED", "center 'x/../../../../PWNED' contains '/'"),
    ("Site A/B", "center 'Site A/B' contains '/'"),
    ("..", "center '..' is '.' or '..'"),
])
def test_center_names_that_become_paths_are_refused(tmp_path, center, text):
    m = tiny_cohort(tmp_path / "cohort")
    edit_manifest(m, lambda df: df.assign(center=["A", center, "A"]))
    before = snapshot(tmp_path)
    r = run_cli("validate", m)
    assert_one_line(r, text, where=f"{m}:3: ")
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.parent.glob("PWNED*"))


def test_center_with_a_space_is_fine(tmp_path):
    m = tiny_cohort(tmp_path / "cohort")
    edit_manifest(m, lambda df: df.assign(center=["Site A", "Site B", "Site A"]))
    r = run_cli("validate", m)
    assert r.returncode == 0, r.stderr


def test_set_file_stem_refuses_a_path_escape():
    from nhb_core.runs import set_file_stem

    assert set_file_stem("external:Site B") == "external_Site B"
    with pytest.raises(DatasetError, match="contains '/'"):
        set_file_stem("external:../../../PWNED")


def test_upload_names_never_become_paths(tmp_path):
    from nhb_dashboard.data import save_upload

    folder = tmp_path / "up"
    folder.mkdir()
    data = gzip.compress(nifti_header_bytes((4, 4, 4)) + b"\x00" * 256)
    p = save_upload(data, "../../../etc/evil.nii.gz", folder, "t1")
    assert p == folder / "t1.nii.gz" and sorted(tmp_path.rglob("*")) == [folder, p]


def test_run_names_are_sanitised():
    from nhb_core.jobs import sanitize_name

    for name in ("../../etc", "/abs/path", "..", "a/../../b", "-rf"):
        s = sanitize_name(name)
        assert "/" not in s and not s.startswith((".", "-")) and s


# ----------------------------------------------------------------------------- 6 run lock

def test_second_study_on_a_locked_run_is_refused(run_copy):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from nhb_core.safety import run_lock
        with run_lock(Path({str(run_copy)!r})):
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_copy.parent)
        r = run_cli("study", "--out", run_copy, "--config", run_copy / "config.yaml", "--epochs", "2", "--quiet")
        line = assert_one_line(r, f"the run folder is locked by another study (process {holder.pid} on "
                                  f"{socket.gethostname()}", where=f"{run_copy}: ")
        assert "Wait for it to finish" in line
        assert snapshot(run_copy.parent) == before
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, capfd):
    from nhb_core.safety import HOLDER_NAME, run_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / HOLDER_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                    "started": "2026-01-01T00:00:00"}))
    with run_lock(tmp_path) as info:
        assert info["pid"] == os.getpid()
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    err = capfd.readouterr().err
    assert f"warning: {tmp_path}: taking over a stale lock left by process {dead.pid}" in err
    assert not (tmp_path / HOLDER_NAME).exists()  # released: the holder record goes with it
    with run_lock(tmp_path):  # and it can be taken again
        pass


def test_lock_dies_with_its_process(tmp_path):
    """A holder killed with SIGKILL leaves no lock behind (an OS lock), only a stale record."""
    from nhb_core.safety import HOLDER_NAME, run_lock

    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from nhb_core.safety import run_lock
        with run_lock(Path({str(tmp_path)!r})):
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match="locked by another study"):
        with run_lock(tmp_path):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / HOLDER_NAME).exists()
    with run_lock(tmp_path) as info:
        assert info["pid"] == os.getpid()


# ----------------------------------------------------------------------------- 4 image bombs and limits

def test_header_declaring_billions_of_voxels_is_refused_before_reading(tmp_path):
    m = tiny_cohort(tmp_path / "cohort")
    t1 = tmp_path / "cohort" / "images" / "S002_t1.nii.gz"
    t1.write_bytes(gzip.compress(nifti_header_bytes((2048, 2048, 1024)) + b"\x00" * 4096))
    before = snapshot(tmp_path)
    r = cli_measured("validate", m)
    assert_one_line(r, "T1 declares 4,294,967,296 voxels (shape (2048, 2048, 1024)), more than the limit of "
                       "134,217,728", where=f"{m}:3: ")
    assert "NHB_MAX_VOXELS" in r[1]
    assert r[2] < RSS_LIMIT_KB, r[2]
    assert snapshot(tmp_path) == before


def test_header_declaring_too_many_bytes_is_refused(tmp_path):
    p = tmp_path / "t1.nii.gz"
    p.write_bytes(gzip.compress(nifti_header_bytes((512, 512, 512), np.float64)))
    out, rss = run_measured(f"from nhb_core.io import load_t1\nload_t1({str(p)!r})")
    assert "ERR" in out and "T1 declares 1.0 GiB of voxel data, more than the limit of 512.0 MiB" in out
    assert "NHB_MAX_IMAGE_BYTES" in out
    assert rss < RSS_LIMIT_KB


def test_real_gzip_bomb_over_the_byte_limit(tmp_path):
    """64 MiB of voxels in a 64 KiB .nii.gz, with NHB_MAX_IMAGE_BYTES lowered to 16 MiB."""
    p = tmp_path / "bomb.nii.gz"
    with gzip.open(p, "wb", compresslevel=9) as fh:
        fh.write(nifti_header_bytes((256, 256, 256), np.float32))
        block = b"\x00" * (1 << 20)
        for _ in range(64):
            fh.write(block)
    assert p.stat().st_size < 200_000
    out, rss = run_measured(f"from nhb_core.io import load_t1\nload_t1({str(p)!r})",
                            env={"NHB_MAX_IMAGE_BYTES": str(16 << 20)})
    assert "ERR" in out and "64.0 MiB of voxel data, more than the limit of 16.0 MiB" in out
    assert rss < 400_000, rss


def test_large_but_allowed_gzip_is_read_in_bounded_memory(tmp_path):
    """The same 64 MiB volume under the default limits: read (then refused as blank), peak RSS bounded."""
    p = tmp_path / "big.nii.gz"
    with gzip.open(p, "wb", compresslevel=1) as fh:
        fh.write(nifti_header_bytes((256, 256, 256), np.float32))
        block = b"\x00" * (1 << 20)
        for _ in range(64):
            fh.write(block)
    out, rss = run_measured(f"from nhb_core.io import load_t1\nload_t1({str(p)!r})")
    assert "T1 is blank: every voxel is 0" in out
    assert rss < RSS_LIMIT_KB, rss


def test_truncated_bomb_diagnosis_counts_without_buffering(tmp_path):
    """A truncated 64 MiB stream: the error path counts bytes, it does not gunzip into memory."""
    p = tmp_path / "cut.nii.gz"
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as fh:
        fh.write(nifti_header_bytes((256, 256, 256), np.float32))
        fh.write(b"\x00" * (48 << 20))
    p.write_bytes(raw.getvalue()[:-20])  # gzip trailer and some data cut
    out, rss = run_measured(f"from nhb_core.io import load_t1\nload_t1({str(p)!r})")
    assert "ERR" in out and "truncated" in out
    assert rss < RSS_LIMIT_KB, rss


def test_voxel_limit_is_configurable_by_environment(tmp_path):
    m = tiny_cohort(tmp_path / "cohort")
    r = run_cli("validate", m, env={"NHB_MAX_VOXELS": "1000"})
    assert_one_line(r, "more than the limit of 1,000", where=f"{m}:2: ")
    r = run_cli("validate", m, env={"NHB_MAX_VOXELS": "lots"})
    assert r.returncode == 2 and "environment variable NHB_MAX_VOXELS='lots' is not a number" in r.stderr
    assert "Traceback" not in r.stderr


def test_dicom_series_over_the_voxel_limit(tmp_path):
    write_series(tmp_path / "s", n=6, rows=8, cols=7)
    out, _ = run_measured(f"from nhb_core.io import load_t1\nload_t1({str(tmp_path / 's')!r})",
                          env={"NHB_MAX_VOXELS": "300"})
    assert "ERR" in out and "DICOM series declares 336 voxels" in out


def _zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_upload_bomb_is_refused_in_bounded_memory(tmp_path):
    z = tmp_path / "bomb.zip"
    z.write_bytes(_zip_of({"IM0001.dcm": b"\x00" * (64 << 20)}))
    assert z.stat().st_size < 200_000
    out, rss = run_measured(textwrap.dedent(f"""
        from pathlib import Path
        from nhb_dashboard.data import save_upload
        Path({str(tmp_path / 'up')!r}).mkdir()
        save_upload(Path({str(z)!r}).read_bytes(), 'scan.zip', {str(tmp_path / 'up')!r}, 't1')
        """), env={"NHB_MAX_IMAGE_BYTES": str(8 << 20)})
    assert "ERR uploaded T1 file 'scan.zip': the zip archive is too large" in out
    assert rss < 400_000, rss


def test_zip_member_lying_about_its_size_is_cut_off(tmp_path):
    """A member whose headers declare 1 KiB but whose stream holds 32 MiB: never written out whole."""
    data = bytearray(_zip_of({"IM0001.dcm": b"\x00" * (32 << 20)}))
    real = 32 << 20
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header / central directory file_size
        i = data.find(sig)
        assert struct.unpack("<I", data[i + off:i + off + 4])[0] == real
        data[i + off:i + off + 4] = struct.pack("<I", 1024)
    from nhb_dashboard.data import save_upload

    (tmp_path / "up").mkdir()
    with pytest.raises(ImageError, match="the zip archive is corrupt"):
        save_upload(bytes(data), "scan.zip", tmp_path / "up", "t1")
    assert sum(p.stat().st_size for p in (tmp_path / "up").rglob("*") if p.is_file()) <= 1024


def test_dev_zero_as_manifest(tmp_path):
    r = run_cli("validate", "/dev/zero")
    assert_one_line(r, "manifest is not a regular file (a device, pipe or socket)", where="/dev/zero: ")


def test_manifest_over_the_size_limit(tmp_path):
    m = tiny_cohort(tmp_path / "cohort")
    r = run_cli("validate", m, env={"NHB_MAX_MANIFEST_BYTES": "100"})
    assert_one_line(r, "more than the limit of 100 bytes", where=f"{m}: ")


# ----------------------------------------------------------------------------- 5 YAML

BILLION_LAUGHS = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] +
                           [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
                           ) + "\nname: *i\n"


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BILLION_LAUGHS)
    t0 = time.monotonic()
    r = cli_measured("study", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "run", "--config", cfg, "--quiet")
    assert_one_line(r, "YAML alias *a is not allowed in a config", where=f"{cfg}:2: ")
    assert time.monotonic() - t0 < 60
    assert r[2] < RSS_LIMIT_KB


def test_any_yaml_alias_is_refused_saying_so(tmp_path):
    from nhb_core.config import load_yaml

    p = tmp_path / "c.yaml"
    p.write_text("train: &t {epochs: 2}\nprepare: *t\n")
    with pytest.raises(ConfigError, match=r"YAML alias \*t is not allowed.*Write the value out in full"):
        load_yaml(p)


def test_oversized_config_file(tmp_path):
    from nhb_core.config import load_yaml

    p = tmp_path / "c.yaml"
    p.write_text("# " + "x" * (2 << 20) + "\nseed: 1\n")
    with pytest.raises(ConfigError, match="config is 2.0 MiB, more than the limit of 1.0 MiB"):
        load_yaml(p)


# ----------------------------------------------------------------------------- 10 config and model.json up front

@pytest.mark.parametrize("yaml_text, expected", [
    ("stats: {n_boot: many}\n", "stats.n_boot must be an integer, not 'many'"),
    ("train: {epochs: 1, warp_speed: 9}\n", "unknown option(s) 'train.warp_speed'"),
    ("split: {test_size: lots}\n", "split.test_size must be a number, not 'lots'"),
    ("split: {test_size: 0.6, val_size: 0.5}\n", "split.test_size + split.val_size = 1.1 leaves no training data"),
    ("prepare: {size: 100000}\n", "prepare.size = 100000 is out of range"),
    ("train: {augment: maybe}\n", "train.augment must be true or false, not 'maybe'"),
    ("evaluate: {aggregate: mode}\n", "evaluate.aggregate must be one of mean, median, max, not 'mode'"),
    ("saliency: {method: magic}\n", "saliency.method must be one of gradcam, gradcam++, eigencam, layercam"),
])
def test_config_errors_come_first_and_name_the_users_file(tmp_path, yaml_text, expected):
    m = tiny_cohort(tmp_path / "cohort")
    cfg = tmp_path / "user.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "run"
    r = run_cli("study", "--manifest", m, "--out", out, "--config", cfg, "--quiet")
    assert_one_line(r, expected, where=f"{cfg}: ")
    assert not (out / "validation.json").exists() and not (out / "dataset").exists()  # before any work


def test_cli_option_errors_name_the_option(tmp_path):
    m = tiny_cohort(tmp_path / "cohort")
    r = run_cli("study", "--manifest", m, "--out", tmp_path / "run", "--epochs", "0", "--quiet")
    assert_one_line(r, "train.epochs must be a positive integer, not 0", where="--epochs: ")


def _model_dir(tmp_path: Path, **fields) -> Path:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    mj = {"architecture": "resnet18", "timm_name": "resnet18", "in_chans": 1, "input_size": [32, 32],
          "threshold": 0.5, **fields}
    (d / "model.json").write_text(json.dumps(mj))
    (d / "model.safetensors").write_bytes(b"")
    return d


@pytest.mark.parametrize("fields, expected", [
    ({"in_chans": "abc"}, "model.json in_chans must be an integer from 1 to 16, not 'abc'"),
    ({"in_chans": 200000}, "model.json in_chans must be an integer from 1 to 16, not 200000"),
    ({"threshold": "high"}, "model.json threshold must be a number from 0 to 1, not 'high'"),
    ({"timm_name": "../../x", "architecture": None}, "model.json names no valid architecture"),
    ({"input_size": [32, 10 ** 9]}, "model.json input_size must be two integers from 8 to 1024"),
])
def test_model_json_is_validated_before_a_model_is_built(tmp_path, fields, expected):
    from nhb_core.models import load_trained

    d = _model_dir(tmp_path, **fields)
    t0 = time.monotonic()
    with pytest.raises(RunError) as ei:
        load_trained(d)
    assert expected in ei.value.line() and ei.value.line().startswith(str(d / "model.json"))
    assert "\n" not in ei.value.line() and time.monotonic() - t0 < 30


# ----------------------------------------------------------------------------- 7-8 DICOM

def test_extensionless_dicom_that_fails_to_read_is_an_error(tmp_path):
    files = write_series(tmp_path / "s", n=6)
    renamed = []
    for f in files:  # GE-style / PACS exports without an extension
        g = f.with_name(f.stem)
        f.rename(g)
        renamed.append(g)
    bad = renamed[2]
    bad.write_bytes(bad.read_bytes()[:200])  # keeps the DICM preamble, loses the rest
    with pytest.raises(DicomError) as ei:
        load_t1(tmp_path / "s")
    line = ei.value.line()
    assert line.startswith(f"{bad}: ") and "truncated" in line and "Copy the series again" in line


def test_truncated_pixel_data_says_truncated_with_the_right_fix(tmp_path):
    files = write_series(tmp_path / "s", n=6)
    files[3].write_bytes(files[3].read_bytes()[:-40])
    with pytest.raises(DicomError) as ei:
        load_t1(tmp_path / "s")
    line = ei.value.line()
    assert line.startswith(f"{files[3]}: DICOM file is truncated")
    assert "Copy the series again from the scanner or PACS" in line
    assert "dcm2niix" not in line and "gdcmconv" not in line


def test_two_series_sharing_number_and_description_are_told_apart(tmp_path):
    write_series(tmp_path / "s", n=4, series_number=3, description="t1")
    write_series(tmp_path / "s", n=3, series_number=3, description="t1", start=10)
    with pytest.raises(DicomError) as ei:
        load_t1(tmp_path / "s")
    line = ei.value.line()
    assert "folder holds 2 DICOM series" in line and "(4 files" in line and "(3 files" in line
    uids = [part.split("UID ending ")[1].split(")")[0] for part in line.split("; ")]
    assert len(set(uids)) == 2, line
    assert "Doe" not in line and "PID-123456" not in line


def test_gzipped_dicom_folder_says_decompress(tmp_path):
    for f in write_series(tmp_path / "s", n=4):
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    with pytest.raises(DicomError) as ei:
        load_t1(tmp_path / "s")
    assert "holds 4 gzip-compressed file(s)" in ei.value.line() and "Decompress them first" in ei.value.line()


def test_enhanced_multiframe_matches_dcm2niix(tmp_path):
    """The shared Siemens XA30 enhanced file: geometry and voxels as dcm2niix (README's reference)."""
    import hashlib

    import nibabel as nib

    src = SHARED_ENHANCED / "0001_enhanced_t1w.dcm"
    if not src.is_file():
        pytest.skip("../shared enhanced DICOM absent")
    (tmp_path / "s").mkdir()
    shutil.copy(src, tmp_path / "s" / src.name)
    vol = load_t1(tmp_path / "s")
    assert vol.shape == (96, 128, 128)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    ref = np.array([[2, 0, 0, -89.576], [0, 2, 0, -97.906], [0, 0, 2, -140.776], [0, 0, 0, 1]])
    np.testing.assert_allclose(vol.affine, ref, atol=1e-3)
    data = vol.data.astype(np.int16)
    assert int(data.astype(np.int64).sum()) == 126603839 and int(data.max()) == 1588
    assert hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest() == \
        "95cdb42708ea43b2b9804163a3fca705dac0c2711ae0a3c8fc604177cc8ef3b1"
    assert vol.meta["n_frames"] == 96
    assert not any(k.lower().startswith("patient") for k in vol.meta)


def _enhanced_from_series(files: list[Path], out: Path) -> None:
    """One enhanced MR file with per-frame geometry, built with pydicom from a classic series."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage

    dss = [pydicom.dcmread(f) for f in files]
    ds = pydicom.dcmread(files[0])
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.NumberOfFrames = len(dss)
    shared = Dataset()
    ori, mea = Dataset(), Dataset()
    ori.ImageOrientationPatient = dss[0].ImageOrientationPatient
    mea.PixelSpacing = dss[0].PixelSpacing
    shared.PlaneOrientationSequence = Sequence([ori])
    shared.PixelMeasuresSequence = Sequence([mea])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for d in reversed(dss):  # frames stored in reverse order: sorted by position on reading
        it, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = d.ImagePositionPatient
        it.PlanePositionSequence = Sequence([pos])
        per.append(it)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = b"".join(d.PixelData for d in reversed(dss))
    ds.save_as(out, enforce_file_format=True)


def test_enhanced_file_built_from_a_classic_series_loads_the_same(tmp_path):
    files = write_series(tmp_path / "classic", n=6, iop=(0, 1, 0, 0, 0, -1))
    (tmp_path / "enh").mkdir()
    _enhanced_from_series(files, tmp_path / "enh" / "multi.dcm")
    a, b = load_t1(tmp_path / "classic"), load_t1(tmp_path / "enh")
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)


# ----------------------------------------------------------------------------- 9 CSV formula injection

def test_neutralise_csv_cells():
    from nhb_core.safety import neutralise_csv

    df = pd.DataFrame({"subject_id": ["=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0", "@SUM(A1)", "-2+3",
                                      "\tx", "-5", "S01"],
                       "p": [0.1, -0.2, 0.3, 0.4, 0.5, 0.6, 0.7]})
    out = neutralise_csv(df)
    assert list(out["subject_id"]) == ["'=HYPERLINK(\"http://x\",\"y\")", "'+cmd|' /C calc'!A0", "'@SUM(A1)", "'-2+3",
                                       "'\tx", "-5", "S01"]
    assert list(out["p"]) == list(df["p"])  # numbers stay numbers


def test_tables_for_people_are_neutralised(tmp_path):
    from nhb_core import stats
    from nhb_core.study import write_tables

    metrics = {"cohort": {"table1": [{"center": "A", "group": "all", "n": 2, "note": "=HYPERLINK(\"x\")"}],
                          "flow": {"dataset": {"subjects": 2, "slices": 4, "centers": ["A"]}, "sets": {}}},
               "sets": {}}
    orig = stats.tidy_table
    try:
        stats.tidy_table = lambda m: pd.DataFrame([{"set": "test", "model": "@evil", "auc": -0.5}])
        write_tables(metrics, tmp_path)
    finally:
        stats.tidy_table = orig
    cohort = pd.read_csv(tmp_path / "cohort.csv", dtype=str)
    assert cohort.loc[0, "note"] == "'=HYPERLINK(\"x\")"
    met = pd.read_csv(tmp_path / "metrics.csv")
    assert met.loc[0, "model"] == "'@evil" and met.loc[0, "auc"] == -0.5


def test_download_is_neutralised_and_the_file_kept(tmp_path):
    from nhb_dashboard.data import csv_download

    p = tmp_path / "test__subjects.csv"
    p.write_text("subject_id,center,label,resnet18\nS1,A,1,0.5\n\"=1+1\",A,0,-0.25\n")
    before = p.read_bytes()
    got = pd.read_csv(io.BytesIO(csv_download(p)), dtype=str)
    assert list(got["subject_id"]) == ["S1", "'=1+1"] and list(got["resnet18"]) == ["0.5", "-0.25"]
    assert p.read_bytes() == before


def test_formula_like_subject_ids_are_refused_at_the_manifest(tmp_path):
    m = tiny_cohort(tmp_path / "cohort")
    edit_manifest(m, lambda df: df.assign(subject_id=["S001", "=HYPERLINK(\"http://evil\",\"x\")", "S003"]))
    r = run_cli("validate", m)
    assert_one_line(r, "which spreadsheets run as a formula", where=f"{m}:3: ")


def test_machine_read_csvs_round_trip_exactly(tmp_path):
    from nhb_core.evaluate import _merge_write

    df = pd.DataFrame({"subject_id": ["S-01", "A+B", "x=y", "007"], "center": ["Site A", "B", "B", "B"],
                       "label": [0, 1, 0, 1], "resnet18": [0.125, 0.5, 0.75, 1e-07]})
    p = tmp_path / "test__subjects.csv"
    _merge_write(p, df, ["subject_id", "center", "label"], "resnet18")
    back = pd.read_csv(p, dtype={"subject_id": str, "center": str})
    pd.testing.assert_frame_equal(back, df)


# ----------------------------------------------------------------------------- 11 small things

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, mask, mode):
    from nhb_core.fileio import atomic_write_json

    old = os.umask(mask)
    try:
        p = atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == mode


def test_temp_files_left_by_a_killed_writer_are_cleaned(tmp_path):
    from nhb_core.fileio import remove_stale_temps

    (tmp_path / "models").mkdir()
    stale = [tmp_path / ".config.yaml.a1b2c3d4.tmp.yaml", tmp_path / "models" / ".model.json.zz_99xyz.tmp.json"]
    keep = [tmp_path / ".study.lock", tmp_path / "config.yaml", tmp_path / ".notes.tmp"]
    fresh = tmp_path / ".status.json.q1w2e3r4.tmp.json"  # maybe being written right now: kept
    for p in stale + keep + [fresh]:
        p.write_text("x")
        if p is not fresh:
            os.utime(p, (time.time() - 3600, time.time() - 3600))
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep + [fresh]) and not any(p.exists() for p in stale)


def test_refresh_of_a_killed_job_keeps_the_signal(tmp_path):
    from nhb_core import jobs
    from nhb_core.runs import read_status, write_status

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    jobs._CHILDREN[proc.pid] = proc
    write_status(run, "running", stage="train", pid=proc.pid, pgid=proc.pid, pid_start=jobs._proc_start_ticks(proc.pid))
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while jobs._proc_state(proc.pid) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    jobs.refresh(tmp_path / "runs")
    st = read_status(run)
    assert st["state"] == "failed" and "killed by SIGKILL (exit code -9)" in st["error"]


def test_nhb_error_lines_stay_one_line():
    err = NHBError("f\nx", "a\nb", "c\rd")
    assert "\n" not in err.line() and "\r" not in err.line()


def test_prepare_cache_cleanup_removes_only_its_own_entries(small_cohort, tmp_path):
    """``prepare --out`` pointed at a folder with a ``cache/`` of the user's files deletes none of them."""
    from nhb_core.slices import PrepareConfig, prepare

    out = tmp_path / "mine"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "thesis.docx").write_text("years of work")
    prepare(small_cohort, out, PrepareConfig(size=16), workers=1)
    assert (out / "cache" / "thesis.docx").read_text() == "years of work"


@pytest.mark.slow
def test_largest_allowed_volume_stays_under_2_gb(tmp_path):
    """A 3 MB .nii.gz holding a 512^3 float32 volume (the default limits' largest), read as the
    T1 and as its own ROI like validate does: peak memory under the issue's 2 GB bound."""
    p = tmp_path / "big.nii.gz"
    with gzip.open(p, "wb", compresslevel=1) as fh:
        fh.write(nifti_header_bytes((512, 512, 512), np.float32))
        block = np.zeros((512, 512), np.float32)
        for k in range(512):
            block[k, 3] = 1.0
            fh.write(block.tobytes())
    assert p.stat().st_size < 50_000_000
    out, rss = run_measured(f"""
        from nhb_core.io import load_roi, load_t1
        v = load_t1({str(p)!r})
        r = load_roi({str(p)!r}, reference=v)
        print("shape", v.shape, int(r.data.sum()))
        """)
    assert f"shape (512, 512, 512) {sum(range(1, 513))}" in out, out  # slab k holds k ones
    assert rss < 2_000_000, rss


def test_enhanced_file_built_from_the_shared_siemens_series_matches_its_classic_load(tmp_path):
    """The shared Siemens series (whose classic load matches dcm2niix, test_dicom) rewritten as one
    enhanced file with pydicom: same voxels and geometry."""
    src = SHARED_ENHANCED.parent / "siemens_t1"
    files = sorted(src.glob("*.dcm")) if src.is_dir() else []
    if not files:
        pytest.skip("../shared Siemens series absent")
    (tmp_path / "enh").mkdir()
    _enhanced_from_series(files, tmp_path / "enh" / "multi.dcm")
    a, b = load_t1(src), load_t1(tmp_path / "enh")
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_out_folder_holding_a_users_models_is_refused(tmp_path):
    m = tiny_cohort(tmp_path / "cohort")
    home = tmp_path / "home"
    (home / "models" / "resnet18").mkdir(parents=True)
    (home / "models" / "resnet18" / "mine.pt").write_text("my own model")
    (home / "predictions").mkdir()
    before = snapshot(home)
    r = run_cli("study", "--manifest", m, "--out", home, "--models", "resnet18", "--quiet")
    assert_one_line(r, "the folder is not a run folder but holds models, predictions", where=f"{home}: ")
    assert snapshot(home) == before


def test_two_studies_started_together_on_one_folder(run_copy):
    """Issue 14 item 6: two studies on one --out at the same moment: one runs, the other is refused,
    and config.yaml, metrics.json and the weights all come from the one that ran."""
    from nhb_core.config import load_yaml
    from nhb_core.fileio import read_json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {ep: subprocess.Popen([sys.executable, "-m", "nhb_core", "study", "--out", str(run_copy), "--config",
                                   str(run_copy / "config.yaml"), "--epochs", str(ep), "--quiet"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for ep in (2, 3)}
    results = {ep: (p.wait(timeout=900), p.stderr.read()) for ep, p in procs.items()}
    codes = sorted(rc for rc, _ in results.values())
    assert codes == [0, 2], results
    winner = next(ep for ep, (rc, _) in results.items() if rc == 0)
    loser_err = next(err for rc, err in results.values() if rc == 2)
    assert "the run folder is locked by another study" in loser_err and "Traceback" not in loser_err
    assert load_yaml(run_copy / "config.yaml")["train"]["epochs"] == winner
    assert read_json(run_copy / "metrics.json")["run"]["config"]["train"]["epochs"] == winner
    hist = pd.read_csv(run_copy / "models" / "resnet18" / "history.csv")
    assert int(hist["epoch"].max()) <= winner and not (run_copy / ".study.lock.json").exists()


def test_train_out_folder_with_a_users_files_is_refused(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.yaml").write_text("my: own config\n")
    (out / "split.json").write_text("{}")
    before = snapshot(tmp_path)
    r = run_cli("train", "--dataset", tmp_path / "nope", "--split", out / "split.json", "--out", out)
    assert_one_line(r, "the --out folder holds other files and is not a model folder", where=f"{out}: ")
    assert snapshot(tmp_path) == before


def test_dev_zero_as_the_study_manifest(tmp_path):
    r = run_cli("study", "--manifest", "/dev/zero", "--out", tmp_path / "run", "--quiet")
    assert_one_line(r, "manifest is not a regular file (a device, pipe or socket)", where="/dev/zero: ")
