"""nhb_core.runs.RunFolder: the one accessor of a run folder's layout, and the module graph it
settles (model loading in models.py, device helpers in device.py)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest

from nhb_core.errors import DatasetError, RunError
from nhb_core.runs import RunFolder, set_file_stem, set_label, sort_sets

REPO = Path(__file__).resolve().parents[1]


def _model(run: Path, name: str, weights: bool = True) -> None:
    d = run / "models" / name
    d.mkdir(parents=True)
    (d / "model.json").write_text(json.dumps({"name": name, "threshold": 0.4}))
    if weights:
        (d / "model.safetensors").write_bytes(b"x")


@pytest.fixture
def run(tmp_path) -> Path:
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "config.yaml").write_text("models: [densenet121, resnet18, efficientnet_b0]\n")
    _model(rd, "resnet18")
    _model(rd, "densenet121")
    _model(rd, "efficientnet_b0", weights=False)  # still training
    _model(rd, ".resnet18.new")  # a staging folder
    (rd / "split.json").write_text(json.dumps({"sets": {"train": [], "val": [], "test": [],
                                                        "external:B": [], "external:Site_C": []}}))
    pred = rd / "predictions"
    pred.mkdir()
    for stem in ("test", "val", "external_B", "external_Site_C"):
        pd.DataFrame({"subject_id": ["007", "012"], "center": ["1", "1"], "label": [1, 0],
                      "resnet18": [0.9, 0.2]}).to_csv(pred / f"{stem}__subjects.csv", index=False)
    pd.DataFrame({"subject_id": ["007"], "center": ["1"], "slice_index": [3], "label": [1],
                  "resnet18": [0.8]}).to_csv(pred / "test__slices.csv", index=False)
    (rd / "metrics.json").write_text(json.dumps({"sets": {"test": {}, "external:B": {}}}))
    (rd / "models" / "resnet18" / "history.csv").write_text("epoch,train_loss\n1,0.7\n2,0.5\n")
    return rd


def test_paths_follow_the_documented_layout(run):
    rf = RunFolder(run)
    assert rf.models_dir == run / "models" and rf.predictions_dir == run / "predictions"
    assert rf.metrics_path == run / "metrics.json" and rf.status_path == run / "status.json"
    assert rf.config_path == run / "config.yaml" and rf.split_path == run / "split.json"
    assert rf.saliency_cache_dir == run / "saliency" / "cache"
    assert rf.saliency_summary_path == run / "saliency" / "summary.json"
    assert rf.cohorts_dir == run / "cohorts" and rf.seeds_dir == run / "seeds"
    assert rf.seeds_path == run / "seeds.json" and rf.baselines_dir == run / "baselines"
    assert rf.model_json_path("resnet18") == run / "models" / "resnet18" / "model.json"
    assert rf.weights_path("resnet18") == run / "models" / "resnet18" / "model.safetensors"
    assert rf.predictions_path("external:B") == run / "predictions" / "external_B__subjects.csv"
    for level in ("slice", "slices"):
        assert rf.predictions_path("test", level) == run / "predictions" / "test__slices.csv"
    with pytest.raises(ValueError):
        rf.predictions_path("test", "voxel")
    assert RunFolder(rf).path == run and Path(rf) == run and rf.name == "run"


def test_one_rule_for_trained_models(run):
    rf = RunFolder(run)
    # model.json + model.safetensors, hidden folders skipped, in the config's order
    assert rf.trained_models() == ["densenet121", "resnet18"]
    assert rf.configured_models() == ["densenet121", "resnet18", "efficientnet_b0"]
    assert rf.models() == rf.configured_models()
    (run / "config.yaml").unlink()
    assert rf.models() == rf.trained_models() == ["densenet121", "resnet18"]  # then by name
    assert rf.require_trained_models() == ["densenet121", "resnet18"]


def test_checked_access_names_the_problem(tmp_path):
    with pytest.raises(RunError, match="run folder not found"):
        RunFolder(tmp_path / "nope").require_trained_models()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no models/ folder"):
        RunFolder(tmp_path / "empty").check()
    (tmp_path / "empty" / "models").mkdir()
    with pytest.raises(RunError, match="no trained model"):
        RunFolder(tmp_path / "empty").require_trained_models()
    assert RunFolder(tmp_path / "empty").trained_models() == []


def test_sets_labels_and_predictions(run):
    rf = RunFolder(run)
    assert rf.prediction_sets() == ["test", "external:B", "external:Site_C", "val"]
    assert rf.prediction_sets("slice") == ["test"]
    df = rf.load_predictions("test")
    assert df["subject_id"].tolist() == ["007", "012"] and df["center"].tolist() == ["1", "1"]  # ids stay text
    assert rf.load_predictions("external:B", "subjects").shape == (2, 4)
    assert rf.load_predictions("external:Z").empty
    assert rf.load_history("resnet18")["train_loss"].tolist() == [0.7, 0.5]
    assert rf.load_history("densenet121").empty
    assert list(rf.histories()) == ["resnet18"]


def test_one_label_and_one_stem_everywhere():
    from nhb_core import figures
    from nhb_dashboard import data as dd

    assert set_label("external:B") == "external center B"
    assert set_label("test") == "internal test" and set_label("val") == "validation"
    assert figures.set_label is set_label and dd.set_label is set_label  # the report, the CLI, the dashboard
    assert set_file_stem("external:Site B") == "external_Site B"
    with pytest.raises(DatasetError):
        set_file_stem("external:../../x")
    assert sort_sets(["val", "external:B", "pooled", "test"]) == ["test", "external:B", "val", "pooled"]


def test_small_files_tolerate_absence_and_corruption(run):
    rf = RunFolder(run)
    assert rf.metrics() == {"sets": {"test": {}, "external:B": {}}}
    assert rf.model_json("resnet18")["threshold"] == 0.4 and rf.model_json("nope") == {}
    assert rf.status() is None and rf.seeds() is None and rf.events() == []
    (run / "metrics.json").write_text("{torn")
    assert rf.metrics() is None
    (run / "config.yaml").write_text("models: [unclosed\n")
    assert rf.config() == {} and rf.configured_models() == []


def _imports(rel: str) -> set[str]:
    """Every nhb_core module a file imports (at top level or inside functions)."""
    tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("nhb_core")}


def test_no_predict_saliency_cycle_and_no_device_helpers_from_train():
    sal = set().union(*(_imports(str(p.relative_to(REPO))) for p in (REPO / "nhb_core" / "saliency").glob("*.py")))
    assert "nhb_core.models.load_run_model" in sal  # the saliency package loads models from models.py
    assert not any(m.startswith("nhb_core.predict") for m in sal)
    assert not any(m.startswith("nhb_core.saliency._") or m == "nhb_core.saliency._CAM_LOCK"
                   for m in _imports("nhb_core/predict.py"))
    for rel in ("nhb_core/evaluate.py", "nhb_core/cohorts.py", "nhb_core/study.py"):
        assert "nhb_core.train.resolve_device" not in _imports(rel), rel
        assert "nhb_core.train.amp_settings" not in _imports(rel), rel
    from nhb_core import models, predict

    assert predict.load_run_model is models.load_run_model and predict.MODEL_LOCK is models.MODEL_LOCK


def test_every_reader_goes_through_the_run_folder():
    """The layout is spelled out in runs.py only: no `"models" /` or `/ "predictions"` path joins elsewhere
    among the readers (the study runner, which writes the folder, is the exception)."""
    readers = [*(REPO / "dashboard_pages").glob("*.py"), *(REPO / "nhb_dashboard").glob("*.py"),
               *(REPO / "nhb_core" / "cli").glob("*.py")]
    readers += [REPO / "nhb_core" / f for f in ("report.py", "figures.py", "predict.py", "export.py",
                                                "reading.py", "cohorts.py", "evaluate.py")]
    for p in readers:
        text = p.read_text(encoding="utf-8")
        for bad in ('/ "models" /', '/ "predictions"', 'run_dir / "metrics.json"', 'rd / "metrics.json"'):
            assert bad not in text, f"{p.relative_to(REPO)} spells the run layout: {bad}"
