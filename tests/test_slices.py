"""ROI slice extraction on volumes of known geometry, the dataset files, and the cache."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nhb_core.errors import ConfigError, DatasetError, ImageError
from nhb_core.fileio import read_json
from nhb_core.slices import PrepareConfig, extract_slices, load_dataset, prepare, select_slices

# ---------------------------------------------------------------- a phantom defined in world mm
# head: a box of intensity 100 with a faint gradient; ROI: two GP boxes at x = -12 (left,
# label 1) and x = +12 (right, label 2) mm around the origin (centroid = origin); a bright
# marker sphere (radius 5 mm) 15 mm to the right and 20 mm anterior of the centroid.
MARKER = np.array([15.0, 20.0, 0.0])


def phantom_world(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    head = (np.abs(x) < 70) & (np.abs(y) < 80) & (np.abs(z) < 70)
    t1 = np.where(head, 100.0 + 0.1 * y, 0.0)
    marker = ((xyz - MARKER) ** 2).sum(-1) <= 5.0 ** 2
    t1 = np.where(marker, 300.0, t1)
    roi = np.zeros(x.shape, np.int16)
    gp = (np.abs(y) < 5) & (np.abs(z) < 4.5)
    roi[gp & (np.abs(x + 12) < 4)] = 1
    roi[gp & (np.abs(x - 12) < 4)] = 2
    return t1.astype(np.float32), roi


def sample_phantom(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return phantom_world(xyz)


def centred_affine(L: np.ndarray, shape) -> np.ndarray:
    """Affine with linear part L whose grid centre is at world origin (+ half-voxel offsets avoided)."""
    A = np.eye(4)
    A[:3, :3] = L
    centre = (np.array(shape) - 1) / 2.0
    A[:3, 3] = -L @ centre + np.array([0.3, -0.2, 0.0])  # not exactly on a voxel centre
    return A


def rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def rot_x(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def write_subject(folder: Path, name: str, affine: np.ndarray, shape) -> tuple[str, str]:
    t1, roi = sample_phantom(affine, shape)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(t1, affine), folder / f"{name}_t1.nii.gz")
    nib.save(nib.Nifti1Image(roi, affine), folder / f"{name}_roi.nii.gz")
    return f"images/{name}_t1.nii.gz", f"images/{name}_roi.nii.gz"


def write_manifest(root: Path, rows: list[dict]) -> Path:
    p = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def marker_pixel(img: np.ndarray) -> np.ndarray:
    """(row, col) centroid of the marker (the brightest pixels)."""
    m = img >= 0.5 * (img.max() + np.median(img))
    r, c = np.nonzero(m)
    return np.array([r.mean(), c.mean()])


# crop 64 mm on 64 px: 1 mm pixels; the marker at +15 mm right, +20 mm anterior falls at
# col = 32 - 15 - 0.5 = 16.5, row = 32 - 20 - 0.5 = 11.5
EXPECTED_MARKER = np.array([11.5, 16.5])
CFG = PrepareConfig(size=64, crop_mm=64, slice_select="central", n_central=1, norm="percentile", clip=False)

GEOMETRIES = {
    # name: (linear part of the affine, shape)
    "ras_iso": (np.diag([1.0, 1.0, 1.0]), (96, 110, 40)),
    "lps_stored": (np.diag([-1.0, -1.0, 1.0]), (96, 110, 40)),
    "anisotropic": (np.diag([0.5, 0.7, 3.0]), (190, 150, 14)),
    "oblique": (rot_z(20) @ rot_x(6) @ np.diag([0.9, 0.9, 2.0]), (120, 130, 22)),
}


@pytest.fixture(scope="module")
def geometry_cohort(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("geom")
    rows = []
    for i, (name, (L, shape)) in enumerate(GEOMETRIES.items()):
        A = centred_affine(L, shape)
        t1, roi = write_subject(root / "images", name, A, shape)
        rows.append({"subject_id": name, "center": "A", "label": i % 2, "t1": t1, "roi": roi})
    man = write_manifest(root, rows)
    out = root / "ds"
    prepare(man, out, CFG, workers=1)
    return man, out


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_marker_lands_where_geometry_says(geometry_cohort, name):
    """Orientation (anterior up, patient right on the left), centre and mm scale are right
    for RAS, LPS-stored, anisotropic and oblique volumes."""
    _, out = geometry_cohort
    ds = load_dataset(out)
    rows = ds.index.index[ds.index["subject_id"] == name]
    assert len(rows) == 1
    img = np.asarray(ds.images[rows[0], 0])
    assert img.shape == (64, 64)
    got = marker_pixel(img)
    tol = 1.6 if name == "oblique" else 1.0
    assert np.abs(got - EXPECTED_MARKER).max() <= tol, (name, got)
    # the ROI mask is centred: left GP (x=-12 mm) on the image's right half and vice versa
    m = np.asarray(ds.masks[rows[0]])
    r, c = np.nonzero(m)
    assert abs(r.mean() - 31.5) < 1.0 and abs(c.mean() - 31.5) < 1.0
    assert m[:, :32].sum() > 0 and m[:, 32:].sum() > 0


def test_lps_stored_equals_ras_stored(geometry_cohort):
    """The same world grid stored RAS or LPS gives the same slices (io reorients, nothing resampled)."""
    _, out = geometry_cohort
    ds = load_dataset(out)
    a = ds.index[ds.index["subject_id"] == "ras_iso"]
    b = ds.index[ds.index["subject_id"] == "lps_stored"]
    # the LPS grid is the RAS grid mirrored about its centre: the same voxel centres in the world
    ia, ib = np.asarray(ds.images[a.index[0], 0]), np.asarray(ds.images[b.index[0], 0])
    assert a["slice_index"].iloc[0] == b["slice_index"].iloc[0]
    assert np.allclose(ia, ib, atol=1e-5)
    assert np.array_equal(ds.masks[a.index[0]], ds.masks[b.index[0]])


def test_anisotropic_thick_slices_not_resampled(geometry_cohort):
    """3 mm slices: the chosen slices are source slices (indices into the thick axis),
    and slice_index counts the acquired slices."""
    _, out = geometry_cohort
    ds = load_dataset(out)
    row = ds.index[ds.index["subject_id"] == "anisotropic"].iloc[0]
    # centroid z = 0 mm; grid centre index (14-1)/2 = 6.5 -> nearest slices 6 or 7
    assert row["slice_index"] in (6, 7)
    assert row["roi_voxels"] > 0


def test_outputs_and_schema(geometry_cohort):
    man, out = geometry_cohort
    ds = load_dataset(out)
    assert ds.images.dtype == np.float32 and ds.images.ndim == 4
    assert ds.in_chans == 1
    assert list(ds.index["row"]) == list(range(len(ds.index)))
    for c in ("subject_id", "center", "label", "slice_index", "source_sha256", "row", "image_sha256"):
        assert c in ds.index.columns
    assert len(ds.subjects) == len(GEOMETRIES)
    assert "t1_path" not in ds.subjects.columns and "roi" not in ds.subjects.columns
    meta = ds.meta
    assert meta["channels"] == ["t1"] and meta["size"] == 64 and meta["crop_mm"] == 64
    assert set(meta["subjects"]) == set(GEOMETRIES)
    assert meta["config"]["slice_select"] == "central"
    # percentile normalisation without clipping: the head is ~[0, 1], the marker far above
    assert float(np.min(ds.images)) >= -0.1 and float(np.max(ds.images)) > 5
    # image_sha256 matches the stored array
    from nhb_core.fileio import sha256_bytes

    assert ds.index["image_sha256"].iloc[0] == sha256_bytes(np.ascontiguousarray(ds.images[0]).tobytes())


# ---------------------------------------------------------------- slice choice


def test_select_slices_min_voxels_and_central():
    mask = np.zeros((10, 10, 12), bool)
    counts = [0, 0, 3, 8, 20, 25, 20, 8, 1, 0, 0, 0]
    for z, c in enumerate(counts):
        mask.reshape(-1, 12)[:c, z] = True
    sel, w = select_slices(mask, PrepareConfig(slice_select="min_voxels", min_roi_voxels=8))
    assert sel.tolist() == [3, 4, 5, 6, 7] and not w
    sel, w = select_slices(mask, PrepareConfig(slice_select="min_voxels", min_roi_voxels=1))
    assert sel.tolist() == [2, 3, 4, 5, 6, 7, 8]
    sel, w = select_slices(mask, PrepareConfig(slice_select="central", n_central=3))
    assert sel.tolist() == [4, 5, 6]
    sel, w = select_slices(mask, PrepareConfig(slice_select="central", n_central=20))
    assert sel.tolist() == [2, 3, 4, 5, 6, 7, 8] and w  # fewer than asked: warned
    # nothing reaches k: the best slice, with a warning
    sel, w = select_slices(mask, PrepareConfig(slice_select="min_voxels", min_roi_voxels=50))
    assert sel.tolist() == [5] and w
    with pytest.raises(ImageError):
        select_slices(np.zeros((4, 4, 4), bool), PrepareConfig())


def test_roi_near_image_edge_is_padded():
    """The crop runs off the image: padded with the normalised background, no crash."""
    t1 = np.full((40, 40, 10), 50.0, np.float32)
    t1[:, :, :] += np.linspace(0, 50, 40)[None, :, None]  # head everywhere, background = min = 50
    roi = np.zeros(t1.shape, np.int16)
    roi[0:4, 18:24, 4:6] = 1  # at the image's left/x=0 edge
    res = extract_slices(t1, roi, (1.0, 1.0, 1.0), PrepareConfig(size=32, crop_mm=64, roi_channel=True))
    img = res["images"]
    assert img.shape == (2, 2, 32, 32)
    assert np.isfinite(img).all()
    # x < 0 lies at columns right of the centre (col increases towards smaller x): padded
    # the ROI centroid x = 1.5 voxel; the image ends 2 voxels (1 px) to the left of centre
    pad = img[:, 0, :, 20:]
    bg = 0.0  # raw minimum 50 -> percentile normalisation (clipped) -> 0
    assert np.allclose(pad, bg)
    assert res["masks"][:, :, 20:].sum() == 0
    assert res["masks"].sum() > 0
    assert np.array_equal(img[:, 1], res["masks"].astype(np.float32))


def test_zscore_normalisation_stats():
    rng = np.random.default_rng(0)
    t1 = np.zeros((30, 30, 8), np.float32)
    t1[5:25, 5:25] = rng.normal(200, 20, (20, 20, 8))
    roi = np.zeros(t1.shape, np.int16)
    roi[12:18, 12:18, 3:5] = 2
    cfg = PrepareConfig(size=16, crop_mm=12, norm="zscore", clip=False, antialias=False)
    res = extract_slices(t1, roi, (1.0, 1.0, 1.0), cfg)
    # the crop lies inside the head: z-scores of a N(200, 20) sample
    v = res["images"][:, 0]
    assert abs(float(v.mean())) < 0.3 and 0.5 < float(v.std()) < 1.3


def test_config_roundtrip_and_errors():
    c = PrepareConfig(size=32, roi_channel=True, norm="zscore")
    assert PrepareConfig.from_dict(c.to_dict()) == c
    assert c.channels == ["t1", "roi"]
    assert c.sha256() != PrepareConfig().sha256()
    with pytest.raises(ConfigError, match="unknown prepare option"):
        PrepareConfig.from_dict({"sizee": 3})
    with pytest.raises(ConfigError):
        PrepareConfig(slice_select="middle")
    with pytest.raises(ConfigError):
        PrepareConfig(p_low=99, p_high=1)


# ---------------------------------------------------------------- dataset: determinism and cache


@pytest.fixture()
def cohort(tmp_path) -> Path:
    rows = []
    for i in range(5):
        L = np.diag([1.2, 1.2, 3.0])
        shape = (70, 76, 12 + i)
        A = centred_affine(L, shape)
        t1, roi = write_subject(tmp_path / "images", f"s{i}", A, shape)
        rows.append({"subject_id": f"s{i}", "center": "A" if i < 3 else "B", "label": i % 2, "t1": t1, "roi": roi,
                     "reader_1": 1 - i % 2, "sex": "F" if i % 2 else "M"})
    return write_manifest(tmp_path, rows)


def test_determinism_and_workers(cohort, tmp_path):
    cfg = PrepareConfig(size=32, roi_channel=True)
    a = prepare(cohort, tmp_path / "a", cfg, workers=1)
    b = prepare(cohort, tmp_path / "b", cfg, workers=2)
    assert (a / "index.csv").read_bytes() == (b / "index.csv").read_bytes()
    assert np.array_equal(np.load(a / "slices.npy"), np.load(b / "slices.npy"))
    ds = load_dataset(a)
    assert ds.in_chans == 2 and ds.images.shape[2:] == (32, 32)
    assert "reader_1" in ds.subjects.columns and "sex" in ds.subjects.columns
    assert read_json(a / "prepare.json")["dataset_sha256"] == read_json(b / "prepare.json")["dataset_sha256"]


def test_progress_callback(cohort, tmp_path):
    events = []
    prepare(cohort, tmp_path / "p", PrepareConfig(size=16), workers=1, progress=events.append)
    assert all(e["stage"] == "prepare" for e in events)
    dones = [e["done"] for e in events]
    assert dones == sorted(dones) and dones[-1] == 5 and events[-1]["total"] == 5
    assert len(events) >= 6  # one per subject at least


def test_cache_unchanged_changed_file_changed_option(cohort, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    cfg = PrepareConfig(size=16)
    prepare(cohort, out, cfg, workers=1)
    meta1 = read_json(out / "prepare.json")
    assert meta1["n_computed"] == 5
    mtime = (out / "prepare.json").stat().st_mtime_ns

    # unchanged rerun: no image is read and no file hashed
    import nhb_core.io
    import nhb_core.slices as slices_mod

    def boom(*a, **k):
        raise AssertionError("image data read on an unchanged rerun")

    with monkeypatch.context() as m:
        m.setattr(nhb_core.io, "load_t1", boom)
        m.setattr(nhb_core.io, "load_roi", boom)
        m.setattr(slices_mod, "sha256_file", lambda p, *a, **k: "x" if str(p).endswith(".csv") else boom())
        events = []
        prepare(cohort, out, cfg, workers=1, progress=events.append)
        assert "unchanged" in events[-1]["message"]
    assert (out / "prepare.json").stat().st_mtime_ns == mtime

    # a touched (same bytes) file is rehashed, hits the cache, and nothing is rewritten
    t1_s0 = cohort.parent / "images" / "s0_t1.nii.gz"
    os.utime(t1_s0, ns=(mtime + 10**9, mtime + 10**9))
    events = []
    prepare(cohort, out, cfg, workers=1, progress=events.append)
    assert "unchanged" in events[-1]["message"]
    assert any("(cached)" in e.get("message", "") for e in events)
    assert (out / "prepare.json").stat().st_mtime_ns == mtime

    # one changed T1: only that subject recomputed, others from the cache
    old = load_dataset(out, mmap=False)
    img = nib.load(cohort.parent / "images" / "s1_t1.nii.gz")
    data = np.asarray(img.get_fdata(), np.float32) * 2 + 5
    nib.save(nib.Nifti1Image(data, img.affine), cohort.parent / "images" / "s1_t1.nii.gz")
    prepare(cohort, out, cfg, workers=1)
    meta = read_json(out / "prepare.json")
    assert meta["n_computed"] == 1
    assert meta["subjects"]["s1"]["t1_sha256"] != meta1["subjects"]["s1"]["t1_sha256"]
    assert meta["subjects"]["s0"]["cache_key"] == meta1["subjects"]["s0"]["cache_key"]
    new = load_dataset(out, mmap=False)
    same = new.index["subject_id"] != "s1"
    assert np.array_equal(new.images[same.to_numpy()], old.images[same.to_numpy()])

    # a changed option recomputes everything, and the stale cache entries are dropped
    prepare(cohort, out, PrepareConfig(size=24), workers=1)
    meta = read_json(out / "prepare.json")
    assert meta["n_computed"] == 5 and meta["size"] == 24
    assert len(list((out / "cache").glob("*.npys"))) == 5

    # a manifest-only change (label) rewrites the tables from the cache
    df = pd.read_csv(cohort, dtype=str)
    df.loc[0, "label"] = "1"
    df.to_csv(cohort, index=False)
    prepare(cohort, out, PrepareConfig(size=24), workers=1)
    meta = read_json(out / "prepare.json")
    assert meta["n_computed"] == 0
    assert int(load_dataset(out).index.query("subject_id == 's0'")["label"].iloc[0]) == 1


def test_bad_inputs_name_the_file(tmp_path):
    shape = (40, 40, 10)
    A = centred_affine(np.eye(3), shape)
    t1, roi = write_subject(tmp_path / "images", "e", A, shape)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), A), tmp_path / "images" / "empty_roi.nii.gz")
    man = write_manifest(tmp_path, [{"subject_id": "ok", "center": "A", "label": 0, "t1": t1, "roi": roi},
                                    {"subject_id": "e", "center": "A", "label": 1, "t1": t1,
                                     "roi": "images/empty_roi.nii.gz"}])
    for workers in (1, 2):  # the error crosses the process boundary intact
        with pytest.raises(ImageError) as ei:
            prepare(man, tmp_path / "ds", PrepareConfig(size=16), workers=workers)
        assert "empty_roi" in ei.value.line()
    assert not (tmp_path / "ds" / "prepare.json").exists()
    with pytest.raises(DatasetError):
        load_dataset(tmp_path / "nothing")


def test_small_dataset_fixture_contract(request):
    """The shared fixture (synthetic small preset at 32 px) builds and loads."""
    pytest.importorskip("nhb_core.synth")
    out = request.getfixturevalue("small_dataset")
    ds = load_dataset(out)
    assert ds.images.shape[1:] == (1, 32, 32)
    assert len(ds.index) == ds.images.shape[0] and ds.index["subject_id"].nunique() == len(ds.subjects)
    assert ds.index.groupby("subject_id")["label"].nunique().max() == 1
