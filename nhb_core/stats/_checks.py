"""Input checks shared by the statistics functions (one-line StatsInputError)."""

from __future__ import annotations

import numpy as np

from nhb_core.errors import StatsInputError


def as_labels(y, *, source: str | None = None, column: str = "truth") -> np.ndarray:
    """Truth labels as a bool array; raises StatsInputError unless every value is 0/1."""
    where = source or column
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise StatsInputError(where, f"{column} must be one column (1-D), got shape {arr.shape}",
                              "Pass one label per case")
    if arr.dtype == bool:
        return arr.copy()
    try:
        f = arr.astype(float)
    except (TypeError, ValueError):
        raise StatsInputError(where, f"column '{column}' holds non-numeric values",
                              "Code the truth as 1 = positive, 0 = negative") from None
    if np.isnan(f).any():
        bad = int(np.flatnonzero(np.isnan(f))[0])
        raise StatsInputError(where, f"column '{column}' has a missing value (case {bad + 1})",
                              "Remove cases without a known truth", row=None)
    if not np.isin(f, (0.0, 1.0)).all():
        vals = sorted(set(np.unique(f[~np.isin(f, (0.0, 1.0))]).tolist()))[:3]
        raise StatsInputError(where, f"column '{column}' has values other than 0/1 ({vals})",
                              "Code the truth as 1 = positive, 0 = negative")
    return f == 1.0


def as_scores(s, n: int | None = None, *, source: str | None = None, column: str = "score") -> np.ndarray:
    """Scores as a float64 array; NaN/inf and length mismatches raise StatsInputError."""
    where = source or column
    try:
        arr = np.asarray(s, dtype=float)
    except (TypeError, ValueError):
        raise StatsInputError(where, f"column '{column}' holds non-numeric values",
                              "Give numeric scores (probabilities or any score, higher = more likely positive)") from None
    if arr.ndim != 1:
        raise StatsInputError(where, f"{column} must be one column (1-D), got shape {arr.shape}",
                              "Pass one score per case")
    if n is not None and arr.shape[0] != n:
        raise StatsInputError(where, f"column '{column}' has {arr.shape[0]} values but the truth has {n}",
                              "Give one score per case, in the same order as the truth")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise StatsInputError(where, f"column '{column}' has a missing or non-finite value (case {bad + 1})",
                              "Remove or impute cases without a score")
    return arr


def as_binary(p, n: int | None = None, *, source: str | None = None, column: str = "reader",
              allow_missing: bool = False) -> np.ndarray:
    """0/1 predictions (e.g. a reader) as float array (NaN kept only when allow_missing)."""
    where = source or column
    try:
        arr = np.asarray(p, dtype=float)
    except (TypeError, ValueError):
        raise StatsInputError(where, f"column '{column}' has values other than 0/1",
                              "Code each read as 1 = positive, 0 = negative") from None
    if arr.ndim != 1:
        raise StatsInputError(where, f"{column} must be one column (1-D)", "Pass one value per case")
    if n is not None and arr.shape[0] != n:
        raise StatsInputError(where, f"column '{column}' has {arr.shape[0]} values but the truth has {n}",
                              "Give one value per case, in the same order as the truth")
    nan = np.isnan(arr)
    if nan.any() and not allow_missing:
        raise StatsInputError(where, f"column '{column}' has a missing value (case {int(np.flatnonzero(nan)[0]) + 1})",
                              "Give a 0/1 read for every case")
    ok = nan | np.isin(arr, (0.0, 1.0))
    if not ok.all():
        vals = sorted(set(arr[~ok].tolist()))[:3]
        raise StatsInputError(where, f"column '{column}' has values other than 0/1 ({vals})",
                              "Code each read as 1 = positive, 0 = negative")
    return arr


def need_both_classes(y: np.ndarray, *, source: str | None = None, column: str = "truth") -> tuple[int, int]:
    m = int(y.sum())
    n = int(y.size - m)
    if m == 0 or n == 0:
        only = "negatives (0)" if m == 0 else "positives (1)"
        raise StatsInputError(source or column, f"column '{column}' has only {only} among {y.size} cases; "
                              "an AUC needs both classes", "Include positive and negative cases")
    return m, n


#: a reader's 1-5 confidence rating (1 definitely no injury .. 5 definitely injury) is a positive call
#: when ``rating >= RATING_POSITIVE`` (3 = "possible injury": the conservative screening read)
RATING_POSITIVE = 3
RATING_LEVELS = (1.0, 2.0, 3.0, 4.0, 5.0)


def reader_scale(values) -> str | None:
    """``"binary"`` (every read 0/1), ``"rating"`` (every read an integer 1..5, at least one above 1)
    or None (anything else, e.g. 0/1 reads mixed with 2-5 ratings). NaN (not read) is ignored.

    >>> reader_scale([0, 1, float("nan")]), reader_scale([1, 3, 5]), reader_scale([0, 3])
    ('binary', 'rating', None)
    """
    arr = np.asarray(values, dtype=float)
    v = arr[~np.isnan(arr)]
    if np.isin(v, (0.0, 1.0)).all():
        return "binary"
    if np.isin(v, RATING_LEVELS).all():
        return "rating"
    return None


def as_reader(p, n: int | None = None, *, source: str | None = None, column: str = "reader",
              allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """A reader column of 0/1 reads or of 1-5 confidence ratings.

    Returns
    -------
    calls : (n,) float 0/1 (NaN = not read, only with ``allow_missing``): the read itself, or
        ``rating >= RATING_POSITIVE`` for a rating column
    ratings : (n,) float 1..5 (NaN = not read) for a rating column, else None

    >>> as_reader([1, 4, 5, 2], column="reader_1")[0].tolist()
    [0.0, 1.0, 1.0, 0.0]
    """
    where = source or column
    try:
        arr = np.asarray(p, dtype=float)
    except (TypeError, ValueError):
        raise StatsInputError(where, f"column '{column}' has values other than 0/1 or 1-5 ratings",
                              "Code each read as 1 = positive, 0 = negative, or as a 1-5 confidence rating") from None
    if reader_scale(arr) == "rating":
        if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
            raise StatsInputError(where, f"column '{column}' has {arr.shape[0]} values but the truth has {n}",
                                  "Give one value per case, in the same order as the truth")
        nan = np.isnan(arr)
        if nan.any() and not allow_missing:
            first = int(np.flatnonzero(nan)[0]) + 1
            raise StatsInputError(where, f"column '{column}' has a missing value (case {first})",
                                  "Give a rating for every case")
        calls = np.where(nan, np.nan, (arr >= RATING_POSITIVE).astype(float))
        return calls, arr
    return as_binary(arr, n, source=source, column=column, allow_missing=allow_missing), None
