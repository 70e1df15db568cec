"""Saliency: Grad-CAM family maps of a run's models over the GP crop and on the full slice.

Computation (maps, energy in the ROI, faithfulness, overlays) lives in
nhb_core.saliency and is cached on disk under RUNDIR/saliency/cache; the page
adds an in-memory st.cache_data layer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from nhb_core import saliency
from nhb_core.runs import RunFolder
from nhb_dashboard import data as dd
from nhb_dashboard import ui

runs = ui.page("Saliency")
st.title("Saliency")

METHOD_LABELS = {"gradcam": "GradCAM", "gradcam++": "GradCAM++", "eigencam": "EigenCAM", "layercam": "LayerCAM"}


@st.cache_data(show_spinner=False, max_entries=8)
def slice_index(ds_key: tuple) -> pd.DataFrame:
    return dd.load_slice_index(ds_key[0])


# no spinner: the page shows a progress bar over the models while maps are computed (ui.steps)
@st.cache_data(show_spinner=False, max_entries=256)
def case(run: str, wkey: tuple, model: str, set_name: str, sid: str, z: int, method: str) -> dict:
    r = saliency.cam_for_case(run, model, set_name, sid, z, method=method, with_faithfulness=True)
    return {k: r[k] for k in ("cam", "image", "roi", "prob", "label", "energy_in_roi", "roi_share", "pointing_hit", "threshold",
                              "faithfulness", "random_baseline") if k in r}


@st.cache_data(show_spinner=False, max_entries=128)
def on_slice(run: str, wkey: tuple, model: str, set_name: str, sid: str, z: int, method: str) -> dict:
    c = case(run, wkey, model, set_name, sid, z, method)
    r = saliency.cam_on_slice(run, {"cam": c["cam"], "subject_id": sid, "slice_index": z, "model": model})
    return {"image": r["image"], "roi": r["roi"], "cam": r["cam"]}


@st.cache_data(show_spinner=False, max_entries=512)
def png(image: np.ndarray, cam: np.ndarray | None, roi: np.ndarray, alpha: float) -> bytes:
    return saliency.overlay_png(image, cam, roi, alpha=alpha)


@st.cache_data(show_spinner=False, max_entries=16)
def study_summary(key: tuple) -> tuple[dict, pd.DataFrame]:
    return dd.load_saliency_summary(key[0])


def show_means(cases: pd.DataFrame, set_name: str, method: str | None, origin: str) -> None:
    """The per-model means of a saliency summary (``saliency.saliency_means``) with what they mean."""
    st.caption(f"{cases['subject_id'].nunique()} cases of set {ui.md_escape(dd.set_label(set_name))}, method "
               f"{ui.md_escape(METHOD_LABELS.get(method or '', str(method)))}{origin}: mean share of CAM energy in "
               "the GP ROI, pointing-game hit rate, ROAD faithfulness (probability drop when the top CAM pixels are "
               "removed) next to the same drop for random maps.")
    ui.show_table(dd.means_table(saliency.saliency_means(cases)))


with ui.guard():
    finished = dd.finished_runs(runs)
    if not finished:
        st.info("No finished run yet. Start one on the Launch page (or `make demo`).")
        st.stop()
    c1, c2, c3, c4 = st.columns(4)
    names = [r.name for r in finished]
    run = runs / c1.selectbox("Run", names, index=ui.run_index(names), key="sal_run")
    models = RunFolder(run).trained_models()
    model = c2.selectbox("Model", models, key="sal_model")
    sets = RunFolder(run).prediction_sets()
    set_name = c3.selectbox("Set", sets, format_func=dd.set_label, key="sal_set",
                            index=sets.index("test") if "test" in sets else 0)
    methods = list(saliency.METHODS)
    method = c4.selectbox("Method", methods, format_func=METHOD_LABELS.get, key="sal_method",
                          index=methods.index(dd.run_saliency_method(run)),
                          help="Preselected: the method of the run's config (saliency.method). Target layer: "
                               "the deepest stage whose map keeps 16 x 16 cells over the crop "
                               "(nhb_core.saliency.resolve_target_layer).")

    m = ui.metrics(run) or {}
    thr = dd.model_threshold(run, model, m)
    pred = ui.predictions(run, set_name, "subject")
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
    labels = {r.subject_id: f"{r.subject_id}  ({r.outcome}, p={dd.prob_text(r.prob)}, label {int(r.label)})"
              for r in sel.itertuples()}
    c1, c2 = st.columns([2, 1])
    sid = c1.selectbox(f"Subject ({len(sel)} cases, threshold {thr:.3f})", list(labels), format_func=labels.get,
                       key="sal_subject")
    idx = slice_index(dd.file_key(dd.dataset_index_path(run)))
    zs = dd.subject_slices(idx, str(sid))
    if not zs:
        st.warning("This subject has no slice in the run's dataset.")
        st.stop()
    z = c2.selectbox("Slice (most ROI voxels first)", zs, key=f"sal_z_{sid}")

    # every model's map of this slice (the selected model first, then its full-slice placement);
    # a cold map costs seconds (model load + CAM + faithfulness): a progress bar counts them
    wkeys = {mod: dd.file_key(RunFolder(run).weights_path(mod)) for mod in models}
    order = [model] + [x for x in models if x != model]
    todo = [("case", mod) for mod in order] + [("slice", model)]
    cold = [t for t in todo if not ui.is_warm("saliency", str(run), wkeys[t[1]], t, set_name, str(sid), int(z), method)]
    results: dict[str, dict] = {}
    with ui.steps(f"Computing the saliency maps ({METHOD_LABELS[method]}, cached on disk afterwards)", len(cold),
                  show=bool(cold)) as prog:
        for kind, mod in todo:
            args = (str(run), wkeys[mod], mod, set_name, str(sid), int(z), method)
            if kind == "case":
                results[mod] = case(*args)
            else:
                full = on_slice(*args)
            if (kind, mod) not in cold:
                continue
            ui.mark_warm("saliency", str(run), wkeys[mod], (kind, mod), set_name, str(sid), int(z), method)
            ui.advance(prog, mod if kind == "case" else f"{mod} on the full slice")

    st.subheader("Selected model")
    r = results[model]
    c1, c2, c3 = st.columns([1, 1, 1])
    c1.image(png(r["image"][0], r["cam"], r["roi"], alpha), caption=f"{model}: GP crop (model input)")
    c2.image(png(full["image"], full["cam"], full["roi"], alpha), caption=f"{model}: on the full axial slice {z}")
    c3.image(png(full["image"], None, full["roi"], 0.0), caption="T1 slice with the GP ROI outline (green)")
    k1, k2, k3, k4 = st.columns(4)
    k1.metric("slice probability", dd.prob_text(r.get("prob"), 3), help=f"label {r['label']}, threshold {thr:.3f}")
    share = r.get("roi_share") or 0.0
    energy = r.get("energy_in_roi")
    if energy is not None and energy == energy:  # not NaN
        k2.metric("CAM energy in GP ROI", f"{energy:.1%}",
                  delta=f"{energy / share:.1f} x chance" if share > 0 else None, delta_color="off",
                  help=f"chance (the ROI's share of the crop, what a map that ignores anatomy gets): {share:.1%}")
        k3.metric("pointing game", "hit" if r["pointing_hit"] else "miss", help="Is the CAM maximum inside the ROI?")
    else:
        k2.metric("CAM energy in GP ROI", "no map", help=dd.NO_MAP)
        k3.metric("pointing game", "no map", help=dd.NO_MAP)
    if r.get("faithfulness") is not None and r.get("random_baseline") is not None:
        k4.metric("faithfulness (ROAD drop)", f"{r['faithfulness']:.3f}",
                  delta=f"{r['faithfulness'] - r['random_baseline']:+.3f} vs random map",
                  help=f"random-map baseline drop: {r['random_baseline']:.3f}")
    else:
        k4.metric("faithfulness (ROAD drop)", "not computed", help="The faithfulness of this map was not computed.")

    st.subheader("All models, same slice")
    cols = st.columns(max(1, len(models)))
    for col, mod in zip(cols, models):
        rr = results[mod]
        col.image(png(rr["image"][0], rr["cam"], rr["roi"], alpha),
                  caption=f"{mod}: p={dd.prob_text(rr.get('prob'))}, energy in ROI {dd.energy_text(rr.get('energy_in_roi'))}")
    ui.show_table(dd.saliency_rows({mod: results[mod] for mod in models}))
    st.caption("energy in ROI: share of the CAM's energy inside the GP ROI; no map: the CAM is all zero (nothing "
               "in the image pushes this slice towards injury), so there is no share and no maximum to point with.")

    st.subheader("Averaged per model")
    skey = dd.file_key(dd.saliency_summary_path(run))
    c1, c2 = st.columns([1, 3])
    n_cases = c1.number_input("Cases", min_value=2, max_value=500, value=8, step=2, key="sal_n_cases")
    if c2.button(f"Compute the averages for {dd.set_label(set_name)} with {METHOD_LABELS[method]}", key="sal_compute"):
        st.session_state["sal_summary"] = (str(run), set_name, method, int(n_cases))
    want = st.session_state.get("sal_summary")
    if want and want[0] == str(run):
        key = (*want, tuple(dd.file_key(RunFolder(run).weights_path(x)) for x in models))
        computed = st.session_state.setdefault("sal_summary_tables", {})
        if key not in computed:
            with ui.steps(f"Computing saliency over {want[3]} cases x {len(models)} models (cached on disk per case)",
                          1) as prog:
                def _progress(ev: dict) -> None:
                    if prog is not None and ev.get("total"):
                        prog.set(ev.get("done") or 0, ev["total"])

                computed.clear()  # one table at a time in the session
                computed[key] = saliency.saliency_summary(want[0], set_name=want[1], method=want[2], max_cases=want[3],
                                                          seed=0, progress=_progress)
        show_means(computed[key], want[1], want[2], "")
    elif skey[2] >= 0:
        s, cases = study_summary(skey)
        if not cases.empty:
            show_means(cases, s.get("set", ""), s.get("method"), " (computed by the study)")
    else:
        st.caption("The study did not compute a saliency summary for this run.")
