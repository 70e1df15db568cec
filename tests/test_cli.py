"""The CLI skeleton: help, version, the one-line error policy."""

import subprocess
import sys

from nhb_core import __version__
from nhb_core.errors import NHBError, Problem


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nhb_core", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "Usage" in r.stdout


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert __version__ in r.stdout


def test_error_line_format():
    e = NHBError("cohort/manifest.csv", "column 'center' is empty.", "Fill in the center of every subject.", row=4)
    assert e.line() == "cohort/manifest.csv:4: column 'center' is empty. Fill in the center of every subject."
    assert "\n" not in NHBError("a\nb", "multi\nline", "fix\nit").line()
    p = Problem("m.csv", "bad", "fix it", row=2, column="label")
    assert p.line() == "m.csv:2: bad. fix it."


def test_unknown_command_exit_2():
    r = run_cli("no-such-command")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
