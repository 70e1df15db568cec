"""The Reading page under AppTest: the owner creates a session, sees progress (no answers) and
closes it; a reader's link shows only their own worklist, saves each answer at once, and the
elements sent to the browser carry no subject id, center, label or (unaided) model output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from reading_run import build_reading_run  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from nhb_core import reading as R  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
PAGE = str(REPO / "dashboard_pages" / "6_Reading.py")


@pytest.fixture(scope="module")
def rrun(tmp_path_factory) -> Path:
    return build_reading_run(tmp_path_factory.mktemp("reading_app"), n_per_class=4, with_model=True)


@pytest.fixture
def runs(rrun, monkeypatch) -> Path:
    monkeypatch.setenv("NHB_RUNS_DIR", str(rrun.parent))
    return rrun.parent


def _clean(at: AppTest, where: str) -> None:
    assert not at.exception, f"{where}: {[e.value for e in at.exception]}"
    assert not at.error, f"{where}: {[e.value for e in at.error]}"


def _sent(at: AppTest) -> str:
    """Every element's protobuf as text: what the browser would receive for this run."""
    out = []
    for node in at._tree.children.values():
        out.append(_dump(node))
    return "\n".join(out)


def _dump(node) -> str:
    parts = []
    proto = getattr(node, "proto", None)
    if proto is not None:
        parts.append(str(proto))
    for ch in getattr(node, "children", {}).values():
        parts.append(_dump(ch))
    return "\n".join(parts)


def test_owner_creates_session_and_sees_progress_only(runs, rrun):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    _clean(at, "owner, empty")
    at.text_area(key="rd_new_readers").set_value("Dr Ann\nDr Bob")
    at.number_input(key="rd_new_n").set_value(6)
    at.text_input(key="rd_new_title").set_value("<b>pilot</b>")
    at.button[0].click()  # the form's submit ("Create the session")
    at.run()
    _clean(at, "owner, created")
    assert any("Session created with 6 cases" in s.value for s in at.success)
    sess = R.list_sessions(runs)[0]
    assert sess["n_cases"] == 6 and [r["name"] for r in sess["readers"]] == ["Dr Ann", "Dr Bob"]
    codes = [c.value for c in at.code]
    assert any(sess["readers"][0]["token"] in c for c in codes)
    # a reader answers one case; the owner sees counts, not the rating
    sdir = runs / "reading" / sess["id"]
    code = R.reader_state(sdir, "r1")["next_code"]
    R.save_answer(sdir, "r1", code, 5, comment="secret-comment")
    at.run()
    df = at.dataframe[0].value
    assert df.set_index("reader").loc["Dr Ann", "done"] == 1
    sent = _sent(at)
    assert "secret-comment" not in sent and code not in sent
    # close: the readings appear, the CSV is written
    at.checkbox(key=f"rd_close_ok_{sess['id']}").check().run()
    at.button(key=f"rd_close_{sess['id']}").click().run()
    _clean(at, "owner, closed")
    assert (sdir / "readings.csv").read_text().splitlines()[0] == "reader,modality,case_id,truth,rating"
    assert any("secret-comment" in str(d.value.to_dict()) for d in at.dataframe)
    assert any("Each reader's statistics" in md.value for md in at.markdown)
    assert len(at.get("plotly_chart")) == 1  # the unaided arm's ROC (networks and readers)
    assert (sdir / "metrics.json").is_file()


def test_reader_link_worklist_saves_and_leaks_nothing(runs, rrun):
    sdir = R.create_session(runs, rrun, ["Dr Ann", "Dr Bob"], n_cases=4, seed=3)
    sess = R.load_session(sdir)
    ann = sess["readers"][0]
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.query_params["token"] = ann["token"]
    at.run()
    _clean(at, "reader")
    order = ann["order"]["unaided"]
    forbidden = [c["subject_id"] for c in sess["cases"]] + ["Dr Bob", "resnet18", str(rrun), "truth", "nbna",
                                                            sess["id"]]
    for i, code in enumerate(order):
        assert at.subheader[0].value == f"Case {code}"
        sent = _sent(at)
        for f in forbidden:
            assert f not in sent, (f, i)
        assert len(at.get("image")) >= 2
        at.radio(key=f"rd_rating_{code}").set_value(1 + i % 5)
        at.button[0].click()  # "Save and next case"
        at.run()
        _clean(at, f"reader case {i}")
        assert R.load_answers(sdir, "r1", "unaided")[code]["rating"] == 1 + i % 5
    assert any("All your cases are read" in s.value for s in at.success)
    # a bad token: one line, no page
    at2 = AppTest.from_file(PAGE, default_timeout=60)
    at2.query_params["token"] = "x" * 32
    at2.run()
    assert "not valid" in at2.error[0].value and not at2.get("image")


def test_aided_reader_sees_network_output(runs, rrun):
    sdir = R.create_session(runs, rrun, ["Ann"], n_cases=2, seed=1, arms=("unaided", "aided"),
                            arm_order="aided-first")
    tok = R.load_session(sdir)["readers"][0]["token"]
    at = AppTest.from_file(PAGE, default_timeout=180)
    at.query_params["token"] = tok
    at.run()
    _clean(at, "aided")
    assert at.metric[0].label == "resnet18" and "aided" in at.caption[1].value
    assert len(at.get("image")) >= 3  # slice, crop, Grad-CAM


def test_reader_revision_separate_call_and_states(runs, rrun):
    sdir = R.create_session(runs, rrun, ["Ann"], n_cases=2, seed=2, allow_revision=True, call_mode="separate",
                            arms=("unaided", "aided"), washout_days=30)
    tok = R.load_session(sdir)["readers"][0]["token"]
    order = R.load_session(sdir)["readers"][0]["order"]["unaided"]
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.query_params["token"] = tok
    at.run()
    _clean(at, "separate")
    c0 = order[0]
    # a rating without the binary call is not saved
    at.radio(key=f"rd_rating_{c0}").set_value(2)
    at.button[0].click().run()
    assert any("binary call" in w.value for w in at.warning) and not R.load_answers(sdir, "r1", "unaided")
    at.radio(key=f"rd_call_{c0}").set_value("no")
    at.button[0].click().run()
    _clean(at, "separate saved")
    assert R.load_answers(sdir, "r1", "unaided")[c0]["call"] == 0
    assert at.subheader[0].value == f"Case {order[1]}"
    # revise the first answer from the selectbox
    at.selectbox(key="rd_revise").set_value(c0).run()
    assert at.subheader[0].value == f"Case {c0}"
    at.radio(key=f"rd_rating_{c0}").set_value(4)
    at.radio(key=f"rd_call_{c0}").set_value("yes")
    at.button[0].click().run()
    _clean(at, "revised")
    a = R.load_answers(sdir, "r1", "unaided")[c0]
    assert (a["rating"], a["call"], a["revisions"]) == (4, 1, 1)
    assert at.subheader[0].value == f"Case {order[1]}"
    at.radio(key=f"rd_rating_{order[1]}").set_value(1)
    at.radio(key=f"rd_call_{order[1]}").set_value("no")
    at.button[0].click().run()
    # the aided arm waits for the washout: no images, no model output
    assert any("washout" in i.value for i in at.info) and not at.get("image") and not at.metric
    R.close_session(sdir)
    at.run()
    assert any("closed" in i.value for i in at.info)


def test_readers_only_server_hides_the_owner_part(runs, rrun, monkeypatch):
    monkeypatch.setenv("NHB_READING_READERS_ONLY", "1")
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    _clean(at, "readers only")
    assert any("private link" in i.value for i in at.info) and not at.tabs and not at.button
