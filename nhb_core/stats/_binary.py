"""Metrics at a fixed threshold, Wilson CIs, exact McNemar, model-versus-reader tests, kappa, consensus.

A case is called positive when ``score >= threshold``. The threshold must be fixed in advance
(chosen on the validation set, e.g. by :func:`youden_threshold`), never on the test set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps
from scipy.special import ndtr, ndtri

from nhb_core.errors import StatsInputError
from nhb_core.stats._checks import as_binary, as_labels, as_scores, need_both_classes
from nhb_core.stats._roc import roc_curve

__all__ = ["wilson_ci", "clopper_pearson_ci", "proportion", "confusion", "threshold_metrics", "youden_threshold",
           "mcnemar_exact", "mcnemar_table", "compare_to_reader", "precision_paired", "cohens_kappa",
           "fleiss_kappa", "reader_consensus", "METRICS"]

#: the threshold metrics, in report order
METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1")


def wilson_ci(count, nobs, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval without continuity correction (R ``prop.test(correct=FALSE)``,
    statsmodels ``proportion_confint(method="wilson")``). (NaN, NaN) when ``nobs == 0``."""
    count, nobs = float(count), float(nobs)
    if nobs <= 0:
        return (float("nan"), float("nan"))
    z = float(ndtri(1 - (1 - level) / 2))
    z2 = z * z
    p = count / nobs
    denom = 1 + z2 / nobs
    center = (p + z2 / (2 * nobs)) / denom
    dist = z * np.sqrt(p * (1 - p) / nobs + z2 / (4 * nobs * nobs)) / denom
    return (float(center - dist), float(center + dist))


def clopper_pearson_ci(count, nobs, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval (R ``binom.test``). (NaN, NaN) when ``nobs == 0``."""
    count, nobs = float(count), float(nobs)
    if nobs <= 0:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    lo = 0.0 if count == 0 else float(sps.beta.ppf(a, count, nobs - count + 1))
    hi = 1.0 if count == nobs else float(sps.beta.ppf(1 - a, count + 1, nobs - count))
    return (lo, hi)


def proportion(count, nobs, level: float = 0.95) -> dict:
    """{"value", "ci" (Wilson), "ci_exact" (Clopper-Pearson), "count", "nobs"}; null value when nobs = 0."""
    value = float(count) / float(nobs) if nobs > 0 else float("nan")
    return {"value": value, "ci": list(wilson_ci(count, nobs, level)),
            "ci_exact": list(clopper_pearson_ci(count, nobs, level)), "count": int(count), "nobs": int(nobs)}


def confusion(y, pred) -> dict:
    """Confusion counts {"tp", "fp", "tn", "fn"} of 0/1 predictions against 0/1 truth."""
    yb = np.asarray(y).astype(bool)
    pb = np.asarray(pred).astype(bool)
    return {"tp": int((yb & pb).sum()), "fp": int((~yb & pb).sum()),
            "tn": int((~yb & ~pb).sum()), "fn": int((yb & ~pb).sum())}


def _metrics_from_confusion(c: Mapping[str, int], level: float) -> dict:
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    out = {
        "accuracy": proportion(tp + tn, tp + fp + tn + fn, level),
        "sensitivity": proportion(tp, tp + fn, level),
        "specificity": proportion(tn, tn + fp, level),
        "precision": proportion(tp, tp + fp, level),
        "npv": proportion(tn, tn + fn, level),
    }
    # F1 = 2TP / (2TP + FP + FN); Wilson interval on that ratio (a documented approximation)
    out["f1"] = proportion(2 * tp, 2 * tp + fp + fn, level)
    out["f1"]["ci"] = list(wilson_ci(tp, tp + (fp + fn) / 2, level)) if tp + fp + fn > 0 else [float("nan")] * 2
    out["f1"].pop("ci_exact")
    return out


def threshold_metrics(y, score, threshold: float, level: float = 0.95, *, source: str | None = None,
                      column: str = "score") -> dict:
    """Confusion matrix and accuracy, sensitivity, specificity, precision (PPV), NPV and F1 with
    Wilson CIs at a fixed threshold (positive when ``score >= threshold``).

    Parameters
    ----------
    y : (n,) 0/1; score : (n,) float; threshold : float, fixed in advance

    Returns
    -------
    dict: ``threshold``, ``confusion`` {tp, fp, tn, fn}, and for each metric
    {"value", "ci" [lower, upper] (Wilson), "ci_exact" (Clopper-Pearson), "count", "nobs"};
    a metric whose denominator is 0 has null value and CI.
    """
    yb = as_labels(y, source=source)
    s = as_scores(score, yb.size, source=source, column=column)
    if threshold is None or np.isnan(float(threshold)):
        raise StatsInputError(source or "--threshold", f"threshold {threshold!r} is not a number",
                              "Fix the threshold in advance (e.g. Youden on the validation set)")
    c = confusion(yb, s >= float(threshold))
    return {"threshold": float(threshold), "confusion": c, **_metrics_from_confusion(c, level)}


def youden_threshold(y, score, *, return_all: bool = False, source: str | None = None):
    """The threshold maximising sensitivity + specificity - 1 (pROC ``coords(best.method="youden")``;
    positive when ``score >= threshold``). Use it on the validation set only.

    Returns
    -------
    float: the lowest of the tied best thresholds; when that is -inf / +inf (no threshold beats
    calling everything positive / negative) the lowest score / just above the highest score, so the
    value is always finite. With ``return_all=True``: dict {"threshold": [every tied threshold,
    ascending, as pROC, possibly -inf/inf], "sensitivity": [...], "specificity": [...], "J": float}.
    """
    yb = as_labels(y, source=source)
    s = as_scores(score, yb.size, source=source)
    m, n = need_both_classes(yb, source=source)
    rc = roc_curve(yb, s)
    # integer numerator of J * m * n: exact comparison of ties
    tp = np.rint(rc.sensitivity * m).astype(np.int64)
    tn = np.rint(rc.specificity * n).astype(np.int64)
    j = tp * n + tn * m
    best = np.flatnonzero(j == j.max())
    if return_all:
        return {"threshold": rc.thresholds[best].tolist(), "sensitivity": rc.sensitivity[best].tolist(),
                "specificity": rc.specificity[best].tolist(),
                "J": float(rc.sensitivity[best[0]] + rc.specificity[best[0]] - 1)}
    k = int(best[0])
    t = float(rc.thresholds[k])
    if not np.isfinite(t):  # a degenerate best (everything positive / negative): use the extreme score
        t = float(s.min()) if t < 0 else float(np.nextafter(s.max(), np.inf))
    return t


# ----------------------------------------------------------------------------- McNemar
def mcnemar_exact(b: int, c: int) -> dict:
    """Exact McNemar test from the discordant counts (statsmodels ``mcnemar(exact=True)``):
    statistic = min(b, c), p = two-sided binomial test of b out of b + c at 1/2 (p = 1 when b + c = 0)."""
    b, c = int(b), int(c)
    stat = min(b, c)
    p = min(1.0, 2.0 * float(sps.binom.cdf(stat, b + c, 0.5)))
    return {"statistic": float(stat), "p_value": p, "b": b, "c": c}


def mcnemar_table(y, pred_a, pred_b) -> list[list[int]]:
    """[[both correct, a correct & b wrong], [a wrong & b correct, both wrong]]."""
    yb = np.asarray(y).astype(bool)
    ca = np.asarray(pred_a).astype(bool) == yb
    cb = np.asarray(pred_b).astype(bool) == yb
    return [[int((ca & cb).sum()), int((ca & ~cb).sum())], [int((~ca & cb).sum()), int((~ca & ~cb).sum())]]


def precision_paired(y, pred_a, pred_b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Paired comparison of precision (PPV) of two 0/1 predictions on the same cases.

    Paired bootstrap: cases resampled with replacement (the pairing kept), PPV_a - PPV_b per replicate
    (replicates where either has no positive call are dropped). ``p_value`` is two-sided from the
    bootstrap standard error (z = diff / se); ``ci`` is the percentile interval of the difference.
    NaN where a PPV is undefined or the difference never varies (then p = 1 if diff = 0).
    """
    yb = np.asarray(y).astype(bool)
    a = np.asarray(pred_a).astype(bool)
    b = np.asarray(pred_b).astype(bool)
    nan = float("nan")
    if a.sum() == 0 or b.sum() == 0:
        return {"diff": nan, "ci": [nan, nan], "se": nan, "z": nan, "p_value": nan, "method": "paired bootstrap"}
    diff = float((a & yb).sum() / a.sum() - (b & yb).sum() / b.sum())
    n = yb.size
    rng = np.random.default_rng(seed)
    reps = []
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(k, n))
        ya, aa, bb = yb[idx], a[idx], b[idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            d = (aa & ya).sum(1) / aa.sum(1) - (bb & ya).sum(1) / bb.sum(1)
        reps.append(d)
        done += k
    d = np.concatenate(reps)
    d = d[np.isfinite(d)]
    se = float(np.std(d, ddof=1)) if d.size > 1 else nan
    if not np.isfinite(se) or se == 0:
        z = 0.0 if diff == 0 else nan
        p = 1.0 if diff == 0 else nan
    else:
        z = diff / se
        p = float(2 * ndtr(-abs(z)))
    alpha = (1 - level) / 2
    ci = [float(v) for v in np.percentile(d, [100 * alpha, 100 * (1 - alpha)])] if d.size else [nan, nan]
    return {"diff": diff, "ci": ci, "se": se, "z": z, "p_value": p, "method": "paired bootstrap",
            "n_boot": int(d.size)}


def compare_to_reader(y, model_pred, reader_pred, n_boot: int = 2000, seed: int = 0) -> dict:
    """Model (0/1 predictions) against a reader (0/1 reads) on the same cases.

    Returns
    -------
    dict: ``mcnemar_p`` (accuracy, all cases), ``mcnemar_p_sensitivity`` (positives only),
    ``mcnemar_p_specificity`` (negatives only) - all exact McNemar; ``tables`` (the 2x2 tables and
    b, c per stratum, b = model-only correct); ``precision_p`` and ``precision`` (paired bootstrap,
    see :func:`precision_paired`).
    """
    yb = np.asarray(y).astype(bool)
    mp = np.asarray(model_pred).astype(bool)
    rp = np.asarray(reader_pred).astype(bool)
    out: dict = {"tables": {}}
    for key, name, mask in (("mcnemar_p", "accuracy_all", np.ones_like(yb)),
                            ("mcnemar_p_sensitivity", "sensitivity_positives", yb),
                            ("mcnemar_p_specificity", "specificity_negatives", ~yb)):
        t = mcnemar_table(yb[mask], mp[mask], rp[mask])
        r = mcnemar_exact(t[0][1], t[1][0])
        out[key] = r["p_value"]
        out["tables"][name] = {"table": t, "b": r["b"], "c": r["c"], "statistic": r["statistic"],
                               "p_value": r["p_value"]}
    pr = precision_paired(yb, mp, rp, n_boot=n_boot, seed=seed)
    out["precision_p"] = pr["p_value"]
    out["precision"] = pr
    return out


def cohens_kappa(a, b) -> dict:
    """Cohen's kappa between two 0/1 raters on the same cases (rows where either is missing dropped).

    Returns {"kappa", "se" (large-sample, Fleiss et al. 1969 under H1), "ci" (Wald, clipped to
    [-1, 1]), "n", "agreement" (observed)}; kappa is 1 when both raters agree perfectly, NaN when
    the expected agreement is 1 (both constant and equal)."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok] == 1, b[ok] == 1
    n = a.size
    nan = float("nan")
    if n == 0:
        return {"kappa": nan, "se": nan, "ci": [nan, nan], "n": 0, "agreement": nan}
    t = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], float) / n
    po = t[0, 0] + t[1, 1]
    r, c = t.sum(1), t.sum(0)
    pe = float(r @ c)
    if pe >= 1.0:
        kappa = 1.0 if po == 1.0 else nan
        return {"kappa": kappa, "se": nan, "ci": [nan, nan], "n": int(n), "agreement": float(po)}
    kappa = (po - pe) / (1 - pe)
    # asymptotic variance (Fleiss, Cohen & Everitt 1969)
    s = sum(t[i, i] * (1 - (r[i] + c[i]) * (1 - kappa)) ** 2 for i in range(2))
    s += (1 - kappa) ** 2 * sum(t[i, j] * (c[i] + r[j]) ** 2 for i in range(2) for j in range(2) if i != j)
    s -= (kappa - pe * (1 - kappa)) ** 2
    se = float(np.sqrt(max(s, 0.0) / (n * (1 - pe) ** 2)))
    z = 1.959963984540054
    return {"kappa": float(kappa), "se": se, "ci": [max(-1.0, kappa - z * se), min(1.0, kappa + z * se)],
            "n": int(n), "agreement": float(po)}


def fleiss_kappa(reads: Mapping[str, Sequence | np.ndarray] | np.ndarray, level: float = 0.95) -> dict:
    """Fleiss' kappa (1971): agreement of several raters, each rating every case into categories.

    Parameters
    ----------
    reads : {reader: (n,) values} or (n_readers, n) array; any category codes (0/1 calls, 1-5
        ratings). Cases where any reader is missing (NaN) are dropped.

    Returns
    -------
    {"kappa", "se0", "z", "p_value" (two-sided test of kappa = 0 with the null variance of Fleiss,
    Nee & Landis 1979), "n" (cases used), "n_readers", "categories", "agreement" (mean observed
    pairwise agreement P-bar)}; kappa NaN when every rating falls in one category.

    Examples
    --------
    >>> round(fleiss_kappa({"a": [1, 0, 1, 1], "b": [1, 0, 1, 0], "c": [1, 0, 0, 1]})["kappa"], 4)
    0.3143
    """
    if isinstance(reads, Mapping):
        X = np.vstack([np.asarray(v, float) for v in reads.values()])
    else:
        X = np.atleast_2d(np.asarray(reads, float))
    R = X.shape[0]
    nan = float("nan")
    X = X[:, np.isfinite(X).all(axis=0)]
    n = X.shape[1]
    cats = np.unique(X)
    out = {"kappa": nan, "se0": nan, "z": nan, "p_value": nan, "n": int(n), "n_readers": int(R),
           "categories": [float(c) for c in cats], "agreement": nan}
    if R < 2 or n == 0:
        return out
    counts = np.stack([(X == c).sum(axis=0) for c in cats], axis=1).astype(float)  # (n, k)
    p = counts.sum(axis=0) / (n * R)
    P_i = ((counts * (counts - 1)).sum(axis=1)) / (R * (R - 1))
    P_bar, P_e = float(P_i.mean()), float((p ** 2).sum())
    out["agreement"] = P_bar
    if P_e >= 1.0:
        return out
    kappa = (P_bar - P_e) / (1 - P_e)
    pq = p * (1 - p)
    spq = float(pq.sum())
    var0 = 2.0 / (n * R * (R - 1)) * (spq ** 2 - float((pq * (1 - 2 * p)).sum())) / spq ** 2
    se0 = float(np.sqrt(max(var0, 0.0)))
    z = kappa / se0 if se0 > 0 else nan
    out.update({"kappa": float(kappa), "se0": se0, "z": float(z),
                "p_value": float(2 * ndtr(-abs(z))) if z == z else nan})
    return out


def reader_consensus(reads: Mapping[str, Sequence | np.ndarray] | np.ndarray, rule: str = "majority") -> np.ndarray:
    """Consensus read of several 0/1 readers per case.

    rule : "majority" (more than half of the available reads positive; a tie counts positive, the
        conservative choice for a screening read), "any" (at least one positive), "all" (every
        available read positive). Missing reads (NaN) are ignored; a case nobody read is NaN.

    Returns (n,) float array of 0/1/NaN.
    """
    if isinstance(reads, Mapping):
        R = np.vstack([np.asarray(v, float) for v in reads.values()])
    else:
        R = np.atleast_2d(np.asarray(reads, float))
    avail = np.isfinite(R).sum(0)
    pos = np.nansum(R, axis=0)
    if rule == "majority":
        out = (2 * pos >= avail).astype(float)
    elif rule == "any":
        out = (pos >= 1).astype(float)
    elif rule == "all":
        out = (pos == avail).astype(float)
    else:
        raise StatsInputError("consensus", f"unknown consensus rule '{rule}'", "Use majority, any or all")
    out[avail == 0] = np.nan
    return out


def check_reader(values, n: int, *, source: str | None = None, column: str = "reader",
                 allow_missing: bool = False) -> np.ndarray:
    """0/1 reader column check (StatsInputError naming the column otherwise)."""
    return as_binary(values, n, source=source, column=column, allow_missing=allow_missing)
