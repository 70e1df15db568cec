"""``train`` and ``evaluate`` commands (also under ``torchrun --nproc-per-node N -m nhb_core train ...``)."""

from __future__ import annotations

from pathlib import Path

import typer

from nhb_core.cli import app
from nhb_core.runs import RunFolder


def _load_yaml(path: Path) -> dict:
    import yaml

    from nhb_core.errors import ConfigError

    if not path.is_file():
        raise ConfigError(path, "the config file does not exist", "Give an existing YAML file")
    from nhb_core.safety import check_regular_file, max_config_bytes, safe_yaml_load

    check_regular_file(path, max_config_bytes(), "config", "NHB_MAX_CONFIG_BYTES", error=ConfigError)
    try:
        d = safe_yaml_load(path.read_text(encoding="utf-8"), path) or {}
    except yaml.YAMLError as err:
        raise ConfigError(path, f"not valid YAML ({' '.join(str(err).split())[:120]})", "Fix the YAML syntax") from None
    if not isinstance(d, dict):
        raise ConfigError(path, "the config must be a mapping of options", "Write e.g. `epochs: 12`")
    if isinstance(d.get("train"), dict):  # a study config: take its train section
        d = d["train"]
    return d


@app.command("train")
def train_cmd(
    dataset: Path = typer.Option(..., "--dataset", help="Prepared slice dataset folder (from `prepare`)."),
    split: Path = typer.Option(..., "--split", help="split.json (from `split`)."),
    model: str = typer.Option("resnet18", "--model", help="timm model name: resnet18, densenet121, efficientnet_b0, ..."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (model.safetensors, model.json, history.csv, ...)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Maximum epochs (default 10)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per step per process (default 32)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3)."),
    patience: int | None = typer.Option(None, "--patience", help="Early-stopping patience in epochs (0 = off)."),
    weights: str | None = typer.Option(None, "--weights",
                                          help="Initial weights: a local ImageNet .safetensors/.pth file, or 'imagenet' "
                                               "(timm hub, needs a network). Default: random."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of weights, sampling and augmentation (default 0)."),
    device: str | None = typer.Option(None, "--device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    config: Path | None = typer.Option(None, "--config", help="YAML with train options (TrainConfig fields)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train one model; multi-GPU / multi-node with `torchrun --nproc-per-node N -m nhb_core train ...`."""
    import signal

    from rich.console import Console

    from nhb_core.config import to_yaml
    from nhb_core.fileio import atomic_write_json, atomic_write_text
    from nhb_core.progress import rich_progress
    from nhb_core.splits import load_split
    from nhb_core.train import TrainConfig, dist_env, train_model

    out = Path(out)
    if dist_env().is_main and out.is_dir() and not (out / "status.json").exists() and \
            any(not p.name.startswith(".") for p in out.iterdir()):
        from nhb_core.errors import RunError

        # train writes config.yaml, split.json, model.json ... there: never over a user's own files
        raise RunError(out, "the --out folder holds other files and is not a model folder (no status.json)",
                       "Give a new or empty folder")
    opts = _load_yaml(config) if config else {}
    for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), ("patience", patience),
                 ("seed", seed), ("device", device)):
        if v is not None:
            opts[k] = v
    cfg = TrainConfig.from_dict(opts, source=str(config) if config else "command line")
    split_d = load_split(split)
    dinfo = dist_env()
    out = Path(out)
    if dinfo.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if split.resolve() != (out / "split.json").resolve():
            atomic_write_json(out / "split.json", split_d)
        atomic_write_text(out / "config.yaml", to_yaml({
            "command": "train", "dataset": str(dataset.resolve()), "split": "split.json", "model": model,
            "weights": weights, "world_size": dinfo.world_size, "train": cfg.to_dict()}))

    def _sigterm(signum, frame):  # a cancelled job: record "cancelled", not a traceback
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread
        pass
    with rich_progress(progress_bar and dinfo.is_main) as cb:
        train_model(dataset, split_d, model, out, cfg, progress=cb, resume=resume, weights=weights)
    if dinfo.is_main:
        from nhb_core.fileio import read_json

        mj = read_json(out / "model.json")
        con = Console(soft_wrap=True)
        auc = mj.get("val_auc")
        thr = mj.get("threshold")
        con.print(f"[bold]{model}[/bold]: best epoch {mj['best_epoch']} of {mj['epochs_run']}, "
                  f"validation AUC (subject) {auc if auc is None else f'{auc:.3f}'}, "
                  f"threshold {thr if thr is None else f'{thr:.3f}'} -> {out}")


def _find_models(run: Path) -> list[Path]:
    if (run / "model.json").exists():
        return [run]
    rf = RunFolder(run)
    return [rf.model_dir(m) for m in rf.trained_models()]


@app.command("evaluate")
def evaluate_cmd(
    run: Path = typer.Option(..., "--run", help="A run folder from `train` (or a study run with models/<name>/)."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Dataset folder (default: the one the model was trained on)."),
    split: Path | None = typer.Option(None, "--split", help="split.json (default: the run's split.json)."),
    aggregate: str = typer.Option("mean", "--aggregate", help="Slice-to-subject aggregation: mean, median or max."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    batch_size: int = typer.Option(256, "--batch-size", help="Slices per forward pass."),
    progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    manifest: Path | None = typer.Option(None, "--manifest",
                                            help="A NEW cohort's manifest: prepare it with the run's preprocessing, "
                                                 "predict it as set external:NAME, update metrics.json and the report."),
    name: str | None = typer.Option(None, "--name", help="Name of the new cohort (with --manifest), e.g. C."),
) -> None:
    """Write predictions/<set>__slices.csv and <set>__subjects.csv for every set but train;
    with --manifest M --name C, evaluate the finished run on a new cohort (set external:C)."""
    from rich.console import Console
    from rich.table import Table

    from nhb_core.errors import ConfigError, DatasetError, RunError
    from nhb_core.evaluate import evaluate_model
    from nhb_core.fileio import read_json
    from nhb_core.progress import rich_progress

    run = Path(run)
    if (manifest is None) != (name is None):
        raise ConfigError("--manifest/--name", "a new cohort needs both --manifest and --name",
                          "Give e.g. --manifest hospital_c/manifest.csv --name C")
    if manifest is not None:
        from nhb_core.cohorts import evaluate_cohort

        assert name is not None  # checked above: --manifest comes with --name
        with rich_progress(progress_bar) as cb:
            rec = evaluate_cohort(run, manifest, name, progress=cb, device=device, batch_size=batch_size)
        table = Table(title=f"{rec['set']}: {rec['n_subjects']} subjects ({', '.join(rec['centers'])}), "
                            "subject-level AUC")
        table.add_column("model")
        table.add_column("AUC", justify="right")
        for m, a in rec["auc"].items():
            table.add_row(m, "-" if a is None else f"{a:.3f}")
        Console().print(table)
        Console().print(f"metrics.json and report.html of {run} now include {rec['set']}")
        return

    run = Path(run)
    models = _find_models(run)
    if not models:
        raise RunError(run, "no trained model here (no model.json, nor models/*/model.json)",
                       "Train first with `python -m nhb_core train --out RUNDIR ...`")
    results = []
    with rich_progress(progress_bar) as cb:
        for mdir in models:
            mj = read_json(mdir / "model.json")
            ds = dataset or (Path(mj["dataset_dir"]) if mj.get("dataset_dir") else None)
            if ds is None or not Path(ds).exists():
                raise DatasetError(ds or mdir / "model.json", "the dataset the model was trained on is not there",
                                   "Give it with --dataset DIR")
            sp = split
            if sp is None:
                for cand in (run / "split.json", mdir / "split.json",
                             Path(mj["split_path"]) if mj.get("split_path") else None):
                    if cand is not None and cand.exists():
                        sp = cand
                        break
            if sp is None:
                raise DatasetError(run / "split.json", "no split found for the run", "Give it with --split FILE")
            res = evaluate_model(mdir, ds, sp, RunFolder(run).predictions_dir, aggregate=aggregate, progress=cb,
                                 batch_size=batch_size, device=device)
            results.append((mj.get("name") or mdir.name, res))
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    table = Table(title=f"Subject-level AUC ({aggregate} of slice probabilities)")
    table.add_column("model")
    table.add_column("set")
    table.add_column("subjects", justify="right")
    table.add_column("AUC", justify="right")
    for name, res in results:
        for set_name, path in res.items():
            df = pd.read_csv(path)
            auc = roc_auc_score(df["label"], df[name]) if df["label"].nunique() == 2 else float("nan")
            table.add_row(name, set_name, str(len(df)), f"{auc:.3f}")
    Console().print(table)
    Console().print(f"predictions written to {run / 'predictions'}")
