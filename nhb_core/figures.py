"""Plotly figures shared by the report and the dashboard.

Every builder is a pure function of run data (a ``metrics.json`` dict, a
predictions DataFrame, a ``history.csv`` DataFrame) returning a
``plotly.graph_objects.Figure``; nothing is read from disk here (callers read the run
through :class:`nhb_core.runs.RunFolder`).

Conventions: one colour per model (:func:`model_color`), probabilities in
[0, 1], FPR = 1 - specificity on the x axis of ROC plots; set names as in
metrics.json (``test``, ``val``, ``external:B``); levels ``subject`` / ``slice``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nhb_core.runs import set_label

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
READER_SYMBOLS = ["diamond", "square", "triangle-up", "cross", "star", "x"]
#: Outline colours of the ROI labels in images (1 = left GP green, 2 = right GP orange).
ROI_COLOURS = {1: (0, 220, 0), 2: (255, 140, 0)}


def contour_rgb(gray: np.ndarray, labels: np.ndarray | None = None, scale: int = 1) -> np.ndarray:
    """RGB uint8 [H*scale, W*scale, 3]: a uint8 grayscale image enlarged ``scale`` times (nearest),
    with the outline of each ROI label in its colour (:data:`ROI_COLOURS`; other labels yellow)."""
    from scipy.ndimage import binary_erosion

    g = np.repeat(np.repeat(gray, scale, 0), scale, 1) if scale > 1 else gray
    rgb = np.repeat(g[..., None], 3, axis=2)
    if labels is not None:
        lab = np.asarray(labels)
        if scale > 1:
            lab = np.repeat(np.repeat(lab, scale, 0), scale, 1)
        for v in [int(x) for x in np.unique(lab) if x > 0]:
            m = lab == v
            rgb[m & ~binary_erosion(m, border_value=0)] = ROI_COLOURS.get(v, (255, 230, 0))
    return rgb

LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), font=dict(size=12))


def model_color(name: str, models: Sequence[str] | None = None) -> str:
    """A stable colour for a model (by position in ``models`` when given)."""
    if models is not None and name in models:
        return PALETTE[list(models).index(name) % len(PALETTE)]
    return PALETTE[sum(map(ord, name)) % len(PALETTE)]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def level_block(metrics: Mapping[str, Any], set_name: str, level: str = "subject") -> Mapping[str, Any]:
    """``metrics["sets"][set_name]["level"][level]`` or {} when absent."""
    return ((metrics.get("sets") or {}).get(set_name) or {}).get("level", {}).get(level) or {}


def models_of(metrics: Mapping[str, Any]) -> list[str]:
    """Model names in the order the run config lists them (else first-seen order)."""
    cfg_models = (((metrics.get("run") or {}).get("config") or {}).get("models")) or []
    seen: list[str] = list(cfg_models)
    for s in (metrics.get("sets") or {}).values():
        for blk in (s.get("level") or {}).values():
            for m in (blk.get("models") or {}):
                if m not in seen:
                    seen.append(m)
    return seen


def _empty(title: str, note: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, height=250, **LAYOUT)
    return fig


def _fmt_ci(v: Any, ci: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    s = f"{v:.{digits}f}"
    if ci and len(ci) == 2 and ci[0] is not None and ci[1] is not None:
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def _value(x: Any) -> float | None:
    """A metric that is either a number or ``{"value": .., "ci": [..]}``."""
    if isinstance(x, Mapping):
        x = x.get("value")
    return None if x is None else float(x)


def _centers_of(metrics: Mapping[str, Any], set_name: str) -> list[str]:
    flow = ((metrics.get("cohort") or {}).get("flow") or {}).get("sets") or {}
    if set_name in flow and flow[set_name].get("centers"):
        return list(flow[set_name]["centers"])
    if set_name.startswith("external:"):
        return [set_name.split(":", 1)[1]]
    return []


def oracle_for_set(metrics: Mapping[str, Any], set_name: str, key: str = "oracle_auc") -> float | None:
    """The synthetic cohort's oracle AUC for a set's center(s) (mean over them), or None.

    ``key="visible_auc"``: the image-visible signal's AUC (the ceiling of an image model)."""
    if set_name.startswith("external:"):
        # a cohort evaluated later (nhb_core.cohorts) carries its own synthetic truth, if any
        ext = (metrics.get("external_cohorts") or {}).get(set_name.split(":", 1)[1])
        if ext is not None:
            own = ext.get(key) or {}
            vals = [float(v) for c, v in own.items() if v is not None and c in (ext.get("centers") or own)]
            return float(np.mean(vals)) if vals else None
    oa = metrics.get(key) or {}
    vals = [oa[c] for c in _centers_of(metrics, set_name) if oa.get(c) is not None]
    return float(np.mean(vals)) if vals else None


def binormal_roc(auc_value: float, n: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """The equal-variance binormal ROC curve with the given AUC (fpr, tpr)."""
    from scipy.stats import norm

    a = min(max(auc_value, 1e-6), 1 - 1e-6)
    d = math.sqrt(2.0) * norm.ppf(a)
    fpr = np.linspace(0.0, 1.0, n)
    with np.errstate(divide="ignore"):
        tpr = norm.cdf(d + norm.ppf(np.clip(fpr, 1e-12, 1 - 1e-12)))
    tpr[0], tpr[-1] = 0.0, 1.0
    return fpr, tpr


def roc_figure(metrics: Mapping[str, Any], set_name: str, level: str = "subject",
               models: Sequence[str] | None = None, show_readers: bool = True,
               show_oracle: bool = True, height: int = 420) -> go.Figure:
    """ROC curves of every model on one set, with 95% confidence bands, reader points and the oracle.

    Parameters
    ----------
    metrics : dict
        A run's metrics.json; uses ``sets[set_name].level[level].models[m].roc``
        (``fpr``, ``tpr``, optional ``band_lower``/``band_upper``), ``auc`` and
        ``auc_ci_delong``, the ``readers`` block (sensitivity/specificity) and ``oracle_auc``.
    set_name, level : str
        Which set (``test``, ``external:B``) and level (``subject``/``slice``).
    """
    blk = level_block(metrics, set_name, level)
    title = f"ROC, {set_label(set_name)} ({level} level"
    if blk.get("n") is not None:
        title += f", n={blk['n']}" + (f", {blk['n_pos']} positive" if blk.get("n_pos") is not None else "")
    title += ")"
    if not blk.get("models"):
        return _empty(title, "no predictions for this set")
    all_models = models_of(metrics)
    names = [m for m in (models or all_models) if m in blk["models"]]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#aaaaaa", dash="dash", width=1),
                             name="chance", hoverinfo="skip"))
    for name in names:
        mm = blk["models"][name]
        roc = mm.get("roc") or {}
        band_x = roc.get("fpr") or []
        pts = roc.get("points") or {}
        if pts.get("fpr"):  # the exact empirical curve; the band is on the FPR grid
            fpr, tpr = pts["fpr"], pts["tpr"]
        else:
            fpr, tpr = roc.get("fpr") or [], roc.get("tpr") or []
        col = model_color(name, all_models)
        lo, hi = roc.get("band_lower"), roc.get("band_upper")
        if lo and hi and len(lo) == len(band_x) == len(hi):
            fig.add_trace(go.Scatter(x=list(band_x) + list(band_x)[::-1], y=list(hi) + list(lo)[::-1],
                                     fill="toself", fillcolor=_rgba(col, 0.15), line=dict(width=0),
                                     hoverinfo="skip", name=f"{name} 95% band", legendgroup=name, showlegend=False))
        label = f"{name}: AUC {_fmt_ci(mm.get('auc'), mm.get('auc_ci_delong'))}"
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", line=dict(color=col, width=2),
                                 name=label, legendgroup=name,
                                 hovertemplate="FPR %{x:.3f}<br>TPR %{y:.3f}<extra>" + name + "</extra>"))
        thr_sens, thr_spec = _value(mm.get("sensitivity")), _value(mm.get("specificity"))
        if thr_sens is not None and thr_spec is not None:
            fig.add_trace(go.Scatter(x=[1 - thr_spec], y=[thr_sens], mode="markers",
                                     marker=dict(color=col, size=9, symbol="circle-open", line=dict(width=2)),
                                     name=f"{name} at threshold", legendgroup=name, showlegend=False,
                                     hovertemplate="operating point<br>1-spec %{x:.3f}<br>sens %{y:.3f}<extra>"
                                                   + name + "</extra>"))
    if show_readers:
        for i, (rname, r) in enumerate((blk.get("readers") or {}).items()):
            se, sp = _value(r.get("sensitivity")), _value(r.get("specificity"))
            if se is None or sp is None:
                continue
            pts = (r.get("roc") or {}).get("points") or {}
            if pts.get("fpr") and r.get("auc") is not None:  # a reader with 1-5 ratings: its empirical ROC
                fig.add_trace(go.Scatter(x=pts["fpr"], y=pts["tpr"], mode="lines",
                                         line=dict(color="#111111", width=1, dash="dash"), legendgroup=rname,
                                         name=f"{rname} ratings, AUC {r['auc']:.3f}",
                                         hovertemplate="1-spec %{x:.3f}<br>sens %{y:.3f}<extra>" + rname + "</extra>"))
            fig.add_trace(go.Scatter(x=[1 - sp], y=[se], mode="markers",
                                     marker=dict(color="#111111", size=11, symbol=READER_SYMBOLS[i % len(READER_SYMBOLS)]),
                                     name=f"{rname} (sens {se:.2f}, spec {sp:.2f})", legendgroup=rname,
                                     hovertemplate="1-spec %{x:.3f}<br>sens %{y:.3f}<extra>" + rname + "</extra>"))
    oracle = oracle_for_set(metrics, set_name) if show_oracle else None
    if oracle is not None:
        ofpr, otpr = binormal_roc(oracle)
        fig.add_trace(go.Scatter(x=ofpr, y=otpr, mode="lines", line=dict(color="#555555", dash="dot", width=1.5),
                                 name=f"oracle (synthetic truth) AUC {oracle:.3f}", hoverinfo="skip"))
    visible = oracle_for_set(metrics, set_name, "visible_auc") if show_oracle else None
    if visible is not None:
        vfpr, vtpr = binormal_roc(visible)
        fig.add_trace(go.Scatter(x=vfpr, y=vtpr, mode="lines", line=dict(color="#999999", dash="dash", width=1.5),
                                 name=f"image-visible signal (ceiling) AUC {visible:.3f}", hoverinfo="skip"))
    fig.update_layout(title=title, height=height, xaxis=dict(title="1 - specificity (FPR)", range=[-0.01, 1.01]),
                      yaxis=dict(title="sensitivity (TPR)", range=[-0.01, 1.01], scaleanchor="x", scaleratio=1),
                      legend=dict(x=0.38, y=0.02, bgcolor="rgba(255,255,255,0.8)", font=dict(size=10)), **LAYOUT)
    return fig


def delong_matrix(metrics: Mapping[str, Any], set_name: str, level: str = "subject") -> tuple[list[str], np.ndarray]:
    """(models, p-value matrix) of the paired DeLong tests on one set; diagonal NaN."""
    blk = level_block(metrics, set_name, level)
    names = [m for m in models_of(metrics) if m in (blk.get("models") or {})]
    p = np.full((len(names), len(names)), np.nan)
    for c in blk.get("comparisons") or []:
        if c.get("a") in names and c.get("b") in names and c.get("delong_p") is not None:
            i, j = names.index(c["a"]), names.index(c["b"])
            p[i, j] = p[j, i] = float(c["delong_p"])
    return names, p


def delong_figure(metrics: Mapping[str, Any], set_name: str, level: str = "subject") -> go.Figure:
    """Heatmap of paired DeLong p-values between models on one set."""
    names, p = delong_matrix(metrics, set_name, level)
    title = f"DeLong p-values, {set_label(set_name)} ({level})"
    if len(names) < 2:
        return _empty(title, "one model: nothing to compare")
    text = [["" if not np.isfinite(v) else f"{v:.3f}" for v in row] for row in p]
    z = [[float(v) if np.isfinite(v) else None for v in row] for row in p]  # None: a blank cell
    fig = go.Figure(go.Heatmap(z=z, x=names, y=names, text=text,
                               texttemplate="%{text}", zmin=0, zmax=1, colorscale="Blues_r",
                               colorbar=dict(title="p"), hovertemplate="%{y} vs %{x}: p=%{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, height=320, yaxis=dict(autorange="reversed"), **LAYOUT)
    return fig


def mrmc_figure(metrics: Mapping[str, Any], set_name: str) -> go.Figure:
    """Forest plot of the set's reader study (``sets[<set>]["mrmc"]``): per comparison the AUC
    difference (first minus second) with its 95% CI for random readers and cases (Hillis df), and a
    line at 0. An empty figure with a note when the set has no reader study."""
    blk = (((metrics or {}).get("sets") or {}).get(set_name) or {}).get("mrmc") or {}
    title = f"Reader study (MRMC), {set_label(set_name)}: AUC difference, random readers and cases"
    comps = blk.get("comparisons") or {}
    if not comps:
        return _empty(title, "; ".join(blk.get("notes") or []) or "no reader study for this set")
    names = list(comps)
    est, lo, hi, hover = [], [], [], []
    for n in names:
        d = comps[n]["RRRC"]["diff"]
        est.append(d["estimate"])
        lo.append(d["ci_lower"])
        hi.append(d["ci_upper"])
        p = d.get("p")
        hover.append(f"{n}<br>diff {d['estimate']:.3f} [{d['ci_lower']:.3f}, {d['ci_upper']:.3f}]"
                     + (f"<br>p {p:.4f}" if isinstance(p, (int, float)) else ""))
    x_est, x_lo, x_hi = (np.asarray(v, float) for v in (est, lo, hi))
    fig = go.Figure(go.Scatter(x=x_est, y=names, mode="markers", marker=dict(size=10, color="#12355b"),
                               error_x=dict(type="data", symmetric=False, array=x_hi - x_est, arrayminus=x_est - x_lo),
                               hovertext=hover, hoverinfo="text", showlegend=False))
    fig.add_vline(x=0, line=dict(color="#888888", dash="dash"))
    fig.update_layout(title=title, height=160 + 40 * len(names), xaxis=dict(title="AUC difference (95% CI)"),
                      yaxis=dict(autorange="reversed"), **LAYOUT)
    return fig


def confusion_counts(y: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray, threshold: float) -> np.ndarray:
    """2x2 counts ``[[TN, FP], [FN, TP]]`` (rows truth 0/1, columns predicted 0/1); predicted 1 when prob >= threshold."""
    y = np.asarray(y).astype(int)
    pred = (np.asarray(prob, dtype=float) >= threshold).astype(int)
    return np.array([[int(((y == 0) & (pred == 0)).sum()), int(((y == 0) & (pred == 1)).sum())],
                     [int(((y == 1) & (pred == 0)).sum()), int(((y == 1) & (pred == 1)).sum())]])


def confusion_figure(metrics: Mapping[str, Any], set_name: str, level: str = "subject",
                     pred: Any = None, show_readers: bool = True) -> go.Figure:
    """One 2x2 confusion matrix per model (and per reader) on one set, at each model's threshold.

    Counts come from ``metrics`` (``models[m].confusion`` = ``{"tp", "fp", "tn", "fn"}``, the same for
    readers); when a block lacks them and ``pred`` (the set's predictions DataFrame) is given, they are
    computed from it at the model's threshold.
    """
    blk = level_block(metrics, set_name, level)
    title = f"Confusion matrices, {set_label(set_name)} ({level} level)"
    thresholds = thresholds_of(metrics)
    cells: list[tuple[str, np.ndarray, float | None]] = []
    for m in models_of(metrics):
        mm = (blk.get("models") or {}).get(m)
        if mm is None:
            continue
        c = mm.get("confusion")
        thr = mm.get("threshold", thresholds.get(m))
        if c:
            cm = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        elif pred is not None and m in pred.columns and thr is not None:
            cm = confusion_counts(pred["label"], pred[m], float(thr))
        else:
            continue
        cells.append((m, cm, thr))
    if show_readers:
        for r, rr in (blk.get("readers") or {}).items():
            c = rr.get("confusion")
            if c:
                cells.append((r, np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]]), None))
    if not cells:
        return _empty(title, "no predictions")
    fig = make_subplots(rows=1, cols=len(cells), horizontal_spacing=0.05, subplot_titles=[
        f"{name}<br>thr {thr:.3f}" if thr is not None else f"{name}<br>(reader)" for name, _, thr in cells])
    for k, (name, cm, _) in enumerate(cells, start=1):
        text = [[f"TN {cm[0, 0]}", f"FP {cm[0, 1]}"], [f"FN {cm[1, 0]}", f"TP {cm[1, 1]}"]]
        fig.add_trace(go.Heatmap(z=cm.tolist(), x=["pred 0", "pred 1"], y=["true 0", "true 1"], text=text,
                                 texttemplate="%{text}", colorscale="Blues", showscale=False,
                                 hovertemplate="%{y}, %{x}: %{z}<extra>" + name + "</extra>"), row=1, col=k)
        fig.update_yaxes(autorange="reversed", row=1, col=k, showticklabels=(k == 1))
    fig.update_layout(title=title, height=300, **LAYOUT)
    return fig


def _calib_points(y: np.ndarray, p: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantile-binned (mean predicted, observed fraction, count)."""
    order = np.argsort(p, kind="mergesort")
    bins = [b for b in np.array_split(order, min(n_bins, max(len(p), 1))) if len(b)]
    mp = np.array([p[b].mean() for b in bins])
    fo = np.array([y[b].mean() for b in bins])
    n = np.array([len(b) for b in bins])
    return mp, fo, n


def calibration_figure(metrics: Mapping[str, Any], set_name: str, level: str = "subject",
                       pred: Any = None, n_bins: int = 8) -> go.Figure:
    """Reliability diagram of every model on one set (Wilson 95% CI of each bin's observed fraction).

    Uses ``models[m].calibration.bins`` of metrics.json (``mean_predicted``, ``observed``,
    ``observed_ci_lower/upper``, ``count``) and shows the calibration intercept, slope and Brier score;
    when the bins are absent and ``pred`` is given, quantile bins are computed from it.
    """
    blk = level_block(metrics, set_name, level)
    title = f"Calibration, {set_label(set_name)} ({level} level)"
    names = [m for m in models_of(metrics) if m in (blk.get("models") or {})]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#aaaaaa", dash="dash", width=1),
                             name="perfect", hoverinfo="skip"))
    drawn = 0
    for name in names:
        mm = blk["models"][name]
        cal = mm.get("calibration") or {}
        bins = cal.get("bins") or {}
        err = None
        if bins.get("mean_predicted"):
            mp, fo, n = bins["mean_predicted"], bins["observed"], bins.get("count")
            if bins.get("observed_ci_lower") and bins.get("observed_ci_upper"):
                err = dict(type="data", visible=True, thickness=1,
                           array=[u - o for u, o in zip(bins["observed_ci_upper"], fo)],
                           arrayminus=[o - lo for lo, o in zip(bins["observed_ci_lower"], fo)])
        elif pred is not None and name in pred.columns:
            p = pred[name].to_numpy(dtype=float)
            ok = np.isfinite(p)
            mp, fo, n = _calib_points(pred["label"].to_numpy(dtype=float)[ok], p[ok], n_bins)
        else:
            continue
        extras = []
        if cal.get("intercept") is not None:
            extras.append(f"int {cal['intercept']:.2f}")
        if cal.get("slope") is not None:
            extras.append(f"slope {cal['slope']:.2f}")
        if _value(mm.get("brier")) is not None:
            extras.append(f"Brier {_value(mm.get('brier')):.3f}")
        label = name + (" (" + ", ".join(extras) + ")" if extras else "")
        fig.add_trace(go.Scatter(x=mp, y=fo, mode="lines+markers", name=label, error_y=err,
                                 line=dict(color=model_color(name, names)), customdata=n,
                                 hovertemplate="predicted %{x:.2f}<br>observed %{y:.2f}<br>n=%{customdata}<extra>"
                                               + name + "</extra>"))
        drawn += 1
    if not drawn:
        return _empty(title, "no calibration data")
    fig.update_layout(title=title, height=380, xaxis=dict(title="mean predicted probability", range=[0, 1]),
                      yaxis=dict(title="observed fraction positive", range=[-0.02, 1.02]),
                      legend=dict(font=dict(size=10)), **LAYOUT)
    return fig


def net_benefit(y: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray,
                thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Net benefit ``TP/n - FP/n * t/(1-t)`` of treating when ``prob >= t``, for each threshold t."""
    y = np.asarray(y).astype(int)
    p = np.asarray(prob, dtype=float)
    n = max(len(y), 1)
    out = []
    for t in thresholds:
        pos = p >= t
        tp = int((pos & (y == 1)).sum())
        fp = int((pos & (y == 0)).sum())
        out.append(tp / n - fp / n * t / (1 - t))
    return np.asarray(out)


def decision_curve_figure(metrics: Mapping[str, Any], set_name: str, level: str = "subject",
                          pred: Any = None) -> go.Figure:
    """Decision-curve analysis: net benefit of every model vs treat-all / treat-none.

    Uses ``models[m].decision_curve`` of metrics.json (``thresholds``, ``net_benefit``, ``treat_all``);
    when absent and ``pred`` is given, net benefit is computed from it.
    """
    blk = level_block(metrics, set_name, level)
    title = f"Decision curves, {set_label(set_name)} ({level} level)"
    names = [m for m in models_of(metrics) if m in (blk.get("models") or {})]
    fig = go.Figure()
    ref_done = False
    for name in names:
        dc = blk["models"][name].get("decision_curve")
        if dc and dc.get("thresholds"):
            ts, nb, ta = np.asarray(dc["thresholds"]), dc["net_benefit"], dc.get("treat_all")
        elif pred is not None and name in pred.columns:
            ts = np.linspace(0.02, 0.9, 45)
            y = pred["label"].to_numpy(dtype=int)
            nb = net_benefit(y, pred[name].to_numpy(dtype=float), ts)
            pr = y.mean()
            ta = (pr - (1 - pr) * ts / (1 - ts)).tolist()
        else:
            continue
        if not ref_done:
            if ta is not None:
                fig.add_trace(go.Scatter(x=ts, y=ta, mode="lines", name="treat all",
                                         line=dict(color="#777777", dash="dash", width=1)))
            fig.add_trace(go.Scatter(x=ts, y=np.zeros_like(ts), mode="lines", name="treat none",
                                     line=dict(color="#000000", width=1)))
            ref_done = True
        fig.add_trace(go.Scatter(x=ts, y=nb, mode="lines", name=name, line=dict(color=model_color(name, names), width=2)))
    if not ref_done:
        return _empty(title, "no decision-curve data")
    n_pos, n = blk.get("n_pos"), blk.get("n")
    top = (n_pos / n) if n_pos is not None and n else 0.5
    fig.update_layout(title=title, height=380, xaxis=dict(title="threshold probability"),
                      yaxis=dict(title="net benefit", range=[-0.1 * max(top, 0.05) - 0.02, max(top, 0.05) * 1.15]),
                      legend=dict(font=dict(size=10)), **LAYOUT)
    return fig


def training_figure(histories: Mapping[str, Any], models: Sequence[str] | None = None,
                    title: str = "Training curves") -> go.Figure:
    """Loss (train solid, validation dashed) and validation AUC per epoch for each model.

    ``histories`` maps model -> DataFrame of ``history.csv`` (``epoch, train_loss, val_loss, val_auc, ...``).
    """
    names = [m for m in (models or list(histories)) if m in histories and len(histories[m])]
    if not names:
        return _empty(title, "no training history")
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "validation AUC"], horizontal_spacing=0.1)
    for name in names:
        h = histories[name]
        col = model_color(name, models or list(histories))
        ep = h["epoch"] if "epoch" in h.columns else np.arange(1, len(h) + 1)
        if "train_loss" in h.columns:
            fig.add_trace(go.Scatter(x=ep, y=h["train_loss"], mode="lines+markers", name=f"{name} train",
                                     line=dict(color=col), legendgroup=name), row=1, col=1)
        if "val_loss" in h.columns:
            fig.add_trace(go.Scatter(x=ep, y=h["val_loss"], mode="lines+markers", name=f"{name} val",
                                     line=dict(color=col, dash="dash"), legendgroup=name), row=1, col=1)
        if "val_auc" in h.columns:
            fig.add_trace(go.Scatter(x=ep, y=h["val_auc"], mode="lines+markers", name=f"{name} val AUC",
                                     line=dict(color=col), legendgroup=name, showlegend=False), row=1, col=2)
    fig.update_xaxes(title="epoch")
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=title, height=360, legend=dict(font=dict(size=10)), **LAYOUT)
    return fig


def flow_figure(flow: Mapping[str, Any], title: str = "Flow: subjects and slices") -> go.Figure:
    """Sankey diagram: dataset -> development / external centers -> train / val / test sets.

    ``flow`` is ``metrics["cohort"]["flow"]``: ``{"dataset": {"subjects", "slices"}, "sets": {name: {"subjects", "slices"}}}``.
    """
    sets = flow.get("sets") or {}
    if not sets:
        return _empty(title, "no split")
    ds = flow.get("dataset") or {}
    labels = [f"prepared: {ds.get('subjects', '?')} subjects, {ds.get('slices', '?')} slices"]
    src, dst, val, custom = [], [], [], []
    dev_sets = [s for s in sets if not s.startswith("external:")]
    ext_sets = [s for s in sets if s.startswith("external:")]
    if dev_sets:
        n_dev = sum(sets[s]["subjects"] for s in dev_sets)
        labels.append(f"development: {n_dev} subjects")
        dev_node = len(labels) - 1
        src.append(0)
        dst.append(dev_node)
        val.append(max(n_dev, 1e-9))
        custom.append(n_dev)
        for s in dev_sets:
            labels.append(f"{set_label(s)}: {sets[s]['subjects']} subjects, {sets[s]['slices']} slices")
            src.append(dev_node)
            dst.append(len(labels) - 1)
            val.append(max(sets[s]["subjects"], 1e-9))
            custom.append(sets[s]["subjects"])
    for s in ext_sets:
        labels.append(f"{set_label(s)}: {sets[s]['subjects']} subjects, {sets[s]['slices']} slices")
        src.append(0)
        dst.append(len(labels) - 1)
        val.append(max(sets[s]["subjects"], 1e-9))
        custom.append(sets[s]["subjects"])
    fig = go.Figure(go.Sankey(node=dict(label=labels, pad=18, thickness=16, color="#9ecae1"),
                              link=dict(source=src, target=dst, value=val, customdata=custom,
                                        hovertemplate="%{customdata} subjects<extra></extra>")))
    fig.update_layout(title=title, height=340, **{k: v for k, v in LAYOUT.items() if k != "template"})
    return fig


def auc_bar_figure(metrics: Mapping[str, Any], level: str = "subject") -> go.Figure:
    """AUC with 95% DeLong CI per model (colour) and set (x): the study at a glance."""
    names = models_of(metrics)
    sets = [s for s in (metrics.get("sets") or {}) if level_block(metrics, s, level).get("models")]
    title = f"AUC by set ({level} level, 95% DeLong CI)"
    if not sets:
        return _empty(title, "no metrics")
    fig = go.Figure()
    for name in names:
        ys, lo, hi = [], [], []
        for s in sets:
            mm = (level_block(metrics, s, level).get("models") or {}).get(name) or {}
            a = mm.get("auc")
            ci = mm.get("auc_ci_delong") or [a, a]
            ys.append(a)
            lo.append(None if a is None or ci[0] is None else a - ci[0])
            hi.append(None if a is None or ci[1] is None else ci[1] - a)
        fig.add_trace(go.Bar(x=[set_label(s) for s in sets], y=ys, name=name,
                             marker_color=model_color(name, names),
                             error_y=dict(type="data", array=hi, arrayminus=lo, visible=True)))
    for s in sets:
        o = oracle_for_set(metrics, s)
        if o is not None:
            fig.add_trace(go.Scatter(x=[set_label(s)], y=[o], mode="markers", marker=dict(symbol="line-ew-open", size=40,
                                     color="#555555", line=dict(width=2)), name="oracle AUC",
                                     showlegend=s == sets[0]))
        v = oracle_for_set(metrics, s, "visible_auc")
        if v is not None:
            fig.add_trace(go.Scatter(x=[set_label(s)], y=[v], mode="markers", marker=dict(symbol="line-ew-open", size=40,
                                     color="#999999", line=dict(width=2, dash="dash")),
                                     name="image-visible signal AUC (ceiling)", showlegend=s == sets[0]))
    fig.update_layout(title=title, barmode="group", height=360, yaxis=dict(title="AUC", range=[0, 1.05]), **LAYOUT)
    return fig


def seeds_figure(seeds: Mapping[str, Any], height: int = 360) -> go.Figure:
    """The spread over repeated seeds (``RUN/seeds.json``, ``nhb_core.study.seed_summary``).

    One marker per seed and model on each set (subject-level AUC), with the mean as a bar tick and
    +- 1 SD as an error bar: a difference between models smaller than this spread is not a finding.
    """
    sets = [s for s in ("test", "val") if s in (seeds.get("sets") or {})]
    sets += sorted(s for s in (seeds.get("sets") or {}) if s not in sets and s != "pooled")
    if not sets:
        return _empty("Repeated seeds", "no AUCs in seeds.json")
    names = list(dict.fromkeys(m for s in sets for m in seeds["sets"][s]))
    fig = go.Figure()
    for name in names:
        xs, ys, mx, my, sd = [], [], [], [], []
        for s in sets:
            v = seeds["sets"][s].get(name)
            if not v:
                continue
            xs += [set_label(s)] * len(v["auc"])
            ys += list(v["auc"])
            mx.append(set_label(s))
            my.append(v["mean"])
            sd.append(v.get("sd") or 0.0)
        color = model_color(name, names)
        fig.add_trace(go.Box(x=xs, y=ys, name=name, marker_color=color, boxpoints="all", jitter=0.3,
                             pointpos=0, fillcolor="rgba(0,0,0,0)", line=dict(width=0), legendgroup=name,
                             hovertemplate="%{y:.3f}<extra>" + name + "</extra>"))
        fig.add_trace(go.Scatter(x=mx, y=my, mode="markers", marker=dict(symbol="line-ew-open", size=26, color=color,
                                 line=dict(width=2)), error_y=dict(type="data", array=sd, visible=True, color=color),
                                 name=f"{name} mean +- SD", legendgroup=name, showlegend=False,
                                 hovertemplate="mean %{y:.3f}<extra>" + name + "</extra>"))
    fig.update_layout(title=f"AUC over seeds {', '.join(map(str, seeds.get('seeds') or []))} (subject level)",
                      boxmode="group", height=height, yaxis=dict(title="AUC", range=[0.4, 1.02]), **LAYOUT)
    return fig


def thresholds_of(metrics: Mapping[str, Any]) -> dict[str, float]:
    """model -> decision threshold (from the run's model info, else any metrics block)."""
    out: dict[str, float] = {}
    for m, info in (((metrics.get("run") or {}).get("models")) or {}).items():
        if info.get("threshold") is not None:
            out[m] = float(info["threshold"])
    for s in (metrics.get("sets") or {}).values():
        for blk in (s.get("level") or {}).values():
            for m, mm in (blk.get("models") or {}).items():
                if m not in out and mm.get("threshold") is not None:
                    out[m] = float(mm["threshold"])
    return out
