"""``python -m nhb_core reading-create / reading-progress / reading-close``: reading sessions without the
dashboard (docs/reading.md); readers still read in the browser (the Reading page, ``?token=...``)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from nhb_core.cli import app


def _runs_dir(runs: Path | None) -> Path:
    return Path(runs or os.environ.get("NHB_RUNS_DIR") or "runs").expanduser().resolve()


@app.command("reading-create")
def reading_create_command(
    run: Path = typer.Option(..., "--run", help="A finished study run (predictions, prepared dataset, manifest)."),
    reader: list[str] = typer.Option(..., "--reader", help="A reader's name (repeat for each reader)."),
    runs: Path | None = typer.Option(None, "--runs", help="Runs folder (default $NHB_RUNS_DIR or ./runs); the "
                                        "session goes under RUNS/reading/<id>."),
    set_name: str = typer.Option("test", "--set", help="The run's set whose subjects are read."),
    n_cases: int = typer.Option(0, "--cases", help="A stratified random sample of this many subjects (0 = all)."),
    by_center: bool = typer.Option(False, "--by-center", help="Stratify the sample by center too (always by label)."),
    aided: bool = typer.Option(False, "--aided", help="Add an aided arm (networks' probability and Grad-CAM)."),
    arm_order: str = typer.Option("unaided-first", "--arm-order", help="unaided-first, aided-first or crossover."),
    washout: float = typer.Option(0.0, "--washout-days", help="Days between a reader's two arms."),
    revision: bool = typer.Option(False, "--allow-revision", help="Readers may change a saved answer."),
    call: str = typer.Option("derived", "--call", help="derived (rating >= 3) or separate."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the sample and the case orders (recorded)."),
    title: str = typer.Option("", "--title", help="A title shown to the readers."),
) -> None:
    """Create a reading session on a finished run and print each reader's private link path."""
    from nhb_core import reading as R

    sdir = R.create_session(_runs_dir(runs), run, reader, set_name=set_name, n_cases=n_cases or None,
                            stratify=("label", "center") if by_center else ("label",),
                            arms=("unaided", "aided") if aided else ("unaided",), arm_order=arm_order,
                            washout_days=washout, allow_revision=revision, call_mode=call, seed=seed, title=title)
    sess = R.load_session(sdir)
    typer.echo(f"session {sess['id']}: {sess['n_cases']} cases, arms {' + '.join(sess['arms'])}, seed {sess['seed']}")
    typer.echo(f"folder {sdir}")
    for r in sess["readers"]:
        typer.echo(f"{r['name']}: /Reading?token={r['token']}")


def _session(session: str, runs: Path | None) -> Path:
    p = Path(session)
    if (p / "session.json").is_file():
        return p
    from nhb_core import reading as R

    return R.session_dir(_runs_dir(runs), session)


@app.command("reading-progress")
def reading_progress_command(
    session: str = typer.Option(..., "--session", help="A session folder or id."),
    runs: Path | None = typer.Option(None, "--runs", help="Runs folder (for a session id)."),
) -> None:
    """Each reader's progress per arm (counts only, never answers)."""
    from nhb_core import reading as R

    typer.echo(R.progress(_session(session, runs)).drop(columns=["fraction"]).to_string(index=False))


@app.command("reading-close")
def reading_close_command(
    session: str = typer.Option(..., "--session", help="A session folder or id."),
    runs: Path | None = typer.Option(None, "--runs", help="Runs folder (for a session id)."),
    install: bool = typer.Option(False, "--install", help="Also copy readings.csv next to the run's manifest "
                                 "(where the study's stats stage reads it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --install: replace an existing readings.csv "
                                   "(kept as readings.csv.bak)."),
) -> None:
    """Close a session: no more answers; write readings/<reader>__<arm>.csv, readings.csv and metrics.json."""
    from nhb_core import reading as R

    sdir = _session(session, runs)
    res = R.close_session(sdir)
    typer.echo(f"closed: {res['n_rows']} readings" + ("" if res["complete"] else " (some readers had not finished)"))
    typer.echo(f"wrote {res['readings']}")
    if install:
        typer.echo(f"wrote {R.install_readings(sdir, overwrite=overwrite)}")
