"""Launch: start a study in the background and follow it live.

The study runs as a detached ``python -m nhb_core study`` process (nhb_core.jobs),
so it survives reloads, the browser closing and dashboard restarts. The live
panel is an ``st.fragment(run_every=...)``: it polls status.json / events.jsonl,
calls ``jobs.refresh`` (notices dead processes, starts queued runs) and leaves
the rest of the page responsive.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from nhb_core import jobs
from nhb_core.models import DEFAULT_MODELS
from nhb_core.runs import RunFolder, list_runs, read_status
from nhb_dashboard import data as dd
from nhb_dashboard import ui

runs = ui.page("Launch")
st.title("Launch a study")

# ------------------------------------------------------------------ the form
with ui.guard():
    choice = ui.manifest_picker(runs, key="launch_manifest")
    manifest = choice.path
    centers = dd.manifest_centers(manifest) if manifest is not None and manifest.is_file() else []
    if choice.missing_synthetic:
        st.caption("This synthetic cohort does not exist yet: it is generated when you start the study.")

    split_unit = st.radio("Split unit", ["subject", "slice"], horizontal=True, key="launch_split",
                          help="subject: all slices of a neonate stay in one set (honest). "
                               "slice: slices are split independently (leaky).")
    if split_unit == "slice":
        st.error("**LEAKAGE WARNING**: a slice-level split puts neighbouring slices of the same neonate in both "
                 "the training and the test set. The model can recognise the subject instead of the injury, and "
                 "the AUC will be optimistic. Use it only to demonstrate the leak next to a subject-level run.",
                 icon=":material/warning:")

    with st.form("launch_form"):
        c1, c2 = st.columns(2)
        name = c1.text_input("Run name", value="study", key="launch_name", help="Letters, digits, _ and - (other characters become -).")
        models = c2.multiselect("Models", list(DEFAULT_MODELS), default=list(DEFAULT_MODELS), key="launch_models")
        c1, c2, c3 = st.columns(3)
        epochs = c1.number_input("Epochs", min_value=1, max_value=500, value=8, step=1, key="launch_epochs")
        batch = c2.number_input("Batch size", min_value=1, max_value=1024, value=32, step=1, key="launch_batch")
        size = c3.number_input("Input size (px)", min_value=16, max_value=512, value=64, step=16, key="launch_size")
        external = st.multiselect("External centers (held out of training, tested separately)", centers, key="launch_external",
                                  help="Empty: the study's default (every center but the first is external).")
        c1, c2, c3 = st.columns(3)
        seed = c1.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="launch_seed")
        device = c2.selectbox("Device", ["auto", "cpu", "cuda"], key="launch_device")
        n_gpus = c3.number_input("GPUs (>1 trains under torchrun)", min_value=1, max_value=16, value=1, step=1, key="launch_gpus")
        submitted = st.form_submit_button("Start study", type="primary", key="launch_submit")

    if submitted:
        if not models:
            st.error("Choose at least one model.")
        elif manifest is None:
            st.error("Give the path of a manifest CSV.")
        elif centers and external and set(external) >= set(centers):
            st.error("Keep at least one center for training: not every center can be external.")
        else:
            if choice.missing_synthetic:
                manifest = choice.generate()
                centers = dd.manifest_centers(manifest)
            cfg = dd.study_config(models, int(epochs), int(batch), int(size), split_unit, external, int(seed),
                                  device, int(n_gpus), centers=centers)
            run_dir = jobs.submit_study(runs, name, manifest, cfg, max_running=ui.max_running())
            st.session_state["launch_last"] = run_dir.name
            st.success(f"Submitted as run {ui.md_escape(run_dir.name)}.", icon=":material/check_circle:")

# ------------------------------------------------------------------ the live panel
st.subheader("Jobs")
st.caption(f"At most {ui.max_running()} study running at a time (NHB_MAX_RUNNING); the others wait in the queue. "
           "The page polls every few seconds.")


def _job_card(run_dir: Path, st_: dict) -> None:
    if st.session_state.get(f"cancel_{run_dir.name}") and st_.get("state") in jobs.ACTIVE_STATES:
        # the Cancel button of this card was clicked: this (fragment) run handles it
        with st.spinner("Stopping the process group..."):
            st_ = jobs.cancel(run_dir)
    state = st_.get("state", "?")
    icon = {"running": ":material/autorenew:", "queued": ":material/schedule:", "done": ":material/check_circle:",
            "failed": ":material/error:", "cancelled": ":material/cancel:"}.get(state, "")
    with st.container(border=True):
        head, btn = st.columns([5, 1])
        head.markdown(f"{icon} **{ui.md_escape(run_dir.name)}** - {state}"
                      + (f" (stage {ui.md_escape(st_.get('stage'))})" if st_.get("stage") and state == "running" else ""))
        if state in jobs.ACTIVE_STATES:
            btn.button("Cancel", key=f"cancel_{run_dir.name}", type="secondary",
                       help="SIGTERM to the study's process group (SIGKILL after 5 s); the run is marked cancelled.")
        if state == "queued":
            pos = jobs.queue_position(runs, run_dir)
            st.caption(f"waiting in the queue (position {pos})" if pos else "starting...")
        if state == "failed":
            ui.error_box(st_.get("error") or "failed (no error recorded; see log.txt)")
        if state in ("running", "done", "cancelled", "failed"):
            rows = dd.progress_rows(run_dir, st_)
            box = st.container() if state == "running" or not rows else st.expander(f"progress of {len(rows)} stage(s)")
            for r in rows:
                label = r["stage"] + (f" / {r['model']}" if r["model"] else "")
                text = f"{label}: {r['text']}" if r["text"] else label
                frac = r["fraction"]
                box.progress(float(frac) if frac is not None else 0.0, text=ui.md_escape(text))
            if state == "done":
                st.caption("Finished: open it on the Results and Saliency pages.")
            if state == "running":
                eta = dd.overall_eta(rows, st_, RunFolder(run_dir).configured_models())
                st.caption(f"ETA: {dd.fmt_seconds(eta)}")
            tail = dd.log_tail(run_dir, 12)
            if tail:
                with st.expander("last log lines", expanded=state == "running"):
                    st.code(tail, language=None)


@st.fragment(run_every=ui.POLL_S)
def live_jobs() -> None:
    with ui.guard():
        jobs.refresh(runs, ui.max_running())
        shown = 0
        for r in list_runs(runs):
            s = read_status(r) or {}
            recent = r.name == st.session_state.get("launch_last")
            if s.get("state") in jobs.ACTIVE_STATES or recent or shown < 3:
                _job_card(r, s)
                shown += 1
            if shown >= 8:
                break
        if shown == 0:
            st.info("No jobs yet.")


live_jobs()
