"""Study-level statistics: one metrics.json "level" block per set (set_metrics), every predictions
file of a run (study_metrics), tidy tables for the dashboard and report, and the analysis behind
``python -m nhb_core stats`` (analyze_predictions)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nhb_core.errors import StatsInputError
from nhb_core.progress import ProgressCallback, emit
from nhb_core.stats import _binary as B
from nhb_core.stats import _calibration as C
from nhb_core.stats import _roc as R
from nhb_core.stats._checks import RATING_POSITIVE, as_labels, as_reader, as_scores, reader_scale

__all__ = ["set_metrics", "study_metrics", "tidy_table", "roc_table", "aggregate_subjects",
           "load_predictions", "analyze_predictions", "set_name_from_file", "META_COLUMNS"]

#: predictions-file columns that are never model scores
META_COLUMNS = {"subject_id", "center", "slice_index", "label", "row", "set", "split", "source_sha256", "nbna"}

_NAN = float("nan")


def _nan2() -> list[float]:
    return [_NAN, _NAN]


def _prop_block(p: dict) -> dict:
    return {"value": p["value"], "ci": p["ci"]}


def aggregate_subjects(df, scores: Sequence[str], by: str = "subject_id", truth: str = "label", how: str = "mean"):
    """Subject-level table from slice rows: scores aggregated per subject (``how`` = mean, median or
    max), the truth taken as the subject's maximum label (a subject is positive when any slice is),
    ``center`` kept when present."""
    if how not in ("mean", "median", "max"):
        raise StatsInputError("--aggregate", f"unknown aggregation '{how}'", "Use mean, median or max")
    agg: dict[str, Any] = {s: how for s in scores}
    agg[truth] = "max"
    if "center" in df.columns and by != "center":
        agg["center"] = "first"
    return df.groupby(by, sort=True).agg(agg).reset_index()


# ----------------------------------------------------------------------------- one block
def _grid_thresholds(curve: R.ROCCurve, grid: np.ndarray) -> list[float]:
    fpr = curve.fpr[::-1]
    thr = curve.thresholds[::-1]
    k = np.searchsorted(fpr, grid, side="right") - 1
    return thr[np.clip(k, 0, thr.size - 1)].tolist()


def set_metrics(df, truth: str = "label", scores: Sequence[str] | None = None, cluster: str | None = None,
                readers: Sequence[str] | None = None, thresholds: Mapping[str, float] | None = None,
                seed: int = 0, n_boot: int = 2000, level: float = 0.95, consensus_rule: str = "majority",
                progress: ProgressCallback | None = None) -> dict:
    """Every statistic of one set at one level: one "level" block of metrics.json.

    Parameters
    ----------
    df : pandas.DataFrame, one row per case (subject) or per slice
    truth : 0/1 column; scores : model probability columns (higher = positive)
    cluster : column of cluster ids (subject) for slice rows: adds Obuchowski's clustered AUC, its CI,
        a cluster-bootstrap CI, clustered paired comparisons, and makes the ROC band a cluster bootstrap
    readers : reader columns of 0/1 reads or of 1-5 confidence ratings (NaN = not read; such rows are
        left out of that reader's statistics). A rating column's call is ``rating >= 3``
        (``RATING_POSITIVE``) for the binary metrics, McNemar and kappa; it also gets ``auc``,
        ``auc_ci_delong``, ``roc.points`` and, per model, a paired DeLong ``auc_diff`` / ``delong_p``.
    thresholds : model -> threshold fixed in advance (positive when score >= threshold); 0.5 when absent
    seed, n_boot : the bootstrap (every random draw is fixed by ``seed``)

    Returns
    -------
    dict: ``n``, ``n_pos``, ``n_clusters``, ``notes`` (list of str), ``models`` {model: {...}},
    ``comparisons`` [...], ``readers`` {...}, ``reader_agreement`` {...}, ``consensus`` {...}; see
    docs/stats.md. A set lacking one class gives null AUC-type fields and a note, not an error.
    """
    scores = list(scores or [])
    readers = list(readers or [])
    thresholds = dict(thresholds or {})
    notes: list[str] = []
    for col in [truth, *scores, *([cluster] if cluster else []), *readers]:
        if col not in df.columns:
            raise StatsInputError("predictions", f"column '{col}' not found",
                                  f"Columns are: {', '.join(map(str, df.columns))}")
    y = as_labels(df[truth].to_numpy(), source="predictions", column=truth)
    n, n_pos = int(y.size), int(y.sum())
    both = 0 < n_pos < n
    if not both:
        notes.append("only one class present (" + ("no positives" if n_pos == 0 else "no negatives")
                     + "): AUC, ROC, comparisons and calibration fit are null")
    S = {m: as_scores(df[m].to_numpy(), n, source="predictions", column=m) for m in scores}
    codes = R._cluster_codes(df[cluster].to_numpy(), n, "predictions") if cluster else None
    block: dict[str, Any] = {"n": n, "n_pos": n_pos, "n_neg": n - n_pos,
                             "n_clusters": int(codes.max()) + 1 if codes is not None else None,
                             "level": level, "n_boot": int(n_boot), "seed": seed, "notes": notes,
                             "models": {}, "comparisons": [], "readers": {}, "reader_agreement": {},
                             "consensus": {}}
    grid = R.FPR_GRID
    boot: Any = None  # bootstrap_aucs() results, set when both classes and scores exist
    boot_c: Any = None
    if both and scores:
        emit(progress, "stats", message="bootstrap", done=0, total=len(scores))
        boot = R.bootstrap_aucs(y, S, n_boot=n_boot, seed=seed, grid=None if cluster else grid)
        if cluster:
            boot_c = R.bootstrap_aucs(y, S, n_boot=n_boot, seed=seed, cluster=codes, grid=grid)
    preds: dict[str, np.ndarray] = {}
    for k, m in enumerate(scores):
        s = S[m]
        thr = thresholds.get(m)
        if thr is None:
            thr = 0.5
            notes.append(f"no threshold given for {m}: 0.5 used")
        mm: dict[str, Any] = {"threshold": float(thr)}
        if both:
            v10, v01 = R._placements_from_groups(R._groups(y, s), y, n_pos, n - n_pos)
            a = float(v10.mean())
            var = R._var_from_placements(v10, v01)
            mm["auc"] = a
            mm["auc_var_delong"] = var
            mm["auc_ci_delong"] = list(R._ci_trunc(a, var, R._z(level)))
            mm["auc_ci_bootstrap"] = list(R._percentile_ci(boot["aucs"][k], level))
            if cluster:
                ca = R.clustered_auc(y, s, codes, level)
                mm["auc_clustered"] = ca["auc"]
                mm["auc_var_clustered"] = ca["var"]
                mm["auc_ci_clustered"] = ca["ci"]
                mm["auc_ci_cluster_bootstrap"] = list(R._percentile_ci(boot_c["aucs"][k], level))
            else:
                mm.update({"auc_clustered": None, "auc_var_clustered": None, "auc_ci_clustered": None,
                           "auc_ci_cluster_bootstrap": None})
            curve = R.roc_curve(y, s)
            g = R._groups(y, s)
            obs = R._tpr_on_grid(g.pos_in[None, :].astype(float), g.neg_in[None, :].astype(float), grid)[0]
            tpr_boot = (boot_c if cluster else boot)["tpr"][k]
            lo, hi = R._band(tpr_boot, level)
            mm["roc"] = {"fpr": grid.tolist(), "tpr": obs.tolist(), "thresholds": _grid_thresholds(curve, grid),
                         "band_lower": lo.tolist(), "band_upper": hi.tolist(),
                         "band_method": "cluster bootstrap" if cluster else "stratified bootstrap",
                         "points": curve.to_dict()}
        else:
            for key in ("auc", "auc_var_delong", "auc_ci_delong", "auc_ci_bootstrap", "auc_clustered",
                        "auc_var_clustered", "auc_ci_clustered", "auc_ci_cluster_bootstrap", "roc"):
                mm[key] = None
        tm = B.threshold_metrics(y, s, thr, level, source="predictions", column=m)
        preds[m] = s >= thr
        mm["confusion"] = tm["confusion"]
        for key in B.METRICS:
            mm[key] = _prop_block(tm[key])
        # the same metrics at the conventional 0.5 (probabilities), next to the threshold chosen on validation
        if float(thr) != 0.5 and ((s >= 0) & (s <= 1)).all():
            t5 = B.threshold_metrics(y, s, 0.5, level, source="predictions", column=m)
            mm["at_0.5"] = {"threshold": 0.5, "confusion": t5["confusion"],
                            **{key: _prop_block(t5[key]) for key in B.METRICS}}
        else:
            mm["at_0.5"] = None
        if ((s >= 0) & (s <= 1)).all():
            cal = C.calibration(y, s)
            mm["brier"] = cal["brier"]
            mm["calibration"] = {"intercept": cal["intercept"], "slope": cal["slope"], "bins": cal["bins"]}
            mm["decision_curve"] = C.decision_curve(y, s)
        else:
            notes.append(f"{m} is not a probability: no calibration or decision curve")
            mm["brier"] = None
            mm["calibration"] = None
            mm["decision_curve"] = None
        block["models"][m] = mm
        emit(progress, "stats", done=k + 1, total=len(scores), model=m)
    # comparisons
    if both and len(scores) > 1:
        names = list(scores)
        Sm = np.vstack([S[m] for m in names])
        V10, V01 = R._placements_multi(y, Sm, n_pos, n - n_pos)
        aucs, cov = V10.mean(1), R._cov_from_placements(V10, V01)
        if cluster:
            aucs_c, cov_c = R.clustered_cov(y, Sm, codes)
        zc = R._z(level)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                r = R._paired_from(aucs[i], aucs[j], cov[i, i], cov[j, j], cov[i, j], zc)
                comp = {"a": names[i], "b": names[j], "auc_diff": r["auc_diff"], "ci": r["ci"],
                        "delong_z": r["z"], "delong_p": r["p_value"], "se": r["se"], "method": "delong"}
                if cluster:
                    rc = R._paired_from(aucs_c[i], aucs_c[j], cov_c[i, i], cov_c[j, j], cov_c[i, j], zc)
                    comp.update({"clustered_z": rc["z"], "clustered_p": rc["p_value"], "ci_clustered": rc["ci"],
                                 "method": "obuchowski clustered (delong_* ignore clusters)"})
                block["comparisons"].append(comp)
    # readers
    reads, ratings = {}, {}
    for r in readers:  # 0/1 reads, or 1-5 ratings (a call is rating >= RATING_POSITIVE)
        reads[r], ratings[r] = as_reader(df[r].to_numpy(), n, source="predictions", column=r, allow_missing=True)

    def reader_block(vals: np.ndarray, rating: np.ndarray | None = None) -> dict:
        ok = np.isfinite(vals)
        yr, pr = y[ok], vals[ok] == 1
        c = B.confusion(yr, pr)
        met = B._metrics_from_confusion(c, level)
        out: dict[str, Any] = {"n": int(ok.sum()), "confusion": c, **{k: _prop_block(met[k]) for k in B.METRICS},
                               "vs": {}}
        both_r = bool(yr.any() and (~yr).any())
        if rating is not None:
            out.update({"scale": "rating", "positive_rating": RATING_POSITIVE})
            if both_r:  # the reader's own ROC from the 1-5 ratings
                rr = rating[ok]
                v10, v01 = R._placements_from_groups(R._groups(yr, rr), yr, int(yr.sum()), int((~yr).sum()))
                a, var = float(v10.mean()), R._var_from_placements(v10, v01)
                out.update({"auc": a, "auc_var_delong": var, "auc_ci_delong": list(R._ci_trunc(a, var, R._z(level))),
                            "roc": {"points": R.roc_curve(yr, rr).to_dict()}})
        for m in scores:
            cmp = B.compare_to_reader(yr, preds[m][ok], pr, n_boot=n_boot, seed=seed)
            out["vs"][m] = {"mcnemar_p": cmp["mcnemar_p"], "mcnemar_p_sensitivity": cmp["mcnemar_p_sensitivity"],
                            "mcnemar_p_specificity": cmp["mcnemar_p_specificity"],
                            "precision_p": cmp["precision_p"], "precision_diff": cmp["precision"]["diff"],
                            "precision_diff_ci": cmp["precision"]["ci"], "tables": cmp["tables"]}
            if rating is not None and both_r:  # paired DeLong: model AUC - reader AUC on the read cases
                pdl = R.delong_paired(yr, S[m][ok], rating[ok], level)
                out["vs"][m].update({"auc_diff": pdl["auc_diff"], "auc_diff_ci": pdl["ci"], "delong_p": pdl["p_value"]})
        return out

    for r, vals in reads.items():
        block["readers"][r] = reader_block(vals, ratings[r])
    if len(reads) >= 2:
        names = list(reads)
        pairs = []
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                kp = B.cohens_kappa(reads[names[i]], reads[names[j]])
                pairs.append({"a": names[i], "b": names[j], **kp})
        ks = [p["kappa"] for p in pairs if p["kappa"] is not None and np.isfinite(p["kappa"])]
        block["reader_agreement"] = {"kappa": pairs[0]["kappa"] if len(pairs) == 1 else
                                     (float(np.mean(ks)) if ks else _NAN),
                                     "kappa_method": "cohen" if len(pairs) == 1 else "mean pairwise cohen (light)",
                                     "pairs": pairs, "fleiss": B.fleiss_kappa(reads, level)}
        cons = B.reader_consensus(reads, rule=consensus_rule)
        block["consensus"] = {"rule": consensus_rule, "readers": names, **reader_block(cons)}
    return block


# ----------------------------------------------------------------------------- a whole run
_FILE_RE = re.compile(r"^(?P<set>.+)__(?P<level>subjects|slices)\.csv$")


def set_name_from_file(name: str) -> str:
    """``external_B`` -> ``external:B`` (file names replace ':' by '_'); other names unchanged."""
    if name.startswith("external_"):
        return "external:" + name[len("external_"):]
    return name


def _model_columns(df, thresholds: Mapping[str, float]) -> list[str]:
    cols = []
    for c in df.columns:
        if c in META_COLUMNS or str(c).startswith("reader_") or str(c).startswith("Unnamed"):
            continue
        if np.issubdtype(df[c].dtype, np.number):
            cols.append(str(c))
    if thresholds:
        known = [c for c in cols if c in thresholds]
        if known:
            return known
    return cols


def _levels(sub_df, sl_df, models, readers, thresholds, seed, n_boot, level, progress):
    out: dict[str, Any] = {}
    if sub_df is not None:
        out["subject"] = set_metrics(sub_df, "label", models, None, readers, thresholds, seed, n_boot, level,
                                     progress=progress)
    if sl_df is not None:
        cl = "subject_id" if "subject_id" in sl_df.columns else None
        out["slice"] = set_metrics(sl_df, "label", models, cl, [], thresholds, seed, n_boot, level,
                                   progress=progress)
    return out


def study_metrics(pred_dir: str | os.PathLike, thresholds: Mapping[str, float] | None = None,
                  readers: Sequence[str] | None = None, seed: int = 0, n_boot: int = 2000, level: float = 0.95,
                  progress: ProgressCallback | None = None) -> dict:
    """Statistics of every predictions file of a run: the ``sets`` part of metrics.json.

    Parameters
    ----------
    pred_dir : folder holding ``<set>__subjects.csv`` and ``<set>__slices.csv`` (set names with ':'
        written as '_', e.g. ``external_B__subjects.csv`` is set ``external:B``)
    thresholds : model -> threshold fixed on validation (positive when score >= threshold)
    readers : reader columns (default: every ``reader_*`` column of the subjects files)

    Returns
    -------
    {set: {"level": {"subject": block, "slice": block}, "centers": {center: {"level": {...}}}}}; the
    slice level is clustered by subject_id. A set spanning several centers gets per-center blocks; when
    there are at least two held-out sets (test, external:*), a ``pooled`` set pools all of them.
    """
    import pandas as pd

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise StatsInputError(pred_dir, "predictions folder not found", "Run the evaluate stage first")
    files: dict[str, dict[str, Path]] = {}
    for f in sorted(pred_dir.iterdir()):
        mt = _FILE_RE.match(f.name)
        if mt:
            files.setdefault(set_name_from_file(mt["set"]), {})[mt["level"]] = f
    if not files:
        raise StatsInputError(pred_dir, "no <set>__subjects.csv or <set>__slices.csv files",
                              "Run the evaluate stage first")
    thresholds = dict(thresholds or {})
    tables: dict[str, dict[str, Any]] = {}
    for set_name, lv in files.items():
        tables[set_name] = {k: pd.read_csv(p) for k, p in lv.items()}
    out: dict[str, Any] = {}
    order = list(tables)
    held_out = [s for s in order if s == "test" or s.startswith("external:")]
    total = len(order) + (1 if len(held_out) >= 2 else 0)
    for i, set_name in enumerate(order):
        emit(progress, "stats", done=i, total=total, message=set_name)
        t = tables[set_name]
        sub, sl = t.get("subjects"), t.get("slices")
        ref = sub if sub is not None else sl
        assert ref is not None, f"set {set_name!r} has no predictions table"
        models = _model_columns(ref, thresholds)
        rd = list(readers) if readers is not None else ([c for c in sub.columns if str(c).startswith("reader_")]
                                                      if sub is not None else [])
        rd = [r for r in rd if sub is not None and r in sub.columns]
        entry = {"level": _levels(sub, sl, models, rd, thresholds, seed, n_boot, level, None), "centers": {}}
        if "center" in ref.columns and ref["center"].nunique() > 1:
            for c in sorted(ref["center"].astype(str).unique()):
                csub = None if sub is None else sub[sub["center"].astype(str) == c]
                csl = None if sl is None else sl[sl["center"].astype(str) == c]
                entry["centers"][c] = {"level": _levels(csub, csl, models, rd, thresholds, seed, n_boot, level, None)}
        out[set_name] = entry
    if len(held_out) >= 2:
        emit(progress, "stats", done=len(order), total=total, message="pooled")
        subs = [tables[s]["subjects"] for s in held_out if "subjects" in tables[s]]
        sls = [tables[s]["slices"] for s in held_out if "slices" in tables[s]]
        sub = pd.concat(subs, ignore_index=True) if subs else None
        sl = pd.concat(sls, ignore_index=True) if sls else None
        ref = sub if sub is not None else sl
        models = [m for m in _model_columns(ref, thresholds) if all(m in d.columns for d in subs + sls)]
        rd = list(readers) if readers is not None else [c for c in (sub.columns if sub is not None else [])
                                                        if str(c).startswith("reader_")]
        if sub is not None:
            rd = [r for r in rd if r in sub.columns]
        out["pooled"] = {"level": _levels(sub, sl, models, rd, thresholds, seed, n_boot, level, None),
                         "centers": {}, "pooled_from": held_out}
    emit(progress, "stats", done=total, total=total)
    return out


# ----------------------------------------------------------------------------- tidy tables
def _sets_of(metrics: Mapping) -> Mapping:
    return metrics["sets"] if "sets" in metrics and isinstance(metrics["sets"], Mapping) else metrics


def _iter_blocks(metrics: Mapping):
    for set_name, entry in _sets_of(metrics).items():
        for lvl, block in (entry.get("level") or {}).items():
            yield set_name, "all", lvl, block
        for center, centry in (entry.get("centers") or {}).items():
            for lvl, block in (centry.get("level") or {}).items():
                yield set_name, str(center), lvl, block


def _g(d, *keys):
    for k in keys:
        if d is None:
            return None
        if isinstance(k, int):
            d = d[k] if isinstance(d, (list, tuple)) and len(d) > k else None
        else:
            d = d.get(k) if isinstance(d, Mapping) else None
    return d


def tidy_table(metrics: Mapping):
    """One row per set x center x level x model (pandas.DataFrame), for the dashboard and the report.

    Columns: set, center ("all" = the whole set), level, model, n, n_pos, n_clusters, auc, auc_lower,
    auc_upper (the primary CI: Obuchowski clustered when the level is clustered, else DeLong),
    ci_method, auc_delong_lower/upper, auc_boot_lower/upper, auc_clustered, auc_clustered_lower/upper,
    threshold, tp, fp, tn, fn, and value/lower/upper of accuracy, sensitivity, specificity, precision,
    npv, f1, then brier, cal_intercept, cal_slope. Accepts metrics.json or its ``sets`` part.
    """
    import pandas as pd

    rows = []
    for set_name, center, lvl, block in _iter_blocks(metrics):
        for model, mm in (block.get("models") or {}).items():
            clustered = mm.get("auc_ci_clustered") is not None
            prim = mm.get("auc_ci_clustered") if clustered else mm.get("auc_ci_delong")
            row = {"set": set_name, "center": center, "level": lvl, "model": model, "n": block.get("n"),
                   "n_pos": block.get("n_pos"), "n_clusters": block.get("n_clusters"), "auc": mm.get("auc"),
                   "auc_lower": _g(prim, 0), "auc_upper": _g(prim, 1),
                   "ci_method": "obuchowski" if clustered else "delong",
                   "auc_delong_lower": _g(mm, "auc_ci_delong", 0), "auc_delong_upper": _g(mm, "auc_ci_delong", 1),
                   "auc_boot_lower": _g(mm, "auc_ci_bootstrap", 0), "auc_boot_upper": _g(mm, "auc_ci_bootstrap", 1),
                   "auc_clustered": mm.get("auc_clustered"),
                   "auc_clustered_lower": _g(mm, "auc_ci_clustered", 0),
                   "auc_clustered_upper": _g(mm, "auc_ci_clustered", 1),
                   "threshold": mm.get("threshold")}
            for k in ("tp", "fp", "tn", "fn"):
                row[k] = _g(mm, "confusion", k)
            for met in B.METRICS:
                row[met] = _g(mm, met, "value")
                row[f"{met}_lower"] = _g(mm, met, "ci", 0)
                row[f"{met}_upper"] = _g(mm, met, "ci", 1)
            row["brier"] = mm.get("brier")
            row["cal_intercept"] = _g(mm, "calibration", "intercept")
            row["cal_slope"] = _g(mm, "calibration", "slope")
            rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        num = [c for c in df.columns if c not in ("set", "center", "level", "model", "ci_method")]
        df[num] = df[num].apply(pd.to_numeric, errors="coerce")
    return df


def roc_table(metrics: Mapping):
    """ROC curves with their pointwise CI band as a long table (one row per set x center x level x
    model x FPR grid point): set, center, level, model, fpr, tpr, lower, upper, auc."""
    import pandas as pd

    rows = []
    for set_name, center, lvl, block in _iter_blocks(metrics):
        for model, mm in (block.get("models") or {}).items():
            roc = mm.get("roc")
            if not roc:
                continue
            for f, t, lo, hi in zip(roc["fpr"], roc["tpr"], roc["band_lower"], roc["band_upper"]):
                rows.append({"set": set_name, "center": center, "level": lvl, "model": model, "fpr": f, "tpr": t,
                             "lower": lo, "upper": hi, "auc": mm.get("auc")})
    return pd.DataFrame(rows, columns=["set", "center", "level", "model", "fpr", "tpr", "lower", "upper", "auc"])


# ----------------------------------------------------------------------------- the CLI analysis
def load_predictions(path: str | os.PathLike, truth: str, scores: Sequence[str], cluster: str | None = None,
                     readers: Sequence[str] = ()):
    """Read a predictions CSV and check it (StatsInputError naming the file, row and column)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise StatsInputError(path, "file not found", "Give an existing predictions CSV")
    try:
        df = pd.read_csv(path)
    except Exception as err:  # pandas raises many types
        raise StatsInputError(path, f"cannot be read as CSV ({type(err).__name__}: {err})",
                              "Give a comma-separated file with a header row") from None
    if not scores:
        raise StatsInputError(path, "no --score column given", "Add --score COL (one per model)")
    for col in [truth, *scores, *([cluster] if cluster else []), *readers]:
        if col not in df.columns:
            raise StatsInputError(path, f"column '{col}' not found",
                                  f"Columns are: {', '.join(map(str, df.columns))}")
    if len(df) == 0:
        raise StatsInputError(path, "has no data rows", "Give at least one positive and one negative case")

    def _numeric(col):
        v = pd.to_numeric(df[col], errors="coerce")
        bad = v.isna() & df[col].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise StatsInputError(path, f"column '{col}' has a non-numeric value '{df[col].iloc[i]}'",
                                  "Give numbers only", row=i + 2)
        return v.to_numpy(dtype=float)

    def _complete(col, v, what):
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StatsInputError(path, f"column '{col}' has a missing or non-finite value", what, row=i + 2)

    y = _numeric(truth)
    _complete(truth, y, "Remove cases without a known truth")
    ok = np.isin(y, (0.0, 1.0))
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise StatsInputError(path, f"column '{truth}' has a value other than 0/1 ({y[i]:g})",
                              "Code the truth as 1 = positive, 0 = negative", row=i + 2)
    m = int(y.sum())
    if m == 0 or m == y.size:
        raise StatsInputError(path, f"column '{truth}' has only {'negatives (0)' if m == 0 else 'positives (1)'} "
                              f"in {y.size} rows; an AUC needs both classes", "Include positive and negative cases")
    cols = {truth: y.astype(int)}
    for s in scores:
        v = _numeric(s)
        _complete(s, v, "Remove or impute cases without a score")
        cols[s] = v
    for r in readers:
        v = _numeric(r)
        _complete(r, v, "Give a 0/1 read for every case")
        bad = ~np.isin(v, (0.0, 1.0))
        if bad.any() and reader_scale(v) != "rating":  # 0/1 reads, or 1-5 ratings (not a mix)
            i = int(np.flatnonzero(bad)[0])
            raise StatsInputError(path, f"reader column '{r}' has a value other than 0/1 ({v[i]:g})",
                                  "Code each read as 1 = positive, 0 = negative (or every read as a 1-5 rating)",
                                  row=i + 2)
        cols[r] = v
    out = pd.DataFrame(cols)
    if cluster:
        c = df[cluster]
        if c.isna().any():
            i = int(np.flatnonzero(c.isna().to_numpy())[0])
            raise StatsInputError(path, f"cluster column '{cluster}' has a missing value",
                                  "Give every row its subject id", row=i + 2)
        out[cluster] = c.astype(str).to_numpy()
    return out


def _subject_level(df, y, S, cluster, truth, how, n_boot, seed, level) -> dict:
    """Subject-level AUCs from slice rows: scores aggregated per cluster (``how``), truth = the
    cluster's maximum slice label. Null scores and a note when a class is missing at that level."""
    import pandas as pd

    names = list(S)
    tab = pd.DataFrame({"__cluster": df[cluster].to_numpy(), "__truth": y.astype(int),
                        **{f"__s{k}": S[s] for k, s in enumerate(names)}})
    agg = aggregate_subjects(tab, [f"__s{k}" for k in range(len(names))], by="__cluster", truth="__truth", how=how)
    mixed = int((tab.groupby("__cluster")["__truth"].nunique() > 1).sum())
    ys = agg["__truth"].to_numpy()
    out: dict[str, Any] = {"aggregate": how, "truth": "maximum slice label of the subject", "n": int(ys.size),
                           "n_pos": int(ys.sum()), "mixed_label_clusters": mixed, "scores": {}}
    if ys.sum() in (0, ys.size):
        out["scores"] = None
        out["note"] = "only one class at subject level: no subject-level AUC"
        return out
    sub = {s: agg[f"__s{k}"].to_numpy() for k, s in enumerate(names)}
    boot = R.bootstrap_aucs(ys, sub, n_boot=n_boot, seed=seed)
    for k, s in enumerate(names):
        a = R.auc(ys, sub[s])
        out["scores"][s] = {"auc": a, "auc_ci_delong": list(R.auc_ci_delong(ys, sub[s], level)),
                            "auc_ci_bootstrap": list(R._percentile_ci(boot["aucs"][k], level))}
    return out


def analyze_predictions(df, truth: str, scores: Sequence[str], cluster: str | None = None,
                        readers: Sequence[str] = (), threshold: float | None = None, n_boot: int = 2000,
                        seed: int = 0, level: float = 0.95, source: str = "predictions",
                        aggregate: str = "mean", progress: ProgressCallback | None = None) -> dict:
    """The statistics ``python -m nhb_core stats --json`` prints (schema in docs/stats.md).

    Returns
    -------
    {"n", "n_pos", "n_neg", "n_clusters", "level", "n_boot", "seed", "threshold",
     "scores": {col: {"auc", "auc_var_delong", "auc_ci_delong", "auc_ci_bootstrap", ["auc_clustered",
     "auc_clustered_ci", "auc_var_clustered", "auc_ci_cluster_bootstrap"], ["threshold_metrics"]}},
     "comparisons": [{"a", "b", "auc_diff", "ci", "delong_z", "delong_p", "cov", ...}],
     "readers": {reader: {"mcnemar_p", "mcnemar_p_sensitivity", "mcnemar_p_specificity", "precision_p",
     "model", "confusion", metrics..., "vs": {score: {...}}}}, "reader_agreement", "consensus"}
    """
    scores = list(scores)
    readers = list(readers)
    y = as_labels(df[truth].to_numpy(), source=source, column=truth)
    n, m = int(y.size), int(y.sum())
    S = {s: as_scores(df[s].to_numpy(), n, source=source, column=s) for s in scores}
    codes = R._cluster_codes(df[cluster].to_numpy(), n, source) if cluster else None
    zc = R._z(level)
    if readers and threshold is None:
        if all(np.isin(S[s], (0.0, 1.0)).all() for s in scores):
            threshold = 0.5
        else:
            raise StatsInputError("--threshold", "comparing with a reader needs a threshold for the model scores",
                                  "Add --threshold X, fixed in advance (e.g. Youden on the validation set)")
    out: dict[str, Any] = {"n": n, "n_pos": m, "n_neg": n - m,
                           "n_clusters": int(codes.max()) + 1 if codes is not None else None,
                           "level": level, "n_boot": int(n_boot), "seed": seed, "threshold": threshold,
                           "scores": {}, "comparisons": [], "readers": {}}
    boot = R.bootstrap_aucs(y, S, n_boot=n_boot, seed=seed, progress=progress)
    boot_c: Any = R.bootstrap_aucs(y, S, n_boot=n_boot, seed=seed, cluster=codes) if cluster else None
    names = list(S)
    Sm = np.vstack([S[s] for s in names])
    V10, V01 = R._placements_multi(y, Sm, m, n - m)
    aucs, cov = V10.mean(1), R._cov_from_placements(V10, V01)
    if cluster:
        aucs_c, cov_c = R.clustered_cov(y, Sm, codes)
    for k, s in enumerate(names):
        e: dict[str, Any] = {"auc": float(aucs[k]), "auc_var_delong": float(cov[k, k]),
                             "auc_se_delong": float(np.sqrt(cov[k, k])) if np.isfinite(cov[k, k]) else _NAN,
                             "auc_ci_delong": list(R._ci_trunc(float(aucs[k]), float(cov[k, k]), zc)),
                             "auc_ci_bootstrap": list(R._percentile_ci(boot["aucs"][k], level))}
        if cluster:
            ca = R.clustered_auc(y, S[s], codes, level)
            e.update({"auc_clustered": ca["auc"], "auc_clustered_ci": ca["ci"], "auc_ci_clustered": ca["ci"],
                      "auc_clustered_ci_raw": ca["ci_raw"], "auc_var_clustered": ca["var"],
                      "auc_se_clustered": ca["se"], "clustered_components": ca["components"],
                      "auc_ci_cluster_bootstrap": list(R._percentile_ci(boot_c["aucs"][k], level))})
        if threshold is not None:
            tm = B.threshold_metrics(y, S[s], threshold, level, source=source, column=s)
            e["threshold_metrics"] = tm
        out["scores"][s] = e
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            r = R._paired_from(aucs[i], aucs[j], cov[i, i], cov[j, j], cov[i, j], zc)
            comp = {"a": names[i], "b": names[j], "auc_a": r["auc_a"], "auc_b": r["auc_b"], "auc_diff": r["auc_diff"],
                    "ci": r["ci"], "se": r["se"], "cov": r["cov"], "delong_z": r["z"], "delong_p": r["p_value"]}
            if cluster:
                rc = R._paired_from(aucs_c[i], aucs_c[j], cov_c[i, i], cov_c[j, j], cov_c[i, j], zc)
                comp.update({"clustered_z": rc["z"], "clustered_p": rc["p_value"], "clustered_ci": rc["ci"]})
            out["comparisons"].append(comp)
    if cluster:
        out["subject_level"] = _subject_level(df, y, S, cluster, truth, aggregate, n_boot, seed, level)
    reads, ratings = {}, {}
    for r in readers:
        reads[r], ratings[r] = as_reader(df[r].to_numpy(), n, source=source, column=r)
    for r, v in reads.items():
        rb = v == 1
        c = B.confusion(y, rb)
        met = B._metrics_from_confusion(c, level)
        entry: dict[str, Any] = {"confusion": c, **{k: _prop_block(met[k]) for k in B.METRICS}, "vs": {}}
        if ratings[r] is not None:  # a 1-5 rating column: calls at rating >= 3, and the reader's AUC
            entry.update({"scale": "rating", "positive_rating": RATING_POSITIVE,
                          "auc": R.auc(y, ratings[r]), "auc_ci_delong": list(R.auc_ci_delong(y, ratings[r], level))})
        for s in names:
            cmp = B.compare_to_reader(y, S[s] >= threshold, rb, n_boot=n_boot, seed=seed)
            entry["vs"][s] = {k: cmp[k] for k in ("mcnemar_p", "mcnemar_p_sensitivity", "mcnemar_p_specificity",
                                                  "precision_p", "tables")}
            entry["vs"][s]["precision_diff"] = cmp["precision"]["diff"]
            entry["vs"][s]["precision_diff_ci"] = cmp["precision"]["ci"]
        first = entry["vs"][names[0]]
        entry.update({"model": names[0], "mcnemar_p": first["mcnemar_p"],
                      "mcnemar_p_sensitivity": first["mcnemar_p_sensitivity"],
                      "mcnemar_p_specificity": first["mcnemar_p_specificity"], "precision_p": first["precision_p"]})
        out["readers"][r] = entry
    if len(reads) >= 2:
        rn = list(reads)
        out["reader_agreement"] = {"pairs": [{"a": rn[i], "b": rn[j], **B.cohens_kappa(reads[rn[i]], reads[rn[j]])}
                                             for i in range(len(rn)) for j in range(i + 1, len(rn))]}
        cons = B.reader_consensus(reads)
        c = B.confusion(y, cons == 1)
        met = B._metrics_from_confusion(c, level)
        out["consensus"] = {"rule": "majority", "readers": rn, "confusion": c,
                            **{k: _prop_block(met[k]) for k in B.METRICS},
                            "vs": {s: {k: v for k, v in B.compare_to_reader(y, S[s] >= threshold, cons == 1,
                                                                             n_boot=n_boot, seed=seed).items()
                                       if k != "precision"} for s in names}}
    return out
