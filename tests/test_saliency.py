"""Saliency: attention measures, geometry, CAMs of the three architectures, faithfulness,
overlays, and the cached per-case maps / summaries over a run folder."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")

from nhb_core import saliency as S  # noqa: E402
from nhb_core.errors import InputError  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- measures


def test_energy_fully_inside_roi_is_one():
    roi = np.zeros((32, 32), bool)
    roi[8:20, 10:24] = True
    cam = np.zeros((32, 32), np.float32)
    cam[10:15, 12:20] = np.linspace(0.1, 1, 40).reshape(5, 8)
    assert S.cam_energy_in_roi(cam, roi) == pytest.approx(1.0)


def test_energy_shares_and_degenerate_maps():
    roi = np.zeros((10, 10), np.uint8)
    roi[:, :5] = 1
    cam = np.ones((10, 10))
    assert S.cam_energy_in_roi(cam, roi) == pytest.approx(0.5)
    cam[:, 5:] = 3.0
    assert S.cam_energy_in_roi(cam, roi) == pytest.approx(50 / (50 + 150))
    assert np.isnan(S.cam_energy_in_roi(np.zeros((10, 10)), roi))
    with pytest.raises(InputError):
        S.cam_energy_in_roi(np.ones((10, 10)), np.ones((8, 8)))


def test_pointing_game():
    roi = np.zeros((16, 16), bool)
    roi[4:8, 4:8] = True
    cam = np.zeros((16, 16))
    cam[5, 6] = 1.0
    assert S.pointing_game(cam, roi) is True
    cam2 = np.zeros((16, 16))
    cam2[12, 12] = 1.0
    assert S.pointing_game(cam2, roi) is False
    cam3 = np.zeros((16, 16))
    cam3[9, 9] = 1.0  # sqrt(8) = 2.83 px from the ROI corner (7, 7)
    assert S.pointing_game(cam3, roi) is False
    assert S.pointing_game(cam3, roi, tolerance_px=2) is False
    assert S.pointing_game(cam3, roi, tolerance_px=3) is True
    assert S.pointing_game(np.ones((16, 16)), roi) is False  # constant map: no maximum
    assert S.pointing_game(cam, np.zeros((16, 16))) is False  # empty ROI


# ----------------------------------------------------------------------------- geometry


def test_paste_back_box_geometry():
    crop = np.zeros((8, 8), np.float32)
    crop[2:4, 5:7] = 1.0
    # the crop covers slice rows 10..26 and cols 20..36 (2 slice px per crop px)
    full = S.paste_back(crop, {"row0": 10, "col0": 20, "rows": 16, "cols": 16}, (40, 50))
    assert full.shape == (40, 50)
    assert full[:10].max() == 0 and full[26:].max() == 0 and full[:, :20].max() == 0 and full[:, 36:].max() == 0
    r, c = np.unravel_index(np.argmax(full), full.shape)
    assert 10 + 2 * 2 <= r < 10 + 4 * 2 and 20 + 5 * 2 <= c < 20 + 7 * 2
    assert full[15, 31] == pytest.approx(1.0)  # centre of crop pixel (2.75, 5.75) region
    # a box partly outside the slice is clipped, not an error
    part = S.paste_back(np.ones((4, 4)), {"row0": -8, "col0": -8, "rows": 16, "cols": 16}, (10, 10))
    assert part[:8, :8].min() == pytest.approx(1.0) and part[8:, :].max() == 0
    with pytest.raises(InputError):
        S.paste_back(crop, {"row0": 1}, (10, 10))


def _volume(rotate_deg=0.0):
    X, Y, Z = 70, 80, 10
    rng = np.random.default_rng(0)
    t1 = (rng.random((X, Y, Z)) + 1).astype(np.float32)
    xx, yy, zz = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    roi = ((((xx - 28) / 5) ** 2 + ((yy - 44) / 3) ** 2 + ((zz - 5) / 2.5) ** 2) < 1).astype(np.int16)
    roi += 2 * ((((xx - 41) / 4) ** 2 + ((yy - 40) / 6) ** 2 + ((zz - 5) / 2.5) ** 2) < 1)
    spacing = (1.0, 1.2, 3.0)
    th = np.deg2rad(rotate_deg)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]]) @ np.diag(spacing)
    return t1, roi, spacing, aff


@pytest.mark.parametrize("rotate", [0.0, 20.0])
@pytest.mark.parametrize("size", [32, 64])
def test_crop_geometry_round_trip(rotate, size):
    """The dataset's ROI crop pasted back on the full slice lands on the ROI (axis-aligned and oblique)."""
    from nhb_core.slices import PrepareConfig, extract_slices

    t1, roi, spacing, aff = _volume(rotate)
    cfg = PrepareConfig(size=size, crop_mm=40)
    res = extract_slices(t1, roi, spacing, cfg, affine=aff)
    geo = S.crop_geometry(res["centroid_vox"], spacing, t1.shape, cfg, affine=aff)
    for k, z in enumerate(res["slice_index"]):
        truth = S.display_slice(roi > 0, int(z))
        assert truth.shape == (t1.shape[1], t1.shape[0])
        back = S.paste_back(res["masks"][k].astype(np.float32), geo, truth.shape) > 0.5
        dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
        assert dice > 0.9, (z, dice)
    # a map at another resolution than the crop still lands in the same place
    big = np.kron(res["masks"][len(res["masks"]) // 2].astype(np.float32), np.ones((2, 2), np.float32))
    z = int(res["slice_index"][len(res["masks"]) // 2])
    back = S.paste_back(big, geo, truth.shape) > 0.5
    truth = S.display_slice(roi > 0, z)
    assert 2 * (back & truth).sum() / (back.sum() + truth.sum()) > 0.85


def test_display_slice_orientation():
    vol = np.zeros((5, 6, 3))
    vol[4, 5, 1] = 1  # RAS+: x max = patient's right, y max = anterior
    d = S.display_slice(vol, 1)
    assert d.shape == (6, 5)
    assert d[0, 0] == 1  # row 0 = anterior, column 0 = patient's right (radiological)
    with pytest.raises(InputError):
        S.display_slice(vol, 3)


# ----------------------------------------------------------------------------- CAMs


class _Blob(torch.nn.Module):
    """Positive conv filters + average pooling: evidence is where the image is bright."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 1)
        with torch.no_grad():
            for m in (self.c1, self.c2):
                m.weight.fill_(1.0 / 9)
                m.bias.zero_()
            self.fc.weight.fill_(1.0)
            self.fc.bias.fill_(-0.5)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def _blob_image():
    img = np.zeros((1, 32, 32), np.float32)
    img[0, 20:26, 6:12] = 4.0
    roi = np.zeros((32, 32), bool)
    roi[18:28, 4:14] = True
    return img, roi


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam", "layercam"])
def test_cam_points_at_the_evidence(method):
    model = _Blob().eval()
    img, roi = _blob_image()
    cam = S.compute_cam(model, img, method=method, target_layer=model.c2)
    assert cam.shape == (32, 32) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() == pytest.approx(1.0, abs=1e-5)
    assert S.pointing_game(cam, roi)
    assert S.cam_energy_in_roi(cam, roi) > 0.8


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0"])
def test_cam_shape_and_range_three_architectures(name):
    from nhb_core.models import create_model

    torch.manual_seed(0)
    model = create_model(name, in_chans=1).eval()
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    maps, probs = S.compute_cams(model, x, method="gradcam", model_name=name, return_probs=True)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    with torch.no_grad():
        ref = torch.sigmoid(model(torch.from_numpy(x))).numpy()[:, 0]
    np.testing.assert_allclose(probs, ref, atol=1e-5)
    one = S.compute_cam(model, x[0], method="eigencam", model_name=name)
    assert one.shape == (32, 32) and one.max() == pytest.approx(1.0, abs=1e-5)  # EigenCAM never vanishes
    # at 32 px the last block is 1 x 1: a shallower stage keeps >= 4 x 4 cells
    layer = S.resolve_target_layer(model, name, (32, 32), in_chans=1)
    assert min(S._output_hw(model, layer, 1, (32, 32))) >= S.MIN_CAM_CELLS
    assert not model.training


def test_unknown_method():
    with pytest.raises(InputError, match="unknown saliency method"):
        S.normalize_method("occlusion")
    assert S.normalize_method("GradCAM++") == "gradcam++"


def test_faithfulness_beats_random_for_a_faithful_map():
    model = _Blob().eval()
    img, roi = _blob_image()
    cam = S.compute_cam(model, img, target_layer=model.c2)
    f = S.faithfulness(model, img, cam, seed=1)
    assert set(f) >= {"drop", "random_baseline_drop", "prob", "drops", "random_drops", "fractions", "method"}
    assert f["drop"] > 0.2
    assert f["drop"] > f["random_baseline_drop"] + 0.1
    g = S.faithfulness(model, img, cam, seed=1)
    assert g["drop"] == f["drop"] and g["random_baseline_drop"] == f["random_baseline_drop"]
    with pytest.raises(InputError):
        S.faithfulness(model, img, cam[:10])


def test_overlay_png():
    from PIL import Image

    img, roi = _blob_image()
    cam = np.zeros((32, 32), np.float32)
    cam[20:26, 6:12] = 1
    png = S.overlay_png(img[0], cam, roi, alpha=0.5)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.mode == "RGB" and im.size == (256, 256)
    a = np.asarray(im)
    edge = np.all(a == (0, 255, 0), axis=2)
    assert edge.sum() > 50  # the ROI contour is drawn
    plain = np.asarray(Image.open(io.BytesIO(S.overlay_png(img[0]))))
    assert (plain[..., 0] == plain[..., 1]).all()  # grayscale without a map
    with pytest.raises(InputError):
        S.overlay_png(img[0], cam[:5])


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    from fake_run import shared_run

    return shared_run(tmp_path_factory)


def test_cam_for_case_cached(fake_run):
    import pandas as pd

    split = json.loads((fake_run / "split.json").read_text())
    sid = split["sets"]["test"][0]
    idx = pd.read_csv(fake_run / "dataset" / "index.csv", dtype={"subject_id": str})
    z = int(idx[idx["subject_id"] == sid]["slice_index"].iloc[0])
    r = S.cam_for_case(fake_run, "resnet18", "test", sid, z)
    assert r["cached"] is False
    assert r["cam"].shape == (32, 32) and r["roi"].shape == (32, 32) and r["image"].shape == (1, 32, 32)
    assert r["roi"].any() and 0 <= r["prob"] <= 1 and r["label"] in (0, 1)
    assert r["pointing_hit"] in (True, False)
    again = S.cam_for_case(fake_run, "resnet18", "test", sid, z)
    assert again["cached"] is True
    np.testing.assert_array_equal(again["cam"], r["cam"])
    assert again["prob"] == r["prob"]
    cache = list((fake_run / "saliency" / "cache" / "resnet18" / "gradcam").glob(f"{sid}__z{z:03d}__*.npz"))
    assert len(cache) == 1
    lc = S.cam_for_case(fake_run, "resnet18", "test", sid, z, method="layercam")
    assert lc["method"] == "layercam" and lc["cache_file"] != r["cache_file"]
    vsid = split["sets"]["val"][0]
    vz = int(idx[idx["subject_id"] == vsid]["slice_index"].iloc[0])
    with pytest.raises(InputError, match="not in set"):
        S.cam_for_case(fake_run, "resnet18", "test", vsid, vz)
    with pytest.raises(InputError, match="no slice"):
        S.cam_for_case(fake_run, "resnet18", "test", sid, 999)


def test_saliency_summary(fake_run, tmp_path):
    df = S.saliency_summary(fake_run, set_name="test", max_cases=2, out_dir=tmp_path / "sal")
    assert list(df.columns[: len(S.SUMMARY_COLUMNS)]) == S.SUMMARY_COLUMNS
    assert len(df) == 2 * 3 and set(df["model"]) == {"resnet18", "densenet121", "efficientnet_b0"}
    assert set(df["outcome"]) <= {"TP", "FP", "FN", "TN"}
    assert df["faithfulness"].notna().all() and df["random_baseline"].notna().all()
    means = S.saliency_means(df)
    assert list(means["model"]) == ["resnet18", "densenet121", "efficientnet_b0"] and (means["n"] == 2).all()
    summ = json.loads((tmp_path / "sal" / "summary.json").read_text())
    assert summ["set"] == "test" and set(summ["models"]) == set(means["model"])
    for rel in df["png"]:
        assert (tmp_path / "sal" / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the study's call form: every model, n_cases, out_dir
    df2 = S.saliency_summary(fake_run, models=["resnet18"], n_cases=1, method="gradcam", out_dir=tmp_path / "s2")
    assert len(df2) == 1 and (tmp_path / "s2" / "summary.json").exists()


def test_cam_on_slice(fake_run):
    from fake_run import cohort_case

    split = json.loads((fake_run / "split.json").read_text())
    sid = split["sets"]["test"][0]
    import pandas as pd

    idx = pd.read_csv(fake_run / "dataset" / "index.csv", dtype={"subject_id": str})
    z = int(idx[idx["subject_id"] == sid]["slice_index"].iloc[0])
    case = S.cam_for_case(fake_run, "efficientnet_b0", "test", sid, z)
    full = S.cam_on_slice(fake_run, case)
    assert full["image"].shape == full["roi"].shape == full["cam"].shape
    assert full["roi"].any() and 0 <= full["cam"].min() and full["cam"].max() <= 1
    # the map is confined to the 64 mm crop around the ROI
    assert (full["cam"] > 0).sum() < full["cam"].size
    cohort_case(fake_run, sid)  # the case's files exist


def test_small_run_saliency(request):
    """On the shared tiny study run (when the whole pipeline is available)."""
    for mod in ("nhb_core.study", "nhb_core.train", "nhb_core.evaluate", "nhb_core.synth"):
        pytest.importorskip(mod)
    small_run = request.getfixturevalue("small_run")
    df = S.saliency_summary(small_run, max_cases=2, with_faithfulness=False)
    assert len(df) >= 3 and set(df["model"]) == {"resnet18", "densenet121", "efficientnet_b0"}
    assert df["energy_in_roi"].dropna().between(0, 1).all()
    assert set(df["outcome"]) <= {"TP", "FP", "FN", "TN"}
    # the study's saliency stage wrote its summary over the same functions
    assert (small_run / "saliency" / "summary.json").exists()
