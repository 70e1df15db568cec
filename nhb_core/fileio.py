"""Small file helpers shared by every stage: atomic writes, hashing, JSON.

No stage leaves half-written output: everything is written to a temporary file
in the destination folder and renamed into place (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` on success.

    On an exception the temporary file is removed and ``dest`` is untouched.
    ``suffix`` defaults to the destination's full suffix (``.nii.gz`` stays
    ``.nii.gz``) so that libraries choosing a format from the name still work.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(dest.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(OSError):  # mkstemp makes 0600; outputs follow the umask like open()
            if tmp_path.is_file():
                os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock (POSIX ``flock``) on ``path`` (created, never removed) for the
    ``with`` block, across processes; a no-op where ``fcntl`` does not exist.

    >>> with exclusive_lock(Path(tempfile.mkdtemp()) / ".lock"):  # doctest: +SKIP
    ...     pass
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:  # closing the file releases the lock
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp")


def remove_stale_temps(folder: str | os.PathLike, min_age_s: float = 300.0) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left under ``folder`` (a process killed
    with SIGKILL mid-write); call it only while holding the folder's lock. Files younger than
    ``min_age_s`` are kept (a dashboard process may be writing a cache entry). Returns them."""
    import time

    removed = []
    now = time.time()
    for p in Path(folder).rglob(".*.tmp*"):
        if p.is_file() and not p.is_symlink() and _TEMP_RE.match(p.name) and now - p.stat().st_mtime >= min_age_s:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe, only where /proc is missing
    os.umask(mask)
    return mask


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(obj: Any, indent: int | None = 2) -> str:
    """JSON text with numpy scalars/arrays converted; NaN/inf become null."""
    return json.dumps(_nan_to_none(obj), indent=indent, default=_json_default, allow_nan=False)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) or isinstance(obj, np.floating):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, dict):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _nan_to_none(obj.tolist())
    return obj


def atomic_write_json(dest: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(dest, to_json(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (for a folder: of its sorted files' names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(chunk), b""):
                    h.update(block)
        return h.hexdigest()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object (keys sorted): a config's cache key."""
    return sha256_bytes(json.dumps(_nan_to_none(obj), sort_keys=True, default=_json_default).encode())
