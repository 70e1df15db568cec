"""The Streamlit dashboard under streamlit.testing.v1.AppTest: every page renders
on an empty runs folder and on a small finished run; the Launch form runs a tiny
study to completion; Cancel stops a running one; user strings never become HTML."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from nhb_core import jobs  # noqa: E402
from nhb_core.runs import list_runs, read_status  # noqa: E402
from nhb_dashboard import nav  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAGES = nav.page_paths()  # every page but Home, as app.py's st.navigation declares them
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
    aucs = at.dataframe[1].value  # subject-level AUC: one row per (run, held-out set), one column per model
    models = [c for c in aucs.columns if c not in ("run", "set")]
    assert set(aucs["run"]) == {run_copy.name} and models
    assert all(0.0 <= float(v) <= 1.0 for c in models for v in aucs[c] if pd.notna(v))

    # Cohort: the run's manifest, validation, slice browser and montage
    at.switch_page("dashboard_pages/1_Cohort.py").run()
    labels = at.selectbox(key="cohort_manifest").options
    at.selectbox(key="cohort_manifest").select(next(x for x in labels if run_copy.name in x)).run()
    _assert_clean(at, "cohort")
    assert len(at.get("image")) >= 2  # the T1 slice with the ROI outline and at least one crop

    # Results: a ROC panel per evaluated set, tables
    at.switch_page("dashboard_pages/3_Results.py").run()
    _assert_clean(at, "results")
    charts = at.get("plotly_chart")
    metrics = __import__("json").loads((run_copy / "metrics.json").read_text())
    n_sets = len([s for s in metrics["sets"] if s != "val"])
    assert len(charts) >= n_sets + 2
    at.radio(key="res_level").set_value("slice").run()
    _assert_clean(at, "results slice level")

    # Saliency: the selected case and the three models side by side
    at.switch_page("dashboard_pages/4_Saliency.py").run()
    _assert_clean(at, "saliency")
    # the run's configured method is preselected (the default study's LayerCAM, not the list's first)
    assert at.selectbox(key="sal_method").value == metrics["run"]["config"]["saliency"]["method"] == "layercam"
    assert len(at.get("image")) >= 3 + len(metrics["run"]["config"]["models"])
    assert any("energy" in m.label.lower() for m in at.metric)

    # Predict: upload one subject of the cohort (T1 + ROI)
    at.switch_page("dashboard_pages/5_Predict.py").run()
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
    at.switch_page("dashboard_pages/5_Predict.py").run()
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
    at.switch_page("dashboard_pages/1_Cohort.py").run()
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
    at.switch_page("dashboard_pages/2_Launch.py").run()
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
    at.switch_page("dashboard_pages/2_Launch.py").run()
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

    from nhb_core.errors import ImageError
    from nhb_dashboard import data as dd

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
    from nhb_core.runs import append_event, write_status
    from nhb_dashboard import data as dd

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
    from nhb_dashboard import ui

    s = ui.md_escape("[x](javascript:alert(1)) <b>*y*</b>")
    assert "<b>" not in s and "](" not in s and "\\<" in s


# ----------------------------------------------------------------- navigation and rough edges (issue 13)
def test_navigation_is_declared_once_and_home_has_a_name(env):
    """app.py builds st.navigation from nhb_dashboard.nav.PAGES: every page script exists, Home is the
    default page with a real title and icon (not "app"), and the Home page lists every page."""
    specs = nav.page_specs()
    assert [p.default for p in specs].count(True) == 1 and specs[0].default
    home = specs[0]
    assert home.title == "Home" and home.icon and home.path != "app.py"
    for p in specs:
        assert (REPO / p.path).is_file(), p.path
    assert len({p.url_path for p in specs}) == len(specs)
    assert "st.navigation" in (REPO / "app.py").read_text()
    at = _app().run()
    _assert_clean(at, "home")
    listed = "\n".join(m.value for m in at.markdown)
    for p in specs:
        assert f"**{p.title}**" in listed, p.title


def test_home_tables_fit_whatever_the_number_of_sets_and_models(run_copy):
    """The runs table has fixed columns (no AUC column per set x model, which pushed the table off the
    right edge); the AUCs sit in their own table, one row per run and set, one column per model."""
    from nhb_dashboard import data as dd

    at = _app(timeout=120).run()
    _assert_clean(at, "home")
    runs_tab, aucs = at.dataframe[0], at.dataframe[1]
    assert list(runs_tab.value.columns) == list(dd.RUNS_TABLE_WIDTHS)
    assert sum(dd.RUNS_TABLE_WIDTHS.values()) <= 800  # the main area of a 1280 px wide window
    m = __import__("json").loads((run_copy / "metrics.json").read_text())
    held = [s for s in m["sets"] if s != "val"]
    assert sorted(aucs.value["set"]) == sorted(dd.set_label(s) for s in held)
    assert len(aucs.value.columns) <= 2 + len(m["run"]["models"]) + 2  # models (+ baselines), not sets x models


def _plotly_specs(at: AppTest) -> list[dict]:
    import json

    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _title(spec: dict) -> str:
    t = (spec.get("layout") or {}).get("title")
    return (t.get("text") if isinstance(t, dict) else t) or ""


def _record_bars(monkeypatch) -> list:
    from nhb_dashboard import ui

    bars: list = []
    real_init = ui.Steps.__init__

    def record(self, label, total):
        real_init(self, label, total)
        bars.append(self)

    monkeypatch.setattr(ui.Steps, "__init__", record)
    return bars


def test_results_figures_fit_their_sections(run_copy, monkeypatch):
    """No figure repeats its section heading ("Training curves" twice); the confusion matrices have no
    title on top of the model names; the calibration/decision-curve legends sit under the plot. The
    first render builds the figures under a progress bar; a warm rerun shows none."""
    bars = _record_bars(monkeypatch)
    at = _app(timeout=300).run()
    at.switch_page("dashboard_pages/3_Results.py").run()
    _assert_clean(at, "results")
    built = [b for b in bars if b.label.startswith("Building the figures")]
    assert len(built) == 1 and built[0].done == built[0].total
    bars.clear()
    at.run()
    assert not bars
    headings = {m.value.lstrip("#").strip() for m in at.markdown if m.value.startswith("#")}
    specs = _plotly_specs(at)
    for sp in specs:
        assert _title(sp) not in headings, _title(sp)
    train = next(sp for sp in specs if any(a.get("text") == "validation AUC" for a in sp["layout"].get("annotations", [])))
    assert not _title(train)
    conf = next(sp for sp in specs if sp["data"] and sp["data"][0].get("type") == "heatmap")
    assert not _title(conf) and conf["layout"]["margin"]["t"] >= 60  # room for "model<br>thr 0.xxx"
    cal = next(sp for sp in specs if any(t.get("name") == "perfect" for t in sp["data"]))
    assert cal["layout"]["legend"]["orientation"] == "h" and cal["layout"]["legend"]["y"] < 0
    dca = next(sp for sp in specs if any(t.get("name") == "treat none" for t in sp["data"]))
    assert dca["layout"]["legend"]["orientation"] == "h"


def _page_text(at: AppTest) -> list[str]:
    out = [e.value for e in list(at.markdown) + list(at.caption)]
    out += [f"{m.label} {m.value}" for m in at.metric]
    out += [i.caption for el in at.get("image") for i in el.proto.imgs]
    for d in at.dataframe:
        out += [str(v) for v in d.value.astype(str).to_numpy().ravel()]
    return out


def test_saliency_says_why_a_value_is_missing(run_copy, monkeypatch):
    """An all-zero CAM has no energy share and no faithfulness: the page says why ("no map", "not
    computed") instead of "nan%" / "None"."""
    import numpy as np

    from nhb_core import saliency

    real = saliency.cam_for_case

    def zero_cam(*a, **kw):
        r = dict(real(*a, **kw))
        r["cam"] = np.zeros_like(r["cam"])
        r["energy_in_roi"] = float("nan")
        r.pop("faithfulness", None)
        r.pop("random_baseline", None)
        return r

    monkeypatch.setattr(saliency, "cam_for_case", zero_cam)
    at = _app(timeout=300).run()
    at.switch_page("dashboard_pages/4_Saliency.py").run()
    _assert_clean(at, "saliency")
    text = _page_text(at)
    for t in text:
        assert "nan%" not in t and "None" not in t and t.strip().lower() != "nan", t
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["CAM energy in GP ROI"] == "no map"
    assert metrics["faithfulness (ROAD drop)"] == "not computed"
    table = at.dataframe[0].value
    assert (table["energy in ROI"].str.startswith("no map")).all()
    assert (table["faithfulness"] == "not computed for this case").all()


def test_saliency_cold_cache_shows_progress(run_copy, monkeypatch):
    """With no map cached (on disk or in memory), the page computes them under a progress bar over the
    models (seconds each); a warm rerun shows none."""
    shutil.rmtree(run_copy / "saliency" / "cache", ignore_errors=True)
    bars = _record_bars(monkeypatch)
    at = _app(timeout=300).run()
    at.switch_page("dashboard_pages/4_Saliency.py").run()
    _assert_clean(at, "saliency cold")
    m = __import__("json").loads((run_copy / "metrics.json").read_text())
    sal = [b for b in bars if b.label.startswith("Computing the saliency maps")]
    assert len(sal) == 1 and sal[0].total == len(m["run"]["config"]["models"]) + 1
    assert sal[0].done == sal[0].total
    bars.clear()
    at.run()
    _assert_clean(at, "saliency warm")
    assert not [b for b in bars if b.label.startswith("Computing the saliency maps")]


def test_saliency_means_from_the_study_then_computed_on_request(run_copy):
    """The "Averaged per model" table: first the study's own summary (said so, with its method), then,
    after "Compute", the requested number of cases with the chosen method; one row per model each time."""
    at = _app(timeout=300).run()
    at.switch_page("dashboard_pages/4_Saliency.py").run()
    _assert_clean(at, "saliency")
    models = __import__("json").loads((run_copy / "metrics.json").read_text())["run"]["config"]["models"]

    def means_caption() -> str:
        return next(c.value for c in at.caption if "mean share of CAM energy" in c.value)

    def means_rows() -> list[str]:
        t = next(d.value for d in at.dataframe if "model" in d.value.columns and "n" in d.value.columns)
        return sorted(t["model"])

    assert "(computed by the study)" in means_caption()
    assert means_rows() == sorted(models)
    at.number_input(key="sal_n_cases").set_value(2)
    at.button(key="sal_compute").click().run()
    _assert_clean(at, "saliency compute")
    cap = means_caption()
    assert "(computed by the study)" not in cap and cap.split(" cases of set ")[0] in ("1", "2"), cap
    assert means_rows() == sorted(models)


def test_results_shows_seed_spread_and_baseline(run_copy):
    from nhb_core.fileio import atomic_write_json
    from nhb_core.study import seed_summary

    atomic_write_json(run_copy / "seeds.json", seed_summary({0: run_copy, 1: run_copy}))
    at = _app(timeout=300).run()
    at.switch_page("dashboard_pages/3_Results.py").run()
    _assert_clean(at, "results with seeds")
    headings = [m.value for m in at.markdown if m.value.startswith("#")]
    assert any("Repeated seeds" in h for h in headings)
    assert any("si_ratio" in c.value for c in at.caption)
    tables = [d.value for d in at.dataframe]
    assert any({"mean", "SD"} <= set(t.columns) for t in tables)


def test_saliency_tables_say_why_not_none():
    import numpy as np

    from nhb_dashboard import data as dd

    rows = dd.saliency_rows({"a": {"prob": 0.7, "energy_in_roi": 0.25, "pointing_hit": True, "faithfulness": 0.1,
                                   "random_baseline": 0.05},
                             "b": {"prob": 0.4, "energy_in_roi": float("nan"), "pointing_hit": False}})
    assert rows.loc[0, "energy in ROI"] == "0.250" and rows.loc[0, "pointing game"] == "hit"
    assert rows.loc[1, "energy in ROI"].startswith("no map") and rows.loc[1, "pointing game"] == "no map"
    assert rows.loc[1, "faithfulness"] == dd.NO_FAITHFULNESS
    means = pd.DataFrame({"model": ["a"], "n": [3], "energy_in_roi": [np.nan], "faithfulness": [None]})
    shown = dd.means_table(means)
    assert shown.loc[0, "energy in ROI"] == "no map in any case" and shown.loc[0, "faithfulness"] == "not computed"
    for t in (rows, shown):
        assert not t.isna().any().any() and "None" not in t.astype(str).to_numpy()
    assert dd.energy_text(float("nan")) == "no map (all-zero CAM)" and dd.energy_text(0.456) == "46%"


def test_ceilings_caption_one_line_escaped():
    from nhb_dashboard import ui

    assert ui.ceilings_caption({}) == ""
    line = ui.ceilings_caption({"oracle_auc": {"A": 0.93, "*B*": 0.9}, "visible_auc": {"A": 0.88}})
    assert "A 0.930" in line and "\\*B\\*" in line and "image-visible signal AUC" in line and "A 0.880" in line
    assert "image-visible" not in ui.ceilings_caption({"oracle_auc": {"A": 0.93}})
