"""``prepare``, ``split`` and ``audit``: the ROI slice dataset and its leakage-proof splits."""

from __future__ import annotations

from pathlib import Path

import typer

from nhb_core.cli import app
from nhb_core.errors import ConfigError


def _read_config_file(path: Path) -> dict:
    """A YAML/JSON file of prepare options, or a study config with a ``prepare:`` section."""
    import json

    import yaml

    if not path.exists():
        raise ConfigError(path, "the config file does not exist", "Give an existing YAML or JSON file")
    from nhb_core.safety import check_regular_file, max_config_bytes, safe_yaml_load

    check_regular_file(path, max_config_bytes(), "config", "NHB_MAX_CONFIG_BYTES", error=ConfigError)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else safe_yaml_load(text, path)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(path, f"not readable as YAML/JSON ({' '.join(str(err).split())[:200]})",
                          "Fix the file syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "the config is not a mapping of options", "Write options as `key: value` lines")
    if isinstance(data.get("prepare"), dict):
        return dict(data["prepare"])
    return data


@app.command("prepare")
def prepare_cmd(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Cohort manifest CSV."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (reused as a cache)."),
    config: Path | None = typer.Option(None, "--config", "-c",
                                          help="YAML/JSON prepare options (or a study config with a 'prepare:' section)."),
    size: int | None = typer.Option(None, "--size", help="Output grid side in pixels (default 64)."),
    crop_mm: float | None = typer.Option(None, "--crop-mm", help="Crop side in mm (default 64)."),
    slice_select: str | None = typer.Option(None, "--slice-select", help="min_voxels (default) or central."),
    norm: str | None = typer.Option(None, "--norm", help="percentile (default) or zscore."),
    roi_channel: bool | None = typer.Option(None, "--roi-channel/--no-roi-channel",
                                               help="Add the ROI mask as a second channel."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="Worker processes (default 2)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Extract the ROI slice dataset: index.csv, slices.npy, subjects.csv, prepare.json (see docs/dataset.md)."""
    import time

    from rich.console import Console
    from rich.table import Table

    from nhb_core.fileio import read_json
    from nhb_core.progress import rich_progress
    from nhb_core.slices import PrepareConfig, prepare

    opts = _read_config_file(config) if config else {}
    for k, v in (("size", size), ("crop_mm", crop_mm), ("slice_select", slice_select), ("norm", norm),
                 ("roi_channel", roi_channel)):
        if v is not None:
            opts[k] = v
    cfg = PrepareConfig.from_dict(opts, source=str(config) if config else "prepare options")
    t0 = time.monotonic()
    with rich_progress(enabled=not quiet) as cb:
        prepare(manifest, out, cfg, workers=workers, progress=cb)
    if quiet:
        return
    meta = read_json(Path(out) / "prepare.json")
    console = Console()
    t = Table(title=f"Slice dataset {out}")
    t.add_column("subjects", justify="right")
    t.add_column("slices", justify="right")
    t.add_column("channels")
    t.add_column("size")
    t.add_column("crop mm", justify="right")
    t.add_column("computed / cached", justify="right")
    t.add_column("seconds", justify="right")
    n = meta["n_subjects"]
    computed = meta.get("n_computed", 0)
    t.add_row(str(n), str(meta["n_slices"]), ",".join(meta["channels"]), f"{meta['size']}x{meta['size']}",
              f"{meta['crop_mm']:g}", f"{computed} / {n - computed}", f"{time.monotonic() - t0:.1f}")
    console.print(t)
    for w in meta.get("warnings", [])[:20]:
        Console(stderr=True).print(f"[yellow]warning[/]: {w['subject_id']}: {w['warning']}", markup=True,
                                   highlight=False)


@app.command("split")
def split_cmd(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="Prepared dataset folder."),
    out: Path = typer.Option(..., "--out", "-o", help="split.json to write."),
    dev_centers: str | None = typer.Option(None, "--dev-centers",
                                              help="Development center(s), comma separated (default A, else the largest)."),
    test_size: float = typer.Option(0.2, "--test-size", help="Fraction of development subjects for test."),
    val_size: float = typer.Option(0.15, "--val-size", help="Fraction of development subjects for validation."),
    folds: int | None = typer.Option(None, "--folds", help="K-fold cross-validation over the non-test subjects."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    unit: str = typer.Option("subject", "--unit",
                             help="subject (no leakage) or slice (the original study's leaky design)."),
) -> None:
    """Subject-level stratified split (train/val/test + external centers) written as split.json."""
    from rich.console import Console

    from nhb_core.slices import load_dataset
    from nhb_core.splits import make_split, save_split, set_names

    ds = load_dataset(dataset)
    split = make_split(ds, dev_centers=dev_centers, test_size=test_size, val_size=val_size, folds=folds,
                       seed=seed, unit=unit)
    save_split(split, out)
    _print_split(split, ds)
    if split["leaky"]:
        err = Console(stderr=True)
        pairs = {k: v for k, v in split["shared_subjects"].items() if v}
        detail = ", ".join(f"{k.replace('|', '/')}: {v}" for k, v in pairs.items())
        err.print(f"[bold red]WARNING: LEAKY SPLIT ({split['unit']}-level).[/] "
                  f"{split['n_shared_subjects']} subject(s) have slices in both train and test"
                  + (f" ({detail})" if detail else "") + ". "
                  "Results on this split overestimate performance; the split is marked leaky and every "
                  "metric, dashboard page and report built on it carries the flag. "
                  "Use --unit subject for an honest estimate.", markup=True, highlight=False)
    counts = ", ".join(f"{k}={len(split['sets'][k])}" for k in set_names(split))
    typer.echo(f"wrote {out} ({counts})")


def _print_split(split: dict, ds) -> None:
    from nhb_core.splits import audit

    rep = audit(ds, split)
    _balance_table(rep, title=f"Split ({split['unit']} level, seed {split['seed']}, dev {','.join(split['dev_centers'])})")


def _balance_table(rep, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in ("set", "center", "subjects", "slices", "pos", "neg", "pos rate"):
        t.add_column(c, justify="left" if c in ("set", "center") else "right")
    for r in rep.balance.itertuples(index=False):
        rate = "-" if r.n_subjects == 0 else f"{r.pos_rate:.2f}"
        t.add_row(r.set, r.center, str(r.n_subjects), str(r.n_slices), str(r.n_pos), str(r.n_neg), rate,
                  style="dim" if r.center == "all" else None)
    Console().print(t)


@app.command("audit")
def audit_cmd(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="Prepared dataset folder."),
    split: Path = typer.Option(..., "--split", "-s", help="split.json."),
) -> None:
    """Check a split for leakage: shared subjects, identical images across sets, label balance.

    Exit code 0 when clean, 1 when leaky (2 on an input error).
    """
    from rich.console import Console
    from rich.table import Table

    from nhb_core.slices import load_dataset
    from nhb_core.splits import audit, load_split

    ds = load_dataset(dataset)
    sp = load_split(split)
    rep = audit(ds, sp)
    console = Console()
    t = Table(title=f"Leakage audit of {split.name}")
    t.add_column("check")
    t.add_column("result")
    t.add_column("detail")
    shared_pairs = {k: v for k, v in rep.shared_subjects.items()}
    t.add_row("subjects shared across sets", "[red]LEAK[/]" if shared_pairs else "[green]ok[/]",
              "; ".join(f"{k.replace('|', ' & ')}: {len(v)} ({', '.join(v[:5])}{', ...' if len(v) > 5 else ''})"
                        for k, v in shared_pairs.items()) or "none")
    for kind, label in (("slice", "identical slice images across sets"),
                        ("volume", "identical T1 volumes across sets")):
        d = rep.duplicate_images[rep.duplicate_images["kind"] == kind] if len(rep.duplicate_images) else rep.duplicate_images
        t.add_row(label, "[red]LEAK[/]" if len(d) else "[green]ok[/]",
                  "; ".join(f"{r.sets}: {r.subjects}" for r in d.head(5).itertuples()) + (" ..." if len(d) > 5 else "")
                  if len(d) else "none")
    t.add_row("split marked leaky", "[red]yes[/]" if rep.marked_leaky else "[green]no[/]", f"unit={rep.unit}")
    console.print(t)
    _balance_table(rep, title="Label balance per set and center (subjects)")
    if rep.leaky:
        Console(stderr=True).print("[bold red]LEAKY[/]: " + "; ".join(rep.problems), markup=True, highlight=False)
        raise typer.Exit(1)
    console.print("[green]clean[/]: no subject or image is shared between sets")
