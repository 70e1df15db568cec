"""``study`` and ``demo``: the one-command study and the synthetic demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from nhb_core.cli import app

_DIST_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
             "GROUP_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}


def _print_auc_table(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from nhb_core.runs import RunFolder, auc_table, set_label

    rows = auc_table(run_dir, "subject")
    if not rows:
        return
    sets = list(dict.fromkeys(r["set"] for r in rows))
    sets.sort(key=lambda s: (0 if s == "test" else 2 if s == "val" else 1, s))
    models = list(dict.fromkeys(r["model"] for r in rows))
    m = RunFolder(run_dir).metrics() or {}
    table = Table(title=f"AUC [95% CI], subject level: {run_dir}")
    table.add_column("model")
    for s in sets:
        table.add_column(set_label(s), justify="right")
    for model in models:
        cells = []
        for s in sets:
            r = next((r for r in rows if r["model"] == model and r["set"] == s), None)
            if r is None or r["auc"] is None:
                cells.append("n/a")
            else:
                ci = r.get("ci") or [None, None]
                cells.append(f"{r['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else f"{r['auc']:.3f}")
        table.add_row(model, *cells)
    import sys

    console = Console(width=None if sys.stdout.isatty() else 160)  # never wrap the table in a log file
    console.print(table)
    if m.get("leaky"):
        console.print("[bold red]Leakage: this run used a slice-level split; its test AUCs are inflated.[/]")
    console.print(f"report: {run_dir / 'report.html'}", soft_wrap=True)


def _run(manifest: Path | None, out: Path, config: Any, overrides: dict[str, Any], quiet: bool) -> Path:
    from nhb_core.progress import rich_progress
    from nhb_core.study import StudyCancelled, run_study

    with rich_progress(enabled=not quiet) as progress:
        try:
            run_dir = run_study(manifest, out, config, progress=progress, overrides=overrides)
        except StudyCancelled:
            typer.echo("error: the study was cancelled (SIGTERM); rerun the same command to resume.", err=True)
            raise typer.Exit(143) from None
    return run_dir


@app.command("study")
def study(
    manifest: Path | None = typer.Option(None, "--manifest", "-m", help="Cohort manifest CSV (docs/manifest.md). "
                                            "May be omitted when --config names one (a run's config.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (created; an existing one is resumed)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Study config YAML (docs/study.md)."),
    models: str | None = typer.Option(None, "--models", help="Comma-separated models, e.g. resnet18,densenet121,efficientnet_b0."),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs per model."),
    split_unit: str | None = typer.Option(None, "--split-unit", help="subject (default) or slice (leaky, for teaching)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of every random choice."),
    seeds: str | None = typer.Option(None, "--seeds", help="Repeat the study with these seeds, e.g. 0,1,2: "
                                        "mean and SD per model and set (RUN/seeds.json)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1, ..."),
    n_gpus: int | None = typer.Option(None, "--n-gpus", help="> 1: train each model under torchrun with this many processes."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a whole study: validate, prepare, split, train, evaluate, statistics, saliency, report.

    A rerun skips every stage whose inputs did not change; a killed study resumes.
    Progress goes to the terminal and to RUNDIR/events.jsonl.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        # launched under torchrun (e.g. by the dashboard with several GPUs): rank 0 runs the study and
        # trains each model under its own torchrun with WORLD_SIZE processes; the other ranks step aside.
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return
        for var in [v for v in os.environ if v in _DIST_ENV or v.startswith("TORCHELASTIC_")]:
            os.environ.pop(var, None)
        n_gpus = n_gpus or world
    overrides = {"models": models, "epochs": epochs, "split_unit": split_unit, "seed": seed, "device": device,
                 "n_gpus": n_gpus, "seeds": seeds}
    run_dir = _run(manifest, out, config, overrides, quiet)
    _print_auc_table(run_dir)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder of the demo study."),
    preset: str = typer.Option("paper", "--preset", help="Synthetic cohort preset: paper (about 277 neonates) or small."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic cohort and of the study."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Study config YAML (default: the default config)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Synthesise a two-center cohort (paper preset) and run the default study on it.

    The cohort goes to RUNDIR/cohort/ (kept and reused by reruns); ends with the AUC table.
    """
    from nhb_core.synth import synthesize

    out = out.expanduser().resolve()
    cohort = out / "cohort"
    manifest = cohort / "manifest.csv"
    if not manifest.exists():
        typer.echo(f"synthesising the {preset} cohort into {cohort} ...", err=True)
        manifest = Path(synthesize(cohort, preset=preset, seed=seed))
    run_dir = _run(manifest, out, config, {"seed": seed, "name": f"demo ({preset} preset)"}, quiet)
    _print_auc_table(run_dir)
