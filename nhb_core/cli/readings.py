"""``python -m nhb_core synth-readings``: the synthetic cohort's simulated reader study, optionally with
an aided arm whose readers lean towards a trained network (docs/synth.md, "Reader study")."""

from __future__ import annotations

from pathlib import Path

import typer

from nhb_core.cli import app
from nhb_core.runs import RunFolder


@app.command("synth-readings")
def synth_readings_command(
    cohort: Path = typer.Option(..., "--cohort", help="Folder written by `nhb_core synth` (holds cohort.json)."),
    run: Path | None = typer.Option(None, "--run", help="A finished study run: its network's subject-level "
                                       "probabilities (predictions/*__subjects.csv) make the aided arm."),
    model: str | None = typer.Option(None, "--model", help="The network of --run (default: its first model)."),
    aid_weight: float = typer.Option(0.5, "--aid-weight", help="How far the aided readers lean towards the "
                                     "network, 0..1."),
    out: Path | None = typer.Option(None, "--out", help="Readings CSV to write (default COHORT/readings.csv, "
                                       "which the study reads)."),
) -> None:
    """Write the simulated 1-5 reader study of a synthetic cohort: unaided, and with --run an aided arm
    (both arms restricted to the subjects the network scored: its validation, test and external sets)."""
    import pandas as pd

    from nhb_core.errors import InputError, RunError
    from nhb_core.synth import write_reader_study

    network = None
    if run is not None:
        files = sorted(RunFolder(run).predictions_dir.glob("*__subjects.csv"))
        if not files:
            raise RunError(run, "has no predictions/*__subjects.csv", "Give a run whose evaluate stage finished")
        preds = pd.concat([pd.read_csv(f, dtype={"subject_id": str}) for f in files], ignore_index=True)
        if model is None:
            skip = {"subject_id", "center", "label", "row", "nbna"}
            cands = [c for c in preds.columns if c not in skip and not c.startswith("reader_")
                     and pd.api.types.is_numeric_dtype(preds[c])]
            if not cands:
                raise RunError(run, "its predictions hold no network column", "Give --model")
            model = cands[0]
        if model not in preds.columns:
            raise InputError("--model", f"'{model}' is not a network of {run}",
                             f"Use one of: {', '.join(c for c in preds.columns if c not in ('subject_id', 'center', 'label'))}")
        preds = preds.drop_duplicates("subject_id")
        network = dict(zip(preds["subject_id"], preds[model].astype(float)))
    dest = write_reader_study(cohort, network=network, aid_weight=aid_weight, out=out)
    n = pd.read_csv(dest)
    arms = ", ".join(sorted(n["modality"].unique()))
    typer.echo(f"wrote {dest}: {n['reader'].nunique()} readers x {n['case_id'].nunique()} subjects ({arms})"
               + (f"; aided arm leans towards {model}" if network is not None else ""))
