"""Cohort: manifest validation, center x label table, slice browser, montage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from nhb_dashboard import data as dd
from nhb_dashboard import ui

runs = ui.page("Cohort")
st.title("Cohort")


@st.cache_data(show_spinner="Validating the manifest...", max_entries=16)
def validate(key: tuple, check_images: bool) -> tuple[dict, pd.DataFrame | None, pd.DataFrame | None]:
    from nhb_core.manifest import validate_manifest

    rep = validate_manifest(key[0], check_images=check_images)
    df = None if rep.manifest is None else rep.manifest.df
    return rep.to_dict(), rep.cohort_table, df


@st.cache_data(show_spinner=False, max_entries=8)
def load_volumes(t1_key: tuple, roi_key: tuple) -> tuple[np.ndarray, np.ndarray, tuple]:
    from nhb_core.io import load_roi, load_t1

    t1 = load_t1(t1_key[0])
    roi = load_roi(roi_key[0], reference=t1)
    return t1.data.astype(np.float32), roi.data.astype(np.int16), tuple(t1.spacing)


@st.cache_data(show_spinner=False, max_entries=512)
def subject_crops(t1_key: tuple, roi_key: tuple, size: int) -> dict:
    from nhb_core.slices import PrepareConfig, process_subject

    res = process_subject(t1_key[0], roi_key[0], PrepareConfig(size=int(size)))
    return {"images": res["images"], "masks": res["masks"], "slice_index": res["slice_index"]}


def crop_rgb(img: np.ndarray, mask: np.ndarray, scale: int = 3) -> np.ndarray:
    return dd.slice_with_contours(img[0], mask, scale=scale)


mdf = None
with ui.guard():
    choice = ui.manifest_picker(runs, key="cohort_manifest")
    manifest = choice.path
    if choice.missing_synthetic:
        st.info("This synthetic cohort has not been generated yet.")
        if st.button("Generate it now", type="primary"):
            choice.generate()
            st.rerun()
        st.stop()
    if manifest is None:
        st.info("Type the path of a manifest CSV.")
        st.stop()

    check = st.checkbox("Also load every T1 and ROI (slower, finds unreadable or mismatched images)", value=False)
    summary, centers_tab, mdf = validate(dd.file_key(manifest), check)

    c1, c2, c3 = st.columns(3)
    c1.metric("rows", summary["n_rows"])
    c2.metric("valid subjects", summary["n_subjects"])
    c3.metric("problems", len(summary["problems"]))

    st.subheader("Validation")
    if summary["problems"]:
        st.error(f"{len(summary['problems'])} problem(s): fix them in the manifest (row = line in the file, header = 1).",
                 icon=":material/error:")
        ui.show_table(pd.DataFrame(summary["problems"])[["row", "column", "problem", "fix"]])
    else:
        st.success("No problems found." + ("" if summary["images_checked"] else " (Images not loaded.)"),
                   icon=":material/check_circle:")
    if summary["warnings"]:
        with st.expander(f"{len(summary['warnings'])} warning(s)"):
            ui.show_table(pd.DataFrame(summary["warnings"])[["row", "column", "problem", "fix"]])

    st.subheader("Subjects per center and label")
    if centers_tab is not None and len(centers_tab):
        t = centers_tab.rename(columns={0: "control (0)", 1: "injury (1)"}).reset_index()
        t["total"] = t[["control (0)", "injury (1)"]].sum(axis=1)
        ui.show_table(t)

if mdf is not None and len(mdf):
    st.subheader("Slice browser")
    with ui.guard():
        ids = mdf["subject_id"].astype(str).tolist()
        c1, c2 = st.columns([1, 3])
        sid = c1.selectbox("Subject", ids, key="cohort_subject")
        row = mdf[mdf["subject_id"].astype(str) == sid].iloc[0]
        c1.caption(f"center {ui.md_escape(row['center'])}, label {int(row['label'])} "
                   f"({'injury' if int(row['label']) == 1 else 'control'})")
        t1k, roik = dd.file_key(row["t1_path"]), dd.file_key(row["roi_path"])
        vol, roi, spacing = load_volumes(t1k, roik)
        zs = np.flatnonzero((roi > 0).any(axis=(0, 1)))
        zdef = int(np.round(zs.mean())) if zs.size else vol.shape[2] // 2
        z = c1.slider("Axial slice", 0, int(vol.shape[2]) - 1, zdef, key=f"cohort_z_{sid}")
        c1.caption("ROI outline: green = left GP (1), orange = right GP (2). Image left = patient's right.")
        img = dd.slice_with_contours(dd.axial_display(vol, z), dd.axial_display(roi, z),
                                     scale=max(1, 384 // max(vol.shape[:2])))
        c2.image(img, caption=f"T1, axial slice {z}", clamp=True)
        crops = subject_crops(t1k, roik, 64)
        st.markdown("**The crops the models see** (64 mm around the GP, normalised)")
        n = len(crops["slice_index"])
        cols = st.columns(min(max(n, 1), 6))
        for i in range(n):
            cols[i % len(cols)].image(crop_rgb(crops["images"][i], crops["masks"][i]),
                                      caption=f"slice {int(crops['slice_index'][i])}", clamp=True)

    st.subheader("Montage: controls vs injured per center")
    with ui.guard():
        npg = st.slider("Subjects per group", 1, 8, 4, key="cohort_montage_n")
        picks = dd.montage_picks(mdf, npg, seed=0)
        by_id = mdf.set_index(mdf["subject_id"].astype(str))
        # each subject's crops cost a volume load + preprocessing (~0.1-0.3 s): count the cold ones
        keys = [(dd.file_key(by_id.loc[s, "t1_path"]), dd.file_key(by_id.loc[s, "roi_path"]))
                for ids in picks.values() for s in ids]
        cold = [k for k in keys if not ui.is_warm("crops", *k)]
        with ui.steps("Preparing the montage crops", len(cold), show=len(cold) > 3) as prog:
            for k in cold:
                subject_crops(k[0], k[1], 64)
                ui.mark_warm("crops", *k)
                ui.advance(prog)
        for center in sorted({c for c, _ in picks}):
            st.markdown(f"**Center {ui.md_escape(center)}**")
            left, right = st.columns(2)
            for lab, col in ((0, left), (1, right)):
                col.caption("controls (label 0)" if lab == 0 else "injured (label 1)")
                ids = picks.get((center, lab), [])
                cc = col.columns(max(1, len(ids)))
                for j, s in enumerate(ids):
                    r = by_id.loc[s]
                    cr = subject_crops(dd.file_key(r["t1_path"]), dd.file_key(r["roi_path"]), 64)
                    k = len(cr["slice_index"]) // 2
                    cc[j].image(crop_rgb(cr["images"][k], cr["masks"][k], scale=2), caption=s, clamp=True)
