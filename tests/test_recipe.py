"""The small-cohort training recipe: reference-tissue normalisation, SI ratios and the si_ratio
baseline, the new training options, input-size checks, local ImageNet weights, saliency grid,
evaluation of a finished run on a new cohort, repeated seeds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nhb_core import models
from nhb_core.baselines import SIRatioBaseline, load_baseline, si_feature_matrix
from nhb_core.errors import ConfigError, DatasetError, NetworkUnavailableError
from nhb_core.slices import PrepareConfig, extract_slices, reference_norm, reference_ring

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- preprocessing


def _phantom(gp_left=130.0, gp_right=120.0, ring=100.0, labels=(1, 2)):
    """A 64 x 64 x 3 volume: uniform tissue, two GP squares (left = label 1 on the patient's left)."""
    t1 = np.full((64, 64, 3), ring, np.float32)
    roi = np.zeros(t1.shape, np.int16)
    # RAS: array axis 0 runs to the patient's left; the left GP at higher x
    roi[38:44, 28:36, 1] = labels[0]
    roi[20:26, 28:36, 1] = labels[1]
    t1[roi == labels[0]] = gp_left
    t1[roi == labels[1]] = gp_right
    t1[:2] = 0.0  # some air so the volume has a black level
    return t1, roi


def test_si_ratios_per_side_and_both():
    t1, roi = _phantom()
    cfg = PrepareConfig(size=64, crop_mm=64, antialias=False, min_roi_voxels=1)
    res = extract_slices(t1, roi, (1.0, 1.0, 1.0), cfg)
    si = res["si"][0]
    assert si[0] == pytest.approx(1.30, abs=0.02) and si[1] == pytest.approx(1.20, abs=0.02)
    assert 1.20 < si[2] < 1.30


def test_si_ratios_single_label_roi_gives_both_only():
    t1, roi = _phantom(labels=(1, 1))
    cfg = PrepareConfig(size=64, crop_mm=64, antialias=False, min_roi_voxels=1)
    si = extract_slices(t1, roi, (1.0, 1.0, 1.0), cfg)["si"][0]
    assert np.isnan(si[0]) and np.isnan(si[1]) and si[2] == pytest.approx(1.20, abs=0.02)  # both GPs at 120


def test_reference_norm_zero_in_ring_and_ratio_in_gp():
    t1, roi = _phantom(gp_left=150.0, gp_right=150.0)
    cfg = PrepareConfig(size=64, crop_mm=64, antialias=False, norm="reference", min_roi_voxels=1)
    res = extract_slices(t1, roi, (1.0, 1.0, 1.0), cfg)
    img, mask = res["images"][0, 0], res["masks"][0] > 0
    ring = reference_ring(mask, cfg)
    assert np.median(img[ring]) == pytest.approx(0.0, abs=1e-6)
    assert img[mask].mean() == pytest.approx(0.5, abs=0.02)  # 150 / 100 - 1
    # independent of the scanner's gain: the same image x 7 normalises to the same crop
    res7 = extract_slices(t1 * 7, roi, (1.0, 1.0, 1.0), cfg)
    assert np.allclose(res7["images"], res["images"], atol=1e-5)


def test_reference_norm_without_tissue_is_one_line_error():
    cfg = PrepareConfig(size=16, crop_mm=16, norm="reference")
    raw = np.zeros((1, 16, 16), np.float32)
    m = np.zeros((1, 16, 16), np.uint8)
    m[0, 6:10, 6:10] = 1
    from nhb_core.errors import ImageError

    with pytest.raises(ImageError) as ei:
        reference_norm(raw, m, cfg, name="t1.nii.gz")
    assert "\n" not in ei.value.line() and "t1.nii.gz" in ei.value.line()


def test_roi_window_keeps_only_the_gp_neighbourhood():
    t1, roi = _phantom()
    cfg = PrepareConfig(size=64, crop_mm=64, antialias=False, norm="reference", roi_window_mm=4,
                        min_roi_voxels=1)
    img = extract_slices(t1, roi, (1.0, 1.0, 1.0), cfg)["images"][0, 0]
    assert abs(img[0, 0]) < 1e-6 and abs(img[-1, -1]) < 1e-6  # far corners: nothing left
    assert img.max() > 0.2  # the GP is kept


@pytest.mark.parametrize("bad", [{"norm": "ratio"}, {"ref_ring_mm": 0}, {"ref_clip": 1}, {"roi_window_mm": -1},
                                 {"ref_ring_mm": "wide"}])
def test_prepare_options_validated(bad):
    with pytest.raises(ConfigError) as ei:
        PrepareConfig.from_dict(bad)
    assert "\n" not in ei.value.line()


def test_dataset_has_si_columns(small_dataset):
    idx = pd.read_csv(Path(small_dataset) / "index.csv")
    for c in ("si_left", "si_right", "si_both"):
        assert c in idx.columns
    assert idx["si_both"].notna().all() and (idx["si_both"] > 0.8).all()


# ----------------------------------------------------------------------------- si_ratio baseline


def _toy_index(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    r = 1.1 + 0.12 * y + rng.normal(0, 0.05, n)
    left = r + rng.normal(0, 0.02, n)
    left[::7] = np.nan  # a side missing on some slices
    return pd.DataFrame({"subject_id": [f"S{i // 2}" for i in range(n)], "label": y,
                         "si_left": left, "si_right": r + rng.normal(0, 0.02, n), "si_both": r})


def test_si_ratio_baseline_learns_and_roundtrips():
    from sklearn.metrics import roc_auc_score

    idx = _toy_index()
    tr, va = np.arange(0, 120, 2), np.arange(1, 120, 2)
    b = SIRatioBaseline().fit(idx, tr, va)
    p = b.predict(idx, va)
    assert roc_auc_score(idx.label.to_numpy()[va], p) > 0.85
    assert b.threshold is not None and 0 < b.threshold < 1 and b.val_auc > 0.8
    b2 = load_baseline(json.loads(json.dumps(b.to_dict())))
    assert np.array_equal(b2.predict(idx, va), p)
    # fitted on the train rows only: changing validation labels changes nothing of the fit
    idx2 = idx.copy()
    idx2.loc[va, "label"] = 1 - idx2.loc[va, "label"]
    assert SIRatioBaseline().fit(idx2, tr).coef_ == b.coef_


def test_si_features_missing_columns_error():
    with pytest.raises(DatasetError) as ei:
        si_feature_matrix(pd.DataFrame({"label": [0, 1]}), np.arange(2))
    assert "prepare" in ei.value.line()


def test_study_has_si_ratio_everywhere(small_run):
    rd = Path(small_run)
    bj = json.loads((rd / "baselines" / "si_ratio.json").read_text())
    assert bj["kind"] == "baseline" and len(bj["coef"]) == 3
    sub = pd.read_csv(rd / "predictions" / "test__subjects.csv")
    assert "si_ratio" in sub.columns and sub["si_ratio"].between(0, 1).all()
    m = json.loads((rd / "metrics.json").read_text())
    blk = m["sets"]["test"]["level"]["subject"]
    assert "si_ratio" in blk["models"]
    pairs = {(c["a"], c["b"]) for c in blk["comparisons"]}
    assert any("si_ratio" in p for p in pairs)  # DeLong against each network
    assert m["run"]["baselines"]["si_ratio"]["threshold"] == pytest.approx(bj["threshold"])
    assert "si_ratio" in (rd / "report.html").read_text()


# ----------------------------------------------------------------------------- training options


@pytest.mark.parametrize("bad", [{"ema": 1.5}, {"select": "median"}, {"label_smoothing": 1.0}, {"mixup": -1},
                                 {"steps": 0}, {"drop_rate": 1.0}, {"steps": 2.5}, {"aux_si": -1},
                                 {"aux_si": float("nan")}])
def test_train_options_validated(bad):
    from nhb_core.train import TrainConfig

    with pytest.raises(ConfigError) as ei:
        TrainConfig.from_dict(bad)
    assert "\n" not in ei.value.line()


def _tiny_split(small_dataset):
    from nhb_core.splits import make_split

    return make_split(small_dataset, seed=0)


def test_ema_last_mixup_train_is_deterministic(small_dataset, tmp_path):
    from nhb_core.train import train_model

    cfg = {"epochs": 2, "batch_size": 8, "ema": 0.9, "select": "last", "mixup": 0.4, "label_smoothing": 0.1,
           "drop_rate": 0.1, "augment": True, "device": "cpu", "seed": 3}
    split = _tiny_split(small_dataset)
    a = train_model(small_dataset, split, "resnet18", tmp_path / "a", cfg)
    b = train_model(small_dataset, split, "resnet18", tmp_path / "b", cfg)
    ha, hb = pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv")
    assert np.allclose(ha.drop(columns="seconds").to_numpy(), hb.drop(columns="seconds").to_numpy(), equal_nan=True)
    mj = json.loads((a / "model.json").read_text())
    assert mj["selected"] == "last" and mj["best_epoch"] == 2 and mj["ema"] == 0.9
    assert "prior_correction_logit" in mj


def test_aux_si_head_learns_its_target():
    """The auxiliary head regresses its target: the squared error falls while the classifier trains."""
    import torch

    from nhb_core.models import create_model
    from nhb_core.train import SliceTensors, make_batches, train_one_epoch, with_aux_head

    rng = np.random.default_rng(0)
    n = 96
    level = rng.normal(0.0, 1.0, n).astype(np.float32)
    imgs = (rng.normal(0.0, 0.3, (n, 1, 32, 32)) + level[:, None, None, None]).astype(np.float32)
    labels = (level > 0).astype(np.float32)
    torch.manual_seed(0)
    model = create_model("resnet18", 1)
    net = with_aux_head(model)
    data = SliceTensors(imgs, np.arange(n), np.arange(0), labels, torch.device("cpu"), aux=level)

    def aux_mse():
        net.eval()
        with torch.no_grad():
            _, aux = net(torch.from_numpy(imgs))
        return float(torch.mean((aux - torch.from_numpy(level)) ** 2))

    before = aux_mse()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    crit = torch.nn.BCEWithLogitsLoss()
    for epoch in range(6):
        order = np.random.default_rng(epoch).permutation(n)
        train_one_epoch(net, opt, None, scaler, crit, data, make_batches(order, 16), torch.device("cpu"),
                        aux_weight=2.0, ema_source=model)
    after = aux_mse()
    assert after < 0.5 * before and after < 0.5
    out = model(torch.from_numpy(imgs[:4]))  # the classifier alone stays a one-logit network
    assert tuple(out.shape) == (4, 1)


def test_aux_si_train_saves_plain_classifier(small_dataset, tmp_path):
    from nhb_core.models import load_trained
    from nhb_core.train import train_model

    split = _tiny_split(small_dataset)
    cfg = {"epochs": 1, "batch_size": 8, "aux_si": 2.0, "select": "last", "device": "cpu", "augment": True}
    out = train_model(small_dataset, split, "resnet18", tmp_path / "aux", cfg)
    model, mj = load_trained(out)  # strict load: no auxiliary head in the saved weights
    assert mj["train_config"]["aux_si"] == 2.0


def test_aux_si_without_ratios_is_one_line_error(small_dataset, tmp_path):
    from nhb_core.train import train_model

    ds = tmp_path / "ds"
    shutil.copytree(small_dataset, ds)
    idx = pd.read_csv(ds / "index.csv")
    idx.drop(columns=["si_left", "si_right", "si_both"]).to_csv(ds / "index.csv", index=False)
    with pytest.raises(DatasetError) as ei:
        train_model(ds, _tiny_split(small_dataset), "resnet18", tmp_path / "m",
                    {"epochs": 1, "batch_size": 8, "aux_si": 1.0, "device": "cpu"})
    assert "si_both" in ei.value.line() and "\n" not in ei.value.line()


def test_steps_budget_sets_epochs(small_dataset, tmp_path):
    from nhb_core.train import train_model

    split = _tiny_split(small_dataset)
    n_train = sum(1 for _ in split["sets"]["train"])
    out = train_model(small_dataset, split, "resnet18", tmp_path / "s",
                      {"steps": 3, "batch_size": 8, "select": "last", "device": "cpu", "augment": False})
    mj = json.loads((out / "model.json").read_text())
    assert mj["epochs_run"] >= 1 and n_train > 0


def test_prior_correction_shifts_the_head_bias():
    import torch

    from nhb_core.train import _correct_prior

    m = models.create_model("resnet18", 1)
    before = float(m.fc.bias.detach())
    shift = _correct_prior(m, 3.0)
    assert shift == pytest.approx(np.log(3.0)) and float(m.fc.bias.detach()) == pytest.approx(before - np.log(3.0))
    assert _correct_prior(m, 1.0) == 0.0
    with torch.no_grad():
        assert torch.isfinite(m(torch.zeros(2, 1, 32, 32))).all()


def test_too_small_input_is_one_line_error():
    m = models.create_model("densenet121", 1)
    with pytest.raises(ConfigError) as ei:
        models.check_input_size(m, "densenet121", 1, (16, 16), source="data/ds")
    line = ei.value.line()
    assert "\n" not in line and "size >= 32" in line and "data/ds" in line
    models.check_input_size(m, "densenet121", 1, (32, 32))


# ----------------------------------------------------------------------------- ImageNet weights


def test_imagenet_weights_from_local_folder(tmp_path, monkeypatch):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(5)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "resnet18.safetensors"))
    monkeypatch.setenv("NHB_WEIGHTS_DIR", str(tmp_path))
    m = models.create_model("resnet18", 1, weights="imagenet")
    assert torch.allclose(m.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(m.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert m.fc.weight.shape == (1, 512)


def test_imagenet_weights_missing_offline_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("NHB_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(models, "_network_available", lambda *a, **k: False)
    with pytest.raises(NetworkUnavailableError) as ei:
        models.create_model("resnet18", 1, weights="imagenet")
    line = ei.value.line()
    assert "\n" not in line and "NHB_WEIGHTS_DIR" in line and "resnet18.safetensors" in line


# ----------------------------------------------------------------------------- saliency grid


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0"])
def test_cam_grid_at_least_8x8_at_64px(name):
    from nhb_core import saliency

    m = models.create_model(name, 1).eval()
    layer = saliency.resolve_target_layer(m, name, (64, 64), in_chans=1)
    hw = saliency._output_hw(m, layer, 1, (64, 64))
    assert min(hw) >= 8


# ----------------------------------------------------------------------------- new cohorts


@pytest.fixture(scope="module")
def run_copy(small_run, tmp_path_factory):
    dst = tmp_path_factory.mktemp("evalc") / "run"
    shutil.copytree(small_run, dst)
    return dst


@pytest.fixture(scope="module")
def other_cohort(tmp_path_factory):
    from nhb_core.synth import synthesize

    return Path(synthesize(tmp_path_factory.mktemp("cohort_c"), preset="small", seed=5))


def test_evaluate_new_cohort(run_copy, other_cohort):
    from nhb_core.cohorts import evaluate_cohort

    before = (run_copy / "predictions" / "test__subjects.csv").read_bytes()
    rec = evaluate_cohort(run_copy, other_cohort, "C", device="cpu")
    assert rec["set"] == "external:C" and rec["n_subjects"] == 26 and set(rec["centers"]) == {"A", "B"}
    assert set(rec["auc"]) >= {"resnet18", "densenet121", "efficientnet_b0", "si_ratio"}
    sub = pd.read_csv(run_copy / "predictions" / "external_C__subjects.csv")
    assert len(sub) == 26 and {"resnet18", "si_ratio", "reader_1"} <= set(sub.columns)
    m = json.loads((run_copy / "metrics.json").read_text())
    assert "external:C" in m["sets"] and "test" in m["sets"]
    assert set(m["sets"]["external:C"]["centers"]) == {"A", "B"}
    assert m["external_cohorts"]["C"]["oracle_auc"] is not None
    assert (run_copy / "predictions" / "test__subjects.csv").read_bytes() == before  # own sets untouched
    from nhb_core.figures import oracle_for_set, set_label

    assert set_label("external:C") in (run_copy / "report.html").read_text()

    assert oracle_for_set(m, "external:C") == pytest.approx(np.mean(list(m["external_cohorts"]["C"]["oracle_auc"].values())))


@pytest.mark.parametrize("name", ["../x", "a/b", "", "test:1", "x" * 41])
def test_evaluate_cohort_bad_name_cli(run_copy, other_cohort, name):
    r = subprocess.run([sys.executable, "-m", "nhb_core", "evaluate", "--run", str(run_copy), "--manifest",
                        str(other_cohort), "--name", name, "--no-progress"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (run_copy / "cohorts" / name).exists() or name == ""


def test_evaluate_cohort_needs_both_options(run_copy, other_cohort):
    r = subprocess.run([sys.executable, "-m", "nhb_core", "evaluate", "--run", str(run_copy), "--manifest",
                        str(other_cohort), "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--name" in r.stderr


# ----------------------------------------------------------------------------- seeds


def test_seeds_config():
    from nhb_core.config import resolve_config

    cfg = resolve_config({"seeds": [3, 4]})
    assert cfg["seeds"] == [3, 4] and cfg["seed"] == 3 and cfg["train"]["seed"] == 3
    assert resolve_config(None, {"seeds": "0,1,2"})["seeds"] == [0, 1, 2]
    for bad in ([1, 1], ["a"], [-1], [0.5]):
        with pytest.raises(ConfigError):
            resolve_config({"seeds": bad})


def test_seed_summary_mean_and_sd(tmp_path):
    from nhb_core.study import seed_summary

    runs = {}
    for s, auc in ((0, 0.8), (1, 0.9), (2, 0.85)):
        d = tmp_path / f"r{s}"
        d.mkdir()
        blk = {"level": {"subject": {"models": {"resnet18": {"auc": auc}}}},
               "centers": {"B": {"level": {"subject": {"models": {"resnet18": {"auc": auc - 0.1}}}}}}}
        (d / "metrics.json").write_text(json.dumps({"sets": {"test": blk}}))
        runs[s] = d
    out = seed_summary(runs)
    v = out["sets"]["test"]["resnet18"]
    assert v["auc"] == [0.8, 0.9, 0.85] and v["mean"] == pytest.approx(0.85) and v["sd"] == pytest.approx(0.05)
    assert out["centers"]["test"]["B"]["resnet18"]["mean"] == pytest.approx(0.75)


def test_seeds_report_section(run_copy):
    from nhb_core.fileio import atomic_write_json
    from nhb_core.report import write_report
    from nhb_core.study import seed_summary

    atomic_write_json(run_copy / "seeds.json", seed_summary({0: run_copy, 1: run_copy}))
    html = write_report(run_copy).read_text()
    assert 'id="seeds"' in html and "Repeated seeds" in html and "&plusmn;" in html
    (run_copy / "seeds.json").unlink()


def test_study_cli_bad_seeds(tmp_path, small_cohort):
    r = subprocess.run([sys.executable, "-m", "nhb_core", "study", "--manifest", str(small_cohort), "--out",
                        str(tmp_path / "r"), "--seeds", "0,0", "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "seeds" in r.stderr and "Traceback" not in r.stderr


def test_aux_si_resume_after_interruption_equals_uninterrupted(small_dataset, tmp_path):
    """The checkpoint carries the auxiliary head and the EMA weights: a run with the study's recipe
    (aux_si, EMA, last epoch) cut after epoch 1 and resumed ends with the same history and the same
    saved weights as the uninterrupted run, and the saved model is still the plain classifier."""
    from tiny_slices import SimulatedCrash, crash_after_epoch, same_weights

    from nhb_core.models import load_trained
    from nhb_core.train import train_model

    split = _tiny_split(small_dataset)
    cfg = {"epochs": 2, "batch_size": 8, "aux_si": 4.0, "ema": 0.9, "select": "last", "augment": True,
           "device": "cpu", "seed": 1, "keep_checkpoint": True}
    full = train_model(small_dataset, split, "resnet18", tmp_path / "full", cfg)

    with pytest.raises(SimulatedCrash):
        train_model(small_dataset, split, "resnet18", tmp_path / "cut", cfg, progress=crash_after_epoch(1))
    events = []
    cut = train_model(small_dataset, split, "resnet18", tmp_path / "cut", cfg, resume=True, progress=events.append)
    assert any("resuming after epoch 1" in str(e.get("message")) for e in events)
    hist = [pd.read_csv(p / "history.csv").drop(columns="seconds") for p in (full, cut)]
    pd.testing.assert_frame_equal(*hist)
    assert same_weights(full, cut)
    load_trained(cut)  # strict: no auxiliary head in the saved weights
