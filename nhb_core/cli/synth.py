"""``python -m nhb_core synth``: write the built-in synthetic two-center cohort."""

from __future__ import annotations

from pathlib import Path

import typer

from nhb_core.cli import app


@app.command("synth")
def synth_command(
    out: Path = typer.Option(..., "--out",
                             help="Folder to write (manifest.csv, cohort.json, truth.csv, images/)."),
    preset: str = typer.Option("paper", "--preset",
                               help="paper (A 106+119, B 34+18 subjects) or small (A 8+8, B 5+5)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; equal seeds give byte-identical files."),
    n: int | None = typer.Option(None, "--n",
                                    help="Total number of subjects instead of the preset's (split like it)."),
    workers: int | None = typer.Option(None, "--workers", help="Worker processes (default: up to 2)."),
    truth: bool = typer.Option(False, "--truth",
                               help="Also write the true GP masks under truth/ (never in the manifest)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write a synthetic two-center neonatal T1WI cohort (NIfTI volumes, GP masks, manifest.csv)."""
    import json

    from nhb_core.progress import rich_progress
    from nhb_core.synth import synthesize

    with rich_progress(enabled=not quiet) as cb:
        manifest = synthesize(out, preset=preset, seed=seed, n=n, progress=cb, workers=workers, write_truth=truth)
    meta = json.loads((manifest.parent / "cohort.json").read_text())
    counts = ", ".join(f"{c}: {v['1']} label 1 + {v['0']} label 0" for c, v in meta["counts"].items())
    oracle = ", ".join(f"{c} {v:.3f}" for c, v in meta["oracle_auc"].items() if v is not None)
    typer.echo(f"wrote {manifest} ({counts}); oracle AUC {oracle}")
