"""Home: the runs table, subject-level AUC per run, set and model, the cohort of the default
study, what each page does (the page list comes from nhb_dashboard.nav).

Runs folder: ``$NHB_RUNS_DIR`` (default ``./runs``). See docs/dashboard.md.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from nhb_core import jobs
from nhb_dashboard import data as dd
from nhb_dashboard import nav, ui

runs = ui.page("Home")
st.title("NHB Lab")
st.caption("T1-weighted MRI deep learning for brain injury in neonatal hyperbilirubinemia: "
           "subject-level splits, per-site evaluation, clustered statistics.")

with ui.guard():
    # Streamlit has no background thread: each page load notices finished or dead
    # jobs and starts queued ones (see nhb_core.jobs).
    jobs.refresh(runs, ui.max_running())

st.subheader("Runs")
with ui.guard():
    st.caption("Runs folder (NHB_RUNS_DIR):")
    st.code(str(runs), language=None)
    table, aucs = ui.runs_table(runs)
    if table.empty:
        st.info("No runs yet. Start a study on the **Launch** page, or run `make demo`.")
    else:
        # fixed columns and widths: the table fits a normal browser width whatever the runs hold;
        # failed runs' errors are shown in full below it
        ui.show_table(table[list(dd.RUNS_TABLE_WIDTHS)], column_config={
            c: st.column_config.TextColumn(c, width=w, help=dd.RUNS_TABLE_HELP.get(c))
            for c, w in dd.RUNS_TABLE_WIDTHS.items()})
        n_leaky = int(table["leakage"].astype(str).str.startswith("LEAKY").sum())
        if n_leaky:
            st.warning(f"{n_leaky} run(s) used a slice-level split: slices of one neonate sit in both training and "
                       "test sets, so their AUCs are optimistic (leakage). Compare them with a subject-level run "
                       "on the Results page.", icon=":material/warning:")
        failed = table[table["status"].astype(str).str.startswith("failed")]
        for _, r in failed.head(5).iterrows():
            ui.error_box(f"{r['name']}: {r['error']}" if r["error"] else f"{r['name']}: failed")
        if len(failed) > 5:
            st.caption(f"... and {len(failed) - 5} more failed run(s).")
        if len(aucs):
            st.markdown("**Subject-level AUC** per run and held-out set (one column per model)")
            ui.show_table(aucs, column_config={
                "run": st.column_config.TextColumn("run", width=140),
                "set": st.column_config.TextColumn("set", width=130),
                **{c: st.column_config.NumberColumn(c, format="%.3f") for c in aucs.columns if c not in ("run", "set")}})

st.subheader("Cohort of the default study")
with ui.guard():
    finished = dd.finished_runs(runs)
    default = next((r for r in finished if r.name == "demo"), finished[0] if finished else None)
    if default is None:
        st.info("The cohort summary appears once a study has finished.")
    else:
        m = ui.metrics(default) or {}
        st.caption(f"Run: {ui.md_escape(default.name)}")
        cohort = m.get("cohort") or {}
        flow = cohort.get("flow") or {}
        ds = flow.get("dataset") or {}
        c1, c2, c3 = st.columns(3)
        c1.metric("subjects", ds.get("subjects", "?"))
        c2.metric("slices", ds.get("slices", "?"))
        c3.metric("centers", len(ds.get("centers") or []))
        if cohort.get("table1"):
            ui.show_table(dd.pretty_columns(pd.DataFrame(cohort["table1"])))
        if flow.get("sets"):
            ui.show_table(pd.DataFrame([{"set": dd.set_label(k), **{kk: (", ".join(vv) if isinstance(vv, list) else vv)
                                                                    for kk, vv in v.items()}}
                                        for k, v in flow["sets"].items()]))
        if m.get("oracle_auc"):
            st.caption(ui.ceilings_caption(m))

st.subheader("Pages")
st.markdown("\n".join(f"- **{page}**: {what}" for page, what in nav.pages_help()))
