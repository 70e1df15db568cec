"""ROC curves, AUC, DeLong (fast, Sun & Xu 2014), bootstrap and clustered AUC.

Conventions follow R's pROC (validated against it, see ``docs/stats.md``):

* the direction is fixed: a higher score means "more likely positive" (pROC
  ``direction = "<"``); an AUC below 0.5 is reported as such, never flipped;
* a tie between a positive and a negative counts 1/2 (Mann-Whitney);
* DeLong CIs are ``auc -/+ z sqrt(var)`` truncated to [0, 1];
* bootstrap CIs are percentile intervals with quantile type 7 (numpy's default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import ndtr, ndtri

from nhb_core.errors import StatsInputError
from nhb_core.progress import ProgressCallback, emit
from nhb_core.stats._checks import as_labels, as_scores, need_both_classes

__all__ = [
    "ROCCurve", "roc_curve", "auc", "delong_placements", "delong_var", "delong_cov", "auc_ci_delong",
    "bootstrap_aucs", "auc_ci_bootstrap", "delong_paired", "delong_matrix", "delong_unpaired",
    "clustered_auc", "clustered_paired", "cluster_bootstrap_ci", "roc_band", "FPR_GRID",
]

#: the fixed false-positive-rate grid of ROC bands (101 points, 0 to 1 by 0.01)
FPR_GRID = np.linspace(0.0, 1.0, 101)


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise StatsInputError("level", f"confidence level {level} is not between 0 and 1", "Use e.g. 0.95")
    return float(ndtri(1 - (1 - level) / 2))


def _prep(y, score, source=None, column="score"):
    yb = as_labels(y, source=source)
    s = as_scores(score, yb.size, source=source, column=column)
    m, n = need_both_classes(yb, source=source)
    return yb, s, m, n


# ----------------------------------------------------------------------------- groups
@dataclass
class _Groups:
    """Tie groups of one score vector: ``gid[i]`` = rank of the distinct value of case i."""

    gid: np.ndarray  # (n_cases,) int, 0..U-1 in ascending score
    values: np.ndarray  # (U,) distinct scores ascending
    pos_in: np.ndarray  # (U,) number of positives in each group
    neg_in: np.ndarray  # (U,) number of negatives in each group


def _groups(yb: np.ndarray, s: np.ndarray) -> _Groups:
    order = np.argsort(s, kind="quicksort")
    ss = s[order]
    new = np.empty(ss.size, dtype=bool)
    new[:1] = True
    np.not_equal(ss[1:], ss[:-1], out=new[1:])
    gsorted = np.cumsum(new) - 1
    gid = np.empty(s.size, dtype=np.int64)
    gid[order] = gsorted
    values = ss[new]
    u = values.size
    pos_in = np.bincount(gid[yb], minlength=u)
    neg_in = np.bincount(gid[~yb], minlength=u)
    return _Groups(gid, values, pos_in, neg_in)


def _placements_from_groups(g: _Groups, yb: np.ndarray, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    neg_below = np.cumsum(g.neg_in) - g.neg_in  # negatives strictly below each group
    pos_above = m - np.cumsum(g.pos_in)  # positives strictly above each group
    # integer arithmetic (exact) before the one division
    v10_num = 2 * neg_below + g.neg_in  # twice (#neg < x + #neg == x / 2)
    v01_num = 2 * pos_above + g.pos_in
    v10 = v10_num[g.gid[yb]] / (2.0 * n)
    v01 = v01_num[g.gid[~yb]] / (2.0 * m)
    return v10, v01


# ----------------------------------------------------------------------------- ROC
@dataclass
class ROCCurve:
    """An empirical ROC curve in pROC's layout.

    thresholds : (k,) float, ascending: -inf, midpoints between consecutive distinct scores, +inf;
        a case is called positive when ``score >= threshold``
    sensitivity, specificity : (k,) float in [0, 1] at each threshold
    """

    thresholds: np.ndarray
    sensitivity: np.ndarray
    specificity: np.ndarray

    @property
    def fpr(self) -> np.ndarray:
        return 1.0 - self.specificity

    @property
    def tpr(self) -> np.ndarray:
        return self.sensitivity

    def to_dict(self) -> dict:
        """Points in plotting order (FPR ascending): {"fpr", "tpr", "thresholds"}."""
        return {"fpr": self.fpr[::-1].tolist(), "tpr": self.tpr[::-1].tolist(),
                "thresholds": self.thresholds[::-1].tolist()}


def _proc_thresholds(values: np.ndarray) -> np.ndarray:
    lo = np.concatenate([[-np.inf], values])
    hi = np.concatenate([values, [np.inf]])
    with np.errstate(invalid="ignore", over="ignore"):
        t1 = (lo + hi) / 2
        t2 = lo / 2 + hi / 2
    return np.where(np.abs(t1) > 1e100, t2, t1)


def roc_curve(y, score, *, source: str | None = None) -> ROCCurve:
    """Empirical ROC curve with pROC's thresholds (``coords(roc, "all")``).

    Parameters
    ----------
    y : array (n,) of 0/1
    score : array (n,) of float, higher = more likely positive

    Returns
    -------
    ROCCurve with ``k = n_distinct + 1`` thresholds.
    """
    yb, s, m, n = _prep(y, score, source)
    g = _groups(yb, s)
    thr = _proc_thresholds(g.values)
    # at threshold j (between group j-1 and j): positives with group >= j, negatives with group < j
    pos_ge = np.concatenate([[m], m - np.cumsum(g.pos_in)])
    neg_lt = np.concatenate([[0], np.cumsum(g.neg_in)])
    return ROCCurve(thr, pos_ge / m, neg_lt / n)


def auc(y, score, *, source: str | None = None) -> float:
    """Area under the empirical ROC curve (Mann-Whitney U / (n_pos n_neg), ties count 1/2)."""
    yb, s, m, n = _prep(y, score, source)
    v10, _ = _placements_from_groups(_groups(yb, s), yb, m, n)
    return float(v10.mean())


def delong_placements(y, score, *, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DeLong placements in O(n log n) (Sun & Xu 2014 midrank algorithm).

    Returns
    -------
    v10 : (n_pos,) for each positive in row order, the fraction of negatives scored below it (ties 1/2)
    v01 : (n_neg,) for each negative in row order, the fraction of positives scored above it (ties 1/2)
    """
    yb, s, m, n = _prep(y, score, source)
    return _placements_from_groups(_groups(yb, s), yb, m, n)


def _var_from_placements(v10: np.ndarray, v01: np.ndarray) -> float:
    m, n = v10.size, v01.size
    if m < 2 or n < 2:
        return float("nan")
    return float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)


def delong_var(y, score, *, source: str | None = None) -> float:
    """DeLong variance of the AUC: S10/m + S01/n (sample variances of the placements).

    NaN when a class has a single case (the variance is undefined, as in pROC).
    """
    v10, v01 = delong_placements(y, score, source=source)
    return _var_from_placements(v10, v01)


def _placements_multi(yb: np.ndarray, S: np.ndarray, m: int, n: int):
    V10 = np.empty((S.shape[0], m))
    V01 = np.empty((S.shape[0], n))
    for k in range(S.shape[0]):
        V10[k], V01[k] = _placements_from_groups(_groups(yb, S[k]), yb, m, n)
    return V10, V01


def _cov_from_placements(V10: np.ndarray, V01: np.ndarray) -> np.ndarray:
    m, n = V10.shape[1], V01.shape[1]
    k = V10.shape[0]
    if m < 2 or n < 2:
        return np.full((k, k), np.nan)
    return np.atleast_2d(np.cov(V10, ddof=1)) / m + np.atleast_2d(np.cov(V01, ddof=1)) / n


def _stack_scores(scores, n_cases: int, source=None) -> tuple[list[str], np.ndarray]:
    if isinstance(scores, Mapping):
        names = [str(k) for k in scores]
        cols = list(scores.values())
    else:
        arr = np.asarray(scores, dtype=float) if not isinstance(scores, (list, tuple)) else None
        if arr is not None and arr.ndim == 2:
            cols = list(arr)
        else:
            cols = list(scores)
        names = [f"score{i + 1}" for i in range(len(cols))]
    S = np.vstack([as_scores(c, n_cases, source=source, column=nm) for nm, c in zip(names, cols)])
    return names, S


def delong_cov(y, scores, *, source: str | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix for k scores on the same cases.

    Parameters
    ----------
    scores : mapping name -> (n,) array, or (k, n) array / list of arrays

    Returns
    -------
    names : list of k names; aucs : (k,); cov : (k, k)
    """
    yb = as_labels(y, source=source)
    names, S = _stack_scores(scores, yb.size, source)
    m, n = need_both_classes(yb, source=source)
    V10, V01 = _placements_multi(yb, S, m, n)
    return names, V10.mean(axis=1), _cov_from_placements(V10, V01)


def _ci_trunc(a: float, var: float, z: float) -> tuple[float, float]:
    if not np.isfinite(var):
        return (float("nan"), float("nan"))
    half = z * np.sqrt(max(var, 0.0))
    return (float(min(max(a - half, 0.0), 1.0)), float(min(max(a + half, 0.0), 1.0)))


def auc_ci_delong(y, score, level: float = 0.95, *, source: str | None = None) -> tuple[float, float]:
    """DeLong CI of the AUC: ``auc -/+ z_{1-alpha/2} sqrt(var)``, truncated to [0, 1] (as pROC)."""
    v10, v01 = delong_placements(y, score, source=source)
    return _ci_trunc(float(v10.mean()), _var_from_placements(v10, v01), _z(level))


# ----------------------------------------------------------------------------- comparisons
def _paired_from(a1, a2, v1, v2, c12, z_crit):
    diff = float(a1 - a2)
    var = float(v1 + v2 - 2 * c12)
    if not np.isfinite(var):
        z = p = float("nan")
        ci = [float("nan"), float("nan")]
        se = float("nan")
    else:
        var = max(var, 0.0)
        se = float(np.sqrt(var))
        if se == 0.0 and diff == 0.0:
            z = 0.0  # pROC's convention
        elif se == 0.0:
            z = float(np.copysign(np.inf, diff))
        else:
            z = diff / se
        p = float(2 * ndtr(-abs(z)))
        ci = [diff - z_crit * se, diff + z_crit * se]
    return {"auc_a": float(a1), "auc_b": float(a2), "auc_diff": diff, "var_a": float(v1), "var_b": float(v2),
            "cov": float(c12), "se": se, "z": z, "p_value": p, "ci": ci}


def delong_paired(y, score_a, score_b, level: float = 0.95, *, source: str | None = None) -> dict:
    """Paired DeLong test of AUC(a) - AUC(b) on the same cases (pROC ``roc.test(paired=TRUE)``).

    Returns
    -------
    dict with ``auc_a``, ``auc_b``, ``auc_diff`` (a - b), ``var_a``, ``var_b``, ``cov``, ``se``,
    ``z`` (sign of a - b; 0 when the difference and its variance are both 0), ``p_value`` (two-sided),
    ``ci`` ([lower, upper] of the difference, not truncated).
    """
    _, aucs, cov = delong_cov(y, {"a": score_a, "b": score_b}, source=source)
    return _paired_from(aucs[0], aucs[1], cov[0, 0], cov[1, 1], cov[0, 1], _z(level))


def delong_matrix(y, scores, level: float = 0.95, *, source: str | None = None) -> dict:
    """All pairwise paired DeLong comparisons of k models on the same cases.

    Returns
    -------
    dict with ``names`` (k), ``auc`` (k), ``cov`` (k x k), ``z``, ``p``, ``diff`` (k x k; entry [i, j]
    compares model i with model j, sign of i - j; diagonal 0 / 1) and ``pairs``: the list of
    :func:`delong_paired` dicts (with ``a``, ``b``) for i < j.
    """
    names, aucs, cov = delong_cov(y, scores, source=source)
    k = len(names)
    zc = _z(level)
    Z = np.zeros((k, k))
    P = np.ones((k, k))
    D = aucs[:, None] - aucs[None, :]
    pairs = []
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            r = _paired_from(aucs[i], aucs[j], cov[i, i], cov[j, j], cov[i, j], zc)
            Z[i, j], P[i, j] = r["z"], r["p_value"]
            if i < j:
                pairs.append({"a": names[i], "b": names[j], **r})
    return {"names": names, "auc": aucs, "cov": cov, "z": Z, "p": P, "diff": D, "pairs": pairs}


def delong_unpaired(y_a, score_a, y_b, score_b, level: float = 0.95) -> dict:
    """Unpaired comparison of two AUCs on disjoint case sets (pROC ``roc.test(paired=FALSE, method="delong")``).

    z = (AUC_a - AUC_b) / sqrt(var_a + var_b); the difference CI is not truncated.
    """
    ya, sa, ma, na = _prep(y_a, score_a, "set a")
    yb_, sb, mb, nb = _prep(y_b, score_b, "set b")
    v10a, v01a = _placements_from_groups(_groups(ya, sa), ya, ma, na)
    v10b, v01b = _placements_from_groups(_groups(yb_, sb), yb_, mb, nb)
    return _paired_from(v10a.mean(), v10b.mean(), _var_from_placements(v10a, v01a),
                        _var_from_placements(v10b, v01b), 0.0, _z(level))


# ----------------------------------------------------------------------------- clustered (Obuchowski 1997)
def _cluster_codes(cluster, n_cases: int, source=None) -> np.ndarray:
    c = np.asarray(cluster)
    if c.ndim != 1 or c.size != n_cases:
        raise StatsInputError(source or "cluster", f"the cluster column has {c.size} values but the truth has {n_cases}",
                              "Give one cluster id (subject) per row")
    try:
        import pandas as pd

        if pd.isna(c).any():
            raise StatsInputError(source or "cluster", "the cluster column has a missing value",
                                  "Give every row its subject id")
        codes, _ = pd.factorize(c, sort=True)
    except TypeError:  # pragma: no cover - exotic objects
        _, codes = np.unique(c.astype(str), return_inverse=True)
    return np.asarray(codes, dtype=np.int64)


def _obuchowski_terms(yb, S, codes, m, n):
    """Per-cluster V10_i, V01_i (k x I) and counts m_i, n_i for k scores."""
    V10, V01 = _placements_multi(yb, S, m, n)
    I = int(codes.max()) + 1
    cp, cn = codes[yb], codes[~yb]
    mi = np.bincount(cp, minlength=I).astype(float)
    ni = np.bincount(cn, minlength=I).astype(float)
    V10i = np.vstack([np.bincount(cp, weights=v, minlength=I) for v in V10])
    V01i = np.vstack([np.bincount(cn, weights=v, minlength=I) for v in V01])
    aucs = V10.mean(axis=1)
    return aucs, V10i, V01i, mi, ni, I


def _obuchowski_cov(aucs, V10i, V01i, mi, ni, I, M, N):
    I10 = int((mi > 0).sum())
    I01 = int((ni > 0).sum())
    D10 = V10i - mi[None, :] * aucs[:, None]
    D01 = V01i - ni[None, :] * aucs[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        f10 = I10 / ((I10 - 1) * M) if I10 > 1 else np.nan
        f01 = I01 / ((I01 - 1) * N) if I01 > 1 else np.nan
        f11 = I / (I - 1) if I > 1 else np.nan
    S10 = f10 * (D10 @ D10.T)
    S01 = f01 * (D01 @ D01.T)
    S11 = f11 * (D10 @ D01.T)  # S11[r, s] pairs modality r's case terms with s's control terms
    cov = S10 / M + S01 / N + (S11 + S11.T) / (M * N)
    comps = {"I": I, "I10": I10, "I01": I01, "M": M, "N": N}
    return cov, S10, S01, S11, comps


def clustered_auc(y, score, cluster, level: float = 0.95, *, source: str | None = None) -> dict:
    """Obuchowski's (1997) nonparametric clustered AUC and its variance (several slices per subject).

    Parameters
    ----------
    y : (n_slices,) 0/1 slice labels (may vary within a cluster)
    score : (n_slices,) float
    cluster : (n_slices,) cluster (subject) ids, any hashable values

    Returns
    -------
    dict: ``auc`` (equals the ordinary slice AUC), ``var``, ``se``, ``ci`` ([lower, upper], Wald,
    truncated to [0, 1]), ``ci_raw`` (the untruncated Wald interval) and ``components``
    (I, I10, I01, M, N, S10, S01, S11). With one slice per cluster ``var`` equals the DeLong variance.
    """
    yb, s, M, N = _prep(y, score, source)
    codes = _cluster_codes(cluster, yb.size, source)
    aucs, V10i, V01i, mi, ni, I = _obuchowski_terms(yb, s[None, :], codes, M, N)
    cov, S10, S01, S11, comps = _obuchowski_cov(aucs, V10i, V01i, mi, ni, I, M, N)
    var = float(cov[0, 0])
    a = float(aucs[0])
    z = _z(level)
    se = float(np.sqrt(var)) if np.isfinite(var) and var >= 0 else float("nan")
    raw = [a - z * se, a + z * se]
    comps.update({"S10": float(S10[0, 0]), "S01": float(S01[0, 0]), "S11": float(S11[0, 0])})
    return {"auc": a, "var": var, "se": se, "ci": list(_ci_trunc(a, var, z)), "ci_raw": raw,
            "components": comps, "n_clusters": I}


def clustered_paired(y, score_a, score_b, cluster, level: float = 0.95, *, source: str | None = None) -> dict:
    """Paired comparison of two clustered AUCs (Obuchowski 1997 covariance); same keys as delong_paired."""
    yb = as_labels(y, source=source)
    _, S = _stack_scores({"a": score_a, "b": score_b}, yb.size, source)
    M, N = need_both_classes(yb, source=source)
    codes = _cluster_codes(cluster, yb.size, source)
    aucs, V10i, V01i, mi, ni, I = _obuchowski_terms(yb, S, codes, M, N)
    cov = _obuchowski_cov(aucs, V10i, V01i, mi, ni, I, M, N)[0]
    return _paired_from(aucs[0], aucs[1], cov[0, 0], cov[1, 1], cov[0, 1], _z(level))


def clustered_cov(yb, S, codes):
    """(aucs, cov) of k scores under Obuchowski's clustered covariance (internal; checked inputs)."""
    M = int(yb.sum())
    N = int(yb.size - M)
    aucs, V10i, V01i, mi, ni, I = _obuchowski_terms(yb, S, codes, M, N)
    return aucs, _obuchowski_cov(aucs, V10i, V01i, mi, ni, I, M, N)[0]


# ----------------------------------------------------------------------------- bootstrap engine
_CHUNK_ELEMS = 4_000_000


class _Boot:
    """Replicate weights for a (stratified or cluster) bootstrap, drawn chunk by chunk.

    Each replicate is a vector of non-negative integer weights per case (how often the case was
    drawn). Stratified: positives and negatives resampled separately with replacement, group sizes
    fixed (pROC's ``boot.stratified = TRUE``). Cluster: clusters resampled with replacement, a slice
    weighs as often as its cluster was drawn.
    """

    def __init__(self, yb, n_boot, seed, cluster_codes=None):
        self.yb = yb
        self.n_boot = int(n_boot)
        self.rng = np.random.default_rng(seed)
        self.codes = cluster_codes
        self.pos_idx = np.flatnonzero(yb)
        self.neg_idx = np.flatnonzero(~yb)
        if cluster_codes is not None:
            self.I = int(cluster_codes.max()) + 1
        width = yb.size if cluster_codes is None else max(yb.size, self.I)
        self.chunk = max(1, min(self.n_boot, _CHUNK_ELEMS // max(width, 1)))

    def chunks(self):
        """Yield (B_chunk, draws) where draws is a function mapping a per-case group id array
        (n_cases,), with U groups, to (pos_weights (B, U), neg_weights (B, U))."""
        done = 0
        while done < self.n_boot:
            b = min(self.chunk, self.n_boot - done)
            yield b, (self._stratified_draws(b) if self.codes is None else self._cluster_draws(b))
            done += b

    def _stratified_draws(self, b):
        """One chunk of ``b`` stratified replicates (cases drawn within each class)."""
        m, n = self.pos_idx.size, self.neg_idx.size
        dp = self.pos_idx[self.rng.integers(0, m, size=(b, m))]
        dn = self.neg_idx[self.rng.integers(0, n, size=(b, n))]
        rows_p = np.repeat(np.arange(b), m)
        rows_n = np.repeat(np.arange(b), n)

        def draws(gid, U):
            pw = np.bincount(rows_p * U + gid[dp].ravel(), minlength=b * U).reshape(b, U)
            nw = np.bincount(rows_n * U + gid[dn].ravel(), minlength=b * U).reshape(b, U)
            return pw.astype(float), nw.astype(float)

        return draws

    def _cluster_draws(self, b):
        """One chunk of ``b`` cluster replicates (clusters drawn with replacement)."""
        I = self.I
        dc = self.rng.integers(0, I, size=(b, I))
        cw = np.bincount((np.arange(b)[:, None] * I + dc).ravel(), minlength=b * I).reshape(b, I)
        cw = cw.astype(float)

        def draws(gid, U):
            codes, yb = self.codes, self.yb
            ap = sparse.csr_matrix((np.ones(int(yb.sum())), (codes[yb], gid[yb])), shape=(self.I, U))
            an = sparse.csr_matrix((np.ones(int((~yb).sum())), (codes[~yb], gid[~yb])), shape=(self.I, U))
            return np.asarray((ap.T @ cw.T).T), np.asarray((an.T @ cw.T).T)

        return draws


def _weighted_auc(pw: np.ndarray, nw: np.ndarray) -> np.ndarray:
    """AUC of each replicate from group weights (B, U) of positives and negatives (ascending scores)."""
    below = np.cumsum(nw, axis=1) - nw
    num = (pw * (below + 0.5 * nw)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / (pw.sum(axis=1) * nw.sum(axis=1))


def _tpr_on_grid(pw: np.ndarray, nw: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """TPR of each replicate's ROC polygon at the FPR grid points (B, G); at a vertical segment the
    top of the segment (the best TPR reachable at that FPR)."""
    b, U = pw.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        tp = np.cumsum(pw[:, ::-1], axis=1) / pw.sum(axis=1, keepdims=True)
        fp = np.cumsum(nw[:, ::-1], axis=1) / nw.sum(axis=1, keepdims=True)
    tp = np.concatenate([np.zeros((b, 1)), tp], axis=1)
    fp = np.concatenate([np.zeros((b, 1)), fp], axis=1)
    fp[:, -1] = 1.0
    tp[:, -1] = 1.0
    bad = ~np.isfinite(fp).all(axis=1) | ~np.isfinite(tp).all(axis=1)
    fp[bad] = np.linspace(0, 1, U + 1)
    tp[bad] = np.nan
    # last vertex with fpr <= f (an FPR equal to f up to rounding, 1e-9, counts as reached)
    qg = grid + 1e-9
    k = np.empty((b, grid.size), dtype=np.int64)
    for i in range(b):
        k[i] = np.searchsorted(fp[i], qg, side="right") - 1
    k = np.clip(k, 0, U)
    k1 = np.minimum(k + 1, U)
    x0, x1 = np.take_along_axis(fp, k, 1), np.take_along_axis(fp, k1, 1)
    y0, y1 = np.take_along_axis(tp, k, 1), np.take_along_axis(tp, k1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(x1 > x0, np.clip((grid[None, :] - x0) / (x1 - x0), 0.0, 1.0), 0.0)
    return y0 + t * (y1 - y0)


def bootstrap_aucs(y, scores, n_boot: int = 2000, seed: int = 0, cluster=None, *, grid=None,
                   source: str | None = None, progress: ProgressCallback | None = None) -> dict:
    """Bootstrap replicates of the AUC of one or several scores (the same replicates for all).

    Parameters
    ----------
    y : (n,) 0/1; scores : (n,) array, or mapping name -> (n,) array
    n_boot : number of replicates; seed : fixes every draw
    cluster : None for a stratified bootstrap (positives and negatives resampled separately),
        or (n,) cluster ids for a cluster (subject-level) bootstrap
    grid : optional FPR grid; when given, the TPR of every replicate at each grid point is returned too

    Returns
    -------
    dict with ``names``, ``aucs`` (k, n_boot) (NaN for a cluster replicate that lacks a class),
    and ``tpr`` (k, n_boot, G) when ``grid`` is given.
    """
    yb = as_labels(y, source=source)
    single = not isinstance(scores, Mapping)
    names, S = _stack_scores({"score": scores} if single else scores, yb.size, source)
    need_both_classes(yb, source=source)
    codes = None if cluster is None else _cluster_codes(cluster, yb.size, source)
    groups = [_groups(yb, S[k]) for k in range(S.shape[0])]
    boot = _Boot(yb, n_boot, seed, codes)
    out = np.empty((len(names), boot.n_boot))
    tpr = None if grid is None else np.empty((len(names), boot.n_boot, len(grid)))
    done = 0
    for b, draws in boot.chunks():
        for k, g in enumerate(groups):
            pw, nw = draws(g.gid, g.values.size)
            out[k, done:done + b] = _weighted_auc(pw, nw)
            if grid is not None:
                assert tpr is not None
                tpr[k, done:done + b] = _tpr_on_grid(pw, nw, np.asarray(grid, float))
        done += b
        emit(progress, "bootstrap", done=done, total=boot.n_boot)
    res = {"names": names, "aucs": out}
    if tpr is not None:
        res["tpr"] = tpr
    return res


def _percentile_ci(x: np.ndarray, level: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    lo, hi = np.percentile(x, [100 * a, 100 * (1 - a)])  # linear = R quantile type 7
    return (float(lo), float(hi))


def auc_ci_bootstrap(y, score, n_boot: int = 2000, seed: int = 0, level: float = 0.95, *,
                     source: str | None = None, progress: ProgressCallback | None = None) -> tuple[float, float]:
    """Stratified bootstrap percentile CI of the AUC (pROC ``ci.auc(method="bootstrap",
    boot.stratified=TRUE)``): ``n_boot`` replicates, quantile type 7, seeded."""
    r = bootstrap_aucs(y, score, n_boot=n_boot, seed=seed, source=source, progress=progress)
    return _percentile_ci(r["aucs"][0], level)


def cluster_bootstrap_ci(y, score, cluster, n_boot: int = 2000, seed: int = 0, level: float = 0.95, *,
                         source: str | None = None, progress: ProgressCallback | None = None) -> tuple[float, float]:
    """Subject-level cluster bootstrap percentile CI of the slice AUC: clusters drawn with
    replacement; replicates lacking a class are dropped."""
    r = bootstrap_aucs(y, score, n_boot=n_boot, seed=seed, cluster=cluster, source=source, progress=progress)
    return _percentile_ci(r["aucs"][0], level)


def roc_band(y, score, cluster=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
             grid: Sequence[float] | None = None, *, source: str | None = None) -> dict:
    """Pointwise bootstrap band of the ROC curve on a fixed FPR grid.

    TPR at each grid FPR is read from the ROC polygon of every bootstrap replicate (stratified, or
    by cluster when ``cluster`` is given); the band is the percentile interval at each grid point.

    Returns
    -------
    dict: ``fpr`` (G,), ``tpr`` (G, the observed curve), ``band_lower``, ``band_upper`` (G,).
    """
    fpr = FPR_GRID if grid is None else np.asarray(grid, float)
    r = bootstrap_aucs(y, score, n_boot=n_boot, seed=seed, cluster=cluster, grid=fpr, source=source)
    yb = as_labels(y, source=source)
    s = as_scores(score, yb.size, source=source)
    g = _groups(yb, s)
    obs = _tpr_on_grid(g.pos_in[None, :].astype(float), g.neg_in[None, :].astype(float), fpr)[0]
    lo, hi = _band(r["tpr"][0], level)
    return {"fpr": fpr.tolist(), "tpr": obs.tolist(), "band_lower": lo.tolist(), "band_upper": hi.tolist()}


def _band(tpr: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(tpr).all(axis=1)
    if not ok.any():
        nan = np.full(tpr.shape[1], np.nan)
        return nan, nan
    a = (1 - level) / 2
    lo, hi = np.percentile(tpr[ok], [100 * a, 100 * (1 - a)], axis=0)
    return lo, hi
