"""Calibration (Brier score, logistic recalibration intercept and slope, reliability curve) and
decision curve analysis (net benefit)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nhb_core.errors import StatsInputError
from nhb_core.stats._binary import wilson_ci
from nhb_core.stats._checks import as_labels, as_scores

__all__ = ["brier_score", "calibration", "decision_curve", "DCA_THRESHOLDS"]

#: default threshold probabilities of the decision curve (0.01 to 0.99 by 0.01)
DCA_THRESHOLDS = np.round(np.arange(1, 100) / 100.0, 2)

_EPS = 1e-6


def _probs(y, p, source=None, column="score"):
    yb = as_labels(y, source=source)
    s = as_scores(p, yb.size, source=source, column=column)
    if (s < 0).any() or (s > 1).any():
        raise StatsInputError(source or column, f"column '{column}' is not a probability (values outside [0, 1])",
                              "Calibration and decision curves need predicted probabilities")
    return yb.astype(float), s


def brier_score(y, p, *, source: str | None = None) -> float:
    """Mean squared difference between predicted probability and 0/1 outcome."""
    yf, s = _probs(y, p, source)
    return float(np.mean((s - yf) ** 2))


def _logistic(X: np.ndarray, y: np.ndarray, offset: np.ndarray, max_iter: int = 100) -> np.ndarray | None:
    """Newton-Raphson logistic regression with an offset; None when it does not converge
    (e.g. perfect separation)."""
    beta = np.zeros(X.shape[1])
    for _ in range(max_iter):
        eta = offset + X @ beta
        mu = 1 / (1 + np.exp(-np.clip(eta, -35, 35)))
        w = mu * (1 - mu)
        H = X.T @ (X * w[:, None])
        g = X.T @ (y - mu)
        try:
            step = np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            return None
        beta = beta + step
        if not np.isfinite(beta).all() or np.abs(beta).max() > 1e3:
            return None
        if np.abs(step).max() < 1e-10:
            return beta
    return None


def calibration(y, p, n_bins: int = 10, strategy: str = "uniform", *, source: str | None = None) -> dict:
    """Calibration of predicted probabilities.

    Parameters
    ----------
    y : (n,) 0/1; p : (n,) probabilities in [0, 1]
    n_bins : reliability bins; strategy : "uniform" (equal width on [0, 1]) or "quantile" (equal counts)

    Returns
    -------
    dict: ``brier``; ``intercept`` (calibration-in-the-large: logistic regression of y on the offset
    logit(p), slope fixed at 1; 0 is perfect); ``slope`` (logistic regression of y on logit(p); 1 is
    perfect); probabilities are clipped to [1e-6, 1 - 1e-6] before the logit; null when the fit does
    not converge (e.g. separation); ``bins``: reliability-curve data, lists per non-empty bin:
    ``lower``, ``upper`` (bin edges), ``mean_predicted``, ``observed`` (fraction positive),
    ``observed_ci_lower/upper`` (Wilson), ``count``.
    """
    yf, s = _probs(y, p, source)
    nan = float("nan")
    lp = np.log(np.clip(s, _EPS, 1 - _EPS) / (1 - np.clip(s, _EPS, 1 - _EPS)))
    both = 0 < yf.sum() < yf.size
    b_int = _logistic(np.ones((yf.size, 1)), yf, lp) if both else None
    b_slope = _logistic(np.column_stack([np.ones(yf.size), lp]), yf, np.zeros(yf.size)) if both else None
    if strategy == "uniform":
        edges = np.linspace(0, 1, n_bins + 1)
    elif strategy == "quantile":
        edges = np.unique(np.quantile(s, np.linspace(0, 1, n_bins + 1)))
        edges[0], edges[-1] = 0.0, 1.0
    else:
        raise StatsInputError("calibration", f"unknown bin strategy '{strategy}'", "Use uniform or quantile")
    k = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, edges.size - 2)
    bins: dict[str, list[Any]] = {"lower": [], "upper": [], "mean_predicted": [], "observed": [], "observed_ci_lower": [],
            "observed_ci_upper": [], "count": []}
    for i in range(edges.size - 1):
        sel = k == i
        c = int(sel.sum())
        if c == 0:
            continue
        pos = float(yf[sel].sum())
        lo, hi = wilson_ci(pos, c)
        bins["lower"].append(float(edges[i]))
        bins["upper"].append(float(edges[i + 1]))
        bins["mean_predicted"].append(float(s[sel].mean()))
        bins["observed"].append(pos / c)
        bins["observed_ci_lower"].append(lo)
        bins["observed_ci_upper"].append(hi)
        bins["count"].append(c)
    return {"brier": float(np.mean((s - yf) ** 2)),
            "intercept": float(b_int[0]) if b_int is not None else nan,
            "slope": float(b_slope[1]) if b_slope is not None else nan,
            "bins": bins, "strategy": strategy}


def decision_curve(y, p, thresholds: Sequence[float] | None = None, *, source: str | None = None) -> dict:
    """Decision curve analysis (Vickers & Elkin 2006).

    Net benefit at threshold probability pt: TP/n - FP/n * pt / (1 - pt), positive when p >= pt.
    Treat-all: prevalence - (1 - prevalence) pt / (1 - pt); treat-none: 0.

    Returns dict of lists: ``thresholds``, ``net_benefit``, ``treat_all``, ``treat_none``.
    """
    yf, s = _probs(y, p, source)
    pts = DCA_THRESHOLDS if thresholds is None else np.asarray(thresholds, float)
    if ((pts <= 0) | (pts >= 1)).any():
        raise StatsInputError("decision_curve", "threshold probabilities must lie strictly between 0 and 1",
                              "Use thresholds in (0, 1)")
    n = yf.size
    order = np.sort(s)
    # number of predictions >= pt, and positives among them, via sorting
    pos_scores = np.sort(s[yf == 1])
    n_call = n - np.searchsorted(order, pts, side="left")
    tp = pos_scores.size - np.searchsorted(pos_scores, pts, side="left")
    fp = n_call - tp
    w = pts / (1 - pts)
    nb = tp / n - fp / n * w
    prev = yf.mean()
    return {"thresholds": pts.tolist(), "net_benefit": nb.tolist(),
            "treat_all": (prev - (1 - prev) * w).tolist(), "treat_none": [0.0] * pts.size}
