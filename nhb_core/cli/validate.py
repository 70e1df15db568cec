"""``python -m nhb_core validate MANIFEST``: check a cohort manifest and print the cohort table."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from nhb_core.cli import app


@app.command("validate")
def validate(
    manifest: Path = typer.Argument(..., help="The cohort manifest CSV (see docs/manifest.md)."),
    nbna_threshold: float = typer.Option(37.0, "--nbna-threshold", help="Injury (label 1) when nbna <= this score."),
    images: bool = typer.Option(True, "--images/--no-images",
                                help="Load every T1 and ROI (default) or only check that the files exist."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of tables."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no tables; only problems and the exit code."),
) -> None:
    """Check every row of a manifest (files exist and load, ROI not empty and on the T1 grid,
    unique ids, labels, NBNA 0..40) and print the cohort table.

    Every problem is printed as one line ``error: <file>:<row>: <problem>. <fix>.`` on
    stderr. Exit code 0 when the manifest is valid, 2 otherwise. Nothing is written.
    """
    from nhb_core.manifest import validate_manifest
    from nhb_core.progress import rich_progress

    with rich_progress(enabled=not (quiet or as_json)) as cb:
        report = validate_manifest(manifest, nbna_threshold=nbna_threshold, check_images=images, progress=cb)

    for w in report.warnings:
        typer.echo(f"warning: {w.line()}", err=True)
    for p in report.problems:
        typer.echo(f"error: {p.line()}", err=True)

    if as_json:
        from nhb_core.fileio import to_json

        typer.echo(to_json(report.to_dict()))
    elif not report.ok:
        n_rows = len(report.rows_with_problems)
        where = f" in {n_rows} of {report.n_rows} rows" if n_rows else ""
        typer.echo(f"{manifest}: {len(report.problems)} problem(s){where}; the manifest is not valid.", err=True)
    elif not quiet:
        _print_tables(report)
    if not report.ok:
        raise typer.Exit(2)


def _print_tables(report) -> None:
    import math

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=sys.stdout)
    man = report.manifest
    ct = report.cohort_table
    t = Table(title=f"Cohort: {len(man)} subjects, {len(ct)} center(s)",
              caption=f"NHB = label 1 (nbna <= {man.nbna_threshold:g} where no label)")
    t.add_column("center")
    t.add_column("controls (0)", justify="right")
    t.add_column("NHB (1)", justify="right")
    t.add_column("total", justify="right")
    for center, row in ct.iterrows():
        t.add_row(Text(str(center)), str(int(row[0])), str(int(row[1])), str(int(row[0] + row[1])))
    t.add_row("all", str(int(ct[0].sum())), str(int(ct[1].sum())), str(int(ct.values.sum())), style="bold")
    console.print(t)
    if len(report.reader_table):
        rt = Table(title="Readers (visual reads vs label)")
        for c in ("reader", "read", "positive", "sensitivity", "specificity"):
            rt.add_column(c, justify="left" if c == "reader" else "right")
        for _, r in report.reader_table.iterrows():
            def fmt(v: float | None) -> str:
                return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

            rt.add_row(Text(str(r["reader"])), str(r["n_read"]), str(r["n_positive"]), fmt(r["sensitivity"]), fmt(r["specificity"]))
        console.print(rt)
    else:
        console.print("Readers: none (no reader_<name> columns)")
    if len(report.covariate_table):
        cv = Table(title="Covariates (mean ± sd; counts for sex)")
        for c in ("covariate", "n", "all", "controls", "NHB"):
            cv.add_column(c, justify="left" if c == "covariate" else "right")
        for _, r in report.covariate_table.iterrows():
            cv.add_row(str(r["covariate"]), str(r["n"]), Text(str(r["all"])), Text(str(r["controls"])), Text(str(r["injury"])))
        console.print(cv)
    if man.extra_columns:
        console.print(f"Extra columns carried along: {', '.join(man.extra_columns)}", markup=False)
    checked = "T1 and ROI images loaded and checked" if report.images_checked else "image files exist (not loaded: --no-images)"
    console.print(f"manifest OK: {len(man)} subjects; {checked}.", markup=False)
