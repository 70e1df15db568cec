"""Predict: one uploaded T1 + ROI mask through every model of a run.

Uploads are written into a fresh temporary folder under fixed names chosen by
content (``t1.nii.gz``, ``t1.nii``, ``t1_dicom/00001.dcm``...): the uploaded
file names are shown as text only and never used as paths.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from nhb_core.errors import NHBError
from nhb_core.runs import RunFolder
from nhb_dashboard import data as dd
from nhb_dashboard import ui

runs = ui.page("Predict")
st.title("Predict one case")
st.caption("Upload a T1 (NIfTI .nii/.nii.gz, or a .zip of one DICOM series) and its GP ROI mask (NIfTI, "
           "1 = left GP, 2 = right GP, on the T1's grid). Files are processed in a temporary folder and deleted.")


def warm_models(run: str, keys: tuple) -> None:
    """Load every model of a run once per process (nhb_core.predict keeps them in memory), with a
    progress bar over the models the first time (seconds each)."""
    from nhb_core.models import load_run_model

    if ui.is_warm("models", run, keys):
        return
    names = RunFolder(run).require_trained_models()
    with ui.steps("Loading the run's models", len(names)) as prog:
        for n in names:
            load_run_model(run, n)
            ui.advance(prog, n)
    ui.mark_warm("models", run, keys)


@st.cache_data(show_spinner="Predicting...", max_entries=32)
def predict(run: str, keys: tuple, t1_bytes: bytes, t1_name: str, roi_bytes: bytes, roi_name: str,
            method: str) -> tuple[dict, dict[str, bytes]]:
    from nhb_core.predict import predict_case

    with tempfile.TemporaryDirectory(prefix="nhb-predict-") as tmp:
        tmp = Path(tmp)
        t1 = dd.save_upload(t1_bytes, t1_name, tmp, "t1", allow_zip=True)
        roi = dd.save_upload(roi_bytes, roi_name, tmp, "roi", allow_zip=False)
        try:
            res = predict_case(run, t1, roi, out_dir=tmp / "out", with_cam=True, method=method)
        except NHBError as err:
            raise dd.upload_error(err, tmp, {"t1": t1_name, "roi": roi_name}) from None
        images = {f: (tmp / "out" / f).read_bytes() for f in res.get("files", []) if f.endswith(".png")}
    return res, images


with ui.guard():
    finished = [r for r in dd.finished_runs(runs) if RunFolder(r).trained_models()]
    if not finished:
        st.info("No finished run with trained models yet. Start one on the Launch page (or `make demo`).")
        st.stop()
    c1, c2 = st.columns([2, 1])
    names = [r.name for r in finished]
    run = runs / c1.selectbox("Run", names, index=ui.run_index(names), key="pred_run")
    method = c2.selectbox("Saliency method", ["gradcam", "gradcam++", "eigencam", "layercam"], key="pred_method")
    keys = tuple(dd.file_key(RunFolder(run).weights_path(m)) for m in RunFolder(run).trained_models())
    warm_models(str(run), keys)
    with st.form("predict_form"):
        c1, c2 = st.columns(2)
        t1_up = c1.file_uploader("T1 volume", type=["nii", "gz", "zip"], key="pred_t1")
        roi_up = c2.file_uploader("ROI mask", type=["nii", "gz"], key="pred_roi")
        go = st.form_submit_button("Predict", type="primary")

    if go:
        if t1_up is None or roi_up is None:
            st.error("Upload both the T1 and its ROI mask.")
            st.stop()
        res, images = predict(str(run), keys, t1_up.getvalue(), t1_up.name, roi_up.getvalue(), roi_up.name, method)
        st.session_state["pred_result"] = (run.name, t1_up.name, roi_up.name, res, images)

    if st.session_state.get("pred_result") and st.session_state["pred_result"][0] == run.name:
        _, t1_name, roi_name, res, images = st.session_state["pred_result"]
        st.caption("Inputs (as uploaded):")
        st.text(f"T1: {t1_name}\nROI: {roi_name}")
        ens = res["ensemble"]
        c1, c2, c3 = st.columns(3)
        c1.metric("ensemble probability of injury", f"{ens['prob']:.3f}")
        c2.metric("ensemble decision", "injury" if ens["decision"] else "no injury",
                  help=f"threshold {ens['threshold']:.3f} ({ens.get('threshold_rule', '')})")
        c3.metric("slices used", len(res.get("slices") or []))
        rows = [{"model": n, "probability": e["prob"], "threshold": e["threshold"],
                 "decision": "injury" if e["decision"] else "no injury",
                 "CAM energy in ROI (mean)": (sum(c["energy_in_roi"] for c in e.get("cam") or []) /
                                              max(1, len(e.get("cam") or []))) if e.get("cam") else None}
                for n, e in res["models"].items()]
        rows.append({"model": "ensemble", "probability": ens["prob"], "threshold": ens["threshold"],
                     "decision": "injury" if ens["decision"] else "no injury"})
        ui.show_table(pd.DataFrame(rows), column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                                         for c in ("probability", "threshold",
                                                                   "CAM energy in ROI (mean)")})
        for w in res.get("warnings") or []:
            st.warning(ui.md_escape(w))
        if images:
            st.subheader("Grad-CAM overlays")
            names = sorted(images)
            cols = st.columns(min(4, len(names)))
            for i, f in enumerate(names):
                cols[i % len(cols)].image(images[f], caption=Path(f).stem.replace("__", ", "))
