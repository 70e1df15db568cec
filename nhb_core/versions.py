"""The library versions recorded next to results (prepare.json, model.json, roi_model.json, metrics.json).

One helper for every stage: each records the modules that shape its numbers.
"""

from __future__ import annotations

import importlib
import platform

#: distributions whose versions a study run records (``metrics.json`` ``run.versions``)
RUN_DISTRIBUTIONS = ("nhb-lab", "torch", "torchvision", "timm", "numpy", "scipy", "pandas", "scikit-learn",
                     "statsmodels", "grad-cam", "plotly", "nibabel")


def module_versions(*modules: str) -> dict[str, str]:
    """``{module: __version__}`` in the given order; ``"python"`` is the interpreter's version.

    >>> list(module_versions("numpy", "python"))
    ['numpy', 'python']
    """
    out = {}
    for name in modules:
        out[name] = platform.python_version() if name == "python" else str(importlib.import_module(name).__version__)
    return out


def run_versions() -> dict[str, str]:
    """Python, the platform and the installed versions of :data:`RUN_DISTRIBUTIONS` (those present)."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in RUN_DISTRIBUTIONS:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
