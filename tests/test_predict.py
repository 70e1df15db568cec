"""Single-case prediction: library fields, ensemble rule, PNGs, privacy of outputs, CLI errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nhb_core.errors import ImageError, RunError  # noqa: E402
from nhb_core.predict import predict_case, safe_stem  # noqa: E402

torch.set_num_threads(1)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    from fake_run import shared_run

    return shared_run(tmp_path_factory)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nhb_core", *map(str, args)], capture_output=True, text=True)


def test_predict_case_fields_and_files(fake_run, tmp_path):
    from fake_run import cohort_case

    t1, roi, sid = cohort_case(fake_run)
    out = tmp_path / "out"
    res = predict_case(fake_run, t1, roi, out_dir=out)
    names = ["resnet18", "densenet121", "efficientnet_b0"]
    assert list(res["models"]) == names
    mj = {n: json.loads((fake_run / "models" / n / "model.json").read_text()) for n in names}
    for n in names:
        e = res["models"][n]
        assert 0 <= e["prob"] <= 1
        assert e["prob"] == pytest.approx(np.mean(e["slice_probs"]))
        assert e["threshold"] == pytest.approx(mj[n]["threshold"])
        assert e["decision"] == int(e["prob"] >= e["threshold"])
        assert e["slice_index"] == res["slices"]
        assert len(e["cam"]) == len(res["slices"])
        for c in e["cam"]:
            assert (out / c["png"]).read_bytes()[:8] == PNG
            assert np.isnan(c["energy_in_roi"]) or 0 <= c["energy_in_roi"] <= 1
    ens = res["ensemble"]
    assert ens["prob"] == pytest.approx(np.mean([res["models"][n]["prob"] for n in names]))
    assert ens["threshold"] == pytest.approx(np.mean([mj[n]["threshold"] for n in names]))
    assert ens["decision"] == int(ens["prob"] >= ens["threshold"])
    for z in res["slices"]:
        assert (out / f"cam/ensemble__z{z:03d}.png").read_bytes()[:8] == PNG
    saved = json.loads((out / "prediction.json").read_text())
    assert saved["ensemble"]["prob"] == pytest.approx(ens["prob"])
    assert saved["input"]["stem"] == safe_stem(t1)
    assert len(saved["input"]["t1_sha256"]) == 64
    # no path of the inputs in the outputs, only the stem
    text = (out / "prediction.json").read_text()
    assert str(t1.parent) not in text and t1.name not in text and roi.name not in text
    # the slice probabilities equal the dataset's (same preprocessing as training)
    from nhb_core.predict import load_run_model, predict_probs
    from nhb_core.slices import load_dataset

    ds = load_dataset(fake_run / "dataset")
    rows = ds.index[ds.index["subject_id"].astype(str) == sid]
    model, _ = load_run_model(fake_run, "resnet18")
    ref = predict_probs(model, np.asarray(ds.images)[rows["row"].to_numpy()])
    np.testing.assert_allclose(res["models"]["resnet18"]["slice_probs"], ref, atol=1e-5)


def test_predict_without_cam_and_subset(fake_run):
    from fake_run import cohort_case

    t1, roi, _ = cohort_case(fake_run)
    res = predict_case(fake_run, t1, roi, with_cam=False, models=["resnet18"])
    assert list(res["models"]) == ["resnet18"] and "cam" not in res["models"]["resnet18"]
    assert res["files"] == []
    assert res["ensemble"]["prob"] == pytest.approx(res["models"]["resnet18"]["prob"])


def test_predict_bad_inputs(fake_run, tmp_path):
    from fake_run import cohort_case

    t1, roi, _ = cohort_case(fake_run)
    with pytest.raises(RunError):
        predict_case(tmp_path / "nope", t1, roi)
    # an ROI on another grid: crop it so its shape differs
    import nibabel as nib

    img = nib.load(str(roi))
    small = nib.Nifti1Image(np.asarray(img.dataobj)[:-3], img.affine)
    bad_roi = tmp_path / "bad_roi.nii.gz"
    nib.save(small, str(bad_roi))
    with pytest.raises(ImageError):
        predict_case(fake_run, t1, bad_roi)


def test_safe_stem():
    assert safe_stem("/x/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert safe_stem("/x/Müller, Hans (1).nii") == "M_ller_Hans_1"
    assert safe_stem("/x/...nii") == "case"
    assert len(safe_stem("/x/" + "a" * 100 + ".nii")) == 40


def test_cli_predict(fake_run, tmp_path):
    from fake_run import cohort_case

    t1, roi, _ = cohort_case(fake_run)
    out = tmp_path / "cli_out"
    r = run_cli("predict", "--run", fake_run, "--t1", t1, "--roi", roi, "--out", out, "--json", "--model", "resnet18")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert list(res["models"]) == ["resnet18"] and (out / "prediction.json").exists()
    assert any(f.endswith(".png") for f in res["files"])


def test_cli_predict_errors(fake_run, tmp_path):
    from fake_run import cohort_case

    t1, roi, _ = cohort_case(fake_run)
    r = run_cli("predict", "--run", tmp_path / "missing", "--t1", t1, "--roi", roi, "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "run folder not found" in r.stderr
    import nibabel as nib

    img = nib.load(str(roi))
    bad_roi = tmp_path / "mismatch_roi.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :-2], img.affine), str(bad_roi))
    r = run_cli("predict", "--run", fake_run, "--t1", t1, "--roi", bad_roi, "--out", tmp_path / "o2", "--no-cam")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "mismatch_roi.nii.gz" in r.stderr
    r = run_cli("predict", "--run", fake_run, "--t1", tmp_path / "nope.nii.gz", "--roi", roi, "--out", tmp_path / "o3")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr
    r = run_cli("predict", "--run", fake_run, "--t1", t1, "--roi", roi, "--method", "occlusion")
    assert r.returncode == 2 and "unknown saliency method" in r.stderr
    # a run whose models folder is empty
    empty = tmp_path / "emptyrun"
    (empty / "models").mkdir(parents=True)
    r = run_cli("predict", "--run", empty, "--t1", t1, "--roi", roi, "--out", tmp_path / "o4")
    assert r.returncode == 2 and "no trained model" in r.stderr
    shutil.rmtree(empty)
