"""Guards against hostile or careless inputs (``docs/security.md``).

One place for the checks that keep an input from deleting, overwriting or
exhausting anything:

- :func:`check_name`: a model name (it becomes ``models/<name>``) is one plain component
  (letters, digits, ``_ . + -``; no ``/``, ``\\``, ``..``); :func:`check_label`: a center
  (part of prediction file names) or a subject id (a spreadsheet cell).
- :func:`inside` / :func:`safe_rmtree`: a derived path must lie inside its run folder
  before anything is written or removed there.
- :func:`max_voxels`, :func:`max_image_bytes`, :func:`check_image_size`, :func:`copy_limited`,
  :func:`count_limited`, :func:`check_regular_file`: resource limits on reads
  (``NHB_MAX_VOXELS``, ``NHB_MAX_IMAGE_BYTES``, ``NHB_MAX_CONFIG_BYTES``, ``NHB_MAX_MANIFEST_BYTES``).
- :func:`safe_yaml_load`: YAML without aliases (the size limit is checked by the callers).
- :func:`check_model_json`: a model.json's types and ranges before a model is built.
- :func:`run_lock`: the exclusive lock of a run folder (``filelock``; the holder's pid
  and host recorded; a stale lock from a dead process is taken over with a warning).
- :func:`neutralise_csv` / :func:`csv_for_people`: spreadsheet formula injection.

Every failure is an :class:`~nhb_core.errors.NHBError` with the one-line message.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from nhb_core.errors import ConfigError, ImageError, InputError, RunError

# ----------------------------------------------------------------------------- limits

#: default largest voxel count of an image (a 512^3 3D T1); ``NHB_MAX_VOXELS`` overrides it.
DEFAULT_MAX_VOXELS = 512 ** 3
#: default largest uncompressed size in bytes of an image's voxel data (or of an uploaded
#: archive's contents); ``NHB_MAX_IMAGE_BYTES`` overrides it.
DEFAULT_MAX_IMAGE_BYTES = 512 << 20
#: largest study config (YAML) in bytes; ``NHB_MAX_CONFIG_BYTES`` overrides it.
DEFAULT_MAX_CONFIG_BYTES = 1 << 20
#: largest manifest (CSV) in bytes; ``NHB_MAX_MANIFEST_BYTES`` overrides it.
DEFAULT_MAX_MANIFEST_BYTES = 64 << 20

_RAISE = "raise it with the environment variable {var} (docs/security.md)"


def _env_int(var: str, default: int) -> int:
    raw = os.environ.get(var)
    if raw in (None, ""):
        return default
    try:
        val = int(float(raw))
    except ValueError:
        raise ConfigError(var, f"environment variable {var}={raw!r} is not a number",
                          f"Set {var} to a positive integer, or unset it (default {default})") from None
    if val < 1:
        raise ConfigError(var, f"environment variable {var}={raw!r} must be positive",
                          f"Set {var} to a positive integer, or unset it (default {default})")
    return val


def max_voxels() -> int:
    """The largest voxel count an image may declare (``NHB_MAX_VOXELS``, default 512^3)."""
    return _env_int("NHB_MAX_VOXELS", DEFAULT_MAX_VOXELS)


def max_image_bytes() -> int:
    """The largest uncompressed voxel data / archive content in bytes (``NHB_MAX_IMAGE_BYTES``, default 512 MiB)."""
    return _env_int("NHB_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES)


def max_config_bytes() -> int:
    return _env_int("NHB_MAX_CONFIG_BYTES", DEFAULT_MAX_CONFIG_BYTES)


def max_manifest_bytes() -> int:
    return _env_int("NHB_MAX_MANIFEST_BYTES", DEFAULT_MAX_MANIFEST_BYTES)


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def check_image_size(file: Any, shape: tuple[int, ...], itemsize: int, what: str = "image") -> None:
    """Raise :class:`ImageError` naming ``file`` when a header's shape exceeds the limits.

    Called with the header's numbers before any voxel is read.
    """
    nvox = 1
    for s in shape:
        nvox *= max(int(s), 0)
    lim = max_voxels()
    if nvox > lim:
        raise ImageError(file, f"{what} declares {nvox:,} voxels (shape {tuple(int(s) for s in shape)}), more than "
                         f"the limit of {lim:,}",
                         "Give a single 3D T1 (at most 512^3 voxels); for a larger real image "
                         + _RAISE.format(var="NHB_MAX_VOXELS"))
    nbytes = nvox * int(itemsize)
    blim = max_image_bytes()
    if nbytes > blim:
        raise ImageError(file, f"{what} declares {_human(nbytes)} of voxel data, more than the limit of {_human(blim)}",
                         "Export it with a smaller voxel type (int16 or float32); for a larger real image "
                         + _RAISE.format(var="NHB_MAX_IMAGE_BYTES"))


def copy_limited(src: IO[bytes], dst: IO[bytes], limit: int, file: Any, what: str = "file",
                 chunk: int = 1 << 20) -> int:
    """Copy a stream with a running byte count; :class:`ImageError` as soon as it passes ``limit``."""
    n = 0
    while True:
        block = src.read(min(chunk, limit + 1 - n))
        if not block:
            return n
        n += len(block)
        if n > limit:
            raise ImageError(file, f"{what} unpacks to more than {_human(limit)} (a compression bomb or not one image)",
                             "Upload one image or one DICOM series; for a larger real input "
                             + _RAISE.format(var="NHB_MAX_IMAGE_BYTES"))
        dst.write(block)


def count_limited(src: IO[bytes] | gzip.GzipFile, limit: int, chunk: int = 1 << 20) -> int:
    """Bytes in a stream, counting at most ``limit + 1`` (nothing kept in memory)."""
    n = 0
    while n <= limit:
        block = src.read(min(chunk, limit + 1 - n))
        if not block:
            break
        n += len(block)
    return n


def check_regular_file(path: Path, limit: int, what: str, var: str, error: type = InputError) -> None:
    """``path`` must be a regular file of at most ``limit`` bytes (not a device, FIFO, ...)."""
    import stat

    try:
        st = path.stat()
    except OSError:
        return  # the caller reports the missing file
    if not stat.S_ISREG(st.st_mode):
        raise error(path, f"{what} is not a regular file (a device, pipe or socket)", f"Give the path of the {what} file")
    if st.st_size > limit:
        raise error(path, f"{what} is {_human(st.st_size)}, more than the limit of {_human(limit)}",
                    "Check that this is the right file; " + _RAISE.format(var=var))


# ----------------------------------------------------------------------------- names and paths

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}$")
#: characters a spreadsheet reads as the start of a formula (tab and CR too)
FORMULA_CHARS = ("=", "+", "-", "@", "\t", "\r")


def check_name(name: Any, what: str, source: Any, fix: str = "") -> str:
    """``name`` as a string when it is one safe path component, else :class:`ConfigError`.

    Allowed: letters, digits, ``_ . + -``, at most 100 characters, not starting with
    ``.`` or ``-`` (so never ``..``, never a hidden file, never an option).
    """
    s = str(name).strip()
    if not _NAME_RE.match(s) or s in (".", ".."):
        raise ConfigError(source, f"{what} {s!r} is not a plain name (only letters, digits, _ . + -; "
                          "no '/', '..' or spaces)", fix or f"Rename the {what}")
    return s


def check_label(value: Any, what: str, source: Any, row: int | None = None, error: type = InputError,
                path_part: bool = True) -> None:
    """A label that ends up in spreadsheets (a subject id) and, with ``path_part``, in file names
    (a center): not starting like a formula, no control characters; with ``path_part`` also no
    path separators and not ``.``/``..``."""
    s = str(value)
    bad = None
    if s.startswith(FORMULA_CHARS):
        bad = f"starts with {s[0]!r}, which spreadsheets run as a formula"
    elif not path_part and any(ord(c) < 32 or ord(c) == 127 for c in s):
        bad = "contains a control character (tab, newline, ...)"
    elif not path_part:
        pass
    elif "/" in s or "\\" in s:
        bad = "contains '/' or '\\', which cannot be part of a file name"
    elif s.strip() in (".", ".."):
        bad = "is '.' or '..'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in s):
        bad = "contains a control character (tab, newline, ...)"
    if bad:
        raise error(source, f"{what} {s[:60]!r} {bad}", f"Rename the {what} (letters, digits, spaces, _ . -)", row=row)


def inside(root: Path, path: Path, what: str = "path") -> Path:
    """``path`` resolved, when it lies inside ``root`` (resolved); else :class:`RunError`."""
    r = Path(root).resolve()
    p = Path(path).resolve()
    if p != r and r not in p.parents:
        raise RunError(path, f"{what} lies outside the run folder {r}", "Use plain names for models, sets and centers")
    return p


def safe_rmtree(path: Path, root: Path, what: str = "folder") -> None:
    """Remove ``path`` (a folder strictly inside ``root``); refuse anything else."""
    path = Path(path)
    if path.is_symlink():  # the link itself goes, never what it points to
        inside(root, path.parent, what)
        path.unlink()
        return
    p = inside(root, path, what)
    if p == Path(root).resolve():
        raise RunError(path, f"refusing to remove the run folder itself as a {what}", "Use plain model names")
    if p.exists():
        shutil.rmtree(p)


# ----------------------------------------------------------------------------- YAML


def safe_yaml_load(text: str, source: Any) -> Any:
    """``yaml.safe_load`` without aliases (``*name``): an alias is a :class:`ConfigError`.

    Aliases are what a "billion laughs" bomb multiplies; a study config never needs them.
    """
    import yaml
    from yaml.events import AliasEvent

    class _NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # noqa: ANN001
            if self.check_event(AliasEvent):
                ev = self.peek_event()
                raise ConfigError(source, f"YAML alias *{ev.anchor} is not allowed in a config "
                                  "(aliases can multiply a small file into gigabytes)",
                                  "Write the value out in full instead of using &anchor / *alias",
                                  row=ev.start_mark.line + 1)
            return super().compose_node(parent, index)

    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# ----------------------------------------------------------------------------- run lock

LOCK_NAME = ".study.lock"
HOLDER_NAME = ".study.lock.json"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[dict[str, Any]]:
    """Hold the exclusive lock of ``run_dir`` for the life of the block.

    The lock is ``RUNDIR/.study.lock`` (``filelock``: an OS lock that dies with its
    process); ``RUNDIR/.study.lock.json`` records the holder (pid, host, started).
    A second holder gets a :class:`RunError` naming the first; a holder file left by
    a dead process (the OS lock is free) is taken over with a warning.
    """
    from filelock import FileLock, Timeout

    from nhb_core.runs import now_iso

    run_dir = Path(run_dir)
    holder_path = run_dir / HOLDER_NAME
    lock = FileLock(str(run_dir / LOCK_NAME), timeout=0, mode=0o666)
    try:
        lock.acquire()
    except Timeout:
        info = _read_holder(holder_path)
        who = f"process {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('started', '?')}"
        raise RunError(run_dir, f"the run folder is locked by another study ({who})",
                       "Wait for it to finish or cancel it, or give another --out folder") from None
    try:
        old = _read_holder(holder_path)
        if old and old.get("pid") != os.getpid():
            same_host = old.get("host") == socket.gethostname()
            if not same_host or not _pid_alive(old.get("pid")):
                msg = (f"{run_dir}: taking over a stale lock left by process {old.get('pid')} on "
                       f"{old.get('host')} (started {old.get('started')}), which no longer holds it")
                print(f"warning: {msg}", file=sys.stderr)
                with contextlib.suppress(OSError):
                    from nhb_core.runs import append_log
                    append_log(run_dir, f"warning: {msg}")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}
        from nhb_core.fileio import atomic_write_json

        atomic_write_json(holder_path, info)
        yield info
    finally:
        with contextlib.suppress(OSError):
            if _read_holder(holder_path).get("pid") == os.getpid():
                holder_path.unlink()
        lock.release()


def _read_holder(p: Path) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- CSV for people


def neutralise_cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula, prefixed with ``'`` (others unchanged)."""
    if isinstance(value, str) and value.startswith(FORMULA_CHARS):
        if value[0] in "+-":
            try:
                float(value)
                return value  # a plain signed number is not a formula
            except ValueError:
                pass
        return "'" + value
    return value


def neutralise_csv(df: Any) -> Any:
    """A copy of a DataFrame whose text cells (and column names) cannot start a formula.

    Numeric columns are untouched (``-0.5`` stays a number); only object/string cells change.
    """
    import pandas as pd

    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object or pd.api.types.is_string_dtype(out[c]):
            out[c] = out[c].map(neutralise_cell)
    out.columns = [neutralise_cell(c) if isinstance(c, str) else c for c in out.columns]
    return out


def csv_for_people(data: bytes) -> bytes:
    """CSV bytes (e.g. a download) with every formula-like cell neutralised."""
    import io

    import pandas as pd

    df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    return neutralise_csv(df).to_csv(index=False).encode("utf-8")


# ----------------------------------------------------------------------------- model.json


def check_model_json(mj: Any, path: Any) -> dict[str, Any]:
    """Validate a ``model.json`` before a model is built from it (:class:`RunError` naming ``path``).

    Known keys with types and ranges: ``architecture``/``timm_name`` plain names, ``in_chans``
    an integer 1..16 (so a hostile file cannot make a model of gigabytes), ``input_size``
    two integers 8..1024, ``threshold``/``threshold_slice`` numbers in [0, 1],
    ``preprocessing`` a mapping.
    """
    import math

    fix = "Retrain the model, or restore its model.json from the run it came from"
    if not isinstance(mj, dict):
        raise RunError(path, "model.json is not a JSON object", fix)
    name = mj.get("timm_name") or mj.get("architecture")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RunError(path, f"model.json names no valid architecture ({str(name)[:60]!r})", fix)

    def _int(key: str, lo: int, hi: int, default: Any = None) -> None:
        v = mj.get(key, default)
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise RunError(path, f"model.json {key} must be an integer from {lo} to {hi}, not {repr(v)[:40]}", fix)

    def _prob(key: str) -> None:
        v = mj.get(key)
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise RunError(path, f"model.json {key} must be a number from 0 to 1, not {repr(v)[:40]}", fix)

    _int("in_chans", 1, 16)
    _prob("threshold")
    _prob("threshold_slice")
    size = mj.get("input_size")
    if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 2 or
                             any(isinstance(x, bool) or not isinstance(x, int) or not 8 <= x <= 1024 for x in size)):
        raise RunError(path, f"model.json input_size must be two integers from 8 to 1024, not {str(size)[:40]}", fix)
    if mj.get("preprocessing") is not None and not isinstance(mj.get("preprocessing"), dict):
        raise RunError(path, "model.json preprocessing must be a mapping of options", fix)
    return mj
