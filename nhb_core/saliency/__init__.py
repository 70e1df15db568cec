"""Grad-CAM saliency over the globus pallidus (GP) crop, with attention and faithfulness measures.

What it computes (see ``docs/saliency.md``), by submodule:

* ``computation``: :func:`compute_cam` / :func:`compute_cams`, a class-activation map (Grad-CAM,
  Grad-CAM++, EigenCAM or LayerCAM from the ``grad-cam`` package, ``pytorch_grad_cam``) for the
  model's single "injury" logit, at the input resolution of the crop, min-max normalised per slice
  to [0, 1]; :func:`resolve_target_layer` (the layer the CAM reads); :func:`normalize_method`.
* ``scores``: :func:`cam_energy_in_roi` (the share of CAM energy inside the GP ROI),
  :func:`pointing_game` (whether the CAM maximum falls inside it), :func:`faithfulness` (ROAD
  "most relevant first", Rong et al. 2022, the noisy linear imputer of
  ``pytorch_grad_cam.metrics.road``: the drop of the model's probability when the top CAM pixels
  are removed and imputed, next to the same drop for random maps).
* ``rendering``: :func:`paste_back` (the crop-space map placed back on the full slice),
  :func:`display_slice`, :func:`crop_geometry`, :func:`gray_u8`, :func:`overlay_png` (grayscale
  slice + CAM colour map + ROI contour as PNG bytes).
* ``summaries``: :func:`cam_for_case` and :func:`saliency_summary` over a finished run, cached
  under ``<run>/saliency/`` (npz keyed by model, method, subject, slice and weights hash);
  :func:`saliency_means`; :func:`saliency_overview`, the study's saliency stage.

Every public name (and the few private ones tests and benchmarks use) is importable from
``nhb_core.saliency`` itself.
"""

from __future__ import annotations

from nhb_core.saliency.computation import (
    _ALIASES,
    _CAM_LOCK,
    _LAYER_MEMO,
    DEFAULT_FRACTIONS,
    METHODS,
    MIN_CAM_CELLS,
    _output_hw,
    _timm_feature_module,
    compute_cam,
    compute_cams,
    normalize_method,
    resolve_target_layer,
)
from nhb_core.saliency.rendering import crop_geometry, display_slice, gray_u8, overlay_png, paste_back
from nhb_core.saliency.scores import cam_energy_in_roi, faithfulness, pointing_game
from nhb_core.saliency.summaries import (
    SUMMARY_COLUMNS,
    cam_for_case,
    cam_on_slice,
    default_set,
    run_dataset_dir,
    saliency_means,
    saliency_overview,
    saliency_summary,
)

__all__ = [
    "DEFAULT_FRACTIONS", "METHODS", "MIN_CAM_CELLS", "SUMMARY_COLUMNS", "_ALIASES", "_CAM_LOCK", "_LAYER_MEMO",
    "_output_hw", "_timm_feature_module", "cam_energy_in_roi", "cam_for_case", "cam_on_slice", "compute_cam",
    "compute_cams", "crop_geometry", "default_set", "display_slice", "faithfulness", "gray_u8", "normalize_method",
    "overlay_png", "paste_back", "pointing_game", "resolve_target_layer", "run_dataset_dir", "saliency_means",
    "saliency_overview", "saliency_summary",
]
