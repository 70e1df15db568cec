"""``roi propose``: GP ROI proposals for the manifest rows without a mask (see docs/roi.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from nhb_core.cli import app

roi_app = typer.Typer(help="GP ROI masks: proposals learned from a few manual masks.", no_args_is_help=True)
app.add_typer(roi_app, name="roi")


@roi_app.command("propose")
def propose_cmd(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Cohort manifest CSV; rows with an empty roi get proposals."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (manifest.csv, proposals.csv, masks/)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs (default 15)."),
    encoder: str | None = typer.Option(None, "--encoder", help="U-Net encoder (default tu-mobilenetv3_small_100; random init)."),
    size: int | None = typer.Option(None, "--size", help="Crop side in pixels (default 80)."),
    crop_mm: float | None = typer.Option(None, "--crop-mm", help="Crop side in mm (default 64)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (weights, sampling, augmentation)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Train a 2D U-Net on the rows with a mask and propose masks for the others (with confidence and QC)."""
    import pandas as pd
    from rich.console import Console

    from nhb_core.progress import rich_progress
    from nhb_core.roi_propose import RoiConfig, propose_rois

    opts = {"seed": seed, "device": device}
    for k, v in (("epochs", epochs), ("encoder", encoder), ("size", size), ("crop_mm", crop_mm)):
        if v is not None:
            opts[k] = v
    cfg = RoiConfig.from_dict(opts)  # bad options fail before any file is read
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    with rich_progress(enabled=not quiet) as cb:
        path = propose_rois(manifest, out, cfg, progress=cb)
    if quiet:
        return
    p = pd.read_csv(Path(out) / "proposals.csv", dtype={"subject_id": str})
    prop = p[p["roi_source"] == "proposed"]
    con = Console()
    con.print(f"wrote {path}: {len(prop)} proposed, {int((p['roi_source'] != 'proposed').sum())} manual/corrected "
              f"masks; {int((~prop['qc_ok'].astype(bool)).sum())} proposal(s) flagged by QC "
              f"(see {Path(out) / 'proposals.csv'})", highlight=False, markup=False)
