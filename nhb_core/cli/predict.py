"""``python -m nhb_core predict`` (one subject with a run's models) and ``export`` (ONNX)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from nhb_core.cli import app


@app.command("predict")
def predict(
    run: Path = typer.Option(..., "--run", help="A finished study run folder (runs/<name>)."),
    t1: Path = typer.Option(..., "--t1", help="The subject's T1: a .nii/.nii.gz file or a DICOM series folder."),
    roi: Path = typer.Option(..., "--roi", help="The bilateral globus pallidus ROI mask (.nii/.nii.gz) on that T1."),
    out: Path | None = typer.Option(None, "--out",
                                       help="Output folder (default RUN/cases/<stem>): prediction.json and cam/*.png."),
    cam: bool = typer.Option(True, "--cam/--no-cam", help="Compute Grad-CAM maps and PNGs (default) or only probabilities."),
    method: str = typer.Option("gradcam", "--method", help="Saliency method: gradcam, gradcam++, eigencam, layercam."),
    model: list[str] | None = typer.Option(None, "--model", help="Only these models of the run (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print prediction.json on stdout instead of a table."),
    threads: int = typer.Option(1, "--threads", min=1,
                                help="CPU threads for torch (default 1: fastest for one subject's small crops)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no table."),
) -> None:
    """Probability of bilirubin brain injury for one subject, per model and for the ensemble.

    Each model's decision uses its threshold (model.json, Youden on the validation set); the
    ensemble is the mean of the model probabilities, decided at the mean of their thresholds.
    Writes prediction.json and, with --cam, one Grad-CAM PNG per model and slice. The outputs
    carry no DICOM field and no input file name beyond a sanitised stem.
    """
    from nhb_core.fileio import to_json
    from nhb_core.predict import predict_case, safe_stem
    from nhb_core.progress import rich_progress
    from nhb_core.saliency import normalize_method

    normalize_method(method)
    from nhb_core.runs import RunFolder

    rd = RunFolder(run).check().path
    if out is None:
        if t1.is_dir():  # a DICOM folder's name may identify the patient: never reuse it
            from nhb_core.fileio import sha256_file

            stem = "case-" + sha256_file(t1)[:12]
        else:
            stem = safe_stem(t1)
        out = rd / "cases" / stem
    with rich_progress(enabled=not (quiet or as_json)) as cb:
        res = predict_case(rd, t1, roi, out_dir=out, with_cam=cam, progress=cb, method=method, models=model or None,
                           threads=threads)
    for w in res["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    if as_json:
        typer.echo(to_json(res))
        return
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"Prediction ({len(res['slices'])} slice(s): {', '.join(map(str, res['slices']))})")
    for c in ("model", "probability", "threshold", "decision", "CAM energy in ROI", "pointing hits"):
        t.add_column(c, justify="left" if c == "model" else "right")

    def _dec(d: int) -> str:
        return "injury (1)" if d else "no injury (0)"

    for name, e in res["models"].items():
        cams = e.get("cam") or []
        en = [c["energy_in_roi"] for c in cams if c["energy_in_roi"] == c["energy_in_roi"]]
        hits = sum(bool(c["pointing_hit"]) for c in cams)
        t.add_row(Text(name), f"{e['prob']:.3f}", f"{e['threshold']:.3f}", _dec(e["decision"]),
                  f"{sum(en) / len(en):.2f}" if en else "-", f"{hits}/{len(cams)}" if cams else "-")
    ens = res["ensemble"]
    t.add_row("ensemble (mean)", f"{ens['prob']:.3f}", f"{ens['threshold']:.3f}", _dec(ens["decision"]), "", "",
              style="bold")
    Console(file=sys.stdout).print(t)
    typer.echo(f"wrote {Path(out) / 'prediction.json'}" + (f" and {len(res['files']) - 1} PNG(s)" if cam else ""))


@app.command("export")
def export(
    run: Path = typer.Option(..., "--run", help="A finished study run folder."),
    fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default RUN/export)."),
    model: list[str] | None = typer.Option(None, "--model", help="Only these models (repeatable)."),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads for torch (default 1)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no listing."),
) -> None:
    """Export the run's models to ONNX (dynamic batch axis, outputs logit and prob), each
    checked against PyTorch under onnxruntime (max difference 1e-4), with a JSON sidecar
    holding the preprocessing and threshold."""
    from nhb_core.errors import ConfigError
    from nhb_core.export import export_onnx
    from nhb_core.fileio import read_json
    from nhb_core.progress import rich_progress

    if fmt.strip().lower() != "onnx":
        raise ConfigError("--format", f"unsupported export format {fmt!r}", "Use --format onnx")
    import torch

    torch.set_num_threads(threads)
    with rich_progress(enabled=not quiet) as cb:
        paths = export_onnx(run, out_dir=out, models=model or None, progress=cb)
    if quiet:
        return
    for p in paths:
        meta = read_json(p.with_suffix(".json"))
        typer.echo(f"{p}  ({meta['exporter']} exporter, max |onnx - torch| = {meta['parity_max_abs_diff']:.1e})")
