"""Reading: reader studies in the browser (nhb_core.reading).

Two faces on one page:
- a reader opens their private link ``.../Reading?token=...`` and sees only their own worklist:
  cases under random codes, GP slices rendered server-side as PNG bytes (whole slice and zoomed
  crop, window/level, slice slider, ROI outline toggle), the 5-point answer form, a progress bar;
  never a subject id, center, label, NBNA, another reader or (unaided arm) a model output;
- without a token, the study owner creates sessions on a finished run, hands out the links, follows
  each reader's progress (counts only) and closes the session (writes the readings CSVs).

Self-contained: runs as a page of the dashboard (``st.Page("dashboard_pages/6_Reading.py")`` under
``st.navigation``, declared in nhb_dashboard/nav.py) or alone (``streamlit run dashboard_pages/6_Reading.py``, e.g. a readers-only server with
``NHB_READING_READERS_ONLY=1``). See docs/reading.md.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

import streamlit as st

from nhb_core import reading as R
from nhb_core.runs import RunFolder
from nhb_dashboard import data as dd
from nhb_dashboard import ui

runs = ui.page("Reading")
READERS_ONLY = os.environ.get("NHB_READING_READERS_ONLY", "").strip() not in ("", "0", "false", "no")


# ----------------------------------------------------------------------------- cached renders
@st.cache_data(show_spinner=False, max_entries=2048)
def slice_png(sdir: str, code: str, pos: int, view: str, level: float, width: float, roi: bool) -> bytes:
    return R.render_slice_png(sdir, code, pos, view=view, level=level, width=width, roi=roi)


@st.cache_data(show_spinner=False, max_entries=512)
def cam_png(sdir: str, reader_id: str, code: str, pos: int, model: str) -> bytes:
    return R.render_cam_png(sdir, reader_id, code, pos, model)


@contextlib.contextmanager
def reader_guard(sdir: str | None = None):
    """Reader-facing errors: one line *without* file paths (they could name a subject); anything
    else is logged in the session folder and shown as a reference only."""
    try:
        yield
    except R.ReadingError as err:
        st.error(ui.md_escape(f"{err.problem}. {err.fix}."), icon=":material/error:")
    except Exception as err:  # noqa: BLE001 - never a traceback, never a path
        ref = secrets.token_hex(4)
        if sdir:
            with contextlib.suppress(OSError):
                with open(Path(sdir) / "errors.log", "a", encoding="utf-8") as fh:
                    fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {ref} {ui.error_line(err)}\n")
        st.error(f"This could not be shown (reference {ref}). Reload the page; if it persists, tell the study owner.",
                 icon=":material/error:")


# ----------------------------------------------------------------------------- reader
def _submit(sdir: str, rid: str, code: str, separate: bool) -> None:
    """Form callback: save the answer before the rerun, so the rerun shows the next case."""
    ss = st.session_state
    rating = ss.get(f"rd_rating_{code}")
    call = ss.get(f"rd_call_{code}")
    if rating is None:
        ss["rd_msg"] = "Choose a rating (1-5) before saving."
        return
    if separate and call is None:
        ss["rd_msg"] = "Give the binary call (injury yes / no) before saving."
        return
    shown = ss.get("rd_shown", {}).get(code)
    secs = None if shown is None else max(0.0, time.time() - shown)
    try:
        R.save_answer(sdir, rid, code, int(rating), call=None if call is None else int(call == "yes"),
                      seconds=secs, comment=ss.get(f"rd_comment_{code}", ""))
    except R.ReadingError as err:
        ss["rd_msg"] = f"{err.problem}. {err.fix}."
        return
    ss["rd_msg"] = None
    ss["rd_revise"] = None
    ss["rd_last_saved"] = code


def reader_page(token: str) -> None:
    st.title("Reading")
    try:
        cached = st.session_state.get("rd_reader")
        if cached and cached[0] == token and (Path(cached[1]) / "session.json").is_file():
            sdir_p, rid = Path(cached[1]), cached[2]
        else:
            sdir_p, rid = R.find_reader(runs, token)
            st.session_state["rd_reader"] = (token, str(sdir_p), rid)
    except R.ReadingError as err:
        st.error(ui.md_escape(f"{err.problem}. {err.fix}."), icon=":material/error:")
        return
    sdir = str(sdir_p)
    with reader_guard(sdir):
        state = R.reader_state(sdir, rid)
        st.caption("Reader: " + ui.md_escape(state["name"]) + (f" | {ui.md_escape(state['title'])}" if state["title"] else ""))
        st.progress(state["total_done"] / max(1, state["total"]),
                    text=f"{state['total_done']} of {state['total']} readings done")
        if state["state"] == "closed":
            st.info("This reading session is closed. Thank you.", icon=":material/lock:")
            return
        if state["state"] == "washout":
            st.info(f"Arm {state['arm_number']} of {state['n_arms']} opens on {state['washout_until']} (UTC), after the "
                    "washout set by the study owner. Come back then with the same link.", icon=":material/schedule:")
            return
        if state["state"] == "done":
            st.success("All your cases are read. Thank you.", icon=":material/check_circle:")
            return
        msg = st.session_state.get("rd_msg")
        if msg:
            st.warning(ui.md_escape(msg))
        code = state["next_code"]
        answered = state["answers"]
        if state["allow_revision"] and answered:
            opts = [None] + [c for c in state["order"] if c in answered]
            pick = st.selectbox("Revise an earlier answer (this arm)", opts, key="rd_revise",
                                format_func=lambda c: "- next unread case -" if c is None else
                                f"case {state['order'].index(c) + 1}: {c} (rated {answered[c]['rating']})")
            if pick in answered:
                code = pick
        pos_in_arm = state["order"].index(code) + 1
        arm_txt = "unaided" if not state["aided"] else "aided (with the networks' output)"
        st.subheader(f"Case {code}")
        st.caption(f"Case {pos_in_arm} of {state['n_cases']} in arm {state['arm_number']} of {state['n_arms']}: "
                   f"{arm_txt}. {state['n_done']} answered in this arm.")
        shown = st.session_state.setdefault("rd_shown", {})
        shown.setdefault(code, time.time())
        n = int(state["n_slices"].get(code, 1))
        c_img, c_crop, c_ctl = st.columns([5, 5, 3])
        with c_ctl:
            pos = st.slider("GP slice", 1, n, R.default_position(n) + 1, key=f"rd_pos_{code}") - 1 if n > 1 else 0
            if n == 1:
                st.caption("One GP slice.")
            level = st.slider("Level (%)", 0, 100, 50, step=5, key="rd_level") / 100
            width = st.slider("Window (%)", 10, 200, 100, step=10, key="rd_width") / 100
            roi = st.toggle("GP outline", value=True, key="rd_roi")
            st.caption("Window/level on each slice's intensity range (50 % / 100 % = default). "
                       "Image left = patient's right, anterior up. Whole slice: green outline = left GP, orange = right "
                       "GP; crop: both GP outlined.")
        c_img.image(slice_png(sdir, code, pos, "full", level, width, roi), caption="whole axial slice",
                    width="stretch")
        c_crop.image(slice_png(sdir, code, pos, "crop", level, width, roi), caption="zoomed GP crop (64 mm)",
                     width="stretch")
        # the next unread case(s), rendered in the background while this one is read
        rest = [c for c in state["order"] if c not in answered and c != code]
        R.prefetch(sdir, rest[:1], level, width, roi)
        if state["aided"]:
            st.markdown("**The networks' output** (aided arm)")
            info = R.aid_info(sdir, rid, code)
            cols = st.columns(max(1, len(info)))
            for col, a in zip(cols, info):
                thr = a["threshold"]
                col.metric(a["model"], f"{a['probability']:.2f}",
                           help=None if thr is None else f"threshold {thr:.2f}")
                col.image(cam_png(sdir, rid, code, pos, a["model"]), caption="Grad-CAM over the GP crop",
                          width="stretch")
        separate = state["call_mode"] == "separate"
        prev = answered.get(code)
        with st.form(key=f"rd_form_{code}", clear_on_submit=False, border=True):
            st.radio("Confidence that this neonate has bilirubin brain injury", [1, 2, 3, 4, 5],
                     index=None if prev is None else int(prev["rating"]) - 1, horizontal=True,
                     format_func=lambda v: R.RATING_LABELS[v], key=f"rd_rating_{code}")
            if separate:
                st.radio("Binary call: injury?", ["no", "yes"], horizontal=True, key=f"rd_call_{code}",
                         index=None if prev is None else int(prev["call"]))
            else:
                st.caption("The binary call is derived: 3 or more = injury.")
            st.text_input("Comment (optional)", key=f"rd_comment_{code}", max_chars=500,
                          value="" if prev is None else str(prev.get("comment", "")))
            st.form_submit_button("Save and next case" if prev is None else "Save the revised answer", type="primary",
                                  on_click=_submit, args=(sdir, rid, code, separate))
        st.caption("Each answer is saved at once: you can close the browser and continue later with the same link."
                   + ("" if state["allow_revision"] else " Answers are final once saved."))


# ----------------------------------------------------------------------------- owner
def owner_page() -> None:
    st.title("Reading")
    st.caption("Reader studies: readers rate cases blinded (1-5) in their browser; a closed session writes readings "
               "that `python -m nhb_core mrmc` and the study's MRMC analysis read (docs/reading.md).")
    sessions = R.list_sessions(runs)
    if st.session_state.get("rd_created_msg"):
        st.success(st.session_state.pop("rd_created_msg"))
    tab_s, tab_new = st.tabs(["Sessions", "New session"])
    with tab_new, ui.guard():
        new_session_form()
    with tab_s, ui.guard():
        if not sessions:
            st.info("No reading session yet: create one in the **New session** tab.")
            return
        labels = {s["id"]: f"{s.get('title') or 'untitled'} | run {s['run_name']} | {s['set']} | "
                           f"{s['n_cases']} cases | {s['created_iso']} | {s['state']}" for s in sessions}
        sid = st.selectbox("Session", list(labels), format_func=lambda k: labels[k], key="rd_owner_session")
        sdir = R.session_dir(runs, sid)
        sess = R.load_session(sdir)
        c1, c2, c3, c4 = st.columns(4)
        c1.metric("cases", sess["n_cases"])
        c2.metric("readers", len(sess["readers"]))
        c3.metric("arms", " + ".join(sess["arms"]))
        c4.metric("washout (days)", f"{sess['washout_days']:g}")
        st.caption(f"Arm order: {sess['arm_order']}; binary call: {sess['call_mode']}; revision "
                   f"{'allowed' if sess['allow_revision'] else 'not allowed'}; seed {sess['seed']}.")
        prog = R.progress(sdir)
        st.markdown("**Progress** (counts only; the answers are shown once the session is closed)")
        ui.show_table(prog.drop(columns=["reader_id"]),
                      column_config={"fraction": st.column_config.ProgressColumn("progress", min_value=0, max_value=1)})
        if sess["state"] == "open":
            with st.expander("Readers' private links"):
                st.caption("Send each reader their own link: the dashboard address followed by the path below "
                           "(e.g. http://HOST:8501/Reading?token=...). Anyone with a link can read as that reader.")
                for r in sess["readers"]:
                    st.text(r["name"])
                    st.code(f"/Reading?token={r['token']}", language=None)
            ok = st.checkbox("I want to close this session: readers can no longer answer", key=f"rd_close_ok_{sid}")
            if st.button("Close the session and write the readings", disabled=not ok, key=f"rd_close_{sid}"):
                res = R.close_session(sdir)
                st.session_state["rd_closed_msg"] = (f"Closed: {res['n_rows']} readings written"
                                                     + ("" if res["complete"] else " (some readers had not finished)"))
                st.rerun()
        else:
            if st.session_state.get("rd_closed_msg"):
                st.success(st.session_state.pop("rd_closed_msg"))
            closed_view(sdir, sess)


def closed_view(sdir: Path, sess: dict) -> None:
    if not sess.get("complete"):
        st.warning("Some readers had not finished: the MRMC analysis uses the cases every reader read in every arm.")
    ans = R.owner_answers(sdir)
    st.markdown("**Readings** (one CSV per reader and arm under the session's `readings/` folder)")
    ui.show_table(ans)
    reader_results(sdir, sess)
    st.download_button("readings.csv (long format: reader, modality, case_id, truth, rating)",
                       (sdir / "readings.csv").read_bytes(), file_name="readings.csv", mime="text/csv")
    st.caption("MRMC of these readings:")
    st.code(f"python -m nhb_core mrmc --readings {sdir / 'readings.csv'}", language="bash")
    if sess.get("manifest"):
        st.caption("For the study's MRMC section (networks vs readers), the readings go next to the manifest "
                   "as readings.csv; the next `study` run redoes its stats stage.")
        ow = st.checkbox("Overwrite an existing readings.csv (kept as readings.csv.bak)", key=f"rd_ow_{sess['id']}")
        if st.button("Write readings.csv next to the run's manifest", key=f"rd_inst_{sess['id']}"):
            dest = R.install_readings(sdir, overwrite=ow)
            st.success("Written:")
            st.code(str(dest), language=None)


@st.cache_data(show_spinner="Computing the readers' statistics...", max_entries=32)
def session_metrics(key: tuple) -> dict:
    from nhb_core.fileio import read_json

    mp = Path(key[0]).parent / "metrics.json"
    if mp.is_file():
        m = read_json(mp)
        if "error" not in m:
            return m
    return R.session_metrics(Path(key[0]).parent)


@st.cache_resource(show_spinner=False, max_entries=64)
def roc_fig(key: tuple, arm: str):
    from nhb_core import figures

    return figures.roc_figure(session_metrics(key), arm, show_oracle=False)


def reader_results(sdir: Path, sess: dict) -> None:
    from nhb_core import stats

    key = dd.file_key(sdir / "readings.csv")
    m = session_metrics(key)
    names = m.get("reader_columns") or {}
    st.markdown("**Each reader's statistics** (ratings 1-5: ROC and AUC with DeLong CI; the call rating >= 3: "
                "binary metrics and McNemar against each network at its threshold)")
    for note in m.get("notes") or []:
        st.caption(ui.md_escape(note))
    arms = [a for a in sess["arms"] if a in (m.get("sets") or {})]
    cols = st.columns(max(1, len(arms)))
    for col, arm in zip(cols, arms):
        with col:
            st.markdown(f"*{arm} arm*")
            tab = dd.reader_table(m, arm)
            if not tab.empty:
                tab["reader"] = tab["reader"].map(lambda c: names.get(c, c))
                ui.show_table(tab)
            agr = dd.level_block(m, arm, "subject").get("reader_agreement") or {}
            if agr:
                def f3(v) -> str:
                    return "-" if v is None or v != v else f"{float(v):.3f}"

                st.caption(f"Agreement on the calls: Cohen's kappa {f3(agr.get('kappa'))} "
                           f"({agr.get('kappa_method')}); Fleiss' kappa {f3((agr.get('fleiss') or {}).get('kappa'))}")
            st.plotly_chart(roc_fig(key, arm), key=f"rd_roc_{sess['id']}_{arm}", width="stretch")
    if m.get("mrmc"):
        st.markdown("**MRMC** (Obuchowski-Rockette, Hillis df; random readers and cases)")
        ui.show_table(stats.mrmc.study_mrmc_table(m["mrmc"]))
        for note in m["mrmc"].get("notes") or []:
            st.caption(ui.md_escape(note))


def new_session_form() -> None:
    finished = dd.finished_runs(runs)
    if not finished:
        st.info("No finished run yet: a reading session reads the cases of a finished run.")
        return
    names = [r.name for r in finished]
    run_name = st.selectbox("Run", names, index=ui.run_index(names), key="rd_new_run")
    run = runs / run_name
    sets = [s for s in RunFolder(run).prediction_sets() if s != "val"] or RunFolder(run).prediction_sets()
    models = RunFolder(run).models()
    with st.form("rd_new"):
        title = st.text_input("Title (optional)", key="rd_new_title", max_chars=120)
        c1, c2 = st.columns(2)
        set_name = c1.selectbox("Cases from set", sets, format_func=dd.set_label, key="rd_new_set")
        n_cases = c2.number_input("Number of cases (0 = the whole set; else a stratified random sample)", 0, 10000, 0,
                                  key="rd_new_n")
        by_center = c2.checkbox("Stratify by center too (always by label)", key="rd_new_center")
        readers = st.text_area("Readers, one name per line", key="rd_new_readers", height=120)
        c1, c2, c3 = st.columns(3)
        aided = c1.checkbox("Add an aided arm (probability + Grad-CAM of each network)", key="rd_new_aided")
        order = c2.selectbox("Arm order", list(R.ARM_ORDERS), key="rd_new_order",
                             help="crossover: every other reader starts with the aided arm")
        washout = c3.number_input("Washout between arms (days)", 0.0, 365.0, 28.0, step=1.0, key="rd_new_washout")
        aid_models = st.multiselect("Networks shown in the aided arm", models, default=models, key="rd_new_models")
        c1, c2, c3 = st.columns(3)
        call_mode = c1.selectbox("Binary call", list(R.CALL_MODES), key="rd_new_call",
                                 format_func=lambda m: "derived (rating >= 3)" if m == "derived" else "given separately")
        revision = c2.checkbox("Allow readers to revise answers", key="rd_new_rev")
        seed = c3.number_input("Seed (0 = draw one; recorded)", 0, 2**31 - 1, 0, key="rd_new_seed")
        go = st.form_submit_button("Create the session", type="primary")
    if go:
        names_l = [x for x in (readers or "").splitlines() if x.strip()]
        sdir = R.create_session(runs, run, names_l, set_name=set_name, n_cases=int(n_cases) or None,
                                stratify=("label", "center") if by_center else ("label",),
                                arms=("unaided", "aided") if aided else ("unaided",), arm_order=order,
                                washout_days=float(washout), allow_revision=revision, call_mode=call_mode,
                                models=aid_models if aided else None, seed=int(seed) or None, title=title)
        st.session_state["rd_owner_session"] = sdir.name
        st.session_state["rd_created_msg"] = (f"Session created with {R.load_session(sdir)['n_cases']} cases. "
                                              "Its reader links are under the session below.")
        st.rerun()


token = st.query_params.get("token")
if token:
    reader_page(str(token))
elif READERS_ONLY:
    st.title("Reading")
    st.info("Open the private link the study owner sent you.")
else:
    owner_page()
