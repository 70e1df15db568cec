"""Leakage-proof train / validation / test splits of a slice dataset, and their audit.

A split is a dict (saved as ``split.json``, schema in ``docs/dataset.md``)::

    {"version": 1, "unit": "subject"|"slice", "leaky": bool, "seed": 0,
     "dev_centers": ["A"], "test_size": 0.2, "val_size": 0.15,
     "sets": {"train": [...], "val": [...], "test": [...], "external:B": [...]},
     "n_shared_subjects": 0, "shared_subjects": {"train|test": 0, ...},
     "folds": [{"fold": 0, "train": [...], "val": [...]}, ...],   # only with folds=K
     "dataset_sha256": "..."}

With ``unit="subject"`` (the default) every set lists subject ids, and a subject's
slices all go to the same set. ``unit="slice"`` reproduces the original study's
design (slices pooled, then split): the sets list slice keys
``"<subject_id>#<slice_index>"``, slices of one subject end up in train and test,
and the split is marked ``"leaky": true`` so that every result built on it
carries a visible leakage flag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nhb_core.errors import ConfigError, DatasetError
from nhb_core.fileio import atomic_write_json, read_json, sha256_json

SPLIT_VERSION = 1
CORE_SETS = ("train", "val", "test")


# --------------------------------------------------------------------------- helpers


def slice_key(subject_id: Any, slice_index: Any) -> str:
    """The key of one slice in a slice-unit split: ``"<subject_id>#<slice_index>"``."""
    return f"{subject_id}#{int(slice_index)}"


def _index_of(dataset_or_index: Any) -> tuple[pd.DataFrame, str | None]:
    """(index DataFrame, dataset_sha256 or None) from a SliceDataset, a folder or a DataFrame."""
    if isinstance(dataset_or_index, pd.DataFrame):
        return dataset_or_index, None
    if isinstance(dataset_or_index, (str, os.PathLike)):
        from nhb_core.slices import load_dataset

        dataset_or_index = load_dataset(dataset_or_index)
    index = getattr(dataset_or_index, "index", None)
    if not isinstance(index, pd.DataFrame):
        raise TypeError("expected a SliceDataset, a dataset folder or an index DataFrame")
    meta = getattr(dataset_or_index, "meta", None) or {}
    return index, meta.get("dataset_sha256")


def _index_sha(index: pd.DataFrame) -> str:
    cols = [c for c in ("subject_id", "center", "label", "slice_index", "image_sha256") if c in index.columns]
    return sha256_json(index[cols].astype(str).values.tolist())


def _check_index(index: pd.DataFrame, source: str = "index") -> None:
    missing = [c for c in ("subject_id", "center", "label", "slice_index") if c not in index.columns]
    if missing:
        raise DatasetError(source, f"the slice index lacks column(s) {', '.join(missing)}",
                           "Give the index.csv written by prepare")
    if len(index) == 0:
        raise DatasetError(source, "the dataset has no slice", "Prepare a dataset with at least one subject")


def subject_table(index: pd.DataFrame) -> pd.DataFrame:
    """One row per subject (first-seen order): subject_id, center, label, n_slices."""
    idx = index.assign(subject_id=index["subject_id"].astype(str), center=index["center"].astype(str))
    g = idx.groupby("subject_id", sort=False)
    t = g.agg(center=("center", "first"), label=("label", "first"), n_slices=("slice_index", "size")).reset_index()
    bad = g["label"].nunique()
    if (bad > 1).any():
        raise DatasetError("index", f"subject {bad[bad > 1].index[0]!r} has slices with different labels",
                           "Fix the manifest label and rerun prepare")
    t["label"] = t["label"].astype(int)
    return t


def _stratified_take(ids: np.ndarray, labels: np.ndarray, frac: float, rng: np.random.Generator,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``ids`` into (rest, taken) with about ``frac`` of each label in ``taken``.

    The taken count is ``round(frac * n)`` overall, shared between labels by largest
    remainder; every label with at least 2 members keeps one on each side when the
    total allows. Deterministic for a given generator state.
    """
    n = len(ids)
    if frac <= 0 or n == 0:
        return ids, ids[:0]
    total = int(round(frac * n))
    total = min(max(total, 1), n - 1) if n >= 2 else 0
    classes = sorted(np.unique(labels).tolist())
    # sorted members: the result does not depend on the index's row order
    members = {c: np.array(sorted(ids[labels == c].tolist()), dtype=ids.dtype) for c in classes}
    exact = {c: frac * len(members[c]) for c in classes}
    take = {c: int(np.floor(exact[c])) for c in classes}
    # largest remainder to reach the total
    rem = sorted(classes, key=lambda c: (-(exact[c] - take[c]), c))
    i = 0
    while sum(take.values()) < total and i < 10 * len(classes):
        c = rem[i % len(classes)]
        if take[c] < len(members[c]):
            take[c] += 1
        i += 1
    # a class with >= 2 members gets at least one on each side, when possible
    for c in classes:
        m = len(members[c])
        if m >= 2 and take[c] == 0 and total > 0:
            take[c] = 1
        if m >= 2 and take[c] == m:
            take[c] = m - 1
    taken, rest = [], []
    for c in classes:
        perm = rng.permutation(members[c])
        taken.append(perm[: take[c]])
        rest.append(perm[take[c]:])
    taken_a = np.concatenate(taken) if taken else ids[:0]
    rest_a = np.concatenate(rest) if rest else ids[:0]
    return np.sort(rest_a), np.sort(taken_a)


def _stratified_folds(ids: np.ndarray, labels: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """K stratified folds: each label's members shuffled and dealt round-robin."""
    folds: list[list[Any]] = [[] for _ in range(k)]
    start = 0
    for c in sorted(np.unique(labels).tolist()):
        perm = rng.permutation(np.array(sorted(ids[labels == c].tolist()), dtype=ids.dtype))
        for j, s in enumerate(perm):
            folds[(start + j) % k].append(s)
        start = (start + len(perm)) % k  # keep fold sizes balanced across labels
    return [np.sort(np.array(f, dtype=ids.dtype)) for f in folds]


def _sorted_list(a) -> list[str]:
    return sorted(str(x) for x in a)


# --------------------------------------------------------------------------- make_split



def _train_val_test(members: np.ndarray, labels: np.ndarray, n: int, test_size: float, val_size: float,
                    folds: int | None, rng: np.random.Generator) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """Stratified test, then validation (``val_size`` of all ``n``) from the rest, then optional K folds.

    ``members`` are subject ids or slice keys; the same code serves both split units.
    """
    trval, test = _stratified_take(members, labels, float(test_size), rng)
    lab = dict(zip(members, labels))
    trval_lab = np.array([lab[s] for s in trval])
    val_frac = float(val_size) * n / max(len(trval), 1)
    train, val = _stratified_take(trval, trval_lab, min(val_frac, 0.99), rng)
    sets = {"train": _sorted_list(train), "val": _sorted_list(val), "test": _sorted_list(test)}
    fold_list: list[dict[str, Any]] = []
    if folds:
        k = int(folds)
        if k > len(trval):
            raise ConfigError("--folds", f"{k} folds but only {len(trval)} non-test members", "Use fewer folds")
        for i, f in enumerate(_stratified_folds(trval, trval_lab, k, rng)):
            fs = set(f.tolist())
            fold_list.append({"fold": i, "train": _sorted_list(s for s in trval if s not in fs),
                              "val": _sorted_list(f)})
    return sets, fold_list

def make_split(dataset_or_index: Any, dev_centers: str | list[str] | None = None, test_size: float = 0.2,
               val_size: float = 0.15, folds: int | None = None, seed: int = 0, unit: str = "subject") -> dict:
    """Split a dataset into train / val / test (development centers) and external sets.

    Parameters
    ----------
    dataset_or_index : SliceDataset, dataset folder path, or index DataFrame
        Needs columns ``subject_id, center, label, slice_index``.
    dev_centers : str or list of str or None
        Development center(s); None = ``"A"`` when present, else the center with the
        most subjects. Every other center becomes an ``"external:<center>"`` set.
        A comma-separated string is accepted.
    test_size, val_size : float
        Fractions of the development units (subjects, or slices with
        ``unit="slice"``) in the test and validation sets, stratified by label;
        validation units are drawn from the non-test units (for early stopping).
    folds : int or None
        K >= 2 adds ``"folds"``: K stratified folds of the non-test development
        units, each ``{"fold": i, "train": [...], "val": [...]}`` (the fold's
        held-out part is its validation set).
    seed : int
        Fixes every random choice: same inputs + seed -> identical split.
    unit : {"subject", "slice"}
        ``"subject"``: sets of subject ids, zero overlap. ``"slice"``: the original
        study's slice-level design (sets of slice keys), marked ``leaky``.

    Returns
    -------
    dict
        The split.json content (see module docstring).
    """
    if unit not in ("subject", "slice"):
        raise ConfigError("--unit", f"unit must be 'subject' or 'slice', got {unit!r}", "Use subject (recommended) or slice")
    for name, v in (("test_size", test_size), ("val_size", val_size)):
        if not (isinstance(v, (int, float)) and 0 <= float(v) < 1):
            raise ConfigError(f"--{name.replace('_', '-')}", f"{name} must be a fraction in [0, 1), got {v!r}",
                              f"Use e.g. {name} 0.2")
    if float(test_size) + float(val_size) >= 1:
        raise ConfigError("--test-size", f"test_size + val_size = {test_size + val_size:g} leaves no training data",
                          "Make test_size + val_size smaller than 1")
    if folds is not None and (int(folds) < 2):
        raise ConfigError("--folds", f"folds must be at least 2, got {folds}", "Use e.g. --folds 5 or leave it out")

    index, ds_sha = _index_of(dataset_or_index)
    _check_index(index)
    subjects = subject_table(index)
    centers = subjects.groupby("center", sort=True)["subject_id"].size()
    if dev_centers is None:
        dev = ["A"] if "A" in centers.index else [str(centers.sort_values(ascending=False, kind="stable").index[0])]
    else:
        dev = [c.strip() for c in dev_centers.split(",")] if isinstance(dev_centers, str) else [str(c) for c in dev_centers]
        dev = [c for c in dev if c]
        unknown = [c for c in dev if c not in centers.index]
        if unknown or not dev:
            raise ConfigError("--dev-centers", f"center(s) {', '.join(unknown) or '(none)'} not in the dataset "
                              f"(centers: {', '.join(centers.index)})", "Name development centers that exist")
    dev = sorted(set(dev))
    rng = np.random.default_rng(seed)

    dev_subj = subjects[subjects["center"].isin(dev)]
    ext_centers = [c for c in centers.index if c not in dev]
    idx = index.assign(subject_id=index["subject_id"].astype(str), center=index["center"].astype(str))

    if unit == "subject":
        ids = dev_subj["subject_id"].to_numpy(dtype=object)
        labels = dev_subj["label"].to_numpy()
        n = len(ids)
        if n < 3:
            raise DatasetError("dataset", f"the development center(s) {', '.join(dev)} hold only {n} subject(s)",
                               "A split needs at least 3 development subjects")
        sets, fold_list = _train_val_test(ids, labels, n, test_size, val_size, folds, rng)
        for c in ext_centers:
            sets[f"external:{c}"] = _sorted_list(subjects.loc[subjects["center"] == c, "subject_id"])
    else:
        dev_rows = idx[idx["center"].isin(dev)]
        keys = np.array([slice_key(s, z) for s, z in zip(dev_rows["subject_id"], dev_rows["slice_index"])], dtype=object)
        labels = dev_rows["label"].to_numpy().astype(int)
        n = len(keys)
        if n < 3:
            raise DatasetError("dataset", f"the development center(s) hold only {n} slice(s)",
                               "A split needs at least 3 development slices")
        sets, fold_list = _train_val_test(keys, labels, n, test_size, val_size, folds, rng)
        for c in ext_centers:
            r = idx[idx["center"] == c]
            sets[f"external:{c}"] = _sorted_list(slice_key(s, z) for s, z in zip(r["subject_id"], r["slice_index"]))

    shared = _shared_counts(sets, unit)
    split = {
        "version": SPLIT_VERSION,
        "unit": unit,
        "leaky": unit == "slice" or any(v > 0 for v in shared.values()),
        "seed": int(seed),
        "dev_centers": dev,
        "test_size": float(test_size),
        "val_size": float(val_size),
        "sets": sets,
        "n_subjects": {k: len(_subjects_of(v, unit)) for k, v in sets.items()},
        "n_shared_subjects": shared.get("train|test", 0),
        "shared_subjects": shared,
        "dataset_sha256": ds_sha or _index_sha(index),
    }
    if folds:
        split["folds"] = fold_list
    return split


def _subjects_of(members, unit: str) -> set[str]:
    if unit == "slice":
        return {m.rsplit("#", 1)[0] for m in members}
    return {str(m) for m in members}


def _shared_counts(sets: dict[str, list[str]], unit: str) -> dict[str, int]:
    names = list(sets)
    subj = {k: _subjects_of(v, unit) for k, v in sets.items()}
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"{a}|{b}"] = len(subj[a] & subj[b])
    return out


def shared_subjects(split: dict) -> dict[str, list[str]]:
    """Subjects present in two sets, per pair ``"a|b"`` (only pairs that share any)."""
    unit = split.get("unit", "subject")
    names = set_names(split)
    subj = {k: _subjects_of(split["sets"][k], unit) for k in names}
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = subj[a] & subj[b]
            if common:
                out[f"{a}|{b}"] = sorted(common)
    return out


# --------------------------------------------------------------------------- io


def save_split(split: dict, path: str | os.PathLike) -> Path:
    """Write split.json atomically; returns the path."""
    return atomic_write_json(path, split)


def load_split(path: str | os.PathLike) -> dict:
    """Read and check a split.json. Raises :class:`DatasetError` naming the file."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(p, "the split file does not exist", "Run `python -m nhb_core split` first")
    try:
        split = read_json(p)
    except (OSError, ValueError) as err:
        raise DatasetError(p, f"not a readable JSON split ({err})", "Recreate it with `python -m nhb_core split`") from None
    _validate_split(split, p)
    return split


def _validate_split(split: Any, source: Any = "split") -> None:
    if not isinstance(split, dict) or not isinstance(split.get("sets"), dict):
        raise DatasetError(source, "not a split (no 'sets' object)", "Recreate it with `python -m nhb_core split`")
    if split.get("unit") not in ("subject", "slice"):
        raise DatasetError(source, f"unknown unit {split.get('unit')!r}", "Use unit subject or slice")
    for k, v in split["sets"].items():
        if not isinstance(v, list):
            raise DatasetError(source, f"set {k!r} is not a list", "Recreate the split")
    if "train" not in split["sets"]:
        raise DatasetError(source, "no train set", "Recreate the split")


def set_names(split: Mapping[str, Any]) -> list[str]:
    """Set names in a stable order: train, val, test, then external:* sorted."""
    sets = split["sets"]
    core = [s for s in CORE_SETS if s in sets]
    rest = sorted(s for s in sets if s not in CORE_SETS)
    return core + rest


def fold_split(split: dict, fold: int) -> dict:
    """The split of fold ``fold``: train/val replaced by the fold's; test and external kept.

    The result is an ordinary split dict (with ``"fold": fold``) that training and
    evaluation use like any other.
    """
    folds = split.get("folds") or []
    match = [f for f in folds if int(f.get("fold", -1)) == int(fold)]
    if not match:
        raise DatasetError("split", f"the split has no fold {fold} ({len(folds)} folds)", "Use a fold that exists")
    f = match[0]
    out = {k: v for k, v in split.items() if k != "folds"}
    out["sets"] = dict(split["sets"], train=list(f["train"]), val=list(f["val"]))
    out["fold"] = int(fold)
    shared = _shared_counts(out["sets"], out["unit"])
    out["shared_subjects"] = shared
    out["n_shared_subjects"] = shared.get("train|test", 0)
    out["n_subjects"] = {k: len(_subjects_of(v, out["unit"])) for k, v in out["sets"].items()}
    return out


def set_rows(split: Mapping[str, Any], index_df: pd.DataFrame, set_name: str) -> np.ndarray:
    """Dataset rows (positions in ``slices.npy``) of one set, sorted, int64.

    Works for both units: a subject set takes every slice of its subjects, a slice
    set its listed slices. Uses the index's ``row`` column when present (else the
    DataFrame's positions). Raises :class:`DatasetError` when the set is unknown or
    names subjects/slices the dataset lacks (a split made on another dataset).
    """
    if set_name not in split["sets"]:
        raise DatasetError("split", f"no set named {set_name!r} (sets: {', '.join(set_names(split))})",
                           "Use one of the split's sets")
    members = [str(m) for m in split["sets"][set_name]]
    sid = index_df["subject_id"].astype(str).to_numpy()
    if split.get("unit") == "slice":
        keys = np.array([slice_key(s, z) for s, z in zip(sid, index_df["slice_index"])], dtype=object)
    else:
        keys = sid
    want = set(members)
    hit = np.fromiter((k in want for k in keys), dtype=bool, count=len(keys))
    found = set(keys[hit].tolist())
    missing = want - found
    if missing:
        raise DatasetError("split", f"set {set_name!r} names {len(missing)} {'slice' if split.get('unit') == 'slice' else 'subject'}(s) "
                           f"absent from the dataset (e.g. {sorted(missing)[0]!r})",
                           "Make the split from this dataset (`python -m nhb_core split --dataset DIR`)")
    rows = index_df["row"].to_numpy()[hit] if "row" in index_df.columns else np.flatnonzero(hit)
    return np.sort(rows.astype(np.int64))


# --------------------------------------------------------------------------- audit


@dataclass
class AuditReport:
    """Result of :func:`audit`.

    Attributes
    ----------
    leaky : bool
        True when any subject or identical image is in two sets (or folds leak
        into test), or the split itself is marked leaky.
    shared_subjects : dict
        ``{"train|test": [subject ids], ...}`` (only pairs that share subjects).
    duplicate_images : pd.DataFrame
        One row per identical image found in two sets: ``kind`` ("slice" for an
        identical slice array, "volume" for an identical T1 file), ``sha256``,
        ``sets`` ("train,test"), ``subjects`` ("s1,s2"), ``n``.
    balance : pd.DataFrame
        Per set and center: ``set, center, n_subjects, n_slices, n_pos, n_neg, pos_rate``
        (subject counts; ``pos_rate`` = n_pos / n_subjects) plus an ``all`` center row per set.
    unit : str
    marked_leaky : bool
        The split's own ``leaky`` mark (slice-unit splits).
    problems : list of str
        Human-readable findings (empty when clean).
    """

    leaky: bool
    shared_subjects: dict[str, list[str]]
    duplicate_images: pd.DataFrame
    balance: pd.DataFrame
    unit: str = "subject"
    marked_leaky: bool = False
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"leaky": self.leaky, "unit": self.unit, "marked_leaky": self.marked_leaky,
                "shared_subjects": {k: list(v) for k, v in self.shared_subjects.items()},
                "n_shared_subjects": {k: len(v) for k, v in self.shared_subjects.items()},
                "duplicate_images": self.duplicate_images.to_dict(orient="records"),
                "balance": self.balance.to_dict(orient="records"), "problems": list(self.problems)}


def audit(dataset: Any, split: dict | str | os.PathLike) -> AuditReport:
    """Check a split against its dataset for leakage, and tabulate label balance.

    Parameters
    ----------
    dataset : SliceDataset, dataset folder, or index DataFrame
        The index needs ``subject_id, center, label, slice_index``; with
        ``image_sha256`` / ``source_sha256`` identical images are searched too.
    split : dict or path to split.json

    Returns
    -------
    AuditReport
    """
    if not isinstance(split, dict):
        split = load_split(split)
    else:
        _validate_split(split)
    index, _ = _index_of(dataset)
    _check_index(index)
    unit = split.get("unit", "subject")
    names = set_names(split)
    problems: list[str] = []

    # which set(s) each slice row belongs to
    row_sets: dict[str, np.ndarray] = {}
    idx = index.reset_index(drop=True).copy()
    idx["subject_id"] = idx["subject_id"].astype(str)
    idx["center"] = idx["center"].astype(str)
    local = idx.drop(columns=["row"], errors="ignore")  # positions, not the stored row column
    for name in names:
        row_sets[name] = set_rows(split, local, name)  # DatasetError when the split is not of this dataset

    shared = shared_subjects(split)
    for pair, subs in shared.items():
        problems.append(f"{len(subs)} subject(s) in both {pair.replace('|', ' and ')}")
    # folds: nothing of a fold may touch test or the external sets
    for f in split.get("folds") or []:
        fs = _subjects_of(list(f["train"]) + list(f["val"]), unit)
        for other in [n for n in names if n == "test" or n.startswith("external:")]:
            common = fs & _subjects_of(split["sets"][other], unit)
            if common:
                key = f"fold{f['fold']}|{other}"
                shared[key] = sorted(common)
                problems.append(f"{len(common)} subject(s) of fold {f['fold']} also in {other}")

    dup_rows = []
    for kind, col in (("slice", "image_sha256"), ("volume", "source_sha256")):
        if col not in idx.columns:
            continue
        parts = []
        for name in names:
            r = row_sets[name]
            parts.append(pd.DataFrame({"pos": r, "set": name}))
        if not parts:
            continue
        m = pd.concat(parts, ignore_index=True)
        m = m.join(idx[[col, "subject_id"]], on="pos")
        g = m.groupby(col)
        nsets = g["set"].nunique()
        for sha in nsets[nsets > 1].index:
            sub = m[m[col] == sha]
            if kind == "volume" and sub["subject_id"].nunique() < 2:
                continue  # one subject's own slices: that is the shared-subject finding
            dup_rows.append({"kind": kind, "sha256": sha, "sets": ",".join(sorted(sub["set"].unique())),
                             "subjects": ",".join(sorted(sub["subject_id"].unique())), "n": int(len(sub))})
    dups = pd.DataFrame(dup_rows, columns=["kind", "sha256", "sets", "subjects", "n"])
    if len(dups):
        nsl = int((dups["kind"] == "slice").sum())
        nvol = int((dups["kind"] == "volume").sum())
        if nsl:
            problems.append(f"{nsl} identical slice image(s) in more than one set")
        if nvol:
            problems.append(f"{nvol} identical T1 volume(s) under different subjects in more than one set")

    # balance per set and center (subject counts)
    bal = []
    for name in names:
        r = idx.loc[row_sets[name]]
        for center, part in [(c, r[r["center"] == c]) for c in sorted(r["center"].unique())] + [("all", r)]:
            subj = part.drop_duplicates("subject_id")
            n_sub = len(subj)
            n_pos = int((subj["label"].astype(int) == 1).sum())
            bal.append({"set": name, "center": center, "n_subjects": n_sub, "n_slices": int(len(part)),
                        "n_pos": n_pos, "n_neg": n_sub - n_pos,
                        "pos_rate": (n_pos / n_sub) if n_sub else float("nan")})
    balance = pd.DataFrame(bal, columns=["set", "center", "n_subjects", "n_slices", "n_pos", "n_neg", "pos_rate"])

    marked = bool(split.get("leaky", False))
    if marked and not problems:
        problems.append("the split is marked leaky")
    leaky = bool(marked or shared or len(dups))
    return AuditReport(leaky=leaky, shared_subjects=shared, duplicate_images=dups, balance=balance, unit=unit,
                       marked_leaky=marked, problems=problems)


def cohort_summary(ds_dir: Path, split: Mapping[str, Any]) -> dict[str, Any]:
    """Table 1 and the flow counts, from the prepared dataset and the split.

    Returns ``{"table1": [rows], "flow": {...}}``; a row of table 1 is
    ``{"center", "group" ("NHB injury"/"control" by label), "n", <covariate>: "mean ± SD" | "k (p%)"}``;
    ``flow`` holds the number of subjects and slices in the dataset and per set.
    """
    import numpy as np
    import pandas as pd

    subjects = pd.read_csv(ds_dir / "subjects.csv")
    index = pd.read_csv(ds_dir / "index.csv")
    skip = {"subject_id", "center", "label", "t1_path", "roi_path", "row", "manifest_row", "n_slices", "t1", "roi"}
    rows = []
    covs = [c for c in subjects.columns if c not in skip and not c.startswith("reader_")
            and not c.endswith("_path") and not c.endswith("sha256")]
    groups = [("all", subjects)] + [(c, g) for c, g in subjects.groupby("center", sort=True)]
    for center, g in groups:
        for lab, gg in [("all", g)] + [(int(k), v) for k, v in g.groupby("label", sort=True)]:
            row: dict[str, Any] = {"center": str(center),
                                   "group": {"all": "all", 1: "injury (label 1)", 0: "no injury (label 0)"}.get(lab, str(lab)),
                                   "n": int(len(gg)),
                                   "slices": int(index["subject_id"].astype(str).isin(gg["subject_id"].astype(str)).sum())}
            for c in covs:
                col = gg[c]
                if pd.api.types.is_numeric_dtype(col) and col.nunique(dropna=True) > 2:
                    v = col.dropna().astype(float)
                    row[c] = f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else (f"{v.mean():.1f}" if len(v) else "")
                elif col.nunique(dropna=True) <= 6:
                    vc = col.dropna().astype(str).value_counts()
                    row[c] = "; ".join(f"{k}: {n} ({100 * n / max(len(gg), 1):.0f}%)" for k, n in vc.items())
            rows.append(row)
    flow: dict[str, Any] = {"dataset": {"subjects": int(subjects["subject_id"].nunique()), "slices": int(len(index)),
                                        "centers": sorted(map(str, subjects["center"].unique()))},
                            "sets": {}}
    for set_name in split.get("sets", {}):
        r = np.asarray(set_rows(split, index, set_name))
        sub = index.iloc[r] if len(r) else index.iloc[[]]
        subj = sub.drop_duplicates("subject_id")
        flow["sets"][set_name] = {"subjects": int(subj.shape[0]), "slices": int(len(sub)),
                                  "positives": int(subj["label"].sum()) if len(subj) else 0,
                                  "centers": sorted(map(str, sub["center"].unique()))}
    flow["n_shared_subjects"] = split.get("n_shared_subjects")
    return {"table1": rows, "flow": flow}
