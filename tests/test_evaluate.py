"""Evaluation: predictions files for every set (slice and subject level), the format the
stats stage reads, several models in one file, aggregation, predict_slices, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from nhb_core.errors import ConfigError, DatasetError  # noqa: E402
from nhb_core.evaluate import aggregate_subject_probs, evaluate_model, predict_slices, set_file_stem  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_slices import make_tiny_dataset  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from nhb_core.train import train_model

    d = tmp_path_factory.mktemp("evalrun")
    ds, split = make_tiny_dataset(d / "ds", size=32, n_a=12, n_b=4, slices=2)
    (d / "split.json").write_text(json.dumps(split))
    cfg = {"epochs": 1, "batch_size": 8}
    m1 = train_model(ds, split, "resnet18", d / "models" / "resnet18", cfg)
    m2 = train_model(ds, split, "efficientnet_b0", d / "models" / "efficientnet_b0", cfg)
    return d, ds, split, m1, m2


def test_predictions_files_and_format(trained, tmp_path):
    d, ds, split, m1, m2 = trained
    pred = tmp_path / "predictions"
    events = []
    res = evaluate_model(m1, ds, d / "split.json", pred, progress=events.append)
    assert set(res) == {"val", "test", "external:B"}
    assert sorted(p.name for p in pred.iterdir()) == sorted(
        f"{s}__{lvl}.csv" for s in ("val", "test", "external_B") for lvl in ("slices", "subjects"))
    index = pd.read_csv(ds / "index.csv", dtype={"subject_id": str})
    subjects = pd.read_csv(ds / "subjects.csv", dtype={"subject_id": str})
    for set_name, sub_path in res.items():
        sl = pd.read_csv(pred / f"{set_file_stem(set_name)}__slices.csv", dtype={"subject_id": str})
        sub = pd.read_csv(sub_path, dtype={"subject_id": str})
        assert list(sl.columns) == ["subject_id", "center", "slice_index", "label", "resnet18"]
        assert list(sub.columns) == ["subject_id", "center", "label", "resnet18", "reader_1", "reader_2"]
        assert set(sl["subject_id"]) == set(split["sets"][set_name]) == set(sub["subject_id"])
        assert len(sl) == len(index[index["subject_id"].isin(split["sets"][set_name])])
        assert sl["resnet18"].between(0, 1).all()
        # subject probability = mean of its slice probabilities; readers copied from subjects.csv
        mean = sl.groupby("subject_id")["resnet18"].mean()
        assert np.allclose(sub.set_index("subject_id")["resnet18"], mean.loc[sub["subject_id"]], atol=1e-7)
        r = subjects.set_index("subject_id").loc[sub["subject_id"], "reader_1"].to_numpy()
        assert np.array_equal(sub["reader_1"].to_numpy(), r)
    assert events[-1]["stage"] == "evaluate" and events[-1]["done"] == events[-1]["total"] == 3

    # the stats stage reads these files
    from nhb_core import stats

    df = stats.load_predictions(res["test"], truth="label", scores=["resnet18"], readers=["reader_1"])
    assert len(df) == len(split["sets"]["test"])

    # a second model adds its column, the first is kept
    evaluate_model(m2, ds, split, pred)
    sub = pd.read_csv(res["test"])
    assert {"resnet18", "efficientnet_b0", "reader_1"} <= set(sub.columns)
    sl = pd.read_csv(pred / "test__slices.csv")
    assert list(sl.columns) == ["subject_id", "center", "slice_index", "label", "resnet18", "efficientnet_b0"]


def test_predictions_match_the_model_and_are_deterministic(trained, tmp_path):
    d, ds, split, m1, _ = trained
    from nhb_core.models import load_trained
    from nhb_core.slices import load_dataset

    a = evaluate_model(m1, ds, split, tmp_path / "a")
    b = evaluate_model(m1, ds, split, tmp_path / "b")
    assert (tmp_path / "a" / "test__slices.csv").read_bytes() == (tmp_path / "b" / "test__slices.csv").read_bytes()
    model, mj = load_trained(m1)
    data = load_dataset(ds)
    p = predict_slices(model, data.images[:5], batch_size=2)
    with torch.no_grad():
        direct = torch.sigmoid(model(torch.from_numpy(np.array(data.images[:5])))).reshape(-1).numpy()
    assert p.shape == (5,) and np.allclose(p, direct, atol=1e-6)
    assert set(a) == set(b)


def test_aggregation_options(trained, tmp_path):
    d, ds, split, m1, _ = trained
    res = evaluate_model(m1, ds, split, tmp_path / "p", aggregate="max", sets=["test"])
    assert set(res) == {"test"}
    sl = pd.read_csv(tmp_path / "p" / "test__slices.csv", dtype={"subject_id": str})
    sub = pd.read_csv(res["test"], dtype={"subject_id": str}).set_index("subject_id")
    assert np.allclose(sub["resnet18"], sl.groupby("subject_id")["resnet18"].max().loc[sub.index])
    with pytest.raises(ConfigError, match="aggregation"):
        evaluate_model(m1, ds, split, tmp_path / "q", aggregate="vote")
    x = pd.DataFrame({"subject_id": ["s1", "s1", "s2"], "center": "A", "label": [1, 1, 0], "m": [0.2, 0.6, 0.3]})
    assert aggregate_subject_probs(x, "m", "median")["m"].tolist() == pytest.approx([0.4, 0.3])


def test_dataset_mismatch_is_reported(trained, tmp_path):
    d, ds, split, m1, _ = trained
    other, _ = make_tiny_dataset(tmp_path / "ds64", size=40, n_a=12, n_b=4, slices=1)
    with pytest.raises(DatasetError, match="trained on"):
        evaluate_model(m1, other, split, tmp_path / "p")


def test_threshold_is_youden_on_validation(trained, tmp_path):
    d, ds, split, m1, _ = trained
    from nhb_core.stats import youden_threshold

    mj = json.loads((m1 / "model.json").read_text())
    res = evaluate_model(m1, ds, split, tmp_path / "p", sets=["val"])
    val = pd.read_csv(res["val"])
    assert mj["threshold"] == pytest.approx(youden_threshold(val["label"], val["resnet18"]), abs=1e-6)
    vs = pd.read_csv(tmp_path / "p" / "val__slices.csv")
    assert mj["threshold_slice"] == pytest.approx(youden_threshold(vs["label"], vs["resnet18"]), abs=1e-6)


def test_evaluate_cli(trained, tmp_path):
    import shutil

    d, ds, split, m1, _ = trained
    run = tmp_path / "run"
    shutil.copytree(m1, run)
    (run / "split.json").write_text(json.dumps(split))
    r = subprocess.run([sys.executable, "-m", "nhb_core", "evaluate", "--run", str(run), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (run / "predictions" / "external_B__subjects.csv").exists()
    assert "external:B" in r.stdout
    r = subprocess.run([sys.executable, "-m", "nhb_core", "evaluate", "--run", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ")
