"""Multi-reader multi-case (MRMC) ROC analysis: Obuchowski-Rockette with Hillis degrees of freedom.

The design is fully crossed: every reader rates every case under every modality (arm). Each
reader x modality gets an empirical (Wilcoxon, ties 1/2) AUC; the Obuchowski & Rockette (1995)
model

    AUC_ij = mu + tau_i + R_j + (tau R)_ij + e_ij      (i = modality 1..t, j = reader 1..r)

treats readers and cases as random samples. The error covariances of the AUCs come from DeLong's
structural components or from the leave-one-case-out jackknife; Hillis (2007, 2008) gives the
denominator degrees of freedom. Three analyses are reported (docs/stats.md, "MRMC"):

* ``RRRC`` random readers and random cases (the generalisation to new readers and new cases);
* ``FRRC`` fixed readers (these readers only), random cases, with per-reader comparisons;
* ``RRFC`` random readers, fixed cases (these cases only).

A network compared with readers is a modality whose rating is the same for every reader (the
model-versus-readers design): its reader and reader x modality variances are then zero by
construction.

Validated against R's MRMCaov and RJafroc (``../shared/data/mrmc_oracle``, tests/test_mrmc.py).

References: Obuchowski NA, Rockette HE (1995) Commun Stat Simul Comput 24:285-308; Hillis SL (2007)
Stat Med 26:596-619; Hillis SL, Berbaum KS, Metz CE (2008) Acad Radiol 15:647-661.
"""

from __future__ import annotations

import math
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from nhb_core.errors import StatsInputError
from nhb_core.stats._binary import fleiss_kappa
from nhb_core.stats._checks import RATING_POSITIVE
from nhb_core.stats._roc import _groups, _placements_from_groups

__all__ = ["READINGS_COLUMNS", "COV_METHODS", "read_readings", "readings_array", "mrmc", "mrmc_arrays",
           "mrmc_table", "json_ready", "study_mrmc", "study_mrmc_table"]

#: the columns of a long-format readings file, one row per reader x modality x case
READINGS_COLUMNS = ("reader", "modality", "case_id", "truth", "rating")
#: accepted covariance methods (lower case) -> the name reported in ``cov_method``
COV_METHODS = {"jackknife": "jackknife", "delong": "DeLong"}


# ----------------------------------------------------------------------------- input
def _sorted_levels(values) -> list[str]:
    """Distinct labels, sorted numerically when every label is a number (as R sorts a numeric
    factor), else as text."""
    uniq = list(dict.fromkeys(values))
    try:
        keys = [float(v) for v in uniq]
        if all(math.isfinite(k) for k in keys):
            return [u for _, u in sorted(zip(keys, uniq), key=lambda p: (p[0], p[1]))]
    except ValueError:
        pass
    return sorted(uniq)


def read_readings(path: str | os.PathLike):
    """Read and check a long-format readings CSV.

    Parameters
    ----------
    path : path to a CSV with the columns ``reader, modality, case_id, truth, rating`` (any order;
        other columns are ignored): one row per reader x modality x case, ``truth`` 1 = diseased /
        injured, 0 = not, ``rating`` any number, higher = more suspicious (e.g. a 1-5 confidence
        scale or a network probability).

    Returns
    -------
    pandas.DataFrame with those five columns: ``reader``, ``modality``, ``case_id`` as str
    (stripped), ``truth`` int 0/1, ``rating`` float. The design itself (balance, truth per case) is
    checked by :func:`readings_array`.

    Raises
    ------
    StatsInputError
        naming the file and row: file missing or not CSV, a column missing, an empty id, a truth
        other than 0/1, a missing or non-numeric rating.

    Examples
    --------
    >>> df = read_readings("readings.csv")  # doctest: +SKIP
    >>> sorted(df.columns)  # doctest: +SKIP
    ['case_id', 'modality', 'rating', 'reader', 'truth']
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise StatsInputError(path, "file not found", "Give an existing readings CSV "
                              "(columns reader, modality, case_id, truth, rating)")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except Exception as err:  # pandas raises many types
        raise StatsInputError(path, f"cannot be read as CSV ({type(err).__name__}: {err})",
                              "Give a comma-separated file with a header row") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in READINGS_COLUMNS if c not in raw.columns]
    if missing:
        raise StatsInputError(path, f"column{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found "
                              f"(columns are: {', '.join(map(str, raw.columns))})",
                              "Give the long format: reader, modality, case_id, truth, rating "
                              "(one row per reader x modality x case)")
    if len(raw) == 0:
        raise StatsInputError(path, "has no data rows", "Give one row per reader x modality x case")
    out = {}
    for c in ("reader", "modality", "case_id"):
        v = raw[c].astype(str).str.strip()
        empty = (v == "").to_numpy()
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise StatsInputError(path, f"column '{c}' is empty", f"Give a {c} on every row", row=i + 2)
        out[c] = v.to_numpy(dtype=object)
    for c in ("truth", "rating"):
        txt = raw[c].astype(str).str.strip()
        v = pd.to_numeric(txt, errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            shown = txt.iloc[i]
            what = "is missing" if shown == "" else f"is not a finite number ('{shown[:20]}')"
            fix = ("Code the truth as 1 = positive, 0 = negative" if c == "truth"
                   else "Give a numeric rating on every row (higher = more suspicious)")
            raise StatsInputError(path, f"column '{c}' {what}", fix, row=i + 2)
        if c == "truth":
            ok = np.isin(v, (0.0, 1.0))
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise StatsInputError(path, f"column 'truth' has a value other than 0/1 ({v[i]:g})",
                                      "Code the truth as 1 = positive, 0 = negative", row=i + 2)
            v = v.astype(int)
        out[c] = v
    return pd.DataFrame(out, columns=list(READINGS_COLUMNS))


def readings_array(df, *, source: str | None = None):
    """The (modality, reader, case) rating array of a long readings table, with its checks.

    Parameters
    ----------
    df : pandas.DataFrame with the columns ``reader, modality, case_id, truth, rating`` (as
        :func:`read_readings` returns; row ``k`` is reported as line ``k + 2`` of the file).
    source : name of the file, for error messages.

    Returns
    -------
    ratings : (t, r, n) float array, ``ratings[i, j, k]`` = rating of reader j, modality i, case k
    truth : (n,) bool array
    modalities, readers, cases : lists of str (t, r, n), in sorted order (numeric when every label
        is a number); the first modality minus the second is the reported difference.

    Raises
    ------
    StatsInputError
        a case whose truth differs between rows, a repeated reader x modality x case, an unbalanced
        design (a reader without a rating of some case under some modality), fewer than two readers
        or modalities, fewer than two cases of either class.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"reader": ["a", "a", "b", "b"] * 2, "modality": ["1"] * 4 + ["2"] * 4,
    ...                    "case_id": ["x", "y"] * 4, "truth": [1, 0] * 4, "rating": [5, 1, 4, 2, 3, 3, 5, 1]})
    >>> r, y, mods, rdrs, cases = readings_array(df)  # doctest: +SKIP
    """
    import pandas as pd

    where = source or "readings"
    cols = {c: np.asarray(df[c]) for c in READINGS_COLUMNS}
    reader = cols["reader"].astype(str)
    modality = cols["modality"].astype(str)
    case = cols["case_id"].astype(str)
    truth = np.asarray(cols["truth"], dtype=float)
    rating = np.asarray(cols["rating"], dtype=float)
    if truth.size == 0:
        raise StatsInputError(where, "has no readings", "Give one row per reader x modality x case")
    bad = ~np.isfinite(rating)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StatsInputError(where, "column 'rating' is missing or not a finite number",
                              "Give a numeric rating on every row", row=i + 2)
    if not np.isin(truth, (0.0, 1.0)).all():
        i = int(np.flatnonzero(~np.isin(truth, (0.0, 1.0)))[0])
        raise StatsInputError(where, f"column 'truth' has a value other than 0/1 ({truth[i]:g})",
                              "Code the truth as 1 = positive, 0 = negative", row=i + 2)
    modalities = _sorted_levels(modality)
    readers = _sorted_levels(reader)
    cases = _sorted_levels(case)
    t, r, n = len(modalities), len(readers), len(cases)
    if r < 2:
        raise StatsInputError(where, f"has a single reader ('{readers[0]}'); an MRMC analysis treats readers "
                              "as a random sample", "Give the readings of at least two readers "
                              "(for one reader use python -m nhb_core stats)")
    if t < 2:
        raise StatsInputError(where, f"has a single modality ('{modalities[0]}'); MRMC compares modalities",
                              "Give the readings under at least two modalities (e.g. unaided and aided, "
                              "or a network and the readers)")
    mi = pd.Categorical(modality, categories=modalities).codes.astype(np.int64)
    ri = pd.Categorical(reader, categories=readers).codes.astype(np.int64)
    ci = pd.Categorical(case, categories=cases).codes.astype(np.int64)
    # one truth per case
    tr = np.full(n, -1.0)
    tr[ci] = truth  # the last row of each case wins; compare every row with it
    conflict = tr[ci] != truth
    if conflict.any():
        k = int(np.flatnonzero(conflict)[0])
        raise StatsInputError(where, f"case '{case[k]}' has truth {int(truth[k])} here but "
                              f"{int(tr[ci[k]])} on another row", "Give each case one truth on every row",
                              row=k + 2)
    flat = (mi * r + ri) * n + ci
    counts = np.bincount(flat, minlength=t * r * n)
    if (counts > 1).any():
        cell = int(np.flatnonzero(counts > 1)[0])
        rows = np.flatnonzero(flat == cell)
        k = int(rows[1])
        raise StatsInputError(where, f"reader '{reader[k]}', modality '{modality[k]}', case '{case[k]}' is rated "
                              f"{rows.size} times", "Give one rating per reader x modality x case", row=k + 2)
    if (counts == 0).any():
        cell = int(np.flatnonzero(counts == 0)[0])
        i, rest = divmod(cell, r * n)
        j, k = divmod(rest, n)
        raise StatsInputError(where, f"unbalanced design: reader '{readers[j]}' has no rating of case '{cases[k]}' "
                              f"under modality '{modalities[i]}' ({int((counts == 0).sum())} reader x modality x "
                              f"case cells missing of {t * r * n})",
                              "Every reader must rate every case under every modality (a fully crossed design)")
    ratings = np.empty(t * r * n)
    ratings[flat] = rating
    y = tr == 1.0
    m1 = int(y.sum())
    if m1 < 2 or n - m1 < 2:
        only = ("only negatives (0)" if m1 == 0 else "only positives (1)" if m1 == n
                else f"{m1} positive and {n - m1} negative cases")
        raise StatsInputError(where, f"column 'truth' has {only} among {n} cases; the MRMC variance needs "
                              "at least two cases of each class", "Include positive and negative cases")
    return ratings.reshape(t, r, n), y, modalities, readers, cases


# ----------------------------------------------------------------------------- core
def _placements(ratings: np.ndarray, y: np.ndarray):
    """(t, r, m) and (t, r, n0) DeLong placements of every reader x modality."""
    t, r, n = ratings.shape
    m1 = int(y.sum())
    n0 = n - m1
    V10 = np.empty((t, r, m1))
    V01 = np.empty((t, r, n0))
    done: dict[bytes, tuple[int, int]] = {}
    for i in range(t):
        for j in range(r):
            s = ratings[i, j]
            key = s.tobytes()
            if key in done:  # an identical rating vector (a network arm): same placements
                a, b = done[key]
                V10[i, j], V01[i, j] = V10[a, b], V01[a, b]
                continue
            V10[i, j], V01[i, j] = _placements_from_groups(_groups(y, s), y, m1, n0)
            done[key] = (i, j)
    return V10, V01


def _error_cov(V10: np.ndarray, V01: np.ndarray, aucs: np.ndarray, method: str) -> np.ndarray:
    """(t r, t r) covariance of the AUCs, modality-major (index i * r + j)."""
    t, r, m1 = V10.shape
    n0 = V01.shape[2]
    D10 = (V10 - aucs[:, :, None]).reshape(t * r, m1)
    D01 = (V01 - aucs[:, :, None]).reshape(t * r, n0)
    S10 = D10 @ D10.T / (m1 - 1)
    S01 = D01 @ D01.T / (n0 - 1)
    if method == "DeLong":
        return S10 / m1 + S01 / n0
    # leave-one-case-out jackknife from the placements: removing positive k gives
    # AUC_(k) = (m AUC - V10_k) / (m - 1), removing negative k gives (n AUC - V01_k) / (n - 1); the mean
    # of the N = m + n pseudo-AUCs is AUC, so cov = (N-1)/N sum_k d_k d_k' (d_k = AUC_(k) - AUC) reduces to
    # (N-1)/N [S10/(m-1) + S01/(n-1)]: exact, O(N) per pair, no N leave-one-out AUCs
    N = m1 + n0
    return (N - 1) / N * (S10 / (m1 - 1) + S01 / (n0 - 1))


def _tq(df: float, level: float) -> float:
    """Two-sided critical value of Student's t (normal when df is infinite)."""
    q = 1 - (1 - level) / 2
    if df is None or not np.isfinite(df):
        return float(sps.norm.ppf(q)) if df == math.inf else float("nan")
    return float(sps.t.ppf(q, df))


def _t_p(stat: float, df: float) -> float:
    if stat == 0:
        return 1.0
    if not np.isfinite(stat) and not np.isinf(stat):
        return float("nan")
    if df == math.inf:
        return float(2 * sps.norm.sf(abs(stat)))
    if not np.isfinite(df):
        return float("nan")
    return float(2 * sps.t.sf(abs(stat), df))


def _ratio(num: float, den: float) -> float:
    """num / den with 0 / 0 = 0 (identical modalities) and x / 0 = inf."""
    if num == 0:
        return 0.0
    if den == 0:
        return math.inf
    return num / den


def _satterthwaite(num: float, ms: float, dof: float) -> float:
    """Hillis' df = num^2 / (ms^2 / dof); infinite when ms = 0 < num."""
    if ms == 0:
        return math.inf if num > 0 else float("nan")
    return num * num / (ms * ms / dof)


def _diff_block(est: float, se: float, label: str, level: float, df: float | None) -> dict:
    """Difference with SE, t (df given) or z (df None) statistic, two-sided p and CI."""
    if se == 0:
        stat = 0.0 if est == 0 else math.copysign(math.inf, est)
    else:
        stat = est / se
    if df is None:
        crit = _tq(math.inf, level)
        p = _t_p(stat, math.inf)
        out = {"comparison": label, "estimate": est, "stderr": se}
    else:
        crit = _tq(df, level)
        p = _t_p(stat, df)
        out = {"comparison": label, "estimate": est, "stderr": se, "df": df}
    half = 0.0 if se == 0 else crit * se
    out.update({"ci_lower": est - half, "ci_upper": est + half, ("z" if df is None else "t"): stat, "p": p})
    return out


def _ci(est: float, se: float, crit: float) -> tuple[float, float]:
    half = 0.0 if se == 0 else crit * se
    return est - half, est + half


def mrmc_arrays(ratings, truth, *, modalities: Sequence[str] | None = None, readers: Sequence[str] | None = None,
                cov: str = "jackknife", level: float = 0.95, source: str | None = None) -> dict:
    """Obuchowski-Rockette MRMC analysis of a fully crossed rating array.

    Parameters
    ----------
    ratings : array (t, r, n) of float
        ``ratings[i, j, k]``: rating of case k by reader j under modality i; higher = more suspicious.
        A network is a modality whose ``ratings[i, j]`` is the same for every reader j.
    truth : array (n,) of 0/1 (or bool)
        1 = diseased / injured.
    modalities, readers : labels (default ``"1".."t"``, ``"1".."r"``); the reported difference is
        ``modalities[0] - modalities[1]`` (every pair i < i' in ``diffs``).
    cov : ``"jackknife"`` (leave-one-case-out) or ``"delong"`` (structural components, n - 1 denominators)
    level : confidence level of every interval (0.95: alpha = 0.05).

    Returns
    -------
    dict (JSON-ready; docs/stats.md "MRMC" lists every key): ``cov_method``, ``level``, ``modalities``,
    ``readers``, ``n_cases``, ``n_pos``, ``n_neg``, ``reader_auc`` {"<modality>|<reader>": AUC},
    ``reader_auc_se``, ``modality_auc`` {modality: reader-averaged AUC}, ``ms`` {ms_t, ms_r, ms_tr},
    ``variance_components`` {var_r, var_tr, var_error, cov1, cov2, cov3} (negative estimates kept),
    ``correlations`` {cov1, cov2, cov3} (each / var_error), ``cov_matrix`` {labels, values (t r x t r)},
    and the analyses ``RRRC`` {denominator, F, df1, df2 (Hillis), p, diff, diffs, single_modality},
    ``FRRC`` {denominator, X2, df, p, diff, diffs, single_modality, per_reader, per_reader_diffs},
    ``RRFC`` {denominator, F, df1, df2, p, diff, diffs, single_modality}. An infinite df is ``inf``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.r_[np.ones(30), np.zeros(30)]
    >>> R = y + rng.normal(size=(2, 4, 60))         # 2 modalities x 4 readers x 60 cases
    >>> res = mrmc_arrays(R, y, cov="delong")
    >>> sorted(res["RRRC"])[:4]
    ['F', 'cov2_minus_cov3_truncated_at_0', 'denominator', 'df1']
    >>> res["RRRC"]["diff"]["comparison"]
    '1 - 2'
    """
    where = source or "ratings"
    cov_key = str(cov).strip().lower()
    if cov_key not in COV_METHODS:
        raise StatsInputError("--cov", f"unknown covariance method '{cov}'", "Use jackknife or delong")
    method = COV_METHODS[cov_key]
    if not 0 < level < 1:
        raise StatsInputError("level", f"confidence level {level} is not between 0 and 1", "Use e.g. 0.95")
    X = np.asarray(ratings, dtype=float)
    if X.ndim != 3:
        raise StatsInputError(where, f"ratings must be a (modality, reader, case) array, got shape {X.shape}",
                              "Pass ratings[i, j, k] for modality i, reader j, case k")
    t, r, n = X.shape
    y = np.asarray(truth)
    y = y.astype(bool) if y.dtype == bool else np.asarray(y, dtype=float) == 1.0
    if y.shape != (n,):
        raise StatsInputError(where, f"truth has shape {np.shape(truth)} but the ratings have {n} cases",
                              "Give one truth per case")
    if not np.isfinite(X).all():
        raise StatsInputError(where, "ratings hold a missing or non-finite value", "Give a rating for every cell")
    if r < 2 or t < 2:
        raise StatsInputError(where, f"needs at least two readers and two modalities (got {r} and {t})",
                              "Give a fully crossed design with r >= 2 readers and t >= 2 modalities")
    m1 = int(y.sum())
    n0 = n - m1
    if m1 < 2 or n0 < 2:
        raise StatsInputError(where, f"{m1} positive and {n0} negative cases; the MRMC variance needs at least "
                              "two cases of each class", "Include positive and negative cases")
    mods = [str(x) for x in (modalities if modalities is not None else range(1, t + 1))]
    rdrs = [str(x) for x in (readers if readers is not None else range(1, r + 1))]
    if len(mods) != t or len(rdrs) != r or len(set(mods)) != t or len(set(rdrs)) != r:
        raise StatsInputError(where, "the modality / reader labels do not match the ratings' shape or repeat",
                              "Give one distinct label per modality and per reader")

    V10, V01 = _placements(X, y)
    A = V10.mean(axis=2)  # (t, r) AUCs
    C = _error_cov(V10, V01, A, method)
    C4 = C.reshape(t, r, t, r)
    eye_t = np.eye(t, dtype=bool)[:, None, :, None]
    eye_r = np.eye(r, dtype=bool)[None, :, None, :]
    var_ij = np.einsum("ijij->ij", C4)  # (t, r)
    var_e = float(var_ij.mean())
    cov1 = float(C4[~eye_t & eye_r].sum() / (t * (t - 1) * r))
    cov2 = float(C4[eye_t & ~eye_r].sum() / (t * r * (r - 1)))
    cov3 = float(C4[~eye_t & ~eye_r].sum() / (t * (t - 1) * r * (r - 1)))

    # two-way ANOVA mean squares of the (t, r) AUC table
    mod_mean = A.mean(axis=1)
    rdr_mean = A.mean(axis=0)
    grand = float(A.mean())
    ms_t = r * float(((mod_mean - grand) ** 2).sum()) / (t - 1)
    ms_r = t * float(((rdr_mean - grand) ** 2).sum()) / (r - 1)
    resid = A - mod_mean[:, None] - rdr_mean[None, :] + grand
    ms_tr = float((resid ** 2).sum()) / ((t - 1) * (r - 1))
    Ash = A - A[:, :1]  # shifted by the first reader: MS_i(R) is exactly 0 for a network (constant) modality
    ms_r_i = ((Ash - Ash.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) / (r - 1)  # (t,)
    var_i = var_ij.mean(axis=1)
    offdiag_r = ~np.eye(r, dtype=bool)
    cov2_i = np.array([C4[i, :, i, :][offdiag_r].mean() for i in range(t)])
    var_j = var_ij.mean(axis=0)

    var_r = (ms_r - ms_tr) / t - cov1 + cov3
    var_tr = ms_tr - var_e + cov1 + cov2 - cov3
    level = float(level)
    z = _tq(math.inf, level)

    def key(i, j):
        return f"{mods[i]}|{rdrs[j]}"

    pairs = [(a, b) for a in range(t) for b in range(a + 1, t)]

    def label(a, b):
        return f"{mods[a]} - {mods[b]}"

    # ---- RRRC (Hillis 2007): denominator MS(T:R) + r max(Cov2 - Cov3, 0), Hillis ddf
    c23 = max(cov2 - cov3, 0.0)
    den_rrrc = ms_tr + r * c23
    df2_rrrc = _satterthwaite(den_rrrc, ms_tr, (t - 1) * (r - 1))
    F_rrrc = _ratio(ms_t, den_rrrc)
    se_rrrc = math.sqrt(2.0 / r * den_rrrc)
    diffs_rrrc = [_diff_block(float(mod_mean[a] - mod_mean[b]), se_rrrc, label(a, b), level, df2_rrrc)
                  for a, b in pairs]
    sm_rrrc = {}
    for i in range(t):
        c2 = max(float(cov2_i[i]), 0.0)
        se = math.sqrt(ms_r_i[i] / r + c2)
        dfi = _satterthwaite(float(ms_r_i[i]) + r * c2, float(ms_r_i[i]), r - 1)
        lo, hi = _ci(float(mod_mean[i]), se, _tq(dfi, level))
        sm_rrrc[mods[i]] = {"estimate": float(mod_mean[i]), "ms_r": float(ms_r_i[i]), "cov2": float(cov2_i[i]),
                            "stderr": se, "df": dfi, "ci_lower": lo, "ci_upper": hi}
    RRRC = {"denominator": den_rrrc, "F": F_rrrc, "df1": t - 1, "df2": df2_rrrc,
            "p": _f_p(F_rrrc, t - 1, df2_rrrc), "cov2_minus_cov3_truncated_at_0": bool(cov2 - cov3 < 0),
            "diff": diffs_rrrc[0], "diffs": diffs_rrrc, "single_modality": sm_rrrc}

    # ---- FRRC: chi-square test, denominator Var - Cov1 + (r - 1) max(Cov2 - Cov3, 0)
    den_frrc = var_e - cov1 + (r - 1) * c23
    den_frrc_raw = var_e - cov1 + (r - 1) * (cov2 - cov3)
    X2 = (t - 1) * _ratio(ms_t, den_frrc)
    se_frrc = math.sqrt(max(2.0 / r * den_frrc, 0.0))
    diffs_frrc = [_diff_block(float(mod_mean[a] - mod_mean[b]), se_frrc, label(a, b), level, None)
                  for a, b in pairs]
    sm_frrc = {}
    for i in range(t):
        c2 = max(float(cov2_i[i]), 0.0)
        se = math.sqrt(max((var_i[i] + (r - 1) * c2) / r, 0.0))
        lo, hi = _ci(float(mod_mean[i]), se, z)
        sm_frrc[mods[i]] = {"estimate": float(mod_mean[i]), "var_error": float(var_i[i]), "cov2": float(cov2_i[i]),
                            "stderr": se, "ci_lower": lo, "ci_upper": hi}
    per_reader_diffs = {}
    for j in range(r):
        rows = []
        for a, b in pairs:
            ve = 0.5 * float(C4[a, j, a, j] + C4[b, j, b, j])
            c1 = float(C4[a, j, b, j])
            blk = _diff_block(float(A[a, j] - A[b, j]), math.sqrt(max(2 * (ve - c1), 0.0)), label(a, b), level, None)
            rows.append({"comparison": blk["comparison"], "estimate": blk["estimate"], "var_error": ve, "cov1": c1,
                         **{k: blk[k] for k in ("stderr", "ci_lower", "ci_upper", "z", "p")}})
        per_reader_diffs[rdrs[j]] = rows
    FRRC = {"denominator": den_frrc, "denominator_without_max": den_frrc_raw,
            "cov2_minus_cov3_truncated_at_0": bool(cov2 - cov3 < 0), "X2": X2, "df": t - 1,
            "p": float(sps.chi2.sf(X2, t - 1)) if np.isfinite(X2) else (0.0 if X2 == math.inf else float("nan")),
            "diff": diffs_frrc[0], "diffs": diffs_frrc, "single_modality": sm_frrc,
            "per_reader": {k: v[0] for k, v in per_reader_diffs.items()}, "per_reader_diffs": per_reader_diffs}

    # ---- RRFC: F = MS(T) / MS(T:R), df (t - 1, (t - 1)(r - 1))
    df2_rrfc = (t - 1) * (r - 1)
    F_rrfc = _ratio(ms_t, ms_tr)
    se_rrfc = math.sqrt(2.0 / r * ms_tr)
    diffs_rrfc = [_diff_block(float(mod_mean[a] - mod_mean[b]), se_rrfc, label(a, b), level, df2_rrfc)
                  for a, b in pairs]
    sm_rrfc = {}
    for i in range(t):
        se = math.sqrt(ms_r_i[i] / r)
        lo, hi = _ci(float(mod_mean[i]), se, _tq(r - 1, level))
        sm_rrfc[mods[i]] = {"estimate": float(mod_mean[i]), "ms_r": float(ms_r_i[i]), "stderr": se, "df": r - 1,
                            "ci_lower": lo, "ci_upper": hi}
    RRFC = {"denominator": ms_tr, "F": F_rrfc, "df1": t - 1, "df2": df2_rrfc, "p": _f_p(F_rrfc, t - 1, df2_rrfc),
            "diff": diffs_rrfc[0], "diffs": diffs_rrfc, "single_modality": sm_rrfc}

    labels = [key(i, j) for i in range(t) for j in range(r)]
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = {k: (float(v / var_e) if var_e != 0 else float("nan"))
                for k, v in (("cov1", cov1), ("cov2", cov2), ("cov3", cov3))}
    return {
        "cov_method": method, "level": level, "modalities": mods, "readers": rdrs,
        "n_cases": n, "n_pos": m1, "n_neg": n0,
        "reader_auc": {key(i, j): float(A[i, j]) for i in range(t) for j in range(r)},
        "reader_auc_se": {key(i, j): float(math.sqrt(max(var_ij[i, j], 0.0))) for i in range(t) for j in range(r)},
        "modality_auc": {mods[i]: float(mod_mean[i]) for i in range(t)},
        "ms": {"ms_t": ms_t, "ms_r": ms_r, "ms_tr": ms_tr},
        "variance_components": {"var_r": var_r, "var_tr": var_tr, "var_error": var_e,
                                "cov1": cov1, "cov2": cov2, "cov3": cov3},
        "correlations": corr,
        "reader_variance": {"var_error": {rdrs[j]: float(var_j[j]) for j in range(r)}},
        "cov_matrix": {"labels": labels, "values": C.tolist()},
        "RRRC": RRRC, "FRRC": FRRC, "RRFC": RRFC,
    }


def _f_p(F: float, df1: float, df2: float) -> float:
    """Upper-tail p of F(df1, df2); chi-square(df1) / df1 when df2 is infinite."""
    if F == math.inf:
        return 0.0
    if F == 0:
        return 1.0
    if not np.isfinite(F) or not (df2 == math.inf or np.isfinite(df2)):
        return float("nan")
    if df2 == math.inf:
        return float(sps.chi2.sf(F * df1, df1))
    return float(sps.f.sf(F, df1, df2))


def mrmc(readings, *, cov: str = "jackknife", level: float = 0.95, source: str | None = None) -> dict:
    """MRMC analysis of a long-format readings table or file.

    Parameters
    ----------
    readings : path to a readings CSV, or a pandas.DataFrame with the columns ``reader, modality,
        case_id, truth, rating`` (one row per reader x modality x case).
    cov : ``"jackknife"`` or ``"delong"``.
    level : confidence level.

    Returns
    -------
    dict as :func:`mrmc_arrays`, plus ``"source"`` (the file name or None).

    Examples
    --------
    >>> res = mrmc("readings.csv", cov="delong")  # doctest: +SKIP
    >>> res["RRRC"]["F"], res["RRRC"]["df2"], res["RRRC"]["p"]  # doctest: +SKIP
    """
    if isinstance(readings, (str, os.PathLike)):
        source = source or str(readings)
        df = read_readings(readings)
    else:
        df = readings
        missing = [c for c in READINGS_COLUMNS if c not in getattr(df, "columns", [])]
        if missing:
            raise StatsInputError(source or "readings", f"column{'s' if len(missing) > 1 else ''} "
                                  f"{', '.join(missing)} not found", "Give the long format: reader, modality, "
                                  "case_id, truth, rating")
    X, y, mods, rdrs, _cases = readings_array(df, source=source)
    res = mrmc_arrays(X, y, modalities=mods, readers=rdrs, cov=cov, level=level, source=source)
    return {"source": source, **res}


def mrmc_table(result: dict):
    """Tidy summary of an :func:`mrmc` result for tables and reports.

    Returns
    -------
    pandas.DataFrame, one row per analysis (RRRC, FRRC, RRFC) x comparison with ``analysis,
    comparison, estimate, stderr, ci_lower, ci_upper, statistic (F or X2 of the global test), df1,
    df2, p_global, p`` (p of the pairwise difference).

    Examples
    --------
    >>> mrmc_table(res)[["analysis", "comparison", "estimate", "p"]]  # doctest: +SKIP
    """
    import pandas as pd

    rows = []
    for an in ("RRRC", "FRRC", "RRFC"):
        blk = result[an]
        stat = blk.get("F", blk.get("X2"))
        df1 = blk.get("df1", blk.get("df"))
        df2 = blk.get("df2", math.inf if an == "FRRC" else None)
        for d in blk["diffs"]:
            rows.append({"analysis": an, "comparison": d["comparison"], "estimate": d["estimate"],
                         "stderr": d["stderr"], "ci_lower": d["ci_lower"], "ci_upper": d["ci_upper"],
                         "statistic": stat, "df1": df1, "df2": df2, "p_global": blk["p"], "p": d["p"]})
    return pd.DataFrame(rows)


def _set_from_file(stem: str) -> str:
    return "external:" + stem[len("external_"):] if stem.startswith("external_") else stem


def study_mrmc(pred_dir: str | os.PathLike, readings: str | os.PathLike, models: Sequence[str], *,
               cov: str = "jackknife", level: float = 0.95, sets: Sequence[str] | None = None) -> dict:
    """Networks versus readers (and aided versus unaided readers) on a run's held-out sets.

    For every held-out set (``test``, ``external:*``, and ``pooled`` = all of them when there are at
    least two) the cases are the set's subjects that every reader rated under every arm of the
    readings file; each network's subject-level probability (``predictions/<set>__subjects.csv``) is
    a modality rated identically by every reader. One two-modality Obuchowski-Rockette analysis per
    network x reader arm (``"<model> vs <arm>"``: difference = network - readers), plus
    ``"aided vs unaided"`` when the readings hold both arms. The truth is the study's label; a
    reading whose truth differs from it is noted, not used.

    Parameters
    ----------
    pred_dir : a run's ``predictions`` folder.
    readings : long-format readings CSV (``reader, modality, case_id, truth, rating``; case_id =
        subject_id), e.g. the synthetic cohort's ``readings.csv`` next to the manifest.
    models : the network columns to compare.
    cov, level : as :func:`mrmc_arrays`.
    sets : restrict to these set names (default: every held-out set found, and ``pooled``).

    Returns
    -------
    {set: {"design": "networks vs readers", "readings": str, "cov_method", "level", "readers": [..],
    "arms": [..], "models": [..], "n_cases", "n_pos", "n_neg", "n_set_subjects", "notes": [str],
    "agreement": {arm: {"calls" (rating >= 3), "ratings" (5 categories): Fleiss' kappa}},
    "comparisons": {"<a> vs <b>": mrmc result (json_ready: an infinite df is "inf")}}}; a set where
    no analysis is possible (too few cases read, one class) holds ``comparisons: {}`` and a note.

    Examples
    --------
    >>> blk = study_mrmc("run/predictions", "cohort/readings.csv", ["resnet18"])  # doctest: +SKIP
    >>> blk["test"]["comparisons"]["resnet18 vs unaided"]["RRRC"]["diff"]["estimate"]  # doctest: +SKIP
    """
    import pandas as pd

    pred_dir = Path(pred_dir)
    rd = read_readings(readings)
    arms = _sorted_levels(rd["modality"].tolist())
    rdrs = _sorted_levels(rd["reader"].tolist())
    tables = {}
    for f in sorted(pred_dir.glob("*__subjects.csv")):
        name = _set_from_file(f.name[: -len("__subjects.csv")])
        if name == "test" or name.startswith("external:"):
            tables[name] = pd.read_csv(f, dtype={"subject_id": str})
    if len(tables) >= 2:
        tables["pooled"] = pd.concat(list(tables.values()), ignore_index=True)
    if sets is not None:
        tables = {k: v for k, v in tables.items() if k in set(sets)}
    dup = rd.duplicated(["reader", "modality", "case_id"])
    if dup.any():
        k = int(np.flatnonzero(dup.to_numpy())[0])
        raise StatsInputError(readings, f"reader '{rd['reader'][k]}', modality '{rd['modality'][k]}', case "
                              f"'{rd['case_id'][k]}' is rated twice", "Give one rating per reader x modality x case",
                              row=k + 2)
    # cases rated by every reader under every arm (a fully crossed design)
    cell = rd.groupby("case_id").size()
    full = set(cell.index[cell == len(arms) * len(rdrs)])
    out = {}
    for name, sub in tables.items():
        notes: list[str] = []
        blk: dict[str, Any] = {"design": "networks vs readers", "readings": str(readings), "cov_method": COV_METHODS.get(
            str(cov).lower(), cov), "level": level, "readers": rdrs, "arms": arms, "models": [], "notes": notes,
            "n_set_subjects": int(len(sub)), "n_cases": 0, "n_pos": 0, "n_neg": 0, "comparisons": {}}
        out[name] = blk
        mods = [m for m in models if m in sub.columns and np.isfinite(pd.to_numeric(sub[m], errors="coerce")).all()]
        blk["models"] = mods
        sub = sub.drop_duplicates("subject_id")
        keep = sub[sub["subject_id"].isin(full)]
        if len(keep) < len(sub):
            notes.append(f"{len(sub) - len(keep)} of {len(sub)} subjects not rated by every reader under every arm: "
                         "left out")
        part = rd[rd["case_id"].isin(set(keep["subject_id"]))]
        truth = dict(zip(keep["subject_id"], keep["label"].astype(int)))
        bad = part["truth"].to_numpy() != part["case_id"].map(truth).to_numpy()
        if bad.any():
            wrong = set(part["case_id"][bad])
            notes.append(f"{len(wrong)} subjects have a readings truth other than their label: left out")
            keep = keep[~keep["subject_id"].isin(wrong)]
            part = part[~part["case_id"].isin(wrong)]
        y = keep["label"].to_numpy(dtype=int) == 1
        blk.update({"n_cases": int(len(keep)), "n_pos": int(y.sum()), "n_neg": int((~y).sum())})
        if y.sum() < 2 or (~y).sum() < 2:
            notes.append("fewer than two read cases of each class: no MRMC analysis")
            continue
        cases = keep["subject_id"].tolist()
        pos = {c: k for k, c in enumerate(cases)}
        ai = {a: i for i, a in enumerate(arms)}
        ri = {r: j for j, r in enumerate(rdrs)}
        X = np.empty((len(arms), len(rdrs), len(cases)))
        X[part["modality"].map(ai).to_numpy(), part["reader"].map(ri).to_numpy(),
          part["case_id"].map(pos).to_numpy()] = part["rating"].to_numpy(dtype=float)
        blk["agreement"] = {a: {"calls": fleiss_kappa((X[ai[a]] >= RATING_POSITIVE).astype(float), level),
                                "ratings": fleiss_kappa(X[ai[a]], level)} for a in arms}
        pairs = [(m, a) for m in mods for a in arms]
        if "aided" in ai and "unaided" in ai:
            pairs.append(("aided", "unaided"))
        for a, b in pairs:
            Xa = np.broadcast_to(keep[a].to_numpy(dtype=float), (len(rdrs), len(cases))) if a in mods else X[ai[a]]
            Xb = X[ai[b]]
            res = mrmc_arrays(np.stack([Xa, Xb]), y, modalities=[a, b], readers=rdrs, cov=cov, level=level,
                              source=str(readings))
            blk["comparisons"][f"{a} vs {b}"] = json_ready(res)
    return out


def _as_float(v) -> float:
    """A JSON value back to float ("inf" -> inf, None -> NaN)."""
    return float("nan") if v is None else float(v)


def study_mrmc_table(block: dict):
    """One row per comparison of a :func:`study_mrmc` set block, for the Results page and the report:
    ``comparison, auc_a, auc_b, diff, ci_lower, ci_upper, p`` (random readers and cases, Hillis df),
    ``df2``, ``p_fixed_readers`` (FRRC), ``p_fixed_cases`` (RRFC).

    Examples
    --------
    >>> study_mrmc_table(metrics["sets"]["test"]["mrmc"])  # doctest: +SKIP
    """
    import pandas as pd

    rows = []
    for name, res in (block or {}).get("comparisons", {}).items():
        a, b = res["modalities"]
        d = res["RRRC"]["diff"]
        rows.append({"comparison": name, "a": a, "b": b, "auc_a": res["modality_auc"][a],
                     "auc_b": res["modality_auc"][b], "diff": d["estimate"], "ci_lower": d["ci_lower"],
                     "ci_upper": d["ci_upper"], "p": d["p"], "df2": _as_float(res["RRRC"]["df2"]),
                     "p_fixed_readers": res["FRRC"]["p"], "p_fixed_cases": res["RRFC"]["p"]})
    return pd.DataFrame(rows, columns=["comparison", "a", "b", "auc_a", "auc_b", "diff", "ci_lower", "ci_upper", "p",
                                       "df2", "p_fixed_readers", "p_fixed_cases"])


def json_ready(result: dict) -> dict:
    """A copy of an MRMC result for JSON: an infinite value (a df) becomes the string ``"inf"`` (as in
    the oracle's expected.json; ``float("inf")`` reads it back), NaN stays for ``to_json`` to null.

    Examples
    --------
    >>> json_ready({"df": float("inf"), "p": 0.5})
    {'df': 'inf', 'p': 0.5}
    """
    def conv(o):
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, (float, np.floating)) and math.isinf(o):
            return "inf" if o > 0 else "-inf"
        return o

    return conv(result)


class _CallableModule(types.ModuleType):
    """``nhb_core.stats.mrmc`` is this module and also callable: ``stats.mrmc(path)`` = ``mrmc.mrmc(path)``."""

    def __call__(self, *args, **kwargs):
        return mrmc(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
