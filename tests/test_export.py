"""ONNX export: parity with PyTorch under onnxruntime (1e-4) for the three architectures,
dynamic batch axis, sidecar JSON, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from nhb_core.export import PARITY_ATOL, export_onnx  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    from fake_run import shared_run

    return shared_run(tmp_path_factory)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nhb_core", *map(str, args)], capture_output=True, text=True)


def test_export_parity_three_architectures(fake_run, tmp_path):
    from nhb_core.predict import load_run_model

    paths = export_onnx(fake_run, out_dir=tmp_path / "onnx")
    names = ["resnet18", "densenet121", "efficientnet_b0"]
    assert [p.name for p in paths] == [f"{n}.onnx" for n in names]
    rng = np.random.default_rng(1)
    for name, p in zip(names, paths):
        meta = json.loads(p.with_suffix(".json").read_text())
        assert meta["input"]["shape"] == ["batch", 1, 32, 32]
        assert meta["parity_max_abs_diff"] <= PARITY_ATOL
        assert meta["threshold"] == json.loads((fake_run / "models" / name / "model.json").read_text())["threshold"]
        assert meta["preprocessing"]["size"] == 32
        model, _ = load_run_model(fake_run, name)
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].shape[0] == "batch"
        for batch in (1, 5):  # the batch axis is dynamic
            x = rng.standard_normal((batch, 1, 32, 32)).astype(np.float32)
            logit, prob = sess.run(["logit", "prob"], {"input": x})
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            assert logit.shape == (batch, 1) and prob.shape == (batch, 1)
            np.testing.assert_allclose(logit, ref, atol=1e-4, rtol=0)
            np.testing.assert_allclose(prob, 1 / (1 + np.exp(-ref)), atol=1e-4, rtol=0)
    assert not list((tmp_path / "onnx").glob(".*tmp*"))  # no temporary file left


def test_export_default_folder_and_subset(fake_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fake_run, run, ignore=shutil.ignore_patterns("dataset", "saliency"))
    paths = export_onnx(run, models=["resnet18"])
    assert paths == [run / "export" / "resnet18.onnx"] and paths[0].exists()


def test_cli_export(fake_run, tmp_path):
    r = run_cli("export", "--run", fake_run, "--format", "onnx", "--out", tmp_path / "e", "--model", "resnet18")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "e" / "resnet18.onnx").exists() and "max |onnx - torch|" in r.stdout


def test_cli_export_errors(fake_run, tmp_path):
    r = run_cli("export", "--run", tmp_path / "missing", "--format", "onnx")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: ")
    r = run_cli("export", "--run", fake_run, "--format", "tflite", "--out", tmp_path / "x")
    assert r.returncode == 2 and "unsupported export format" in r.stderr
    r = run_cli("export", "--run", fake_run, "--model", "vgg16", "--out", tmp_path / "y")
    assert r.returncode == 2 and "not in the run" in r.stderr
