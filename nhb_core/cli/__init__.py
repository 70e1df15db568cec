"""The command-line interface: ``python -m nhb_core <command> ...``.

Each command group lives in its own module of this package (``validate.py``,
``synth.py``, ``data.py``, ...) and registers its commands on :data:`app`;
modules are discovered automatically, so adding a command means adding a file.
Heavy imports (torch, timm) happen inside the command functions so that
``--help`` stays fast.

Errors: any :class:`nhb_core.errors.NHBError` becomes one line
``error: <file>[:<row>]: <problem>. <fix>`` on stderr and exit code 2; a
traceback only with ``--debug``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from nhb_core import __version__
from nhb_core.errors import NHBError

app = typer.Typer(
    name="nhb_core",
    help="NHB Lab: T1WI deep learning for neonatal hyperbilirubinemia brain injury.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}


def debug_enabled() -> bool:
    return _state["debug"]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"nhb_core {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool | None = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """NHB Lab command line. Every command has --help."""
    _state["debug"] = debug


def _register_commands() -> None:
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_register_commands()


def fail(err: NHBError) -> None:
    """Print the one-line error and exit 2 (used by commands that catch errors themselves)."""
    typer.echo(f"error: {err.line()}", err=True)
    raise typer.Exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the Typer app with the project's error policy."""
    try:  # typer >= 0.2x vendors its own click
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - older typer
        from click.exceptions import ClickException  # type: ignore[assignment]

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _state["debug"] = debug
    try:
        rc = app(args=args, prog_name="nhb_core", standalone_mode=False)
    except NHBError as err:
        if debug:
            raise
        typer.echo(f"error: {err.line()}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("error: aborted.", err=True)
        sys.exit(130)
    except ClickException as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # the help was printed
            sys.exit(0)
        if debug:
            raise
        err.show()
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted.", err=True)
        sys.exit(130)
    except Exception as err:  # an unexpected bug: still one line unless --debug
        if debug:
            raise
        msg = " ".join(f"{type(err).__name__}: {err}".split())
        typer.echo(f"error: internal error: {msg}. Rerun with --debug for the traceback and report it.", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
