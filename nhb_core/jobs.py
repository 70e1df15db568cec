"""Background study jobs for the dashboard: a file-based queue over run folders.

A job is a run folder ``<runs_dir>/<name>/`` holding ``config.yaml`` and a
``status.json`` (see ``docs/design-shared.md``). :func:`submit_study` writes
both (state ``queued``); :func:`start_queued` launches queued runs as
*detached* processes (``python -m nhb_core study ...`` in a new session, hence
their own process group, output appended to ``log.txt``) while fewer than
``max_running`` are running, and records ``pid``/``pgid`` in ``status.json``.
Because the process is detached and all state lives in files, a job survives
page reloads, the browser closing and the dashboard restarting.

Nothing runs in the background inside the dashboard: Streamlit has no thread
of its own for that, so the pages call :func:`refresh` (which notices dead
processes and then calls :func:`start_queued`) on load and from their polling
fragment (``st.fragment(run_every=...)``). Without an open page, a queued run
waits until a page is opened again; a running one carries on regardless.

:func:`cancel` sends SIGTERM to the job's process group, SIGKILL after a grace
period, and marks the run ``cancelled``.

This module never imports streamlit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nhb_core.errors import ConfigError, RunError
from nhb_core.fileio import atomic_write_text, exclusive_lock
from nhb_core.runs import append_log, list_runs, now_iso, read_status, write_status

__all__ = [
    "sanitize_name", "submit_study", "start_queued", "refresh", "cancel", "study_command",
    "is_alive", "job_pid", "queue_position", "ACTIVE_STATES", "FINAL_STATES", "DEFAULT_MAX_RUNNING",
]

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled")
DEFAULT_MAX_RUNNING = int(os.environ.get("NHB_MAX_RUNNING", "1") or 1)
_NAME_MAX = 64

# Popen objects of the jobs this process started, so that finished children are
# reaped (a zombie still answers kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


# ----------------------------------------------------------------- names
def sanitize_name(name: str) -> str:
    """A run-folder name made of ``[A-Za-z0-9_-]`` only (at most 64 characters).

    Every other character becomes ``-``; leading dashes/dots are stripped, so
    the result can never be ``..``, an absolute path or an option. An empty
    result becomes ``run``.

    >>> sanitize_name("../my run: <b>1</b>")
    'my-run-b-1-b'
    """
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", str(name or ""))
    s = re.sub(r"-{2,}", "-", s).strip("-_")[:_NAME_MAX].strip("-_")
    return s or "run"


def _unique_dir(runs_dir: Path, name: str) -> Path:
    base = sanitize_name(name)
    cand = runs_dir / base
    i = 2
    while cand.exists():
        cand = runs_dir / f"{base[:_NAME_MAX - 4]}-{i}"
        i += 1
    return cand


# ----------------------------------------------------------------- processes
def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name may contain spaces or parentheses: split after the last ')'
    return raw[raw.rfind(")") + 2:].split()


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), or None."""
    rest = _proc_stat_fields(pid)
    try:
        return int(rest[19]) if rest is not None else None
    except (IndexError, ValueError):
        return None


def _proc_state(pid: int) -> str | None:
    rest = _proc_stat_fields(pid)
    return rest[0] if rest else None


#: exit codes of reaped children, by pid (popped when a new child gets the same pid)
_EXIT_CODES: dict[int, int] = {}


def _reap(pid: int) -> int | None:
    """Reap ``pid`` if it is a finished child of this process; its exit code or None.

    The code is remembered (``_EXIT_CODES``): :func:`is_alive` reaps too, and a later
    :func:`refresh` must still be able to say how the process ended.
    """
    if pid in _EXIT_CODES:
        return _EXIT_CODES[pid]
    p = _CHILDREN.get(pid)
    if p is not None:
        rc = p.poll()
        if rc is not None:
            _CHILDREN.pop(pid, None)
            _EXIT_CODES[pid] = rc
        return rc
    try:
        wpid, wstatus = os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        return None
    if wpid == 0:
        return None
    rc = os.waitstatus_to_exitcode(wstatus)
    _EXIT_CODES[pid] = rc
    return rc


def is_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` is running (not a zombie) and, when ``start_ticks``
    is given, is the same process that was started then (pids are reused)."""
    if not pid:
        return False
    pid = int(pid)
    _reap(pid)
    if os.path.isdir("/proc"):
        state = _proc_state(pid)
        if state is None or state in ("Z", "X"):
            return False
        if start_ticks is not None:
            now_ticks = _proc_start_ticks(pid)
            if now_ticks is not None and now_ticks != int(start_ticks):
                return False
        return True
    try:  # pragma: no cover - non-Linux fallback
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    # only zombies left in the group count as dead
    if os.path.isdir("/proc"):
        _reap(pgid)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if os.getpgid(int(d)) == pgid and _proc_state(int(d)) not in (None, "Z", "X"):
                    return True
            except (ProcessLookupError, PermissionError, OSError):
                continue
        return False
    return True  # pragma: no cover


def job_pid(status: dict[str, Any] | None) -> int | None:
    """The pid recorded in a status dict (or None)."""
    if not status:
        return None
    pid = status.get("pid")
    try:
        return int(pid) if pid else None
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------- locking
@contextlib.contextmanager
def _queue_lock(runs_dir: Path) -> Iterator[None]:
    """An exclusive lock on the queue, so that two dashboard sessions never start
    the same queued run twice."""
    with exclusive_lock(runs_dir / ".jobs.lock"):
        yield


# ----------------------------------------------------------------- API
def study_command(run_dir: str | os.PathLike, manifest: str, nproc: int = 1) -> list[str]:
    """The argv that runs the study of ``run_dir`` (under torchrun when ``nproc`` > 1)."""
    run_dir = Path(run_dir)
    tail = ["-m", "nhb_core", "study", "--manifest", str(manifest), "--out", str(run_dir),
            "--config", str(run_dir / "config.yaml")]
    if int(nproc) > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={int(nproc)}", *tail]
    return [sys.executable, *tail]


def submit_study(runs_dir: str | os.PathLike, name: str, manifest: str | os.PathLike, config: dict,
                 max_running: int = DEFAULT_MAX_RUNNING, nproc: int = 1, start: bool = True) -> Path:
    """Queue a study run and start it if a slot is free.

    Parameters
    ----------
    runs_dir : path
        The runs folder (``NHB_RUNS_DIR``).
    name : str
        Wanted run name; sanitised to ``[A-Za-z0-9_-]`` and made unique
        (``name-2``, ...). Never taken from an uploaded file.
    manifest : path
        The cohort manifest CSV the study reads.
    config : dict
        The study configuration, written to ``RUNDIR/config.yaml``.
    max_running : int
        At most this many jobs run at once; the rest wait in the queue.
    nproc : int
        Processes (GPUs) per run: > 1 runs the study under torchrun.
    start : bool
        Call :func:`start_queued` right away.

    Returns
    -------
    Path : the new run folder (status ``queued``, or ``running`` if started).
    """
    import yaml

    runs_dir = Path(runs_dir)
    if not isinstance(config, dict):
        raise ConfigError("config", "the study configuration must be a mapping", "Pass a dict of options")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ConfigError(manifest, "the manifest file does not exist", "Choose an existing manifest CSV")
    runs_dir.mkdir(parents=True, exist_ok=True)
    with _queue_lock(runs_dir):
        run_dir = _unique_dir(runs_dir, name)
        run_dir.mkdir(parents=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        write_status(run_dir, "queued", stage="queued", manifest=str(manifest.resolve()), nproc=int(nproc),
                     submitted=now_iso(), queued_at=time.time(), pid=None, pgid=None)
        append_log(run_dir, f"queued by the dashboard (manifest {manifest.name})")
    if start:
        start_queued(runs_dir, max_running)
    return run_dir


def _launch(run_dir: Path, status: dict[str, Any]) -> dict[str, Any]:
    manifest = status.get("manifest")
    if not manifest:
        return write_status(run_dir, "failed", error=f"{run_dir / 'status.json'}: the queued run names no manifest. "
                                                     "Submit the study again")
    cmd = study_command(run_dir, manifest, int(status.get("nproc") or 1))
    env = os.environ.copy()
    env["PYTHONUNBUFFERED"] = "1"
    log = open(run_dir / "log.txt", "ab")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=env, cwd=os.getcwd())
    except OSError as err:
        return write_status(run_dir, "failed", error=f"could not start the study process: {err}")
    finally:
        log.close()
    _CHILDREN[proc.pid] = proc
    _EXIT_CODES.pop(proc.pid, None)
    return write_status(run_dir, "running", stage="starting", pid=proc.pid, pgid=proc.pid,
                        pid_start=_proc_start_ticks(proc.pid), command=cmd, launched=now_iso())


def _queued(runs: list[Path]) -> list[tuple[Path, dict]]:
    out = []
    for r in runs:
        st = read_status(r)
        if st and st.get("state") == "queued" and not st.get("pid"):
            out.append((r, st))
    out.sort(key=lambda rs: (rs[1].get("queued_at") or 0.0, rs[0].name))
    return out


def _running(runs: list[Path]) -> list[Path]:
    out = []
    for r in runs:
        st = read_status(r)
        if st and st.get("state") == "running" and is_alive(job_pid(st), st.get("pid_start")):
            out.append(r)
    return out


def start_queued(runs_dir: str | os.PathLike, max_running: int = DEFAULT_MAX_RUNNING) -> list[Path]:
    """Launch queued runs (oldest first) while fewer than ``max_running`` are running.

    Returns the run folders started by this call.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    started: list[Path] = []
    with _queue_lock(runs_dir):
        runs = list_runs(runs_dir)
        free = max(0, int(max_running) - len(_running(runs)))
        for run_dir, st in _queued(runs)[:free]:
            _launch(run_dir, st)
            started.append(run_dir)
    return started


def _last_error_line(run_dir: Path) -> str | None:
    """The last ``error: ...`` line (or the last line) of the run's log.txt."""
    p = run_dir / "log.txt"
    try:
        with open(p, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 20000))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    lines = [ln.strip() for ln in lines if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln[len("error:"):].strip()
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[-300:]
    return None


def refresh(runs_dir: str | os.PathLike, max_running: int = DEFAULT_MAX_RUNNING) -> list[Path]:
    """Mark runs whose process died as ``failed`` (with a clear one-line error),
    then start queued runs. Cheap: call it on page load and from polling fragments.

    Returns the run folders whose state this call changed.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    changed: list[Path] = []
    with _queue_lock(runs_dir):
        for r in list_runs(runs_dir):
            st = read_status(r)
            if not st or st.get("state") != "running":
                continue
            pid = job_pid(st)
            if pid is None or is_alive(pid, st.get("pid_start")):
                continue
            st2 = read_status(r) or {}
            if st2.get("state") != "running":  # it finished while we looked
                continue
            rc = _reap(pid)
            why = _last_error_line(r)
            stage = st2.get("stage") or "?"
            msg = f"the study process (pid {pid}) stopped during stage '{stage}'"
            if rc is not None and rc < 0:
                try:
                    sig = signal.Signals(-rc).name
                except ValueError:
                    sig = f"signal {-rc}"
                msg += f" killed by {sig} (exit code {rc})"
            elif rc is not None:
                msg += f" with exit code {rc}"
            else:
                msg += " (exit code unknown: it was not started by this dashboard process)"
            msg += f": {why}" if why else "; see log.txt"
            write_status(r, "failed", error=msg)
            append_log(r, f"marked failed by the dashboard: {msg}")
            changed.append(r)
    changed += start_queued(runs_dir, max_running)
    return changed


def cancel(run_dir: str | os.PathLike, grace_s: float = 5.0) -> dict[str, Any]:
    """Stop a queued or running job and mark it ``cancelled``.

    A running job's process group gets SIGTERM, then SIGKILL if it is still
    alive after ``grace_s`` seconds. Returns the new status dict. Raises
    :class:`RunError` when the run is already finished.
    """
    run_dir = Path(run_dir)
    st = read_status(run_dir)
    if st is None:
        raise RunError(run_dir / "status.json", "the run has no status", "Choose a run folder made by a study")
    state = st.get("state")
    if state in FINAL_STATES:
        raise RunError(run_dir / "status.json", f"the run is already {state}", "Only queued or running jobs can be cancelled")
    pid = job_pid(st)
    pgid = st.get("pgid")
    if pid and is_alive(pid, st.get("pid_start")):
        if pgid:  # started by start_queued: the job leads its own process group
            def send(sig: int) -> None:
                os.killpg(int(pgid), sig)

            def alive() -> bool:
                return _group_alive(int(pgid))
        else:  # a study started elsewhere (CLI): signal that process only, never a foreign group
            def send(sig: int) -> None:
                os.kill(int(pid), sig)

            def alive() -> bool:
                return is_alive(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)
        if alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                send(signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and alive():
                time.sleep(0.05)
        _reap(int(pid))
    append_log(run_dir, "cancelled by the user")
    return write_status(run_dir, "cancelled", error=None, cancelled=now_iso())


def queue_position(runs_dir: str | os.PathLike, run_dir: str | os.PathLike) -> int | None:
    """1-based position of a queued run in the queue, or None if it is not queued."""
    run_dir = Path(run_dir).resolve()
    for i, (r, _st) in enumerate(_queued(list_runs(runs_dir)), start=1):
        if r.resolve() == run_dir:
            return i
    return None
