"""The cohort manifest: one CSV row per subject (format: ``docs/manifest.md``).

Two entry points:

- :func:`load_manifest` for pipeline code: parses and checks the table (files
  exist, ids unique, labels valid) and raises the first problem as
  :class:`~nhb_core.errors.ManifestError`.
- :func:`validate_manifest` for the CLI (``python -m nhb_core validate``) and the
  dashboard: checks every row, by default also loading every T1 and ROI, and
  returns **all** problems as a :class:`ValidationReport` (never raises for bad
  input).

Row numbers are spreadsheet line numbers: the header is line 1, the first
subject line 2.
"""

from __future__ import annotations

import csv
import io as _io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nhb_core.errors import InputError, ManifestError, NHBError, Problem
from nhb_core.progress import EtaEstimator, ProgressCallback, emit
from nhb_core.safety import check_label

REQUIRED_COLUMNS = ("subject_id", "center", "t1", "roi")
LABEL_COLUMNS = ("nbna", "label")
NUMERIC_COVARIATES = ("gestational_age_weeks", "postnatal_age_days", "tsb_umol_l")
COVARIATES = ("sex",) + NUMERIC_COVARIATES
READER_PREFIX = "reader_"
#: columns the loader adds; a manifest may not define them itself
DERIVED_COLUMNS = ("t1_path", "roi_path", "manifest_row")
DEFAULT_NBNA_THRESHOLD = 37.0
NBNA_RANGE = (0.0, 40.0)
#: plausible ranges of the numeric covariates: values outside are warnings, not errors
PLAUSIBLE = {"gestational_age_weeks": (22.0, 45.0), "postnatal_age_days": (0.0, 120.0), "tsb_umol_l": (0.0, 1200.0)}

_KNOWN = set(REQUIRED_COLUMNS) | set(LABEL_COLUMNS) | set(COVARIATES)
_FIX_UTF8 = "Save the file as UTF-8 CSV (Excel: Save As > 'CSV UTF-8 (Comma delimited)')"


@dataclass
class Manifest:
    """A parsed, checked cohort manifest.

    Attributes
    ----------
    df : pandas.DataFrame
        One row per subject, in file order: ``subject_id`` (str), ``center`` (str),
        ``t1`` / ``roi`` (the paths as written), ``t1_path`` / ``roi_path``
        (absolute str), ``label`` (int 0/1), ``nbna`` (float, NaN when absent),
        ``reader_*`` (float 0.0/1.0, or 1.0..5.0 for a 1-5 rating column, or NaN), the covariates present (``sex`` str,
        numeric ones float, NaN when empty), every extra column as written (str),
        and ``manifest_row`` (the line number in the file).
    path : Path
        The manifest file (absolute).
    root : Path
        Its folder: relative image paths start here.
    readers : list of str
        The ``reader_*`` column names, in file order.
    covariates : list of str
        The known covariate columns present.
    extra_columns : list of str
        Other columns, carried along unchanged.
    nbna_threshold : float
        Injury (label 1) when ``nbna <= nbna_threshold`` (rows without ``label``).
    """

    df: pd.DataFrame
    path: Path
    root: Path
    readers: list[str] = field(default_factory=list)
    covariates: list[str] = field(default_factory=list)
    extra_columns: list[str] = field(default_factory=list)
    nbna_threshold: float = DEFAULT_NBNA_THRESHOLD

    @property
    def reader_scales(self) -> dict[str, str]:
        """Per reader column: ``"rating"`` (1-5 confidence ratings: some value above 1) or ``"binary"``
        (0/1 reads). A rating >= 3 (``nhb_core.stats._checks.RATING_POSITIVE``) is a positive call."""
        return {r: ("rating" if (self.df[r] >= 2).any() else "binary") for r in self.readers}

    @property
    def subject_ids(self) -> list[str]:
        return self.df["subject_id"].tolist()

    def __len__(self) -> int:
        return len(self.df)


@dataclass
class ValidationReport:
    """The result of :func:`validate_manifest`.

    Attributes
    ----------
    path : str
        The manifest path as given.
    problems : list of Problem
        Every problem found (file-level ones have ``row=None`` or ``row=1`` for the
        header), in file order. Empty when the manifest is valid.
    warnings : list of Problem
        Things worth a look that do not stop a study (``label`` disagreeing with
        ``nbna``, implausible covariates, a T1 shared by two subjects).
    manifest : Manifest or None
        The rows without problems (all rows when valid); None when the file cannot
        be read or lacks required columns.
    cohort_table : pandas.DataFrame or None
        Subjects by center (index ``center``) x label (columns ``0``, ``1``), counts
        of ``manifest``'s rows.
    reader_table, covariate_table : pandas.DataFrame or None
        See :func:`cohort_summary`.
    n_rows : int
        Subject rows in the file.
    images_checked : bool
        Whether every T1 and ROI was loaded.
    """

    path: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    manifest: Manifest | None = None
    cohort_table: pd.DataFrame | None = None
    reader_table: pd.DataFrame | None = None
    covariate_table: pd.DataFrame | None = None
    n_rows: int = 0
    images_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def rows_with_problems(self) -> list[int]:
        return sorted({p.row for p in self.problems if p.row is not None and p.row > 1})

    def raise_first(self) -> None:
        """Raise the first problem as :class:`ManifestError` (no-op when valid)."""
        if self.problems:
            raise self.problems[0].to_error(ManifestError)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (problems, warnings, counts) for the dashboard or ``--json``."""

        def _p(p: Problem) -> dict[str, Any]:
            return {"file": p.file, "row": p.row, "column": p.column, "problem": p.problem, "fix": p.fix, "line": p.line()}

        table = None
        if self.cohort_table is not None:
            table = {str(c): {str(k): int(v) for k, v in row.items()} for c, row in self.cohort_table.iterrows()}
        return {"path": self.path, "ok": self.ok, "n_rows": self.n_rows,
                "n_subjects": 0 if self.manifest is None else len(self.manifest),
                "images_checked": self.images_checked,
                "problems": [_p(p) for p in self.problems], "warnings": [_p(p) for p in self.warnings],
                "cohort_table": table,
                "readers": [] if self.manifest is None else list(self.manifest.readers)}


# ----------------------------------------------------------------------------- parsing


class _Collector:
    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.bad_rows: set[int] = set()

    def add(self, problem: str, fix: str, row: int | None = None, column: str | None = None) -> None:
        self.problems.append(Problem(self.file, problem.rstrip(". "), fix.rstrip(". "), row, column))
        if row is not None:
            self.bad_rows.add(row)

    def warn(self, problem: str, fix: str, row: int | None = None, column: str | None = None) -> None:
        self.warnings.append(Problem(self.file, problem.rstrip(". "), fix.rstrip(". "), row, column))


def _norm_col(name: str) -> str:
    s = name.strip()
    low = s.lower()
    if low in _KNOWN or low in DERIVED_COLUMNS or low.startswith(READER_PREFIX):
        return low
    return s


def _read_table(path: Path, col: _Collector) -> tuple[list[str], list[tuple[int, list[str]]]] | None:
    """-> (header, [(line_number, cells)]) or None after recording a file-level problem."""
    if not path.exists():
        col.add("manifest not found", "Check the path of the manifest CSV")
        return None
    if path.is_dir():
        col.add("manifest is a folder, not a CSV file", "Give the path of the manifest .csv file")
        return None
    from nhb_core.safety import check_regular_file, max_manifest_bytes

    try:
        check_regular_file(path, max_manifest_bytes(), "manifest", "NHB_MAX_MANIFEST_BYTES")
    except InputError as err:
        col.add(err.problem, err.fix)
        return None
    raw = path.read_bytes()
    if raw.startswith(b"PK\x03\x04") or raw.startswith(b"\xd0\xcf\x11\xe0"):
        col.add("file is a spreadsheet workbook (.xlsx/.xls), not a CSV text file",
                "In Excel use Save As > 'CSV UTF-8 (Comma delimited)' and give that .csv file")
        return None
    if raw.startswith(b"\xff\xfe") or raw.startswith(b"\xfe\xff"):
        col.add("file is UTF-16 text, not UTF-8", _FIX_UTF8)
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        col.add(f"file is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line})", _FIX_UTF8)
        return None
    if "\x00" in text:
        col.add("file holds NUL bytes; it is not a CSV text file (an Excel .xlsx renamed?)",
                "Save the sheet as CSV UTF-8 (comma delimited)")
        return None
    if not text.strip():
        col.add("manifest is empty", "Write a header line (subject_id,center,t1,roi,nbna) and one line per subject")
        return None
    records = []
    try:
        reader = csv.reader(_io.StringIO(text, newline=""), strict=True)
        for cells in reader:
            records.append((reader.line_num, cells))
    except csv.Error as err:
        col.add(f"CSV syntax error near line {reader.line_num}: {err}", "Fix the quoting (a quote \" must be doubled inside a quoted value)",
                row=reader.line_num or None)
        return None
    header = [c for c in records[0][1]]
    data = records[1:]
    # spreadsheet row = record index + 1 (blank lines count as rows, as in Excel)
    rows = [(i + 2, cells) for i, (_ln, cells) in enumerate(data)]
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        sep = "';'" if ";" in header[0] else "a tab"
        col.add(f"the header has a single column; the file seems to use {sep} as separator", "Save it as comma-separated CSV",
                row=1)
        return None
    return header, rows


def _num(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _binary(s: str) -> int | None:
    v = _num(s)
    if v is None or v not in (0.0, 1.0):
        return None
    return int(v)


def _resolve(val: str, root: Path) -> Path:
    """A manifest path -> absolute path (relative to the manifest's folder; ``~`` expanded;
    Windows separators accepted on POSIX when the path does not exist as written)."""
    full = Path(os.path.expanduser(val))
    full = full if full.is_absolute() else root / full
    if "\\" in val and os.sep == "/" and not full.exists():
        alt = Path(os.path.expanduser(val.replace("\\", "/")))
        alt = alt if alt.is_absolute() else root / alt
        if alt.exists():
            return alt
    return full


def _parse(path: str | os.PathLike, nbna_threshold: float, col: _Collector) -> tuple[Manifest | None, list[dict]]:
    """Parse and check the table (no image loading). Returns (manifest of all parsed rows, row dicts)."""
    p = Path(path)
    table = _read_table(p, col)
    if table is None:
        return None, []
    header, rows = table
    # spreadsheets often save trailing empty columns ("a,b,c,,"): drop them when they hold nothing
    while len(header) > 1 and header[-1].strip() == "" and all(
            len(c) < len(header) or c[len(header) - 1].strip() == "" for _r, c in rows):
        header = header[:-1]
        rows = [(r, c[: len(header)] if len(c) > len(header) else c) for r, c in rows]
    names = [_norm_col(h) for h in header]
    fatal = False
    # header checks
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n == "":
            col.add(f"column {i + 1} of the header has no name", "Give every column a name or delete the empty column", row=1)
            fatal = True
        elif n in seen:
            col.add(f"column '{n}' appears twice in the header (columns {seen[n] + 1} and {i + 1})", "Keep one of them", row=1)
            fatal = True
        else:
            seen[n] = i
    for n in DERIVED_COLUMNS:
        if n in seen:
            col.add(f"column name '{n}' is reserved (the loader computes it)", "Rename that column", row=1, column=n)
            fatal = True
    fixes = {"subject_id": "Add a column 'subject_id' with a unique id per subject",
             "center": "Add a column 'center' with the acquisition site of each subject (e.g. A, B)",
             "t1": "Add a column 't1' with each subject's T1 (a NIfTI file or a DICOM series folder, relative to the manifest's folder)",
             "roi": "Add a column 'roi' with each subject's ROI mask (NIfTI), relative to the manifest's folder"}
    for n in REQUIRED_COLUMNS:
        if n not in seen:
            col.add(f"missing required column '{n}'", fixes[n], row=1, column=n)
            fatal = True
    if "nbna" not in seen and "label" not in seen:
        col.add("neither an 'nbna' nor a 'label' column", "Add 'nbna' (0..40; injury when nbna <= threshold) or 'label' (0 = control, 1 = injury)",
                row=1)
        fatal = True
    if not rows:
        col.add("manifest has a header but no subject rows", "Add one line per subject", row=1)
        fatal = True
    if fatal:
        return None, []

    readers = [n for n in names if n.startswith(READER_PREFIX)]
    for r in readers:
        if r == READER_PREFIX:
            col.add("reader column 'reader_' has no reader name", "Name it reader_<name>, e.g. reader_1", row=1, column=r)
    covs = [n for n in names if n in COVARIATES]
    extras = [n for n in names if n not in _KNOWN and not n.startswith(READER_PREFIX)]
    root = p.resolve().parent
    ncol = len(names)
    out: list[dict] = []
    ids: dict[str, int] = {}
    t1_seen: dict[str, int] = {}
    for row, cells in rows:
        if not cells or all(c.strip() == "" for c in cells):
            continue  # a blank line
        if len(cells) > ncol:
            extra = [c for c in cells[ncol:] if c.strip()]
            if extra:
                col.add(f"row has {len(cells)} values but the header has {ncol} columns", "Remove the extra values or add a column name",
                        row=row)
                continue
        cells = [c.strip() for c in cells[:ncol]] + [""] * max(0, ncol - len(cells))
        rec: dict[str, Any] = dict(zip(names, cells))
        sid = rec["subject_id"]
        if not sid:
            col.add("subject_id is empty", "Give every subject an id", row=row, column="subject_id")
        elif sid in ids:
            col.add(f"duplicate subject_id '{sid}' (also on row {ids[sid]})", "Give every subject a unique id (one row per subject)",
                    row=row, column="subject_id")
        else:
            ids[sid] = row
        if not rec["center"]:
            col.add("center is empty", "Fill in the acquisition center of every subject (e.g. A or B)", row=row, column="center")
        # centers become file names (predictions per center); both become spreadsheet cells
        for key, what in (("subject_id", "subject_id"), ("center", "center")):
            try:
                if rec[key]:
                    check_label(rec[key], what, path, row=row, error=ManifestError, path_part=key == "center")
            except ManifestError as err:
                col.add(err.problem, err.fix, row=row, column=key)
        for key, what, fix_kind in (("t1", "T1", "a NIfTI file or a DICOM series folder"), ("roi", "ROI mask", "a NIfTI mask file")):
            val = rec[key]
            if not val and key == "roi":  # a subject without a mask: roi propose fills it, prepare refuses it
                col.warn("roi is empty: this subject has no ROI mask yet",
                         "Run `python -m nhb_core roi propose --manifest <this manifest> --out <dir>` to propose it "
                         "from the rows that have masks, or draw it", row=row, column=key)
                rec[key + "_path"] = ""
                continue
            if not val:
                col.add(f"{key} is empty", f"Give the {what} path ({fix_kind}), relative to the manifest's folder", row=row, column=key)
                rec[key + "_path"] = ""
                continue
            full = _resolve(val, root)
            rec[key + "_path"] = str(full)
            if not full.exists():
                col.add(f"{what} not found: {val} (looked for {full})",
                        "Check the path; relative paths start at the manifest's folder", row=row, column=key)
            elif key == "roi" and full.is_dir():
                col.add(f"ROI {val} is a folder", "Give the mask as a NIfTI file (.nii or .nii.gz)", row=row, column=key)
            elif key == "t1":
                if str(full) in t1_seen:
                    col.warn(f"same T1 as row {t1_seen[str(full)]}: {val}", "Check for a copy-paste error", row=row, column="t1")
                else:
                    t1_seen[str(full)] = row
        # label / nbna
        nbna = float("nan")
        if "nbna" in rec and rec["nbna"] != "":
            nv = _num(rec["nbna"])
            if nv is None:
                col.add(f"nbna '{rec['nbna']}' is not a number", "Write the NBNA score as a number from 0 to 40", row=row, column="nbna")
            elif not (NBNA_RANGE[0] <= nv <= NBNA_RANGE[1]):
                col.add(f"nbna {rec['nbna']} is outside 0..40", "The NBNA score runs from 0 to 40; correct the value", row=row, column="nbna")
            else:
                nbna = nv
        label: int | None = None
        if "label" in rec and rec["label"] != "":
            label = _binary(rec["label"])
            if label is None:
                col.add(f"label '{rec['label']}' is not 0 or 1", "Write 0 (control) or 1 (injury), or leave it empty and give nbna",
                        row=row, column="label")
        nbna_ok = "nbna" not in rec or rec["nbna"] == "" or not math.isnan(nbna)
        label_ok = "label" not in rec or rec["label"] == "" or label is not None
        if label is None and math.isnan(nbna) and nbna_ok and label_ok:
            col.add("no label: nbna and label are both empty", "Give the NBNA score (0..40) or the label (0/1)", row=row,
                    column="nbna" if "nbna" in rec else "label")
        derived = None if math.isnan(nbna) else int(nbna <= nbna_threshold)
        if label is not None and derived is not None and label != derived:
            col.warn(f"label {label} disagrees with nbna {nbna:g} (threshold {nbna_threshold:g} gives {derived}); label is used",
                     "Check both values; remove one if the other is right", row=row, column="label")
        rec["label"] = label if label is not None else derived
        rec["nbna"] = nbna
        for r in readers:
            v = rec[r]
            if v == "":
                rec[r] = float("nan")
            else:
                b = _binary(v)
                x = _num(v)
                if b is None and x in (2.0, 3.0, 4.0, 5.0):  # a 1-5 confidence rating (checked per column below)
                    rec[r] = float(x)
                elif b is None:
                    col.add(f"{r} '{v}' is not 0 or 1 (or a 1-5 rating)",
                            "Write 1 (injury seen), 0 (not seen), a 1-5 confidence rating (1 definitely no injury .. "
                            "5 definitely injury), or leave it empty (not read)", row=row, column=r)
                    rec[r] = float("nan")
                else:
                    rec[r] = float(b)
        for c in NUMERIC_COVARIATES:
            if c in rec:
                v = rec[c]
                if v == "":
                    rec[c] = float("nan")
                    continue
                x = _num(v)
                if x is None:
                    col.add(f"{c} '{v}' is not a number", "Write a number (decimal point '.') or leave it empty", row=row, column=c)
                    rec[c] = float("nan")
                    continue
                if x < 0:
                    col.add(f"{c} {v} is negative", "Correct the value or leave it empty", row=row, column=c)
                lo, hi = PLAUSIBLE[c]
                if not lo <= x <= hi:
                    col.warn(f"{c} {v} is outside the plausible range {lo:g}..{hi:g}", "Check the value and its unit", row=row, column=c)
                rec[c] = x
        if "sex" in rec and rec["sex"] == "":
            rec["sex"] = float("nan")
        rec["manifest_row"] = row
        out.append(rec)
    for r in readers:  # one scale per reader column: 0/1 reads, or 1-5 ratings (then a 1 is "definitely no")
        zero = next((rec["manifest_row"] for rec in out if rec.get(r) == 0.0), None)
        high = next(((rec["manifest_row"], rec[r]) for rec in out if rec.get(r) in (2.0, 3.0, 4.0, 5.0)), None)
        if zero is not None and high is not None:
            col.add(f"{r} mixes 0/1 reads with 1-5 ratings ({high[1]:g} here, 0 on row {zero})",
                    "Use one scale per reader column: 0/1 reads, or 1-5 confidence ratings", row=high[0], column=r)
    if "tsb_umol_l" in covs:
        tsb = np.array([r["tsb_umol_l"] for r in out if isinstance(r.get("tsb_umol_l"), float)], dtype=float)
        tsb = tsb[np.isfinite(tsb)]
        if tsb.size >= 5 and float(np.median(tsb)) < 40:
            col.warn(f"tsb_umol_l values look like mg/dL (median {np.median(tsb):.3g}); bilirubin in umol/L is typically 100..500",
                     "Convert mg/dL to umol/L by multiplying by 17.1", row=None, column="tsb_umol_l")
    man = _build(out, p, root, names, readers, covs, extras, nbna_threshold)
    return man, out


def _build(recs: list[dict], path: Path, root: Path, names: list[str], readers: list[str], covs: list[str],
           extras: list[str], thr: float) -> Manifest:
    cols = (["subject_id", "center", "t1", "roi", "t1_path", "roi_path", "label", "nbna"] + readers + covs + extras
            + ["manifest_row"])
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in recs], columns=cols)
    if len(df):
        df["label"] = pd.array(df["label"], dtype="Int64")  # nullable until bad rows are dropped
    for c in ["nbna"] + readers + [c for c in covs if c in NUMERIC_COVARIATES]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["manifest_row"] = df["manifest_row"].astype(int)
    return Manifest(df=df, path=path.resolve(), root=root, readers=readers, covariates=covs, extra_columns=extras,
                    nbna_threshold=float(thr))


def _subset(man: Manifest, keep_rows: set[int]) -> Manifest:
    df = man.df[man.df["manifest_row"].isin(keep_rows)].reset_index(drop=True)
    df["label"] = df["label"].astype(int)
    return Manifest(df=df, path=man.path, root=man.root, readers=man.readers, covariates=man.covariates,
                    extra_columns=man.extra_columns, nbna_threshold=man.nbna_threshold)


def _check_threshold(thr: float) -> None:
    if not (isinstance(thr, (int, float)) and math.isfinite(thr) and NBNA_RANGE[0] <= thr <= NBNA_RANGE[1]):
        raise ManifestError("--nbna-threshold", f"NBNA threshold {thr} is outside 0..40", "Use a score from 0 to 40 (default 37)")


# ----------------------------------------------------------------------------- public API


def load_manifest(path: str | os.PathLike, nbna_threshold: float = DEFAULT_NBNA_THRESHOLD) -> Manifest:
    """Read and check a manifest for pipeline use (images are not opened).

    Checks the header, ids, centers, labels / NBNA, readers, covariates and that
    every T1 and ROI path exists.

    Parameters
    ----------
    path : path-like
        The manifest CSV (UTF-8, with or without BOM).
    nbna_threshold : float
        Injury (label 1) when ``nbna <= nbna_threshold``; default 37.

    Returns
    -------
    Manifest

    Raises
    ------
    ManifestError
        The first problem found (use :func:`validate_manifest` to list them all).
    """
    _check_threshold(nbna_threshold)
    col = _Collector(str(path))
    man, _ = _parse(path, nbna_threshold, col)
    if col.problems:
        raise col.problems[0].to_error(ManifestError)
    assert man is not None
    return _subset(man, set(man.df["manifest_row"]))


def validate_manifest(path: str | os.PathLike, nbna_threshold: float = DEFAULT_NBNA_THRESHOLD, check_images: bool = True,
                      progress: ProgressCallback | None = None, workers: int | None = None) -> ValidationReport:
    """Check every row of a manifest and return **all** problems (never raises for bad input).

    Parameters
    ----------
    path : path-like
        The manifest CSV.
    nbna_threshold : float
        Injury when ``nbna <= nbna_threshold`` (default 37).
    check_images : bool
        Also load every T1 (:func:`nhb_core.io.load_t1`) and ROI
        (:func:`nhb_core.io.load_roi` against that T1): readable, 3D, finite,
        ROI not empty, ROI on the T1 grid. Each file is read once.
    progress : callable, optional
        Called with ``{"stage": "validate", "done": i, "total": n, "message": subject_id, "eta_s": ...}``
        after each row's images.
    workers : int, optional
        Threads loading images (default ``min(4, cpu_count)``; 1 = sequential).

    Returns
    -------
    ValidationReport
    """
    col = _Collector(str(path))
    try:
        _check_threshold(nbna_threshold)
    except ManifestError as err:
        col.add(err.problem, err.fix)
        return ValidationReport(path=str(path), problems=col.problems)
    man, recs = _parse(path, nbna_threshold, col)
    report = ValidationReport(path=str(path), n_rows=len(recs))
    if man is not None and check_images:
        _check_images(recs, col, progress, workers)
        report.images_checked = True
    # file order: sort by row (None first)
    col.problems.sort(key=lambda q: (q.row is not None, q.row or 0))
    col.warnings.sort(key=lambda q: (q.row is not None, q.row or 0))
    report.problems, report.warnings = col.problems, col.warnings
    if man is not None:
        keep = {r["manifest_row"] for r in recs if r["manifest_row"] not in col.bad_rows and r["label"] is not None}
        report.manifest = _subset(man, keep)
        summary = cohort_summary(report.manifest)
        report.cohort_table = summary["centers"]
        report.reader_table = summary["readers"]
        report.covariate_table = summary["covariates"]
    return report


def _check_row_images(r: dict) -> list[tuple[str, str, str]]:
    """Load one row's T1 and ROI; -> [(column, problem, fix)]. Runs in a worker thread."""
    from nhb_core.io import load_roi, load_t1

    found = []
    t1 = None
    t1_path, roi_path = r.get("t1_path") or "", r.get("roi_path") or ""
    bug_fix = "Check the file; if it opens elsewhere, report this message as a bug"
    if t1_path and Path(t1_path).exists():
        try:
            t1 = load_t1(t1_path)
        except NHBError as err:
            found.append(("t1", f"t1 {r['t1']}: {err.problem}", err.fix))
        except Exception as err:  # an unforeseen failure still ends up in the list, not as a crash
            found.append(("t1", f"t1 {r['t1']}: unexpected error while reading ({type(err).__name__}: {err})", bug_fix))
    if roi_path and Path(roi_path).is_file():
        try:
            load_roi(roi_path, reference=t1)
        except NHBError as err:
            found.append(("roi", f"roi {r['roi']}: {err.problem}", err.fix))
        except Exception as err:
            found.append(("roi", f"roi {r['roi']}: unexpected error while reading ({type(err).__name__}: {err})", bug_fix))
    return found


def _check_images(recs: list[dict], col: _Collector, progress: ProgressCallback | None, workers: int | None = None) -> None:
    """Load every row's images (threads: gzip/zlib and numpy release the GIL); problems in file order."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(recs)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    eta = EtaEstimator()
    results: dict[int, list] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        # map keeps the order; progress is reported as rows finish, in order
        for i, (r, found) in enumerate(zip(recs, pool.map(_check_row_images, recs)), 1):
            results[r["manifest_row"]] = found
            emit(progress, "validate", done=i, total=n, message=str(r.get("subject_id", "")), eta_s=eta.eta(i, n))
    finally:
        # a progress callback that raises (a cancelled job) stops the remaining rows at once
        pool.shutdown(wait=True, cancel_futures=True)
    for r in recs:
        for column, problem, fix in results[r["manifest_row"]]:
            col.add(problem, fix, row=r["manifest_row"], column=column)


def _mean_sd(x: pd.Series) -> str:
    x = pd.to_numeric(x, errors="coerce").dropna()
    if len(x) == 0:
        return "-"
    if len(x) == 1:
        return f"{x.iloc[0]:.1f}"
    return f"{x.mean():.1f} ± {x.std(ddof=1):.1f}"


def cohort_summary(manifest: Manifest) -> dict[str, pd.DataFrame]:
    """Tables describing a cohort.

    Returns
    -------
    dict with
        ``centers``: DataFrame, index ``center``, columns ``0`` (controls) and ``1``
        (injury) with subject counts;
        ``readers``: DataFrame, one row per reader column: ``reader``, ``n_read``,
        ``n_positive``, ``sensitivity``, ``specificity`` (against ``label``; NaN when undefined; a
        1-5 rating column's call is rating >= 3), ``scale`` ("binary" or "rating");
        ``covariates``: DataFrame, one row per covariate: ``covariate``, ``n``
        (non-missing), ``all``, ``controls``, ``injury`` (mean ± sd for numeric
        covariates, counts ``F:10 M:12`` for ``sex``).
    """
    df = manifest.df
    centers = pd.crosstab(df["center"], df["label"]) if len(df) else pd.DataFrame()
    centers = centers.reindex(columns=[0, 1], fill_value=0)
    centers.index.name = "center"
    centers.columns.name = "label"
    rrows = []
    scales = manifest.reader_scales
    for r in manifest.readers:
        read = df[df[r].notna()]
        vals = read[r].to_numpy(dtype=float)
        call = vals >= 3 if scales[r] == "rating" else vals == 1  # a rating >= 3 is a positive call
        pos = (read["label"] == 1).fillna(False).to_numpy(dtype=bool)
        neg = (read["label"] == 0).fillna(False).to_numpy(dtype=bool)
        rrows.append({"reader": r, "n_read": int(len(read)), "n_positive": int(call.sum()),
                      "sensitivity": float(call[pos].mean()) if pos.any() else float("nan"),
                      "specificity": float((~call[neg]).mean()) if neg.any() else float("nan"),
                      "scale": scales[r]})
    readers = pd.DataFrame(rrows, columns=["reader", "n_read", "n_positive", "sensitivity", "specificity", "scale"])
    crows = []
    for c in manifest.covariates:
        s = df[c]
        if c == "sex":
            def _counts(x: pd.Series) -> str:
                vc = x.dropna().astype(str).value_counts().sort_index()
                return " ".join(f"{k}:{v}" for k, v in vc.items()) or "-"
            crows.append({"covariate": c, "n": int(s.notna().sum()), "all": _counts(s),
                          "controls": _counts(s[df["label"] == 0]), "injury": _counts(s[df["label"] == 1])})
        else:
            crows.append({"covariate": c, "n": int(s.notna().sum()), "all": _mean_sd(s),
                          "controls": _mean_sd(s[df["label"] == 0]), "injury": _mean_sd(s[df["label"] == 1])})
    covariates = pd.DataFrame(crows, columns=["covariate", "n", "all", "controls", "injury"])
    return {"centers": centers, "readers": readers, "covariates": covariates}
