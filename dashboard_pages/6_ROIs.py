"""ROIs: review GP ROI proposals (``roi propose`` output) and correct them with a brush.

Grid of every subject's GP slice with its mask (proposed / manual / corrected told apart),
sortable by confidence and QC flags; one subject's slices in an editor (paint left or
right, erase, undo, accept). Saving writes a new NIfTI (``corrected/<id>_roi_corrected.nii.gz``)
through :func:`nhb_core.roi_edit.save_correction`: never over the original mask.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import streamlit as st

from nhb_core import roi_edit
from nhb_dashboard import data as dd
from nhb_dashboard import ui

runs = ui.page("ROIs")
st.title("GP ROIs")
st.caption("Proposals from `python -m nhb_core roi propose` (docs/roi.md): review them sorted by confidence "
           "and QC flags, correct a mask with the brush, accept. A correction is saved as a new file; "
           "the original mask is never overwritten.")

SCALE = roi_edit.CANVAS_SCALE  # canvas pixels per voxel
SORTS = {"confidence (lowest first)": (["confidence", "subject_id"], [True, True]),
         "QC flags (most first)": (["n_flags", "confidence", "subject_id"], [False, True, True]),
         "subject id": (["subject_id"], [True])}


@st.cache_data(show_spinner=False, max_entries=4)
def proposals(key: tuple, man_key: tuple):  # noqa: ARG001 - the file keys are the cache key
    return roi_edit.load_proposals(Path(key[0]).parent)


@st.cache_data(show_spinner=False, max_entries=512)
def thumb(roi_dir: str, sid: str, man_key: tuple) -> np.ndarray:  # noqa: ARG001
    case = roi_edit.load_case(roi_dir, sid)
    z = case["slices"][len(case["slices"]) // 2]
    return dd.slice_with_contours(roi_edit.view(case["t1"], z, case["box"]),
                                  roi_edit.view(case["mask"], z, case["box"]), scale=2)


def _working(roi_dir: str, sid: str, case: dict) -> list:
    """The undo stack of this subject's mask in this session (the first entry is the file)."""
    k = f"roi_stack::{roi_dir}::{sid}"
    if k not in st.session_state or st.session_state[k][0][0] != case["roi_path"]:
        st.session_state[k] = [(case["roi_path"], case["mask"])]
    return st.session_state[k]


with ui.guard():
    default = os.environ.get("NHB_ROI_DIR", "")
    typed = st.text_input("roi propose folder (its --out)", value=default, key="roi_dir")
    if not typed.strip():
        st.info("Give the output folder of `python -m nhb_core roi propose --manifest M --out DIR`.")
        st.stop()
    roi_dir = Path(typed.strip()).expanduser().resolve()
    man_key = dd.file_key(roi_dir / "manifest.csv")
    table = proposals(dd.file_key(roi_dir / "proposals.csv"), man_key)

    c1, c2, c3 = st.columns([2, 2, 1])
    sort = c1.selectbox("Sort by", list(SORTS), key="roi_sort")
    sources = c2.multiselect("Show", ["proposed", "corrected", "manual"], default=["proposed", "corrected", "manual"],
                             key="roi_sources")
    per_page = int(c3.number_input("Per page", 4, 48, 12, step=4, key="roi_per_page"))
    by, asc = SORTS[sort]
    view_df = table[table["roi_source"].isin(sources)].sort_values(by, ascending=asc, na_position="last")
    n_prop = int((table["roi_source"] == "proposed").sum())
    st.text(f"{len(table)} subjects: {n_prop} proposed, {int((table['roi_source'] == 'corrected').sum())} corrected, "
            f"{int((table['roi_source'] == 'manual').sum())} manual; "
            f"{int((table['n_flags'] > 0).sum())} with QC flags")
    cols = ["subject_id", "center", "roi_source", "confidence", "qc_flags", "volume_left_mm3", "volume_right_mm3",
            "asymmetry", "position_mm", "intensity_outlier_frac"]
    ui.show_table(view_df[[c for c in cols if c in view_df.columns]].reset_index(drop=True))

    pages = max(1, -(-len(view_df) // per_page))
    page = int(st.number_input("Page", 1, pages, 1, key="roi_page")) if pages > 1 else 1
    shown = view_df.iloc[(page - 1) * per_page: page * per_page]
    grid = st.columns(4)
    for i, r in enumerate(shown.itertuples()):
        conf = "" if r.confidence != r.confidence else f" conf {r.confidence:.2f}"  # NaN for manual masks
        flags = f" [{r.qc_flags}]" if r.n_flags else ""
        grid[i % 4].image(thumb(str(roi_dir), r.subject_id, man_key),
                          caption=f"{r.subject_id} {r.roi_source}{conf}{flags}")

    st.subheader("Correct one subject")
    ids = list(view_df["subject_id"]) or list(table["subject_id"])
    sid = st.selectbox("Subject", ids, key="roi_subject")
    case = roi_edit.load_case(roi_dir, sid)
    stack = _working(str(roi_dir), sid, case)
    mask = stack[-1][1]
    e1, e2, e3, e4 = st.columns([1, 2, 1, 2])
    z = e1.selectbox("Slice", case["slices"], index=len(case["slices"]) // 2, key=f"roi_z_{sid}")
    action = e2.radio("Brush", ["paint left GP (1)", "paint right GP (2)", "erase"], key="roi_action",
                      horizontal=True)
    tool = e3.radio("Tool", ["brush", "rectangle"], key="roi_tool", horizontal=True)
    width = int(e4.slider("Brush width (canvas px; 6 px = 1 voxel)", 2, 40, 10, key="roi_brush"))
    label = {"paint left GP (1)": 1, "paint right GP (2)": 2, "erase": 0}[action]
    img = roi_edit.view(case["t1"], z, case["box"])
    lab = roi_edit.view(mask, z, case["box"])
    st.text(f"{sid}: source {case['roi_source']}; {int((mask > 0).sum())} voxels; edits in this session: "
            f"{len(stack) - 1}. Green outline = left GP, orange = right GP (radiological view: patient's "
            f"right on the image left).")
    bg = dd.slice_with_contours(img, lab, scale=SCALE)
    h, w = img.shape
    canvas_key = f"roi_canvas::{sid}::{z}::{len(stack)}"
    strokes = None
    try:
        from PIL import Image
        from streamlit_drawable_canvas import st_canvas

        colour = {1: "#00dc00", 2: "#ff8c00", 0: "#ffffff"}[label]
        res = st_canvas(stroke_width=width if tool == "brush" else 1, stroke_color=colour, fill_color=colour,
                        background_image=Image.fromarray(bg), height=h * SCALE, width=w * SCALE,
                        drawing_mode="freedraw" if tool == "brush" else "rect", return_image_data=True,
                        key=canvas_key)
        strokes = res.image_data
    except Exception as err:  # noqa: BLE001 - not installed, or a component that cannot load: read-only
        st.warning("The brush canvas is unavailable (`pip install streamlit-drawable-canvas`; "
                   f"{type(err).__name__}); the mask is shown read-only.")
        st.image(bg)
    b1, b2, b3 = st.columns(3)
    if b1.button("Apply brush strokes", key="roi_apply"):
        painted = roi_edit.canvas_pixels(strokes, (h, w)) if strokes is not None else np.zeros((h, w), bool)
        if painted.any():
            stack.append((case["roi_path"], roi_edit.paint(mask, z, case["box"], painted, label)))
            st.rerun()
        else:
            st.info("No brush stroke on this slice yet.")
    if b2.button("Undo", key="roi_undo", disabled=len(stack) < 2):
        stack.pop()
        st.rerun()
    if b3.button("Accept and save", type="primary", key="roi_save"):
        path = roi_edit.save_correction(roi_dir, sid, mask)
        st.session_state.pop(f"roi_stack::{roi_dir}::{sid}", None)
        st.success(f"saved {path.relative_to(roi_dir)}; {sid} is marked corrected "
                   "(the original mask is unchanged). Run roi propose on this folder's manifest.csv to learn from it.")
