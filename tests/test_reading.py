"""Reading sessions (nhb_core.reading): randomisation per reader with a recorded seed, atomic
answers, finality and revision, washout, progress without answers, closing writes exact CSVs that
the MRMC analysis reads, and the reader's view never holds identifiers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from reading_run import build_reading_run

from nhb_core import reading as R
from nhb_core.fileio import read_json


@pytest.fixture(scope="module")
def rrun(tmp_path_factory) -> Path:
    return build_reading_run(tmp_path_factory.mktemp("reading"), n_per_class=6, with_model=True)


@pytest.fixture()
def runs(rrun) -> Path:
    return rrun.parent


def _truth(rrun) -> dict:
    df = pd.read_csv(rrun / "predictions" / "test__subjects.csv", dtype={"subject_id": str})
    return dict(zip(df["subject_id"], df["label"]))


def test_create_randomises_per_reader_with_recorded_seed(rrun, runs):
    s1 = R.create_session(runs, rrun, ["Ann", "Bob", "Cy"], n_cases=8, seed=11)
    s2 = R.create_session(runs, rrun, ["Ann", "Bob", "Cy"], n_cases=8, seed=11)
    a, b = R.load_session(s1), R.load_session(s2)
    assert s1 != s2 and s1.parent == runs / "reading" and len(s1.name) >= 16  # token_urlsafe ids
    assert a["seed"] == 11 and a["n_cases"] == 8
    # same seed: same sample and same order *positions* per reader (codes are random, orders identical by subject)
    def subj(s, r):
        return [next(c["subject_id"] for c in s["cases"] if c["code"] == k) for k in r["order"]["unaided"]]

    for ra, rb in zip(a["readers"], b["readers"]):
        assert ra["seed"] == rb["seed"]
        assert subj(a, ra) == subj(b, rb)
        assert ra["token"] != rb["token"] and len(ra["token"]) >= 32
    # each reader gets their own order, reproducible from the recorded reader seed
    orders = [tuple(subj(a, r)) for r in a["readers"]]
    assert len(set(orders)) == 3
    for r in a["readers"]:
        perm = np.random.default_rng(r["seed"]).permutation(a["n_cases"])
        assert r["order"]["unaided"] == [a["cases"][k]["code"] for k in perm]
    # stratified sample: 8 of 6+6 -> 4 per class; codes unique and not identifiers
    assert sorted(c["truth"] for c in a["cases"]) == [0] * 4 + [1] * 4
    codes = [c["code"] for c in a["cases"]]
    assert len(set(codes)) == 8 and not any(c["subject_id"] in codes for c in a["cases"])


def test_bad_settings_are_one_line_errors(rrun, runs):
    for kw, frag in (({"readers": ["A", "a"]}, "same name"), ({"readers": ["A", " "]}, "empty"),
                     ({"readers": ["A"], "arms": ("aided",)}, "unaided"),
                     ({"readers": ["A"], "set_name": "external:Z"}, "no subject-level predictions"),
                     ({"readers": ["A"], "arm_order": "random"}, "arm order"),
                     ({"readers": ["A"], "washout_days": -1}, "washout")):
        with pytest.raises(R.ReadingError) as e:
            R.create_session(runs, rrun, **kw)
        assert frag in str(e.value) and "\n" not in e.value.line()
    with pytest.raises(R.ReadingError):
        R.session_dir(runs, "../../etc")
    with pytest.raises(R.ReadingError):
        R.find_reader(runs, "not-a-real-token-at-all-xxxxxxxx")


def test_answers_saved_atomically_final_and_progress_without_answers(rrun, runs):
    s = R.create_session(runs, rrun, ["Ann", "Bob"], n_cases=6, seed=2)
    sess = R.load_session(s)
    ann, bob = sess["readers"]
    assert R.find_reader(runs, ann["token"]) == (s, "r1")
    st = R.reader_state(s, "r1")
    assert st["state"] == "reading" and st["next_code"] == ann["order"]["unaided"][0] and st["n_done"] == 0
    # the reader's view holds no identifier, center or truth
    blob = json.dumps(st)
    for c in sess["cases"]:
        assert c["subject_id"] not in blob
    assert "truth" not in blob and "center" not in blob and "Bob" not in blob
    code = st["next_code"]
    rec = R.save_answer(s, "r1", code, 4, seconds=12.5, comment="GP bright")
    assert rec["call"] == 1 and rec["call_source"] == "derived" and rec["position"] == 1
    f = s / "answers" / "r1__unaided.json"
    assert read_json(f)["answers"][0]["rating"] == 4
    assert not [p for p in f.parent.iterdir() if p.name.startswith(".")]  # no temp files left behind
    # final: a second answer to the same case is refused, the stored one unchanged
    with pytest.raises(R.ReadingError, match="final"):
        R.save_answer(s, "r1", code, 1)
    assert R.load_answers(s, "r1", "unaided")[code]["rating"] == 4
    assert R.reader_state(s, "r1")["next_code"] == ann["order"]["unaided"][1]
    # a code of the session that is not valid / a bad rating
    with pytest.raises(R.ReadingError):
        R.save_answer(s, "r1", "NOPE99", 3)
    with pytest.raises(R.ReadingError, match="rating"):
        R.save_answer(s, "r1", ann["order"]["unaided"][1], 6)
    # "server restart": a fresh load of the files gives the same state
    R._VOLS.clear()
    assert R.reader_state(s, "r1")["n_done"] == 1
    # owner progress: counts only
    pr = R.progress(s)
    assert list(pr.columns) == ["reader", "reader_id", "arm", "arm_number", "done", "cases", "fraction", "state",
                                "last_activity"]
    assert pr.set_index("reader").loc["Ann", "done"] == 1 and pr.set_index("reader").loc["Bob", "done"] == 0
    assert pr.set_index("reader").loc["Ann", "state"] == "reading"
    with pytest.raises(R.ReadingError, match="closed"):
        R.owner_answers(s)


def test_revision_flag_and_separate_call(rrun, runs):
    s = R.create_session(runs, rrun, ["Ann"], n_cases=4, seed=5, allow_revision=True, call_mode="separate")
    code = R.reader_state(s, "r1")["next_code"]
    with pytest.raises(R.ReadingError, match="binary call"):
        R.save_answer(s, "r1", code, 2)
    R.save_answer(s, "r1", code, 2, call=0)
    rec = R.save_answer(s, "r1", code, 5, call=1, comment="second look")
    assert rec["revisions"] == 1 and rec["history"][0]["rating"] == 2 and rec["call_source"] == "given"
    ans = R.load_answers(s, "r1", "unaided")
    assert len(ans) == 1 and ans[code]["rating"] == 5


def test_arms_washout_and_close_writes_exact_csvs(rrun, runs):
    t0 = 1_800_000_000.0
    s = R.create_session(runs, rrun, ["Ann", "Bob"], n_cases=6, seed=9, arms=("unaided", "aided"),
                         arm_order="crossover", washout_days=2, now=t0)
    sess = R.load_session(s)
    assert [r["arms"] for r in sess["readers"]] == [["unaided", "aided"], ["aided", "unaided"]]
    truth = {c["code"]: (c["subject_id"], c["truth"]) for c in sess["cases"]}
    clicked = {}
    rng = np.random.default_rng(0)
    for r in sess["readers"]:
        first = r["arms"][0]
        for code in r["order"][first]:
            v = int(rng.integers(1, 6))
            R.save_answer(s, r["id"], code, v, seconds=3.0, now=t0 + 60)
            clicked[(r["name"], first, code)] = v
    # washout: the second arm waits two days after the last answer of the first
    st = R.reader_state(s, "r1", now=t0 + 3600)
    assert st["state"] == "washout" and st["arm"] == "aided" and st["washout_until"].startswith("2027-01-17")
    with pytest.raises(R.ReadingError, match="washout"):
        R.save_answer(s, "r1", st["order"][0], 3, now=t0 + 3600)
    # the unaided arm gets no model output; the aided one does
    with pytest.raises(R.ReadingError, match="not shown"):
        R.aid_info(s, "r1", st["order"][0])
    later = t0 + 3 * 86400
    pr = R.progress(s, now=t0 + 3600)
    assert set(pr[pr["arm_number"] == 2]["state"]) == {"waiting (washout)"}
    for r in sess["readers"]:
        second = r["arms"][1]
        for code in r["order"][second][:-1] if r["id"] == "r2" else r["order"][second]:
            v = int(rng.integers(1, 6))
            R.save_answer(s, r["id"], code, v, seconds=4.0, now=later)
            clicked[(r["name"], second, code)] = v
    # an earlier arm cannot change once the next one started
    with pytest.raises(R.ReadingError):
        R.save_answer(s, "r1", sess["readers"][0]["order"]["unaided"][0], 1, arm="unaided", now=later)
    res = R.close_session(s, now=later + 10)
    assert res["complete"] is False and res["n_rows"] == len(clicked) == 23
    with pytest.raises(R.ReadingError, match="closed"):
        R.save_answer(s, "r2", sess["readers"][1]["order"]["unaided"][-1], 3)
    assert R.reader_state(s, "r1")["state"] == "closed"
    # one CSV per reader and arm, rows in the reader's order, exactly the clicks
    for r in sess["readers"]:
        for arm in r["arms"]:
            df = pd.read_csv(s / "readings" / f"{r['id']}__{arm}.csv", dtype={"case_id": str, "code": str})
            assert list(df.columns) == R.READER_CSV_COLUMNS
            assert df["code"].tolist() == [c for c in r["order"][arm] if (r["name"], arm, c) in clicked]
            assert df["position"].tolist() == sorted(df["position"].tolist())
            for _, row in df.iterrows():
                assert row["rating"] == clicked[(r["name"], arm, row["code"])]
                assert (row["case_id"], row["truth"]) == truth[row["code"]]
                assert row["call"] == int(row["rating"] >= 3)
    text = (s / "readings.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == "reader,modality,case_id,truth,rating"
    expect = sorted((arm, name, truth[c][0], truth[c][1], v) for (name, arm, c), v in clicked.items())
    got = [tuple(x.split(",")) for x in lines[1:]]
    assert got == [(n, a, cid, str(t), str(v)) for a, n, cid, t, v in expect]
    # idempotent; owner sees answers only now
    assert R.close_session(s)["n_rows"] == 23
    assert len(R.owner_answers(s)) == 23


def test_closed_session_feeds_mrmc(rrun, runs, tmp_path):
    from nhb_core import stats

    s = R.create_session(runs, rrun, ["Ann", "Bob", "Cy"], seed=4, arms=("unaided", "aided"))
    sess = R.load_session(s)
    truth = {c["code"]: c["truth"] for c in sess["cases"]}
    rng = np.random.default_rng(1)
    for r in sess["readers"]:
        for arm in r["arms"]:
            for code in r["order"][arm]:
                v = int(np.clip(np.round(2 + 2 * truth[code] + rng.normal(0, 1)), 1, 5))
                R.save_answer(s, r["id"], code, v)
    assert R.reader_state(s, "r1")["state"] == "done"
    assert R.close_session(s)["complete"] is True
    res = stats.mrmc(s / "readings.csv")
    assert res["modalities"] == ["aided", "unaided"] and res["n_cases"] == 12 and len(res["readers"]) == 3
    # the study's stats stage reads the same file next to the manifest
    blk = stats.mrmc.study_mrmc(rrun / "predictions", s / "readings.csv", ["resnet18"])
    assert "resnet18 vs unaided" in blk["test"]["comparisons"] and "aided vs unaided" in blk["test"]["comparisons"]
    # install next to the manifest (an existing synthetic one is kept as .bak only with overwrite)
    man_dir = Path(sess["manifest"]).parent
    with pytest.raises(R.ReadingError, match="already"):
        R.install_readings(s)
    dest = R.install_readings(s, overwrite=True)
    assert dest == man_dir / "readings.csv" and (man_dir / "readings.csv.bak").exists()
    assert dest.read_text() == (s / "readings.csv").read_text()


def test_images_are_plain_pngs_and_aided_cam(rrun, runs):
    import io

    from PIL import Image

    s = R.create_session(runs, rrun, ["Ann", "Bob"], n_cases=4, seed=1, arms=("unaided", "aided"),
                         arm_order="crossover")
    sess = R.load_session(s)
    code = sess["cases"][0]["code"]
    full = R.render_slice_png(s, code, 0, "full")
    crop = R.render_slice_png(s, code, 0, "crop", level=0.3, width=0.5, roi=False)
    for b in (full, crop):
        im = Image.open(io.BytesIO(b))
        assert im.format == "PNG" and not im.info.get("text") and not getattr(im, "text", {})
        assert sess["cases"][0]["subject_id"].encode() not in b
    a = np.asarray(Image.open(io.BytesIO(full)))
    assert (a[..., 1] > a[..., 0] + 100).any() or (a[..., 0] > a[..., 2] + 100).any()  # ROI outline colour
    assert R.render_slice_png(s, code, 0, "full", roi=False) != full
    # prefetch renders the next case's opening slice in the background: the same bytes, from the cache
    nxt = sess["cases"][1]
    R.prefetch(s, [nxt["code"]]).join(60)
    pos = R.default_position(len(nxt["slices"]))
    key = (str(s), nxt["code"], pos, "full", 0.5, 1.0, True, 384)
    assert key in R._PNGS
    R._PNGS.clear()
    assert R.render_slice_png(s, nxt["code"], pos, "full") == R._PNGS[key]
    assert R.render_slice_png(s, code, 0, "full", level=0.3, width=0.4) != full
    # r2 starts aided: probability and Grad-CAM; r1 (unaided) is refused
    info = R.aid_info(s, "r2", code)
    assert info[0]["model"] == "resnet18" and 0 <= info[0]["probability"] <= 1
    cam = R.render_cam_png(s, "r2", code, 0, "resnet18")
    assert Image.open(io.BytesIO(cam)).format == "PNG"
    with pytest.raises(R.ReadingError):
        R.render_cam_png(s, "r1", code, 0, "resnet18")


def test_session_metrics_per_reader(rrun, runs):
    from nhb_core import stats

    s = R.create_session(runs, rrun, ["Ann", "Bob"], seed=8)
    sess = R.load_session(s)
    truth = {c["code"]: c["truth"] for c in sess["cases"]}
    rng = np.random.default_rng(2)
    given = {}
    for r in sess["readers"]:
        for code in r["order"]["unaided"]:
            v = int(np.clip(np.round(2.5 + 1.5 * truth[code] + rng.normal(0, 1)), 1, 5))
            R.save_answer(s, r["id"], code, v)
            given[(r["name"], code)] = v
    res = R.close_session(s)
    m = read_json(res["metrics"])
    assert m["reader_columns"] == {"reader_Ann": "Ann", "reader_Bob": "Bob"}
    blk = m["sets"]["unaided"]["level"]["subject"]
    for col, name in m["reader_columns"].items():
        rb = blk["readers"][col]
        y = np.array([truth[c] for c in sess["readers"][0]["order"]["unaided"]])
        v = np.array([given[(name, c)] for c in sess["readers"][0]["order"]["unaided"]])
        assert rb["n"] == 12 and rb["scale"] == "rating"
        assert rb["auc"] == pytest.approx(stats.auc(y, v))
        assert rb["confusion"]["tp"] == int(((v >= 3) & (y == 1)).sum())
        assert "mcnemar_p" in rb["vs"]["resnet18"] and len(rb["auc_ci_delong"]) == 2
    assert blk["reader_agreement"]["pairs"][0]["a"] == "reader_Ann" and "fleiss" in blk["reader_agreement"]
    assert m["mrmc"] is not None and "resnet18 vs unaided" in m["mrmc"]["comparisons"]


def test_cli_create_progress_close(rrun, runs):
    from typer.testing import CliRunner

    from nhb_core.cli import app

    cli = CliRunner()
    r = cli.invoke(app, ["reading-create", "--run", str(rrun), "--runs", str(runs), "--reader", "Ann", "--reader",
                         "Bob", "--cases", "4", "--seed", "3"])
    assert r.exit_code == 0, r.output
    sid = r.output.split()[1].rstrip(":")
    sdir = runs / "reading" / sid
    tok = R.load_session(sdir)["readers"][0]["token"]
    assert f"Ann: /Reading?token={tok}" in r.output
    R.save_answer(sdir, "r1", R.reader_state(sdir, "r1")["next_code"], 2)
    r = cli.invoke(app, ["reading-progress", "--session", sid, "--runs", str(runs)])
    assert r.exit_code == 0 and "Ann" in r.output and "reading" in r.output
    r = cli.invoke(app, ["reading-close", "--session", str(sdir)])
    assert r.exit_code == 0 and "closed: 1 readings (some readers had not finished)" in r.output
    assert (sdir / "readings.csv").read_text().count("\n") == 2
