"""The self-contained report and the shared figures.

A hand-built run folder (metrics.json in the documented shape, predictions,
histories, a saliency overlay) exercises the report without training; the
`small_run` fixture exercises it on a real study. A headless Chromium opens the
report and checks that every figure rendered with no console error and no
network request.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nhb_core import figures as F
from nhb_core.fileio import atomic_write_json
from nhb_core.report import CHECKLIST, render_report, write_report

CHROMIUM = "/usr/bin/chromium"
EVIL = '<img src=x onerror="alert(1)">&'  # no slash: it is also a center name in file names


def _png_bytes() -> bytes:
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_fake_run(root: Path, leaky: bool = False) -> Path:
    """A run folder with every file the report reads: hand-made predictions, metrics by nhb_core.stats."""
    rng = np.random.default_rng(0)
    run = root / "fake_run"
    models = ["resnet18", "densenet121"]
    readers = ["reader_1"]
    sets = {"test": ("A", 30), f"external:{EVIL}": (EVIL, 24), "val": ("A", 20)}
    (run / "predictions").mkdir(parents=True)
    for s, (center, n) in sets.items():
        y = np.array([0, 1] * (n // 2))
        subj = pd.DataFrame({"subject_id": [f"{EVIL}{i}" if i == 0 else f"S{i:03d}" for i in range(n)],
                             "center": center, "label": y})
        for m in models:
            subj[m] = np.clip(y * 0.35 + rng.random(n) * 0.65, 0, 1)
        subj["reader_1"] = np.where(rng.random(n) < 0.8, y, 1 - y)
        slices = subj.loc[subj.index.repeat(3), ["subject_id", "center", "label"] + models].reset_index(drop=True)
        slices.insert(2, "slice_index", np.tile([10, 11, 12], n))
        for m in models:
            slices[m] = np.clip(slices[m] + rng.normal(0, 0.05, len(slices)), 0, 1)
        fname = s.replace(":", "_")
        subj.to_csv(run / "predictions" / f"{fname}__subjects.csv", index=False)
        slices.to_csv(run / "predictions" / f"{fname}__slices.csv", index=False)
    from nhb_core import stats

    metrics_sets = stats.study_metrics(run / "predictions", {m: 0.5 for m in models}, readers, seed=0, n_boot=100)
    metrics = {
        "run": {"name": f"fake {EVIL}", "created": "2026-01-01T00:00:00+00:00", "manifest": f"/data/{EVIL}/manifest.csv",
                "config": {"models": models, "seed": 0}, "seed": 0, "versions": {"python": "3.x"},
                "sha256": {"manifest": "ab" * 32, "models": {m: "cd" * 32 for m in models}},
                "models": {m: {"architecture": m, "in_chans": 1, "input_size": [32, 32], "threshold": 0.5,
                               "best_epoch": 2, "val_auc": 0.8} for m in models},
                "readers": readers, "split_unit": "slice" if leaky else "subject"},
        "leaky": leaky, "n_shared_subjects": 7 if leaky else 0,
        "oracle_auc": {"A": 0.93, EVIL: 0.9},
        "cohort": {"table1": [{"center": EVIL, "group": "all", "n": 24, "slices": 72, "sex": "F: 12 (50%)"}],
                   "flow": {"dataset": {"subjects": 74, "slices": 222, "centers": ["A", EVIL]},
                            "sets": {s: {"subjects": n, "slices": 3 * n, "positives": n // 2, "centers": [c]}
                                     for s, (c, n) in sets.items()}}},
        "sets": metrics_sets,
    }
    atomic_write_json(run / "metrics.json", metrics)
    (run / "config.yaml").write_text(f"models: [resnet18, densenet121]\nname: '{EVIL}'\n")
    for m in models:
        (run / "models" / m).mkdir(parents=True)
        pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.7, 0.6, 0.5], "val_loss": [0.7, 0.65, 0.6],
                      "val_auc": [0.6, 0.7, 0.8]}).to_csv(run / "models" / m / "history.csv", index=False)
    sal = run / "saliency"
    (sal / "resnet18").mkdir(parents=True)
    (sal / "resnet18" / "case0.png").write_bytes(_png_bytes())
    atomic_write_json(sal / "summary.json", {"method": "gradcam", "models": {"resnet18": {
        "summary": {"pointing_game": 0.5, "energy_in_roi_mean": 0.4},
        "cases": [{"set": "test", "subject_id": EVIL, "slice_index": 10, "label": 1, "prob": 0.8, "correct": True,
                   "png": "resnet18/case0.png", "roi_energy": 0.4},
                  {"set": "test", "subject_id": "S001", "slice_index": 11, "label": 0, "prob": 0.7, "correct": False,
                   "png": "../../etc/passwd", "roi_energy": 0.1}]}}})
    return run


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("fake"))


@pytest.fixture(scope="module")
def fake_leaky_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("fake_leaky"), leaky=True)


def test_figures_are_pure_functions(fake_run):
    m = json.loads((fake_run / "metrics.json").read_text())
    fig = F.roc_figure(m, "test", "subject")
    names = [t.name for t in fig.data]
    assert any(n.startswith("resnet18: AUC") for n in names)
    assert any(n.startswith("reader_1") for n in names)
    assert any("oracle" in (n or "") for n in names)
    assert any(t.fill == "toself" for t in fig.data)  # CI band
    pm_names, pm = F.delong_matrix(m, "test")
    comp = m["sets"]["test"]["level"]["subject"]["comparisons"][0]
    assert pm_names == ["resnet18", "densenet121"] and pm[0, 1] == pytest.approx(comp["delong_p"]) and np.isnan(pm[0, 0])
    from nhb_core.runs import RunFolder

    pred = RunFolder(fake_run).load_predictions("test")
    cm = F.confusion_counts(pred["label"], pred["resnet18"], 0.5)
    assert cm.sum() == len(pred)
    assert cm[1].sum() == pred["label"].sum()
    c = m["sets"]["test"]["level"]["subject"]["models"]["resnet18"]["confusion"]
    assert [[c["tn"], c["fp"]], [c["fn"], c["tp"]]] == cm.tolist()  # the figure's counts match metrics.json
    nb = F.net_benefit([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], [0.5])
    assert nb[0] == pytest.approx(0.5)  # 2 TP of 4, no FP
    f, t = F.binormal_roc(0.9)
    assert np.trapezoid(t, f) == pytest.approx(0.9, abs=0.01)
    for fig in (F.confusion_figure(m, "test"), F.calibration_figure(m, "test"), F.decision_curve_figure(m, "test"),
                F.training_figure(RunFolder(fake_run).histories(["resnet18"])),
                F.flow_figure(m["cohort"]["flow"]), F.auc_bar_figure(m), F.delong_figure(m, "test")):
        assert len(fig.data) >= 1
    # missing data gives an explanatory empty figure, not an exception
    assert F.roc_figure(m, "nope").layout.annotations


def test_report_sections_and_escaping(fake_run):
    html_text = render_report(fake_run)
    for sec in ("cohort", "flow", "roc", "auc", "threshold", "confusion", "calibration", "levels", "gradcam",
                "training", "provenance", "checklist"):
        assert f'id="{sec}"' in html_text
    # user strings never reach the page as markup
    assert EVIL not in html_text
    assert "&lt;img src=x onerror=" in html_text
    # no remote resources: plotly.js inlined once; outside it no src/href to http(s)
    import plotly
    js = plotly.offline.get_plotlyjs()
    assert html_text.count(js) == 1
    rest = html_text.replace(js, "")
    import re
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', rest)
    assert "https://" not in rest and "http://cdn" not in rest
    assert html_text.count("Plotly.newPlot") >= 10
    # the path-traversal overlay was not read, the real one was inlined
    assert rest.count("data:image/png;base64,") == 1
    assert "Leakage warning" not in html_text
    assert len(CHECKLIST) >= 15


def test_leakage_banner(fake_leaky_run):
    out = write_report(fake_leaky_run)
    text = out.read_text()
    assert 'id="leakage-banner"' in text and "7 subjects shared" in text


def _chromium_check(report: Path) -> dict:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium): the browser check cannot run")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page()
            page.add_init_script("window.alert = () => { window.__alerted = true; };")
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(report.as_uri(), wait_until="load")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector('.main-svg'))",
                timeout=60000)
            n_figs = page.eval_on_selector_all(".plotly-graph-div", "els => els.length")
            n_rendered = page.eval_on_selector_all(
                ".plotly-graph-div", "els => els.filter(d => d.querySelector('.main-svg') && d._fullLayout).length")
            n_img = page.eval_on_selector_all("img", "els => els.filter(i => i.complete && i.naturalWidth > 0).length")
            alerted = page.evaluate("() => window.__alerted === true")
        finally:
            browser.close()
    return {"errors": errors, "requests": requests, "n_figs": n_figs, "n_rendered": n_rendered, "n_img": n_img,
            "alerted": alerted}


@pytest.mark.browser
def test_report_renders_in_chromium(fake_run):
    report = write_report(fake_run)
    r = _chromium_check(report)
    assert r["n_figs"] >= 10
    assert r["n_rendered"] == r["n_figs"]
    assert r["errors"] == []
    assert all(u.startswith(("file:", "data:", "blob:", "about:")) for u in r["requests"]), r["requests"]
    assert r["n_img"] >= 1
    assert not r["alerted"]


@pytest.mark.browser
def test_real_run_report_renders(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("dataset"))
    report = write_report(run)
    r = _chromium_check(report)
    assert r["n_rendered"] == r["n_figs"] >= 10
    assert r["errors"] == []
    assert all(u.startswith(("file:", "data:", "blob:", "about:")) for u in r["requests"]), r["requests"]
