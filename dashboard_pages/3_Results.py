"""Results: one run, or two side by side (e.g. subject-level vs slice-level split).

Every number comes from the run's metrics.json / predictions (nhb_core.stats via
the study); every figure from nhb_core.figures (shared with the HTML report).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from nhb_core import figures
from nhb_core.runs import RunFolder
from nhb_dashboard import data as dd
from nhb_dashboard import figs, ui

runs = ui.page("Results")
st.title("Results")


# Figures are cached as objects (st.cache_resource, keyed on the files' mtime): a plotly
# Figure costs ~0.3 s to unpickle or re-validate, which st.cache_data would pay on every rerun.
# They are never mutated after creation.
@st.cache_resource(show_spinner=False, max_entries=128)
def roc_fig(mkey: tuple, set_name: str, level: str):
    return figs.roc(figures.roc_figure(ui.metrics(Path(mkey[0]).parent), set_name, level))


@st.cache_resource(show_spinner=False, max_entries=64)
def pred_figs(mkey: tuple, pkey: tuple, set_name: str, level: str):
    run_dir = Path(mkey[0]).parent
    m = ui.metrics(run_dir) or {}
    pred = ui.predictions(run_dir, set_name, level)
    return (figs.confusion(figures.confusion_figure(m, set_name, level, pred=pred)),
            figs.below_legend(figures.calibration_figure(m, set_name, level, pred=pred)),
            figs.below_legend(figures.decision_curve_figure(m, set_name, level, pred=pred)))


@st.cache_resource(show_spinner=False, max_entries=64)
def train_fig(keys: tuple, run: str):
    run_dir = Path(run)
    models = RunFolder(run_dir).models()
    return figs.training(figures.training_figure(
        {m: ui.history(run_dir, m) for m in models if len(ui.history(run_dir, m))}, models))


@st.cache_resource(show_spinner=False, max_entries=32)
def seeds_fig(skey: tuple):
    return figures.seeds_figure(dd.seed_summary(Path(skey[0]).parent) or {})


@st.cache_data(show_spinner=False, max_entries=64)
def metrics_bytes(mkey: tuple) -> bytes:
    return Path(mkey[0]).read_bytes()


def render_run(run_dir: Path, level: str, kp: str, compact: bool) -> None:
    """One run; a progress bar while its figures are built the first time in this process."""
    m = ui.metrics(run_dir)
    n_sets = len([s for s in ((m or {}).get("sets") or {}) if s != "val"])
    warm = ui.is_warm("results", dd.file_key(RunFolder(run_dir).metrics_path), level)
    with ui.steps(f"Building the figures of {run_dir.name}", n_sets + 2, show=not warm and n_sets > 0) as prog:
        _render_run(run_dir, m, level, kp, compact, prog)
    ui.mark_warm("results", dd.file_key(RunFolder(run_dir).metrics_path), level)


def _render_run(run_dir: Path, m, level: str, kp: str, compact: bool, prog) -> None:
    if not m:
        st.info("This run has no metrics.json yet.")
        return
    mkey = dd.file_key(RunFolder(run_dir).metrics_path)
    summ = dd.run_summary(run_dir)
    unit = (m.get("run") or {}).get("split_unit") or ("slice" if m.get("leaky") else "subject")
    st.markdown(f"### {ui.md_escape(run_dir.name)}")
    st.caption(f"split unit: {unit}; models: {ui.md_escape(', '.join(summ['models']))}; "
               f"created {ui.md_escape(summ['created'])}")
    if m.get("leaky"):
        st.error("**LEAKY RUN**: slice-level split, slices of the same neonate are in both training and test sets "
                 f"({m.get('n_shared_subjects') or 'some'} shared subjects). Its AUCs are optimistic.",
                 icon=":material/warning:")
    sets = [s for s in dd.sort_sets((m.get("sets") or {}).keys()) if s != "val"]
    if not sets:
        st.info("No evaluated sets.")
        return

    st.markdown("#### ROC curves per set")
    st.caption("Bands: 95% DeLong-based confidence band; open circles: the model at its threshold; black markers: "
               "readers; dotted: oracle (synthetic truth) where known.")
    per_row = 1 if compact else 2
    for i in range(0, len(sets), per_row):
        cols = st.columns(per_row)
        for c, s in zip(cols, sets[i:i + per_row]):
            c.plotly_chart(roc_fig(mkey, s, level), key=f"{kp}roc_{s}_{level}", width="stretch")
            ui.advance(prog, f"ROC {dd.set_label(s)}")

    st.markdown("#### AUC (95% CI) and threshold metrics")
    tab = dd.auc_table(m, level)
    if not tab.empty:
        ui.show_table(tab, column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                          for c in tab.columns if tab[c].dtype.kind == "f"})
    if m.get("oracle_auc"):
        st.caption(ui.ceilings_caption(m))

    if "si_ratio" in ((m.get("run") or {}).get("baselines") or {}):
        st.caption("si_ratio: the GP / surroundings signal-intensity ratio (per side and both, logistic regression "
                   "fitted on the training set), the comparator a radiologist can measure with two ROIs; "
                   "DeLong p-values below compare every network with it.")
    seeds = dd.seed_summary(run_dir)
    if seeds:
        st.markdown("#### Repeated seeds")
        st.plotly_chart(seeds_fig(dd.file_key(RunFolder(run_dir).seeds_path)), key=f"{kp}seeds", width="stretch")
        ui.show_table(dd.seed_table(seeds), column_config={
            c: st.column_config.NumberColumn(c, format="%.3f") for c in ("mean", "SD", "min", "max")})
        st.caption(f"The study repeated with seeds {', '.join(map(str, seeds.get('seeds') or []))} (split and "
                   "training seeded alike): a difference between models smaller than this spread is not a finding.")

    set_pick = st.selectbox("Set for the detailed tables", sets, format_func=dd.set_label, key=f"{kp}set")
    st.markdown("#### DeLong p-values (paired, model vs model)")
    dl = dd.delong_table(m, set_pick, level)
    if dl.shape[0] >= 2:
        st.dataframe(dl.apply(lambda col: col.map(lambda v: "-" if pd.isna(v) else f"{v:.4f}")), width="stretch")
        st.caption("\\- : not computed (a model compared with itself, or too few cases of one class).")
    else:
        st.caption("One model: nothing to compare.")
    rt = dd.reader_table(m, set_pick, level)
    st.markdown("#### Readers vs models (McNemar at the model's threshold)")
    if rt.empty:
        st.caption("No reader columns for this set/level." + (" Readers are scored per subject." if level == "slice" else ""))
    else:
        ui.show_table(rt, column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                         for c in rt.columns if c != "reader"})

    mr, mr_comp, mr_auc = dd.mrmc_tables(m, set_pick)
    if mr:  # a reader study next to the manifest (readings.csv): networks vs readers, MRMC
        st.markdown("#### Reader study: networks vs readers (MRMC, Obuchowski-Rockette, Hillis df)")
        st.caption(f"{mr.get('n_cases')} subjects read by {len(mr.get('readers') or [])} readers "
                   f"({mr.get('n_pos')} positive); covariance: {ui.md_escape(mr.get('cov_method'))}. "
                   "Difference = first minus second, CI and p for random readers and cases; FRRC / RRFC p: "
                   "these readers / these cases only.")
        if not mr_comp.empty:
            st.plotly_chart(figures.mrmc_figure(m, set_pick), key=f"{kp}mrmc", width="stretch")
            ui.show_table(mr_comp.drop(columns=["a", "b"]),
                          column_config={c: st.column_config.NumberColumn(c, format="%.4f")
                                         for c in mr_comp.columns if mr_comp[c].dtype.kind == "f"})
        if not mr_auc.empty:
            ui.show_table(mr_auc, column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                                 for c in mr_auc.columns if c != "reader"})
        for note in mr.get("notes") or []:
            st.caption(ui.md_escape(note))

    pkey = dd.file_key(RunFolder(run_dir).predictions_path(set_pick, level))
    if pkey[2] >= 0:
        conf, cal, dca = pred_figs(mkey, pkey, set_pick, level)
        ui.advance(prog, "confusion, calibration, decision curves")
        st.markdown(f"#### Confusion matrices at each model's threshold, {ui.md_escape(dd.set_label(set_pick))} "
                    f"({level} level)")
        st.plotly_chart(conf, key=f"{kp}conf", width="stretch")
        if compact:
            st.plotly_chart(cal, key=f"{kp}cal", width="stretch")
            st.plotly_chart(dca, key=f"{kp}dca", width="stretch")
        else:
            c1, c2 = st.columns(2)
            c1.plotly_chart(cal, key=f"{kp}cal", width="stretch")
            c2.plotly_chart(dca, key=f"{kp}dca", width="stretch")
        st.caption("Calibration: observed fraction of injured vs the mean predicted probability (quantile bins, "
                   "Wilson 95% CI); decision curves: net benefit of treating at each threshold.")

    st.markdown("#### Training curves")
    hkeys = tuple(dd.file_key(RunFolder(run_dir).history_path(x)) for x in summ["models"])
    st.plotly_chart(train_fig(hkeys, str(run_dir)), key=f"{kp}train", width="stretch")
    ui.advance(prog, "training curves")

    st.markdown("#### Downloads")
    c1, c2, c3 = st.columns(3)
    pk = RunFolder(run_dir).predictions_path(set_pick, level)
    if pk.exists():
        c1.download_button("Predictions CSV", dd.csv_download(pk), file_name=f"{run_dir.name}_{pk.name}",
                           mime="text/csv", key=f"{kp}dl_pred")
    c2.download_button("Metrics JSON", metrics_bytes(mkey), file_name=f"{run_dir.name}_metrics.json",
                       mime="application/json", key=f"{kp}dl_metrics")
    rep = run_dir / "report.html"
    if rep.exists():
        c3.download_button("HTML report", rep.read_bytes(), file_name=f"{run_dir.name}_report.html",
                           mime="text/html", key=f"{kp}dl_report")


compare, a, b, level = False, None, None, "subject"
with ui.guard():
    finished = dd.finished_runs(runs)
    if not finished:
        st.info("No finished run yet. Start one on the Launch page (or `make demo`).")
        st.stop()
    names = [r.name for r in finished]
    c1, c2, c3 = st.columns([2, 2, 1])
    compare = c3.toggle("Compare two runs", key="res_compare", value=False)
    level = c3.radio("Level", ["subject", "slice"], horizontal=True, key="res_level",
                     help="subject: one probability per neonate (mean of its slices); slice: every slice counted "
                          "(clustered statistics account for slices of one neonate).")
    a = c1.selectbox("Run", names, index=ui.run_index(names), key="res_run_a")
    b = None
    if compare:
        others = [n for n in names if n != a] or names
        b = c2.selectbox("Compare with", others, key="res_run_b")

if a is None:
    pass
elif not compare:
    with ui.guard():
        render_run(runs / a, level, "a_", compact=False)
else:
    ca, cb = st.columns(2)
    for col, name, kp in ((ca, a, "a_"), (cb, b, "b_")):
        with col:
            with ui.guard():
                render_run(runs / name, level, kp, compact=True)
