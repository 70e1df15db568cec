"""Review and correction of GP ROI masks in a ``roi propose`` folder (the dashboard page "ROIs").

The folder is the output of :func:`nhb_core.roi_propose.propose_rois` (``manifest.csv``
with ``roi_source``, ``proposals.csv``). Views are the axial slices of the RAS+ arrays
in the display orientation of :func:`nhb_core.saliency.display_slice` (row 0 anterior,
column 0 the patient's right), cropped to a box around the GP. A correction is saved as
a **new** NIfTI ``corrected/<id>_roi_corrected.nii.gz`` on the T1's own grid (atomic),
never over the manual or proposed original; the subject's row of ``manifest.csv`` and
``proposals.csv`` then points at it with ``roi_source`` = corrected (both rewritten
atomically, the other rows unchanged). No streamlit here.
"""

from __future__ import annotations

import csv
import io as _io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nhb_core.errors import InputError
from nhb_core.fileio import atomic_write_text

#: half side (mm) of the display box around the GP
BOX_HALF_MM = 36.0
#: canvas pixels per displayed voxel on the dashboard's editor
CANVAS_SCALE = 6


def load_proposals(roi_dir: str | os.PathLike) -> pd.DataFrame:
    """``proposals.csv`` of a roi propose folder, with the row's current ``roi`` and ``roi_source`` from manifest.csv.

    Adds ``n_flags`` (number of QC flags) for sorting.
    """
    d = Path(roi_dir)
    for name in ("manifest.csv", "proposals.csv"):
        if not (d / name).is_file():
            raise InputError(d, f"no {name} in this folder (not a roi propose output)",
                             "Give the --out folder of `python -m nhb_core roi propose`")
    p = pd.read_csv(d / "proposals.csv", dtype={"subject_id": str, "qc_flags": str, "roi": str},
                    keep_default_na=False, na_values={"confidence": [""], "soft_dice": [""], "mean_prob": [""]})
    rows = {r["subject_id"]: r for r in _read_rows(d / "manifest.csv")[1]}
    p["roi_source"] = [rows.get(s, {}).get("roi_source", src) for s, src in zip(p["subject_id"], p["roi_source"])]
    p["roi"] = [rows.get(s, {}).get("roi", r) for s, r in zip(p["subject_id"], p["roi"])]
    p["n_flags"] = [len([f for f in str(x).split(";") if f]) for x in p["qc_flags"]]
    return p


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header as written, rows keyed by the normalised column name: stripped, lower case)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        r = csv.reader(fh)
        header = next(r, [])
        keys = [h.strip().lower() for h in header]
        return header, [dict(zip(keys, (c.strip() for c in cells))) for cells in r if any(c.strip() for c in cells)]


def load_case(roi_dir: str | os.PathLike, subject_id: str) -> dict[str, Any]:
    """One subject: ``t1`` float32 (X, Y, Z) and ``mask`` int16 (X, Y, Z) (RAS+), ``affine``,
    ``spacing``, ``t1_path``, ``roi_path``, ``roi_source``, ``slices`` (the GP slices and one on
    each side, or the 3 central slices of an empty mask), ``box`` (x0, x1, y0, y1) voxels."""
    from nhb_core.io import load_roi, load_t1

    d = Path(roi_dir)
    _, rows = _read_rows(d / "manifest.csv")
    row = next((r for r in rows if r.get("subject_id") == subject_id), None)
    if row is None:
        raise InputError(d / "manifest.csv", f"no subject {subject_id!r}", "Pick a subject of this folder")
    t1_path = str((d / row["t1"]).resolve())
    roi_path = str((d / row["roi"]).resolve()) if row.get("roi") else ""
    t1 = load_t1(t1_path)
    mask = (np.asarray(load_roi(roi_path, reference=t1, allow_empty=True).data, dtype=np.int16) if roi_path
            else np.zeros(t1.shape, np.int16))
    Z = t1.shape[2]
    has = np.flatnonzero((mask > 0).any(axis=(0, 1)))
    if has.size:
        slices = list(range(max(0, int(has.min()) - 1), min(Z, int(has.max()) + 2)))
        ix, iy, _ = np.nonzero(mask > 0)
        cx, cy = float(ix.mean()), float(iy.mean())
    else:
        slices = list(range(max(0, Z // 2 - 1), min(Z, Z // 2 + 2)))
        cx, cy = t1.shape[0] / 2, t1.shape[1] / 2
    hx, hy = BOX_HALF_MM / t1.spacing[0], BOX_HALF_MM / t1.spacing[1]
    box = (max(0, int(round(cx - hx))), min(t1.shape[0], int(round(cx + hx))),
           max(0, int(round(cy - hy))), min(t1.shape[1], int(round(cy + hy))))
    return {"subject_id": subject_id, "t1": np.asarray(t1.data, np.float32), "mask": mask, "affine": t1.affine,
            "spacing": t1.spacing, "t1_path": t1_path, "roi_path": roi_path,
            "roi_source": row.get("roi_source", "") or "manual", "slices": slices, "box": box}


def view(volume: np.ndarray, z: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Slice ``z`` of ``volume`` inside ``box`` in display orientation: shape (y1 - y0, x1 - x0)."""
    from nhb_core.saliency import display_slice

    x0, x1, y0, y1 = box
    return display_slice(np.asarray(volume)[x0:x1, y0:y1, :], z)


def canvas_pixels(rgba: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Painted display pixels, bool (h, w), from a canvas RGBA image of (h*s, w*s, 4): a pixel
    is painted when at least half of its s x s block has a stroke (alpha > 0)."""
    a = np.asarray(rgba)
    h, w = shape
    if a.ndim != 3 or a.shape[0] < h or a.shape[1] < w:
        return np.zeros((h, w), bool)
    sy, sx = a.shape[0] // h, a.shape[1] // w
    alpha = a[: h * sy, : w * sx, 3] > 0
    return alpha.reshape(h, sy, w, sx).mean(axis=(1, 3)) >= 0.5


def paint(mask: np.ndarray, z: int, box: tuple[int, int, int, int], painted: np.ndarray, label: int) -> np.ndarray:
    """A copy of ``mask`` with the display pixels ``painted`` (bool (h, w) of :func:`view`) of
    slice ``z`` set to ``label`` (1 = left, 2 = right, 0 = erase)."""
    if label not in (0, 1, 2):
        raise InputError(None, f"label {label} is not 0, 1 or 2", "Paint left (1), right (2) or erase (0)")
    x0, x1, y0, y1 = box
    p = np.asarray(painted, bool)
    if p.shape != (y1 - y0, x1 - x0):
        raise InputError(None, f"painted shape {p.shape} differs from the view {(y1 - y0, x1 - x0)}",
                         "Paint on the slice shown")
    out = mask.copy()
    sub = p.T[::-1, ::-1]  # display -> (x, y) of the box (inverse of display_slice)
    region = out[x0:x1, y0:y1, z]
    region[sub] = label
    return out


def save_correction(roi_dir: str | os.PathLike, subject_id: str, mask: np.ndarray) -> Path:
    """Write ``mask`` (int16 (X, Y, Z), RAS+) as ``corrected/<id>_roi_corrected.nii.gz`` on the T1's
    grid and mark the subject ``corrected`` in manifest.csv and proposals.csv; returns the file.

    The original mask (manual or proposed) is never written; other subjects' rows and files are
    untouched.
    """
    from nhb_core.roi_propose import _safe_name, _save_on_t1_grid

    d = Path(roi_dir)
    case = load_case(d, subject_id)
    m = np.asarray(mask)
    if m.shape != case["mask"].shape:
        raise InputError(d / "manifest.csv", f"corrected mask shape {m.shape} differs from the T1 {case['mask'].shape}",
                         "Edit the mask of this subject")
    rel = f"corrected/{_safe_name(subject_id, set())}_roi_corrected.nii.gz"
    target = (d / rel).resolve()
    if case["roi_path"] and Path(case["roi_path"]) == target and case["roi_source"] != "corrected":
        raise InputError(target, "the corrected file would overwrite the original mask", "Move the original mask")
    (d / "corrected").mkdir(exist_ok=True)
    _save_on_t1_grid(m.astype(np.int16), case["affine"], case["t1_path"], d / rel)
    _set_row(d / "manifest.csv", subject_id, {"roi": rel, "roi_source": "corrected"})
    _set_row(d / "proposals.csv", subject_id, {"roi": rel, "roi_source": "corrected"})
    return d / rel


def _set_row(path: Path, subject_id: str, values: dict[str, str]) -> None:
    """Set ``values`` in the row of ``subject_id`` (other rows and cells as they were); atomic."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        table = [cells for cells in csv.reader(fh)]
    header = table[0]
    keys = [h.strip().lower() for h in header]
    for k in values:
        if k not in keys:
            header.append(k)
            keys.append(k)
    i_id = keys.index("subject_id")
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for cells in table[1:]:
        if not any(c.strip() for c in cells):
            continue
        cells = cells + [""] * (len(header) - len(cells))
        if cells[i_id].strip() == subject_id:
            for k, v in values.items():
                cells[keys.index(k)] = v
        w.writerow(cells)
    atomic_write_text(path, buf.getvalue())
