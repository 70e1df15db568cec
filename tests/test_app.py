"""The Streamlit dashboard under streamlit.testing.v1.AppTest: every page renders
on an empty runs folder and on a small finished run; the Launch form runs a tiny
study to completion; Cancel stops a running one; user strings never become HTML."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from nhb_core import jobs  # noqa: E402
from nhb_core.runs import list_runs, read_status  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # dashboard_ui.py lives next to app.py
    sys.path.insert(0, str(REPO))
PAGES = ["pages/1_Cohort.py", "pages/2_Launch.py", "pages/3_Results.py", "pages/4_Saliency.py", "pages/5_Predict.py"]
EVIL = "<script>alert(1)</script>"


@pytest.fixture
def env(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("NHB_RUNS_DIR", str(runs))
    monkeypatch.setenv("NHB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NHB_POLL_S", "1")
    yield runs
    for r in list_runs(runs):  # never leave a detached study behind
        if (read_status(r) or {}).get("state") in jobs.ACTIVE_STATES:
            jobs.cancel(r, grace_s=2)


@pytest.fixture
def run_copy(small_run, env) -> Path:
    """A private copy of the finished tiny run (pages write saliency caches into it)."""
    dst = env / small_run.name
    shutil.copytree(small_run, dst)
    return dst


def _app(timeout: float = 120) -> AppTest:
    return AppTest.from_file(str(REPO / "app.py"), default_timeout=timeout)


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def _assert_clean(at: AppTest, where: str) -> None:
    assert not at.exception, f"{where}: exception {[e.value for e in at.exception]}"
    assert not _errors(at), f"{where}: error boxes {_errors(at)}"


def _wait(pred, timeout: float, step: float = 0.5):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def test_every_page_renders_on_empty_runs_folder(env):
    at = _app().run()
    _assert_clean(at, "home")
    assert any("No runs yet" in i.value for i in at.info)
    for page in PAGES:
        at.switch_page(page).run()
        _assert_clean(at, page)
    assert list_runs(env) == []


def test_every_page_renders_a_finished_run(run_copy, small_cohort):
    at = _app(timeout=300).run()
    _assert_clean(at, "home")
    table = at.dataframe[0].value
    assert run_copy.name in set(table["name"])
    row = table[table["name"] == run_copy.name].iloc[0]
    assert row["status"] == "done"
    auc_cols = [c for c in table.columns if c.startswith("AUC ")]
    assert auc_cols and all(0.0 <= float(row[c]) <= 1.0 for c in auc_cols if pd.notna(row[c]))

    # Cohort: the run's manifest, validation, slice browser and montage
    at.switch_page("pages/1_Cohort.py").run()
    labels = at.selectbox(key="cohort_manifest").options
    at.selectbox(key="cohort_manifest").select(next(x for x in labels if run_copy.name in x)).run()
    _assert_clean(at, "cohort")
    assert len(at.get("image")) >= 2  # the T1 slice with the ROI outline and at least one crop

    # Results: a ROC panel per evaluated set, tables
    at.switch_page("pages/3_Results.py").run()
    _assert_clean(at, "results")
    charts = at.get("plotly_chart")
    metrics = __import__("json").loads((run_copy / "metrics.json").read_text())
    n_sets = len([s for s in metrics["sets"] if s != "val"])
    assert len(charts) >= n_sets + 2
    at.radio(key="res_level").set_value("slice").run()
    _assert_clean(at, "results slice level")

    # Saliency: the selected case and the three models side by side
    at.switch_page("pages/4_Saliency.py").run()
    _assert_clean(at, "saliency")
    assert len(at.get("image")) >= 3 + len(metrics["run"]["config"]["models"])
    assert any("energy" in m.label.lower() for m in at.metric)

    # Predict: upload one subject of the cohort (T1 + ROI)
    at.switch_page("pages/5_Predict.py").run()
    _assert_clean(at, "predict")
    man = pd.read_csv(small_cohort, dtype=str)
    t1 = small_cohort.parent / man.iloc[0]["t1"]
    roi = small_cohort.parent / man.iloc[0]["roi"]
    at.file_uploader(key="pred_t1").upload(f"{EVIL}.nii.gz", t1.read_bytes())
    at.file_uploader(key="pred_roi").upload("../../roi.nii.gz", roi.read_bytes())
    [b for b in at.button if b.label == "Predict"][0].click().run(timeout=300)
    _assert_clean(at, "predict result")
    names = {m.label for m in at.metric}
    assert "ensemble probability of injury" in names
    assert any(EVIL in t.value for t in at.text)  # shown as plain text
    assert not any("<script>" in m.value for m in at.markdown)


def test_predict_bad_upload_gives_one_line_error(run_copy):
    at = _app(timeout=120).run()
    at.switch_page("pages/5_Predict.py").run()
    at.file_uploader(key="pred_t1").upload("scan.nii.gz", b"this is not an image")
    at.file_uploader(key="pred_roi").upload("roi.nii", b"nor this")
    [b for b in at.button if b.label == "Predict"][0].click().run()
    assert not at.exception
    errs = _errors(at)
    assert len(errs) == 1 and "\n" not in errs[0]
    assert "scan" in errs[0] and "not a NIfTI" in errs[0].replace("\\", "")
    assert not list(Path(os.environ["NHB_RUNS_DIR"]).glob("**/scan.nii.gz"))


def test_user_strings_are_text_not_html(small_cohort, env, tmp_path):
    """A subject id and a center name made of HTML reach the page escaped."""
    man = pd.read_csv(small_cohort, dtype=str, keep_default_na=False)
    for col in ("t1", "roi"):
        man[col] = [str((small_cohort.parent / p).resolve()) for p in man[col]]
    man.loc[0, "subject_id"] = EVIL
    evil_manifest = tmp_path / "evil.csv"
    man.to_csv(evil_manifest, index=False)
    at = _app(timeout=120).run()
    at.switch_page("pages/1_Cohort.py").run()
    sb = at.selectbox(key="cohort_manifest")
    sb.select(sb.options[-1]).run()
    at.text_input(key="cohort_manifest_path").input(str(evil_manifest)).run()
    assert not at.exception
    assert EVIL in at.selectbox(key="cohort_subject").options
    at.selectbox(key="cohort_subject").select(EVIL).run()
    assert not at.exception
    for el in list(at.markdown) + list(at.caption) + list(at.error) + list(at.info):
        assert "<script>" not in el.value, el.value


def test_launch_form_runs_tiny_study_to_completion(env, small_cohort):
    at = _app(timeout=60).run()
    at.switch_page("pages/2_Launch.py").run()
    sb = at.selectbox(key="launch_manifest")
    sb.select(sb.options[-1]).run()
    at.text_input(key="launch_manifest_path").input(str(small_cohort)).run()
    # form widgets: values are staged until the submit button (no run() in between)
    at.text_input(key="launch_name").input("ui tiny")
    at.multiselect(key="launch_models").set_value(["resnet18"])
    at.number_input(key="launch_epochs").set_value(1)
    at.number_input(key="launch_batch").set_value(16)
    at.number_input(key="launch_size").set_value(32)
    at.selectbox(key="launch_device").set_value("cpu")
    at.button(key="launch_submit").click().run()
    _assert_clean(at, "launch submit")
    run_dir = env / "ui-tiny"
    assert (run_dir / "config.yaml").exists(), [p.name for p in env.iterdir()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["models"] == ["resnet18"] and cfg["train"]["epochs"] == 1 and cfg["prepare"]["size"] == 32
    st0 = read_status(run_dir)
    assert st0["state"] in ("running", "done") and st0["pid"]

    def finished():
        at.run()
        s = read_status(run_dir) or {}
        return s if s.get("state") in jobs.FINAL_STATES else None

    st1 = _wait(finished, timeout=600, step=2)
    assert st1 and st1["state"] == "done", (read_status(run_dir), (run_dir / "log.txt").read_text()[-2000:])
    _assert_clean(at, "launch after done")
    assert (run_dir / "metrics.json").exists()
    assert any("ui-tiny" in m.value.replace("\\", "") and "done" in m.value for m in at.markdown)


def test_cancel_button_stops_a_running_study(env, small_cohort, tiny_study_config):
    cfg = {**tiny_study_config, "models": ["resnet18"],
           "train": {**tiny_study_config["train"], "epochs": 300, "patience": 1000}}
    run_dir = jobs.submit_study(env, "long", small_cohort, cfg)
    pid = read_status(run_dir)["pid"]
    assert jobs.is_alive(pid)
    at = _app(timeout=60).run()
    at.switch_page("pages/2_Launch.py").run()
    _assert_clean(at, "launch with running job")
    at.button(key=f"cancel_{run_dir.name}").click().run()
    assert not at.exception
    st = read_status(run_dir)
    assert st["state"] == "cancelled"
    assert not jobs.is_alive(pid)
    at.run()
    assert any("long" in m.value and "cancelled" in m.value for m in at.markdown)


# ----------------------------------------------------------------- plain helpers of the pages
def test_save_upload_uses_content_not_names(tmp_path):
    import gzip
    import io
    import zipfile

    from nhb_core import dashboard_data as dd
    from nhb_core.errors import ImageError

    p = dd.save_upload(gzip.compress(b"x" * 400), "../../etc/passwd", tmp_path, "t1")
    assert p == tmp_path / "t1.nii.gz"
    hdr = (348).to_bytes(4, "little") + b"\0" * 400
    assert dd.save_upload(hdr, "a b.nii", tmp_path, "roi", allow_zip=False) == tmp_path / "roi.nii"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../evil.dcm", b"a")
        zf.writestr("/abs/two.dcm", b"b")
        zf.writestr("series/", b"")
        zf.writestr("__MACOSX/._x", b"junk")
    sub = tmp_path / "z"
    sub.mkdir()
    out = dd.save_upload(buf.getvalue(), "patient name.zip", sub, "t1")
    assert out == sub / "t1_dicom"
    assert sorted(f.name for f in out.iterdir()) == ["00001.dcm", "00002.dcm"]
    assert not (tmp_path / "evil.dcm").exists() and not list(sub.glob("*.dcm"))
    with pytest.raises(ImageError) as e:
        dd.save_upload(b"hello", f"{EVIL}.nii", tmp_path, "t1")
    assert "\n" not in e.value.line() and EVIL in e.value.line()
    with pytest.raises(ImageError):
        dd.save_upload(buf.getvalue(), "roi.zip", sub, "roi", allow_zip=False)


def test_progress_rows_from_events(tmp_path):
    from nhb_core import dashboard_data as dd
    from nhb_core.runs import append_event, write_status

    run = tmp_path / "r"
    write_status(run, "running", stage="train")
    append_event(run, {"t": "2026-01-01T00:00:00+00:00", "stage": "prepare", "done": 1, "total": 1})
    append_event(run, {"t": "2026-01-01T00:00:10+00:00", "stage": "train", "model": "resnet18", "epoch": 1,
                       "epochs": 4, "step": 0, "steps": 10})
    append_event(run, {"t": "2026-01-01T00:00:30+00:00", "stage": "train", "model": "resnet18", "epoch": 2,
                       "epochs": 4, "step": 5, "steps": 10, "metrics": {"loss": 0.5}})
    with open(run / "events.jsonl", "a") as fh:
        fh.write('{"t": "2026-01-01T00:00:31", "stage": "tra')  # a torn last line
    rows = dd.progress_rows(run)
    assert [(r["stage"], r["model"]) for r in rows] == [("prepare", ""), ("train", "resnet18")]
    assert rows[0]["fraction"] == 1.0
    assert rows[1]["fraction"] == pytest.approx(15 / 40)
    assert "epoch 2/4" in rows[1]["text"] and "loss=0.500" in rows[1]["text"]
    assert rows[1]["eta_s"] == pytest.approx(20 * (1 - 15 / 40) / (15 / 40))
    assert dd.overall_eta(rows, {"state": "running"}, ["resnet18"]) == pytest.approx(rows[1]["eta_s"])


def test_md_escape_neutralises_markdown_and_html():
    import dashboard_ui as ui

    s = ui.md_escape("[x](javascript:alert(1)) <b>*y*</b>")
    assert "<b>" not in s and "](" not in s and "\\<" in s
