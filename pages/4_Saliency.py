"""Saliency: Grad-CAM family maps of a run's models over the GP crop and on the full slice.

Computation (maps, energy in the ROI, faithfulness, overlays) lives in
nhb_core.saliency and is cached on disk under RUNDIR/saliency/cache; the page
adds an in-memory st.cache_data layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

import dashboard_ui as ui  # noqa: E402
from nhb_core import dashboard_data as dd  # noqa: E402
from nhb_core import saliency  # noqa: E402

runs = ui.page("Saliency")
st.title("Saliency")

METHOD_LABELS = {"gradcam": "GradCAM", "gradcam++": "GradCAM++", "eigencam": "EigenCAM", "layercam": "LayerCAM"}


@st.cache_data(show_spinner=False, max_entries=8)
def slice_index(ds_key: tuple) -> pd.DataFrame:
    cols = ["subject_id", "center", "label", "slice_index", "roi_voxels"]
    df = pd.read_csv(ds_key[0], dtype={"subject_id": str, "center": str})
    return df[[c for c in cols if c in df.columns]]


@st.cache_data(show_spinner="Computing the saliency map...", max_entries=256)
def case(run: str, wkey: tuple, model: str, set_name: str, sid: str, z: int, method: str) -> dict:
    r = saliency.cam_for_case(run, model, set_name, sid, z, method=method, with_faithfulness=True)
    return {k: r[k] for k in ("cam", "image", "roi", "prob", "label", "energy_in_roi", "roi_share", "pointing_hit", "threshold",
                              "faithfulness", "random_baseline") if k in r}


@st.cache_data(show_spinner="Placing the map on the full slice...", max_entries=128)
def on_slice(run: str, wkey: tuple, model: str, set_name: str, sid: str, z: int, method: str) -> dict:
    c = case(run, wkey, model, set_name, sid, z, method)
    r = saliency.cam_on_slice(run, {"cam": c["cam"], "subject_id": sid, "slice_index": z, "model": model})
    return {"image": r["image"], "roi": r["roi"], "cam": r["cam"]}


@st.cache_data(show_spinner=False, max_entries=512)
def png(image: np.ndarray, cam: np.ndarray | None, roi: np.ndarray, alpha: float) -> bytes:
    return saliency.overlay_png(image, cam, roi, alpha=alpha)


@st.cache_data(show_spinner=False, max_entries=16)
def study_summary(key: tuple) -> tuple[dict, pd.DataFrame]:
    from nhb_core.fileio import read_json

    s = read_json(key[0])
    cases_csv = Path(key[0]).parent / "cases.csv"
    cases = pd.read_csv(cases_csv, dtype={"subject_id": str}) if cases_csv.exists() else pd.DataFrame(s.get("cases") or [])
    return s, cases


@st.cache_data(show_spinner="Computing saliency over the set (cached on disk per case)...", max_entries=32)
def summary(run: str, wkeys: tuple, set_name: str, method: str, n: int) -> pd.DataFrame:
    return saliency.saliency_summary(run, set_name=set_name, method=method, max_cases=n, seed=0)


with ui.guard():
    finished = dd.finished_runs(runs)
    if not finished:
        st.info("No finished run yet. Start one on the Launch page (or `make demo`).")
        st.stop()
    c1, c2, c3, c4 = st.columns(4)
    names = [r.name for r in finished]
    run = runs / c1.selectbox("Run", names, index=ui.run_index(names), key="sal_run")
    models = dd.run_models(run)
    model = c2.selectbox("Model", models, key="sal_model")
    sets = dd.prediction_sets(run)
    set_name = c3.selectbox("Set", sets, format_func=dd.set_label, key="sal_set",
                            index=sets.index("test") if "test" in sets else 0)
    method = c4.selectbox("Method", list(saliency.METHODS), format_func=METHOD_LABELS.get, key="sal_method",
                          help="Target layer: the last convolutional stage of each architecture "
                               "(nhb_core.saliency.resolve_target_layer).")

    m = ui.metrics(run) or {}
    thr = dd.model_threshold(run, model, m)
    pred = ui.predictions(run, set_name, "subjects")
    table = dd.outcome_table(pred, model, thr)
    c1, c2, c3 = st.columns([2, 1, 1])
    outcomes = c1.multiselect("Outcome at the model's threshold", ["TP", "FP", "FN", "TN"],
                              default=["TP", "FP", "FN", "TN"], key="sal_outcomes")
    order = c2.radio("Sort by confidence", ["most confident", "least confident"], key="sal_order")
    alpha = c3.slider("Map opacity", 0.0, 1.0, 0.5, 0.05, key="sal_alpha")
    sel = table[table["outcome"].isin(outcomes)].sort_values("confidence", ascending=order == "least confident")
    if sel.empty:
        st.info("No case with these outcomes in this set.")
        st.stop()
    labels = {r.subject_id: f"{r.subject_id}  ({r.outcome}, p={r.prob:.2f}, label {int(r.label)})"
              for r in sel.itertuples()}
    c1, c2 = st.columns([2, 1])
    sid = c1.selectbox(f"Subject ({len(sel)} cases, threshold {thr:.3f})", list(labels), format_func=labels.get,
                       key="sal_subject")
    ds_dir = saliency.run_dataset_dir(run)
    idx = slice_index(dd.file_key(ds_dir / "index.csv"))
    zs = idx[idx["subject_id"] == str(sid)].sort_values("roi_voxels" if "roi_voxels" in idx.columns else "slice_index",
                                                         ascending=False)["slice_index"].astype(int).tolist()
    if not zs:
        st.warning("This subject has no slice in the run's dataset.")
        st.stop()
    z = c2.selectbox("Slice (most ROI voxels first)", zs, key=f"sal_z_{sid}")
    wkey = dd.file_key(run / "models" / model / "model.safetensors")

    st.subheader("Selected model")
    r = case(str(run), wkey, model, set_name, str(sid), int(z), method)
    full = on_slice(str(run), wkey, model, set_name, str(sid), int(z), method)
    c1, c2, c3 = st.columns([1, 1, 1])
    c1.image(png(r["image"][0], r["cam"], r["roi"], alpha), caption=f"{model}: GP crop (model input)")
    c2.image(png(full["image"], full["cam"], full["roi"], alpha), caption=f"{model}: on the full axial slice {z}")
    c3.image(png(full["image"], None, full["roi"], 0.0), caption="T1 slice with the GP ROI outline (green)")
    k1, k2, k3, k4 = st.columns(4)
    k1.metric("slice probability", f"{r['prob']:.3f}", help=f"label {r['label']}, threshold {thr:.3f}")
    share = r.get("roi_share") or 0.0
    if r["energy_in_roi"] == r["energy_in_roi"]:  # not NaN
        k2.metric("CAM energy in GP ROI", f"{r['energy_in_roi']:.1%}",
                  delta=f"{r['energy_in_roi'] / share:.1f} x chance" if share > 0 else None, delta_color="off",
                  help=f"chance (the ROI's share of the crop, what a map that ignores anatomy gets): {share:.1%}")
    else:
        k2.metric("CAM energy in GP ROI", "no map", help="The map is all zero: nothing pushes this case towards injury")
    k3.metric("pointing game", "hit" if r["pointing_hit"] else "miss", help="Is the CAM maximum inside the ROI?")
    if "faithfulness" in r:
        k4.metric("faithfulness (ROAD drop)", f"{r['faithfulness']:.3f}",
                  delta=f"{r['faithfulness'] - r['random_baseline']:+.3f} vs random map",
                  help=f"random-map baseline drop: {r['random_baseline']:.3f}")

    st.subheader("All models, same slice")
    cols = st.columns(max(1, len(models)))
    rows = []
    for col, mod in zip(cols, models):
        wk = dd.file_key(run / "models" / mod / "model.safetensors")
        rr = case(str(run), wk, mod, set_name, str(sid), int(z), method)
        col.image(png(rr["image"][0], rr["cam"], rr["roi"], alpha),
                  caption=f"{mod}: p={rr['prob']:.2f}, energy in ROI {rr['energy_in_roi']:.0%}")
        rows.append({"model": mod, "slice probability": rr["prob"], "energy in ROI": rr["energy_in_roi"],
                     "pointing hit": bool(rr["pointing_hit"]), "faithfulness": rr.get("faithfulness"),
                     "random baseline": rr.get("random_baseline")})
    ui.show_table(pd.DataFrame(rows), column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                                     for c in ("slice probability", "energy in ROI", "faithfulness",
                                                               "random baseline")})

    st.subheader("Averaged per model")
    skey = dd.file_key(run / "saliency" / "summary.json")
    c1, c2 = st.columns([1, 3])
    n_cases = c1.number_input("Cases", min_value=2, max_value=500, value=8, step=2, key="sal_n_cases")
    if c2.button(f"Compute the averages for {dd.set_label(set_name)} with {METHOD_LABELS[method]}", key="sal_compute"):
        st.session_state["sal_summary"] = (str(run), set_name, method, int(n_cases))
    want = st.session_state.get("sal_summary")
    if want and want[0] == str(run):
        wkeys = tuple(dd.file_key(run / "models" / x / "model.safetensors") for x in models)
        cases = summary(want[0], wkeys, want[1], want[2], want[3])
        means = saliency.saliency_means(cases)
        st.caption(f"{cases['subject_id'].nunique()} cases of set {ui.md_escape(dd.set_label(want[1]))}, method "
                   f"{METHOD_LABELS[want[2]]}: mean share of CAM energy in the GP ROI, pointing-game hit rate, "
                   "ROAD faithfulness (probability drop when the top CAM pixels are removed) next to the same drop "
                   "for random maps.")
        ui.show_table(means, column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                            for c in means.columns if c not in ("model", "n")})
    elif skey[2] >= 0:
        s, cases = study_summary(skey)
        if not cases.empty:
            means = saliency.saliency_means(cases)
            st.caption(f"{len(cases['subject_id'].unique())} cases of set {ui.md_escape(dd.set_label(s.get('set', '')))}, "
                       f"method {ui.md_escape(METHOD_LABELS.get(s.get('method'), s.get('method')))} "
                       "(computed by the study). Faithfulness: drop of the probability when the top CAM pixels are "
                       "removed, next to the same drop for random maps.")
            ui.show_table(means, column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                                for c in means.columns if c not in ("model", "n")})
    else:
        st.caption("The study did not compute a saliency summary for this run.")
