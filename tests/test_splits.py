"""Subject-level stratified splits, folds, the slice-level (leaky) mode and the audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nhb_core.errors import ConfigError, DatasetError
from nhb_core.splits import (
    audit,
    fold_split,
    load_split,
    make_split,
    save_split,
    set_names,
    set_rows,
    shared_subjects,
    slice_key,
)


def make_index(n_a=80, n_b=30, pos_rate=0.4, slices=(3, 6), seed=0) -> pd.DataFrame:
    """A synthetic index.csv: subjects of centers A and B, 3-6 slices each, unique image hashes."""
    rng = np.random.default_rng(seed)
    rows = []
    r = 0
    for center, n in (("A", n_a), ("B", n_b)):
        for i in range(n):
            sid = f"{center}{i:03d}"
            label = int(rng.random() < pos_rate)
            k = int(rng.integers(slices[0], slices[1] + 1))
            for z in range(10, 10 + k):
                rows.append({"subject_id": sid, "center": center, "label": label, "slice_index": z,
                             "source_sha256": f"vol-{sid}", "row": r, "image_sha256": f"img-{sid}-{z}"})
                r += 1
    return pd.DataFrame(rows)


def subj_labels(index: pd.DataFrame) -> dict[str, int]:
    return index.groupby("subject_id")["label"].first().to_dict()


def test_subject_split_stratified_no_overlap():
    idx = make_index()
    sp = make_split(idx, seed=3)
    assert sp["unit"] == "subject" and sp["leaky"] is False and sp["n_shared_subjects"] == 0
    assert sp["dev_centers"] == ["A"]
    assert set_names(sp) == ["train", "val", "test", "external:B"]
    sets = {k: set(v) for k, v in sp["sets"].items()}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], (a, b)
    dev = {s for s in idx["subject_id"].unique() if s.startswith("A")}
    assert sets["train"] | sets["val"] | sets["test"] == dev
    assert sets["external:B"] == {s for s in idx["subject_id"].unique() if s.startswith("B")}
    # sizes: 20% / 15% of the 80 development subjects
    assert len(sets["test"]) == 16 and len(sets["val"]) == 12
    # stratified: each set's positive rate within one subject of the development rate
    lab = subj_labels(idx)
    dev_rate = np.mean([lab[s] for s in dev])
    for name in ("train", "val", "test"):
        n_pos = sum(lab[s] for s in sets[name])
        assert abs(n_pos - dev_rate * len(sets[name])) <= 1.0, name
    assert not shared_subjects(sp)


def test_split_deterministic_and_seed_dependent():
    idx = make_index()
    a, b = make_split(idx, seed=7), make_split(idx, seed=7)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = make_split(idx, seed=8)
    assert a["sets"]["test"] != c["sets"]["test"]
    # row order of the index does not matter
    d = make_split(idx.sample(frac=1.0, random_state=1), seed=7)
    assert d["sets"] == a["sets"]


def test_dev_centers_default_and_choice():
    idx = make_index()
    idx2 = idx.assign(center=idx["center"].map({"A": "X", "B": "Y"}))
    sp = make_split(idx2)  # no "A": the largest center
    assert sp["dev_centers"] == ["X"] and "external:Y" in sp["sets"]
    sp = make_split(idx, dev_centers="B")
    assert sp["dev_centers"] == ["B"] and "external:A" in sp["sets"]
    sp = make_split(idx, dev_centers="A,B")
    assert not [k for k in sp["sets"] if k.startswith("external:")]
    with pytest.raises(ConfigError):
        make_split(idx, dev_centers="Q")
    with pytest.raises(ConfigError):
        make_split(idx, test_size=0.7, val_size=0.4)
    with pytest.raises(ConfigError):
        make_split(idx, unit="voxel")


def test_folds_partition_non_test_subjects():
    idx = make_index()
    sp = make_split(idx, folds=5, seed=1)
    folds = sp["folds"]
    assert len(folds) == 5
    non_test = set(sp["sets"]["train"]) | set(sp["sets"]["val"])
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == non_test
    assert sum(len(v) for v in vals) == len(non_test)
    lab = subj_labels(idx)
    for f in folds:
        assert not set(f["train"]) & set(f["val"])
        assert set(f["train"]) | set(f["val"]) == non_test
        assert not (set(f["train"]) | set(f["val"])) & set(sp["sets"]["test"])
        assert abs(len(f["val"]) - len(non_test) / 5) <= 1
        n_pos = [lab[s] for s in f["val"]]
        assert 0 < sum(n_pos) < len(n_pos)
    fs = fold_split(sp, 2)
    assert fs["sets"]["val"] == folds[2]["val"] and fs["sets"]["test"] == sp["sets"]["test"]
    assert fs["fold"] == 2 and "folds" not in fs
    assert not audit(idx, sp).leaky
    with pytest.raises(DatasetError):
        fold_split(sp, 9)


def test_slice_unit_is_marked_leaky_with_shared_count():
    idx = make_index()
    sp = make_split(idx, unit="slice", seed=0)
    assert sp["unit"] == "slice" and sp["leaky"] is True
    assert all("#" in k for k in sp["sets"]["train"])
    train_subj = {k.rsplit("#", 1)[0] for k in sp["sets"]["train"]}
    test_subj = {k.rsplit("#", 1)[0] for k in sp["sets"]["test"]}
    assert sp["n_shared_subjects"] == len(train_subj & test_subj) > 0
    # slices are partitioned (no slice twice), though subjects are shared
    keys = [k for s in ("train", "val", "test") for k in sp["sets"][s]]
    assert len(keys) == len(set(keys)) == int((idx["center"] == "A").sum())
    rep = audit(idx, sp)
    assert rep.leaky and rep.marked_leaky
    assert len(rep.shared_subjects["train|test"]) == sp["n_shared_subjects"]


def test_set_rows_both_units():
    idx = make_index()
    sp = make_split(idx, seed=2)
    rows = set_rows(sp, idx, "test")
    assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
    assert set(idx.loc[rows, "subject_id"]) == set(sp["sets"]["test"])
    # every slice of a test subject is in the test rows
    assert len(rows) == int(idx["subject_id"].isin(sp["sets"]["test"]).sum())
    all_rows = np.concatenate([set_rows(sp, idx, s) for s in set_names(sp)])
    assert sorted(all_rows.tolist()) == idx["row"].tolist()

    ss = make_split(idx, unit="slice", seed=2)
    rows = set_rows(ss, idx, "val")
    got = {slice_key(s, z) for s, z in zip(idx.loc[rows, "subject_id"], idx.loc[rows, "slice_index"])}
    assert got == set(ss["sets"]["val"])
    with pytest.raises(DatasetError):
        set_rows(sp, idx, "nope")
    with pytest.raises(DatasetError, match="absent from the dataset"):
        set_rows(sp, idx[~idx["subject_id"].isin(sp["sets"]["test"][:1])], "test")


def test_audit_finds_duplicates_and_balance():
    idx = make_index()
    sp = make_split(idx, seed=4)
    rep = audit(idx, sp)
    assert not rep.leaky and rep.problems == [] and rep.duplicate_images.empty
    bal = rep.balance.set_index(["set", "center"])
    assert bal.loc[("test", "all"), "n_subjects"] == len(sp["sets"]["test"])
    assert bal.loc[("external:B", "B"), "n_subjects"] == 30
    # the same scan filed under two ids, one in train and one in test
    a, b = sp["sets"]["train"][0], sp["sets"]["test"][0]
    dup = idx.copy()
    ra = dup.index[dup["subject_id"] == a][0]
    rb = dup.index[dup["subject_id"] == b][0]
    dup.loc[rb, "image_sha256"] = dup.loc[ra, "image_sha256"]
    dup.loc[dup["subject_id"] == b, "source_sha256"] = dup.loc[ra, "source_sha256"]
    rep = audit(dup, sp)
    assert rep.leaky
    kinds = set(rep.duplicate_images["kind"])
    assert kinds == {"slice", "volume"}
    assert rep.duplicate_images.iloc[0]["sets"] == "test,train"
    # a hand-edited split sharing a subject
    bad = json.loads(json.dumps(sp))
    bad["sets"]["test"].append(sp["sets"]["train"][1])
    rep = audit(idx, bad)
    assert rep.leaky and rep.shared_subjects["train|test"] == [sp["sets"]["train"][1]]
    assert rep.to_dict()["n_shared_subjects"]["train|test"] == 1


def test_save_load_roundtrip(tmp_path):
    idx = make_index(n_a=20, n_b=5)
    sp = make_split(idx, folds=3)
    p = save_split(sp, tmp_path / "split.json")
    assert load_split(p) == json.loads(json.dumps(sp))
    (tmp_path / "bad.json").write_text("{\"sets\": 3}")
    with pytest.raises(DatasetError):
        load_split(tmp_path / "bad.json")
    with pytest.raises(DatasetError):
        load_split(tmp_path / "missing.json")


def test_tiny_cohort_keeps_both_classes_where_possible():
    idx = make_index(n_a=10, n_b=0, pos_rate=0.5, seed=5)
    sp = make_split(idx, seed=0)
    lab = subj_labels(idx)
    for s in ("train", "test"):
        assert {lab[x] for x in sp["sets"][s]} == {0, 1}
    with pytest.raises(DatasetError):
        make_split(make_index(n_a=2, n_b=0))


# ---------------------------------------------------------------- CLI on a prepared dataset


def run_cli(*args):
    """The CLI as a user runs it (own process)."""
    return subprocess.run([sys.executable, "-m", "nhb_core", *args], capture_output=True, text=True)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture()
def cli(capsys):
    """The CLI in this process (same entry point and error policy, no interpreter start-up)."""
    from nhb_core.cli import main

    def _run(*args):
        capsys.readouterr()
        try:
            main(list(args))
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return _Result(rc, out, err)

    return _run


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """A tiny prepared dataset (12 subjects, 2 centers) built from phantom volumes."""
    import nibabel as nib

    from nhb_core.slices import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("splitcli")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        t1 = rng.normal(100, 10, (24, 24, 8)).astype(np.float32)
        roi = np.zeros(t1.shape, np.int16)
        roi[8:11, 10:14, 2:6] = 1
        roi[13:16, 10:14, 2:6] = 2
        A = np.diag([1.5, 1.5, 4.0, 1.0])
        nib.save(nib.Nifti1Image(t1, A), root / "images" / f"s{i}_t1.nii.gz")
        nib.save(nib.Nifti1Image(roi, A), root / "images" / f"s{i}_roi.nii.gz")
        rows.append({"subject_id": f"s{i:02d}", "center": "A" if i < 9 else "B", "label": i % 2,
                     "t1": f"images/s{i}_t1.nii.gz", "roi": f"images/s{i}_roi.nii.gz"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return prepare(root / "manifest.csv", root / "ds", PrepareConfig(size=16, min_roi_voxels=5), workers=1)


def test_cli_split_and_audit(dataset_dir, tmp_path, cli):
    out = tmp_path / "split.json"
    r = cli("split", "--dataset", str(dataset_dir), "--out", str(out), "--seed", "1", "--folds", "2")
    assert r.returncode == 0, r.stderr
    sp = load_split(out)
    assert sp["unit"] == "subject" and not sp["leaky"] and len(sp["folds"]) == 2
    assert all(not s.__contains__("#") for s in sp["sets"]["train"])
    r = cli("audit", "--dataset", str(dataset_dir), "--split", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in r.stdout and "external:B" in r.stdout


def test_cli_slice_mode_warns_and_audit_fails(dataset_dir, tmp_path):
    out = tmp_path / "split_slice.json"
    r = run_cli("split", "--dataset", str(dataset_dir), "--out", str(out), "--unit", "slice")
    assert r.returncode == 0, r.stderr
    sp = load_split(out)
    assert sp["leaky"] is True and sp["unit"] == "slice"
    err = " ".join(r.stderr.split())
    assert "LEAKY SPLIT" in err
    assert f"{sp['n_shared_subjects']} subject(s) have slices in both train and test" in err
    r = run_cli("audit", "--dataset", str(dataset_dir), "--split", str(out))
    assert r.returncode == 1
    assert "LEAK" in r.stdout and "LEAKY" in r.stderr


def test_cli_errors_are_one_line(dataset_dir, tmp_path, cli):
    r = run_cli("split", "--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "s.json"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = cli("split", "--dataset", str(dataset_dir), "--out", str(tmp_path / "s.json"), "--dev-centers", "Z")
    assert r.returncode == 2 and "Z" in r.stderr
    r = cli("audit", "--dataset", str(dataset_dir), "--split", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "missing.json" in r.stderr


def test_stratified_take_partitions_property():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from nhb_core.splits import _stratified_take

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(0, 1), min_size=2, max_size=60), st.floats(0.05, 0.6), st.integers(0, 10))
    def check(labels, frac, seed):
        ids = np.array([f"s{i:03d}" for i in range(len(labels))], dtype=object)
        lab = np.array(labels)
        rest, taken = _stratified_take(ids, lab, frac, np.random.default_rng(seed))
        assert set(rest) | set(taken) == set(ids) and not set(rest) & set(taken)
        assert len(rest) >= 1 and len(taken) >= 1
        for c in (0, 1):
            m = int((lab == c).sum())
            if m >= 2:  # a label with two members is on both sides
                assert any(lab[list(ids).index(t)] == c for t in taken)
                assert any(lab[list(ids).index(r)] == c for r in rest)

    check()


def test_cli_prepare_with_config_file(tmp_path, cli):
    import nibabel as nib
    import yaml

    rows = []
    (tmp_path / "images").mkdir()
    for i in range(3):
        t1 = np.random.default_rng(i).normal(100, 10, (20, 20, 6)).astype(np.float32)
        roi = np.zeros(t1.shape, np.int16)
        roi[6:9, 8:12, 2:4] = 1
        roi[11:14, 8:12, 2:4] = 2
        nib.save(nib.Nifti1Image(t1, np.eye(4)), tmp_path / "images" / f"s{i}_t1.nii.gz")
        nib.save(nib.Nifti1Image(roi, np.eye(4)), tmp_path / "images" / f"s{i}_roi.nii.gz")
        rows.append({"subject_id": f"s{i}", "center": "A", "label": i % 2, "t1": f"images/s{i}_t1.nii.gz",
                     "roi": f"images/s{i}_roi.nii.gz"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"prepare": {"size": 16, "roi_channel": True, "crop_mm": 20}}))
    r = cli("prepare", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "ds"),
            "--config", str(tmp_path / "study.yaml"), "--workers", "1", "--norm", "zscore")
    assert r.returncode == 0, r.stderr
    from nhb_core.slices import load_dataset

    ds = load_dataset(tmp_path / "ds")
    assert ds.images.shape[1:] == (2, 16, 16) and ds.meta["config"]["norm"] == "zscore"
    assert ds.meta["crop_mm"] == 20
    (tmp_path / "bad.yaml").write_text("prepare:\n  sise: 3\n")
    r = cli("prepare", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "ds2"),
            "--config", str(tmp_path / "bad.yaml"))
    assert r.returncode == 2 and "sise" in r.stderr and "bad.yaml" in r.stderr
