"""Reader studies in the browser: reading sessions on a finished run (no Streamlit here).

A *session* lives in ``RUNS_DIR/reading/<session_id>/`` (the id from ``secrets.token_urlsafe``;
no user string is ever part of a path)::

    session.json                 settings, readers (name, private token, seed, arm order, case order),
                                 the cases (random code -> subject, truth, slices); server-side only
    answers/<reader_id>__<arm>.json   one file per reader x arm, rewritten atomically on every answer
    readings/<reader_id>__<arm>.csv   written when the session is closed (one per reader x arm)
    readings.csv                 the long format ``reader, modality, case_id, truth, rating`` that
                                 ``nhb_core.stats.mrmc`` and ``python -m nhb_core mrmc`` read

The browser side (``dashboard_pages/6_Reading.py``) only ever sees what :func:`reader_state` returns (codes,
the reader's own answers, progress) and PNG bytes from :func:`render_slice_png` /
:func:`render_cam_png`; never subject ids, centers, labels or other readers' answers.
See docs/reading.md.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from nhb_core.errors import InputError
from nhb_core.fileio import atomic_write_json, atomic_write_text, exclusive_lock, read_json
from nhb_core.runs import RunFolder

ARMS = ("unaided", "aided")
ARM_ORDERS = ("unaided-first", "aided-first", "crossover")
CALL_MODES = ("derived", "separate")
RATING_LABELS = {1: "1 - definitely no injury", 2: "2 - probably no injury", 3: "3 - possible injury",
                 4: "4 - probably injury", 5: "5 - definitely injury"}
RATING_POSITIVE = 3  # a derived binary call: rating >= 3 is "injury" (as the synthetic readers)
READER_CSV_COLUMNS = ["reader", "reader_id", "modality", "position", "code", "case_id", "truth", "rating", "call",
                      "call_source", "seconds", "comment", "saved_at", "revisions"]
LONG_COLUMNS = ["reader", "modality", "case_id", "truth", "rating"]
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_DAY_S = 86400.0


class ReadingError(InputError):
    """A reading session problem the user can act on (one line: file, problem, fix)."""


# ----------------------------------------------------------------------------- helpers
def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(float(t), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reading_root(runs_dir: str | os.PathLike) -> Path:
    """``RUNS_DIR/reading``: the folder of every session."""
    return Path(runs_dir) / "reading"


def session_dir(runs_dir: str | os.PathLike, session_id: str) -> Path:
    """The folder of one session; ``session_id`` must look like an id we made (no path tricks)."""
    if not isinstance(session_id, str) or not _ID_RE.match(session_id):
        raise ReadingError(None, "not a valid reading session id", "Pick a session from the list")
    return reading_root(runs_dir) / session_id


@contextlib.contextmanager
def _lock(sdir: Path) -> Iterator[None]:
    """Exclusive lock on a session (answers and closing never interleave), across processes."""
    with _THREAD_LOCK, exclusive_lock(sdir / ".lock"):
        yield


_THREAD_LOCK = threading.RLock()


def load_session(sdir: str | os.PathLike) -> dict:
    """``session.json`` of a session folder (raises :class:`ReadingError` when absent)."""
    p = Path(sdir) / "session.json"
    if not p.is_file():
        raise ReadingError(p, "reading session not found", "Pick an existing session or create one")
    s = read_json(p)
    s["_dir"] = str(Path(sdir))
    return s


def _save_session(sess: dict) -> None:
    d = Path(sess["_dir"])
    atomic_write_json(d / "session.json", {k: v for k, v in sess.items() if not k.startswith("_")})


def list_sessions(runs_dir: str | os.PathLike) -> list[dict]:
    """Every session under ``RUNS_DIR/reading``, newest first (unreadable folders skipped)."""
    root = reading_root(runs_dir)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and (d / "session.json").is_file():
                try:
                    out.append(load_session(d))
                except (OSError, ValueError, ReadingError):
                    continue
    return sorted(out, key=lambda s: s.get("created", 0), reverse=True)


def _run_manifest(run_dir: Path) -> str | None:
    try:
        import yaml

        m = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("manifest")
        if m:
            return str(m)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return (read_json(RunFolder(run_dir).metrics_path).get("run") or {}).get("manifest")
    except (OSError, ValueError, AttributeError):
        return None


def _set_table(run_dir: Path, set_name: str):
    import pandas as pd

    p = RunFolder(run_dir).predictions_path(set_name, "subject")
    if not p.is_file():
        raise ReadingError(p, f"the run has no subject-level predictions of set {set_name!r}",
                           "Pick a finished run and one of its held-out sets")
    return pd.read_csv(p, dtype={"subject_id": str, "center": str}), p


def sample_cases(table, n_cases: int | None, seed: int, stratify: Sequence[str] = ("label",)):
    """A stratified random sample of ``n_cases`` rows of a set's subject table (all when ``None``).

    Each stratum (``label``, optionally ``center``) gets its share of ``n_cases`` rounded by largest
    remainder (at least one case per non-empty stratum when ``n_cases`` allows); reproducible with
    ``seed``. Returns the rows sorted by subject id.
    """
    import pandas as pd

    df = table.reset_index(drop=True)
    if n_cases is None or int(n_cases) >= len(df):
        return df.sort_values("subject_id").reset_index(drop=True)
    n_cases = int(n_cases)
    if n_cases < 2:
        raise ReadingError(None, f"a sample of {n_cases} case(s) is too small", "Ask for at least 2 cases")
    rng = np.random.default_rng(seed)
    keys = [c for c in stratify if c in df.columns]
    groups = (list(df.groupby(keys if len(keys) > 1 else keys[0], sort=True).groups.items()) if keys
              else [("all", df.index)])
    sizes = np.array([len(ix) for _, ix in groups], dtype=float)
    quota = sizes / sizes.sum() * n_cases
    take = np.floor(quota).astype(int)
    take = np.maximum(take, np.minimum(1, sizes.astype(int))) if n_cases >= len(groups) else take
    while take.sum() > n_cases:
        take[int(np.argmax(take - quota))] -= 1
    rem = quota - take
    while take.sum() < n_cases:
        cand = np.where(take < sizes)[0]
        i = cand[int(np.argmax(rem[cand]))]
        take[i] += 1
        rem[i] = -np.inf
    picks = []
    for (_, ix), k in zip(groups, take):
        ix = np.asarray(sorted(ix))
        picks.extend(ix[rng.permutation(len(ix))[:k]].tolist())
    return pd.DataFrame(df.loc[sorted(picks)]).sort_values("subject_id").reset_index(drop=True)


def _new_code(used: set) -> str:
    alphabet = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L
    while True:
        c = "".join(secrets.choice(alphabet) for _ in range(6))
        if c not in used:
            used.add(c)
            return c


# ----------------------------------------------------------------------------- creation
def create_session(runs_dir: str | os.PathLike, run_dir: str | os.PathLike, readers: Sequence[str], *,
                   set_name: str = "test", n_cases: int | None = None, stratify: Sequence[str] = ("label",),
                   arms: Sequence[str] = ("unaided",), arm_order: str = "unaided-first", washout_days: float = 0.0,
                   allow_revision: bool = False, call_mode: str = "derived", models: Sequence[str] | None = None,
                   seed: int | None = None, title: str = "", now: float | None = None) -> Path:
    """Create a reading session on a finished run; returns its folder.

    Parameters
    ----------
    runs_dir : the dashboard's runs folder (the session goes under ``runs_dir/reading/<id>``).
    run_dir : a finished run (its ``predictions/<set>__subjects.csv``, prepared dataset and manifest).
    readers : the readers' names (unique, non-empty; shown to the owner and written in the readings).
    set_name : the run's set whose subjects are read (``test``, ``external:B``...).
    n_cases : a stratified random sample of that many subjects (``None`` = all of the set).
    stratify : the strata of the sample (``label``, and ``center`` if wanted).
    arms : ``("unaided",)`` or ``("unaided", "aided")``; in the aided arm the reader also sees each
        network's probability and Grad-CAM overlay.
    arm_order : ``unaided-first``, ``aided-first`` or ``crossover`` (alternate readers start with the
        other arm).
    washout_days : days between a reader's last answer of one arm and the first of the next.
    allow_revision : whether a submitted answer may be changed (within the arm, until the next arm
        is started or the session is closed).
    call_mode : ``derived`` (binary call = rating >= 3) or ``separate`` (the reader gives it).
    models : the networks shown in the aided arm (default: every model column of the predictions).
    seed : fixes the sample and every reader's case order (default: a random one, recorded).
    """
    import pandas as pd

    run_dir = Path(run_dir).resolve()
    names = [" ".join(str(r).split()) for r in readers]
    if not names or any(not n for n in names):
        raise ReadingError(None, "a reader name is empty", "Give one non-empty name per reader")
    if len(set(n.casefold() for n in names)) != len(names):
        raise ReadingError(None, "two readers have the same name", "Give each reader a distinct name")
    if any(len(n) > 80 for n in names):
        raise ReadingError(None, "a reader name is longer than 80 characters", "Shorten it")
    arms = [str(a) for a in arms]
    if not arms or any(a not in ARMS for a in arms) or len(set(arms)) != len(arms) or arms[0] not in ARMS:
        raise ReadingError(None, f"arms {arms} are not valid", "Use ['unaided'] or ['unaided', 'aided']")
    if "unaided" not in arms:
        raise ReadingError(None, "a session needs the unaided arm", "Add 'unaided' to the arms")
    if arm_order not in ARM_ORDERS:
        raise ReadingError(None, f"unknown arm order {arm_order!r}", f"Use one of {', '.join(ARM_ORDERS)}")
    if call_mode not in CALL_MODES:
        raise ReadingError(None, f"unknown call mode {call_mode!r}", "Use 'derived' or 'separate'")
    washout_days = float(washout_days)
    if not np.isfinite(washout_days) or washout_days < 0:
        raise ReadingError(None, "the washout must be a number of days >= 0", "Give e.g. 0 or 28")
    if not RunFolder(run_dir).predictions_dir.is_dir():
        raise ReadingError(run_dir, "the run has no predictions", "Pick a finished run")
    table, pred_path = _set_table(run_dir, set_name)
    base_cols = {"subject_id", "center", "label", "slice_index", "row"}
    model_cols = [c for c in table.columns if c not in base_cols and not c.startswith("reader_")
                  and pd.api.types.is_numeric_dtype(table[c])]
    if "aided" in arms:
        models = list(models) if models else model_cols
        bad = [m for m in models if m not in model_cols]
        if not models or bad:
            raise ReadingError(pred_path, f"no prediction column for model(s) {bad or models}",
                               f"Pick among {', '.join(model_cols) or 'none'}")
    else:
        models = []
    # the slices of each subject: the run's prepared dataset
    from nhb_core.saliency import run_dataset_dir
    from nhb_core.slices import load_dataset

    ds_dir = run_dataset_dir(run_dir)
    ds = load_dataset(ds_dir)
    idx = ds.index.assign(subject_id=ds.index["subject_id"].astype(str))
    slices_of = idx.sort_values("slice_index").groupby("subject_id")["slice_index"].apply(lambda s: [int(v) for v in s])
    table = table[table["subject_id"].isin(slices_of.index)]
    manifest = _run_manifest(run_dir)
    paths: dict[str, tuple[str, str]] = {}
    if manifest and Path(manifest).is_file():
        from nhb_core.manifest import load_manifest

        mdf = load_manifest(manifest).df
        for _, r in mdf.iterrows():
            paths[str(r["subject_id"])] = (str(r["t1_path"]), str(r["roi_path"]))
    if seed is None:
        seed = int(secrets.randbits(31))
    seed = int(seed)
    chosen = sample_cases(table, n_cases, seed, stratify)
    if len(chosen) < 2:
        raise ReadingError(pred_path, f"set {set_name!r} has fewer than 2 cases to read", "Pick a larger set")
    used: set = set()
    cases = []
    for _, r in chosen.iterrows():
        sid = str(r["subject_id"])
        t1, roi = paths.get(sid, (None, None))
        cases.append({"code": _new_code(used), "subject_id": sid, "center": str(r.get("center", "")),
                      "truth": int(r["label"]), "slices": slices_of[sid], "t1_path": t1, "roi_path": roi,
                      "probs": {m: float(r[m]) for m in models}})
    ss = np.random.SeedSequence(seed)
    child = ss.spawn(len(names))
    rd = []
    for i, (name, cs) in enumerate(zip(names, child)):
        rseed = int(cs.generate_state(1)[0])
        order_arms = list(arms)
        if len(arms) == 2 and (arm_order == "aided-first" or (arm_order == "crossover" and i % 2 == 1)):
            order_arms = order_arms[::-1]
        rng = np.random.default_rng(rseed)
        orders = {a: [cases[k]["code"] for k in rng.permutation(len(cases))] for a in order_arms}
        rd.append({"id": f"r{i + 1}", "name": name, "token": secrets.token_urlsafe(24), "seed": rseed,
                   "arms": order_arms, "order": orders})
    sid = secrets.token_urlsafe(12)
    t = _now() if now is None else float(now)
    sdir = reading_root(runs_dir) / sid
    sess = {"version": 1, "id": sid, "title": " ".join(str(title).split())[:120], "created": t,
            "created_iso": _iso(t), "state": "open", "run": str(run_dir), "run_name": run_dir.name,
            "set": set_name, "n_cases": len(cases), "sample": {"n_cases": n_cases, "stratify": list(stratify)},
            "seed": seed, "arms": list(arms), "arm_order": arm_order, "washout_days": washout_days,
            "allow_revision": bool(allow_revision), "call_mode": call_mode, "models": list(models),
            "dataset_dir": str(ds_dir), "manifest": manifest, "readers": rd, "cases": cases}
    sdir.mkdir(parents=True, exist_ok=False)
    (sdir / "answers").mkdir()
    sess["_dir"] = str(sdir)
    _save_session(sess)
    return sdir


# ----------------------------------------------------------------------------- readers
def _reader(sess: dict, reader_id: str) -> dict:
    for r in sess["readers"]:
        if r["id"] == reader_id:
            return r
    raise ReadingError(Path(sess["_dir"]) / "session.json", "no such reader in this session", "Check the link")


def find_reader(runs_dir: str | os.PathLike, token: str) -> tuple[Path, str]:
    """``(session folder, reader id)`` of a reader's private token (constant-time comparison)."""
    tok = str(token or "").strip()
    if len(tok) >= 16:
        root = reading_root(runs_dir)
        for s in list_sessions(runs_dir):
            for r in s["readers"]:
                if hmac.compare_digest(r["token"].encode(), tok.encode()):
                    return root / s["id"], r["id"]
    raise ReadingError(None, "this reading link is not valid", "Ask the study owner for your private link")


def _answers_path(sdir: Path, reader_id: str, arm: str) -> Path:
    return sdir / "answers" / f"{reader_id}__{arm}.json"


def load_answers(sdir: str | os.PathLike, reader_id: str, arm: str) -> dict[str, dict]:
    """A reader's answers in one arm: ``{code: answer}`` (empty when none yet)."""
    p = _answers_path(Path(sdir), reader_id, arm)
    if not p.is_file():
        return {}
    data = read_json(p)
    return {a["code"]: a for a in data.get("answers", [])}


def _arm_status(sess: dict, reader: dict, now: float) -> list[dict]:
    """Per arm of a reader, in their order: n_done, complete, started, last answer, available from."""
    sdir = Path(sess["_dir"])
    out = []
    prev_done_at = None
    prev_complete = True
    for a in reader["arms"]:
        ans = load_answers(sdir, reader["id"], a)
        n = len(reader["order"][a])
        times = [x["saved_at"] for x in ans.values()]
        avail = None
        if prev_complete:
            avail = 0.0 if prev_done_at is None else prev_done_at + float(sess["washout_days"]) * _DAY_S
        complete = len(ans) >= n
        out.append({"arm": a, "n_done": len(ans), "n_cases": n, "complete": complete, "started": bool(ans),
                    "first_at": min(times) if times else None, "last_at": max(times) if times else None,
                    "available_from": avail, "available": avail is not None and now >= avail, "answers": ans})
        prev_complete = prev_complete and complete
        prev_done_at = max(times) if times else prev_done_at
    return out


def reader_state(sdir: str | os.PathLike, reader_id: str, now: float | None = None) -> dict:
    """What a reader's page may know: no subject id, center, truth or other reader.

    Returns
    -------
    dict: ``name``, ``state`` ("reading" | "washout" | "done" | "closed"), ``arm`` (the current arm),
    ``arm_number`` / ``n_arms``, ``aided`` (bool), ``order`` (the codes of the current arm in this
    reader's order), ``answers`` ({code: own answer} of the current arm), ``next_code`` (first
    unanswered code or None), ``n_done`` / ``n_cases`` (current arm), ``total_done`` / ``total``
    (all arms), ``washout_until`` (ISO time or None), ``allow_revision``, ``call_mode``, ``title``,
    ``models`` (aided arm only), ``n_slices`` ({code: number of GP slices}).
    """
    sess = load_session(sdir)
    reader = _reader(sess, reader_id)
    t = _now() if now is None else float(now)
    arms = _arm_status(sess, reader, t)
    cur = next((a for a in arms if not a["complete"]), None)
    total_done = sum(a["n_done"] for a in arms)
    total = sum(a["n_cases"] for a in arms)
    base = {"name": reader["name"], "title": sess.get("title", ""), "n_arms": len(arms), "total_done": total_done,
            "total": total, "allow_revision": bool(sess["allow_revision"]), "call_mode": sess["call_mode"],
            "washout_until": None, "order": [], "answers": {}, "next_code": None, "aided": False, "models": [],
            "n_slices": {}}
    if sess["state"] != "open":
        return {**base, "state": "closed", "arm": None, "arm_number": None, "n_done": 0, "n_cases": 0}
    if cur is None:
        last = arms[-1]
        return {**base, "state": "done", "arm": last["arm"], "arm_number": len(arms), "n_done": last["n_done"],
                "n_cases": last["n_cases"], "order": reader["order"][last["arm"]], "answers": last["answers"],
                "aided": last["arm"] == "aided", "models": sess["models"] if last["arm"] == "aided" else [],
                "n_slices": {c["code"]: len(c["slices"]) for c in sess["cases"]}}
    k = arms.index(cur)
    order = reader["order"][cur["arm"]]
    st = {**base, "arm": cur["arm"], "arm_number": k + 1, "n_done": cur["n_done"], "n_cases": cur["n_cases"],
          "order": order, "answers": cur["answers"], "aided": cur["arm"] == "aided",
          "models": sess["models"] if cur["arm"] == "aided" else [],
          "n_slices": {c["code"]: len(c["slices"]) for c in sess["cases"]},
          "next_code": next((c for c in order if c not in cur["answers"]), None)}
    if not cur["available"]:
        return {**st, "state": "washout", "washout_until": _iso(cur["available_from"]), "next_code": None}
    return {**st, "state": "reading"}


def save_answer(sdir: str | os.PathLike, reader_id: str, code: str, rating: int, *, call: int | None = None,
                seconds: float | None = None, comment: str = "", arm: str | None = None,
                now: float | None = None) -> dict:
    """Record one answer at once (atomic rewrite of ``answers/<reader>__<arm>.json`` under a lock).

    ``rating`` 1-5; ``call`` 0/1 (required when the session's call mode is ``separate``; else derived
    as rating >= 3); ``arm`` defaults to the reader's current arm and must be it (or, with revision
    allowed, an arm the reader has not moved on from). An answer is final unless the session allows
    revision. Returns the stored answer.
    """
    sdir = Path(sdir)
    t = _now() if now is None else float(now)
    try:
        rating = int(rating)
    except (TypeError, ValueError):
        rating = -1
    if rating not in RATING_LABELS:
        raise ReadingError(None, "the rating must be 1, 2, 3, 4 or 5", "Choose one of the five levels")
    comment = str(comment or "").replace("\r", " ")[:2000]
    with _lock(sdir):
        sess = load_session(sdir)
        if sess["state"] != "open":
            raise ReadingError(None, "this reading session is closed", "No more answers can be given")
        reader = _reader(sess, reader_id)
        arms = _arm_status(sess, reader, t)
        cur = next((a for a in arms if not a["complete"]), None)
        if arm is None:
            if cur is None:
                raise ReadingError(None, "every case has been read already", "Nothing left to answer")
            arm = cur["arm"]
        a_st = next((a for a in arms if a["arm"] == arm), None)
        if a_st is None:
            raise ReadingError(None, f"arm {arm!r} is not part of this reading", "Reload the page")
        k = arms.index(a_st)
        if not a_st["available"]:
            raise ReadingError(None, "this arm is not open yet (washout)", "Come back after the washout")
        if any(b["started"] for b in arms[k + 1:]):
            raise ReadingError(None, "answers of an earlier arm cannot change once the next arm has started",
                               "Carry on with the current arm")
        if code not in reader["order"][arm]:
            raise ReadingError(None, "unknown case code", "Reload the page")
        ans = a_st["answers"]
        prev = ans.get(code)
        if prev is not None and not sess["allow_revision"]:
            raise ReadingError(None, f"case {code} has been answered already and answers are final",
                               "Go on with the next case")
        if sess["call_mode"] == "separate":
            if call not in (0, 1, True, False):
                raise ReadingError(None, "the binary call (injury yes/no) is missing", "Give it with the rating")
            call_v, src = int(call), "given"
        else:
            call_v, src = int(rating >= RATING_POSITIVE), "derived"
        rec = {"code": code, "rating": rating, "call": call_v, "call_source": src,
               "seconds": None if seconds is None else round(float(seconds), 2), "comment": comment,
               "saved_at": t, "saved_iso": _iso(t), "position": reader["order"][arm].index(code) + 1,
               "revisions": 0 if prev is None else int(prev.get("revisions", 0)) + 1}
        if prev is not None:
            rec["history"] = list(prev.get("history", [])) + [{k2: prev[k2] for k2 in ("rating", "call", "seconds",
                                                                                       "comment", "saved_at")}]
        ans = dict(ans)
        ans[code] = rec
        ordered = [ans[c] for c in reader["order"][arm] if c in ans]
        atomic_write_json(_answers_path(sdir, reader_id, arm),
                          {"reader_id": reader_id, "arm": arm, "answers": ordered})
        return rec


def progress(sdir: str | os.PathLike, now: float | None = None):
    """The owner's view of an open session: one row per reader x arm with counts only, never answers.

    Columns: ``reader, reader_id, arm, arm_number, done, cases, fraction, state, last_activity``.
    """
    import pandas as pd

    sess = load_session(sdir)
    t = _now() if now is None else float(now)
    rows = []
    for r in sess["readers"]:
        arms = _arm_status(sess, r, t)
        for k, a in enumerate(arms):
            if a["complete"]:
                state = "done"
            elif not a["available"]:
                state = "waiting (washout)" if a["available_from"] is not None else "not started"
            else:
                state = "reading" if a["started"] else "not started"
            rows.append({"reader": r["name"], "reader_id": r["id"], "arm": a["arm"], "arm_number": k + 1,
                         "done": a["n_done"], "cases": a["n_cases"],
                         "fraction": a["n_done"] / a["n_cases"] if a["n_cases"] else 0.0, "state": state,
                         "last_activity": _iso(a["last_at"]) if a["last_at"] else ""})
    return pd.DataFrame(rows, columns=["reader", "reader_id", "arm", "arm_number", "done", "cases", "fraction",
                                       "state", "last_activity"])


# ----------------------------------------------------------------------------- closing
def close_session(sdir: str | os.PathLike, now: float | None = None) -> dict:
    """Close a session: no more answers; writes ``readings/<reader_id>__<arm>.csv`` (one per reader and
    arm, every answer with the subject id and truth) and ``readings.csv`` (long format ``reader,
    modality, case_id, truth, rating``, rows sorted by modality, reader, case_id). Idempotent.

    Also ``metrics.json``: :func:`session_metrics` (each reader's ROC/AUC, binary metrics, McNemar,
    kappas, MRMC), or ``{"error": line}`` when they cannot be computed.

    Returns ``{"readings": path, "files": [...], "complete": bool, "n_rows": int, "metrics": path}``.
    """
    import pandas as pd

    sdir = Path(sdir)
    t = _now() if now is None else float(now)
    with _lock(sdir):
        sess = load_session(sdir)
        by_code = {c["code"]: c for c in sess["cases"]}
        files, frames, complete = [], [], True
        for r in sess["readers"]:
            for arm in r["arms"]:
                ans = load_answers(sdir, r["id"], arm)
                complete = complete and len(ans) == len(r["order"][arm])
                rows = []
                for code in r["order"][arm]:
                    a = ans.get(code)
                    if a is None:
                        continue
                    c = by_code[code]
                    rows.append({"reader": r["name"], "reader_id": r["id"], "modality": arm,
                                 "position": a["position"], "code": code, "case_id": c["subject_id"],
                                 "truth": int(c["truth"]), "rating": int(a["rating"]), "call": int(a["call"]),
                                 "call_source": a["call_source"], "seconds": a.get("seconds"),
                                 "comment": a.get("comment", ""), "saved_at": a.get("saved_iso", ""),
                                 "revisions": int(a.get("revisions", 0))})
                df = pd.DataFrame(rows, columns=READER_CSV_COLUMNS)
                p = sdir / "readings" / f"{r['id']}__{arm}.csv"
                atomic_write_text(p, df.to_csv(index=False, lineterminator="\n"))
                files.append(str(p))
                frames.append(df)
        allr = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=READER_CSV_COLUMNS)
        long = allr[LONG_COLUMNS].sort_values(["modality", "reader", "case_id"], kind="mergesort")
        rp = sdir / "readings.csv"
        atomic_write_text(rp, long.to_csv(index=False, lineterminator="\n"))
        if sess["state"] != "closed":
            sess["state"] = "closed"
            sess["closed"] = t
            sess["closed_iso"] = _iso(t)
        sess["complete"] = bool(complete)
        sess["readings"] = str(rp)
        _save_session(sess)
    mp = sdir / "metrics.json"  # each reader's statistics (outside the lock; a failure never blocks closing)
    try:
        atomic_write_json(mp, session_metrics(sdir))
    except Exception as err:  # noqa: BLE001 - e.g. one class absent from a tiny sample
        atomic_write_json(mp, {"error": " ".join(str(err).split())[:400]})
    return {"readings": str(rp), "files": files, "complete": bool(complete), "n_rows": int(len(long)),
            "metrics": str(mp)}


def owner_answers(sdir: str | os.PathLike):
    """Every answer with subject ids and truth: only once the session is closed (else ReadingError)."""
    import pandas as pd

    sess = load_session(sdir)
    if sess["state"] != "closed":
        raise ReadingError(None, "answers are shown once the session is closed", "Close the session first")
    frames = [pd.read_csv(f, dtype={"case_id": str, "reader": str}) for f in
              sorted((Path(sdir) / "readings").glob("*.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=READER_CSV_COLUMNS)


def reader_column(name: str, taken: set) -> str:
    """A ``reader_*`` column name for a reader (``reader_`` + the name's letters, digits and ``_``; unique)."""
    base = "reader_" + (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "x")
    col, k = base, 2
    while col in taken:
        col, k = f"{base}_{k}", k + 1
    taken.add(col)
    return col


def session_metrics(sdir: str | os.PathLike, n_boot: int = 2000, seed: int = 0) -> dict:
    """Each reader's statistics in a session, per arm, as the study computes them for reader columns.

    Per arm, the session's cases with the run's subject-level predictions and one ``reader_<name>``
    column of 1-5 ratings per reader (NaN = not read) go through ``nhb_core.stats.set_metrics``: each
    reader's ROC points, AUC with its DeLong CI, the binary metrics of the call rating >= 3 with CIs,
    McNemar (and paired DeLong) against each network at its threshold, Cohen's kappa per pair and
    Fleiss' kappa. With a closed session's ``readings.csv``, the networks-vs-readers MRMC on these
    cases (``stats.mrmc.study_mrmc``). Shaped like metrics.json so ``figures.roc_figure(m, arm)`` and
    ``dashboard_data.reader_table(m, arm)`` show it.

    Returns
    -------
    {"sets": {arm: {"level": {"subject": block}}}, "mrmc": study_mrmc block or None, "reader_columns":
    {column: name}, "run": {"config": {"models": [..]}}, "notes": [str]}
    """
    from nhb_core import stats

    sdir = Path(sdir)
    sess = load_session(sdir)
    run = Path(sess["run"])
    table, _ = _set_table(run, sess["set"])
    codes = {c["code"]: c for c in sess["cases"]}
    ids = {c["subject_id"] for c in sess["cases"]}
    df = table[table["subject_id"].isin(ids)].drop_duplicates("subject_id").reset_index(drop=True)
    base_cols = {"subject_id", "center", "label", "slice_index", "row"}
    models = [c for c in df.columns if c not in base_cols and not c.startswith("reader_")
              and np.issubdtype(df[c].dtype, np.number)]
    thresholds = {}
    for m in models:
        try:
            thr = RunFolder(run).model_json(m).get("threshold")
        except (OSError, ValueError):
            thr = None
        if thr is not None:
            thresholds[m] = float(thr)
    taken: set = set()
    cols = {r["id"]: reader_column(r["name"], taken) for r in sess["readers"]}
    out: dict[str, Any] = {"sets": {}, "mrmc": None, "reader_columns": {cols[r["id"]]: r["name"] for r in sess["readers"]},
                           "run": {"config": {"models": models}}, "notes": []}
    for arm in sess["arms"]:
        d = df[["subject_id", "center", "label", *models]].copy()
        for r in sess["readers"]:
            ans = load_answers(sdir, r["id"], arm)
            by_sid = {codes[k]["subject_id"]: float(a["rating"]) for k, a in ans.items()}
            d[cols[r["id"]]] = d["subject_id"].map(by_sid).astype(float)
        readers = [c for c in cols.values() if d[c].notna().any()]
        if not readers:
            out["notes"].append(f"arm {arm}: no answers yet")
            continue
        block = stats.set_metrics(d, "label", models, None, readers, thresholds, seed=seed, n_boot=n_boot)
        out["sets"][arm] = {"level": {"subject": block}}
    rp = sdir / "readings.csv"
    if sess["state"] == "closed" and rp.is_file() and models:
        try:
            blk = stats.mrmc.study_mrmc(RunFolder(run).predictions_dir, rp, models, sets=[sess["set"]])
            out["mrmc"] = blk.get(sess["set"])
        except InputError as err:
            out["notes"].append(f"MRMC: {err.problem}")
    return out


def install_readings(sdir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy a closed session's ``readings.csv`` next to the run's manifest, where the study's stats
    stage looks for a reader study (``study`` reruns stats when it changes). An existing file is kept
    unless ``overwrite`` (then it is first saved as ``readings.csv.bak``)."""
    sess = load_session(sdir)
    if sess["state"] != "closed":
        raise ReadingError(None, "the session is still open", "Close it first")
    if not sess.get("manifest"):
        raise ReadingError(sess["run"], "the run does not record its manifest", "Copy readings.csv by hand")
    dest = Path(sess["manifest"]).parent / "readings.csv"
    if dest.exists():
        if not overwrite:
            raise ReadingError(dest, "a readings.csv is already there", "Tick overwrite (a .bak copy is kept)")
        atomic_write_text(dest.with_name("readings.csv.bak"), dest.read_text(encoding="utf-8"))
    atomic_write_text(dest, (Path(sdir) / "readings.csv").read_text(encoding="utf-8"))
    return dest


# ----------------------------------------------------------------------------- images
_VOLS: dict[str, Any] = {}
_PNGS: OrderedDict[tuple, bytes] = OrderedDict()
_PNG_LOCK = threading.Lock()
_INFLIGHT: set = set()
_VOL_LOCK = threading.Lock()
_DS: dict[tuple, Any] = {}


def _case(sess: dict, code: str) -> dict:
    for c in sess["cases"]:
        if c["code"] == code:
            return c
    raise ReadingError(None, "unknown case code", "Reload the page")


def _volumes(t1_path: str, roi_path: str):
    key = f"{t1_path}|{roi_path}"
    with _VOL_LOCK:
        if key in _VOLS:
            return _VOLS[key]
    from nhb_core.io import load_roi, load_t1

    t1 = load_t1(t1_path)
    roi = load_roi(roi_path, reference=t1)
    v = (np.asarray(t1.data, dtype=np.float32), np.asarray(roi.data, dtype=np.int16))
    with _VOL_LOCK:
        if len(_VOLS) >= 6:
            _VOLS.pop(next(iter(_VOLS)))
        _VOLS[key] = v
    return v


def _dataset(ds_dir: str):
    from nhb_core.slices import load_dataset

    key = (ds_dir, (Path(ds_dir) / "index.csv").stat().st_mtime_ns)
    if key not in _DS:
        _DS.clear()
        _DS[key] = load_dataset(ds_dir)
    return _DS[key]


def _window_u8(img: np.ndarray, level: float, width: float) -> np.ndarray:
    """Grayscale with window/level expressed on the slice's 1st-99th percentile range
    (level 0.5, width 1.0 = that range; narrower width = more contrast)."""
    a = np.nan_to_num(np.asarray(img, dtype=np.float64))
    lo, hi = np.percentile(a, [1, 99]) if a.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max()) + 1e-6
    x = (a - lo) / (hi - lo)
    w = max(float(width), 1e-3)
    y = (x - (float(level) - w / 2)) / w
    return (np.clip(y, 0, 1) * 255).round().astype(np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=1)  # no text chunks
    return buf.getvalue()


def case_slice_count(sdir: str | os.PathLike, code: str) -> int:
    return len(_case(load_session(sdir), code)["slices"])


def render_slice_png(sdir: str | os.PathLike, code: str, position: int, view: str = "full", level: float = 0.5,
                     width: float = 1.0, roi: bool = True, size_px: int = 384, sess: dict | None = None) -> bytes:
    """PNG bytes (no metadata) of case ``code``'s GP slice number ``position`` (0-based among its
    GP slices): ``view="full"`` the whole axial T1 slice, ``"crop"`` the dataset's zoomed GP crop;
    window/level on the slice's percentile range; the ROI outline when ``roi``. Radiological
    orientation (image left = patient's right, anterior up). Kept in a small in-process cache
    (filled ahead of the reader by :func:`prefetch`)."""
    key = (str(sdir), code, int(position), view, round(float(level), 4), round(float(width), 4), bool(roi), int(size_px))
    with _PNG_LOCK:
        hit = _PNGS.get(key)
        if hit is not None:
            _PNGS.move_to_end(key)
            return hit
    png = _render_slice_png(sdir, code, position, view, level, width, roi, size_px, sess)
    with _PNG_LOCK:
        _PNGS[key] = png
        while len(_PNGS) > 512:
            _PNGS.popitem(last=False)
    return png


def default_position(n_slices: int) -> int:
    """The GP slice a case opens on (0-based): the middle one."""
    return (int(n_slices) + 1) // 2 - 1


def prefetch(sdir: str | os.PathLike, codes: Sequence[str], level: float = 0.5, width: float = 1.0,
             roi: bool = True) -> threading.Thread | None:
    """Render the opening slice (both views) of the next case(s) in a background thread while the
    reader reads the current one, so that the click on *Save and next case* finds them ready."""
    job = (str(sdir), tuple(c for c in codes if c), round(float(level), 4), round(float(width), 4), bool(roi))
    with _PNG_LOCK:
        if not job[1] or job in _INFLIGHT:
            return None
        _INFLIGHT.add(job)

    def work():
        try:
            sess = load_session(sdir)
            for code in job[1]:
                n = len(_case(sess, code)["slices"])
                for view in ("full", "crop"):
                    render_slice_png(sdir, code, default_position(n), view, level, width, roi, sess=sess)
        except Exception:  # noqa: BLE001 - best effort; the page renders on demand anyway
            pass
        finally:
            with _PNG_LOCK:
                _INFLIGHT.discard(job)

    t = threading.Thread(target=work, name="nhb-reading-prefetch", daemon=True)
    t.start()
    return t


def _render_slice_png(sdir, code, position, view, level, width, roi, size_px, sess) -> bytes:
    from nhb_core.saliency import display_slice

    sess = sess or load_session(sdir)
    c = _case(sess, code)
    position = int(np.clip(int(position), 0, len(c["slices"]) - 1))
    z = int(c["slices"][position])
    if view == "full":
        if not c.get("t1_path"):
            raise ReadingError(None, "the whole slice is not available for this case", "Use the zoomed view")
        t1, lab = _volumes(c["t1_path"], c["roi_path"])
        img = display_slice(t1, z)
        labs: np.ndarray | None = display_slice(lab, z)
    else:
        ds = _dataset(sess["dataset_dir"])
        idx = ds.index
        hit = idx[(idx["subject_id"].astype(str) == c["subject_id"]) & (idx["slice_index"].astype(int) == z)]
        if hit.empty:
            raise ReadingError(None, "the zoomed crop of this slice is missing", "Tell the study owner")
        row = int(hit.iloc[0]["row"]) if "row" in hit.columns else int(hit.index[0])
        img = np.asarray(ds.images[row, 0], dtype=np.float32)
        labs = np.asarray(ds.masks[row]).astype(np.int16) if ds.masks is not None else None
    scale = max(1, int(round(size_px / max(img.shape))))
    from nhb_core.figures import contour_rgb

    return _png(contour_rgb(_window_u8(img, level, width), labs if roi else None, scale))


def _aided_now(sdir, reader_id: str) -> bool:
    st = reader_state(sdir, reader_id)
    return bool(st["aided"]) and st["state"] in ("reading", "done")


def aid_info(sdir: str | os.PathLike, reader_id: str, code: str, sess: dict | None = None) -> list[dict]:
    """The aided arm's help for one case: ``[{"model", "probability", "threshold"}]``. Refused unless
    the reader's current arm is the aided one (the unaided arm never gets a model output)."""
    sess = sess or load_session(sdir)
    if not _aided_now(sdir, reader_id):
        raise ReadingError(None, "model outputs are not shown in this arm", "Read the case unaided")
    c = _case(sess, code)
    out = []
    for m in sess["models"]:
        thr = None
        try:
            thr = RunFolder(sess["run"]).model_json(m).get("threshold")
        except (OSError, ValueError):
            pass
        out.append({"model": m, "probability": float(c["probs"][m]), "threshold": thr})
    return out


def render_cam_png(sdir: str | os.PathLike, reader_id: str, code: str, position: int, model: str,
                   alpha: float = 0.45, sess: dict | None = None) -> bytes:
    """Aided arm only: the network's Grad-CAM over the zoomed GP crop (``nhb_core.saliency``), PNG bytes."""
    from nhb_core import saliency

    sess = sess or load_session(sdir)
    if not _aided_now(sdir, reader_id):
        raise ReadingError(None, "model outputs are not shown in this arm", "Read the case unaided")
    if model not in sess["models"]:
        raise ReadingError(None, "unknown model", "Reload the page")
    c = _case(sess, code)
    position = int(np.clip(int(position), 0, len(c["slices"]) - 1))
    r = saliency.cam_for_case(sess["run"], model, sess["set"], c["subject_id"], int(c["slices"][position]))
    return saliency.overlay_png(r["image"][0], r["cam"], r["roi"], alpha=alpha)
