"""NHB Lab core: cohort manifests, T1/ROI loading, ROI slices, splits, training,
evaluation, statistics, saliency and reports for T1WI deep learning on neonatal
hyperbilirubinemia brain injury.

The package never imports Streamlit: the dashboard (``app.py`` + ``dashboard_pages/``) is a
thin layer over the functions here, as are the CLI (``python -m nhb_core``) and
the notebooks.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
