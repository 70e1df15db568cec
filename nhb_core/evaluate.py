"""Predictions of a trained model on every evaluation set of a split.

:func:`evaluate_model` writes, for each set of the split except ``train``
(``val``, ``test``, ``external:B``, ...), two CSV files in the predictions folder:

- ``<set>__slices.csv``: ``subject_id, center, slice_index, label, <model>`` (one
  row per slice; ``<model>`` = probability of label 1),
- ``<set>__subjects.csv``: ``subject_id, center, label, <model>, reader_*`` (one row
  per subject; the slice probabilities aggregated, mean by default; the readers'
  0/1 calls copied from the dataset's ``subjects.csv``).

Set names in file names have ":" replaced by "_" (``external_B__subjects.csv``).
Several models share the files: each call adds (or replaces) its own column and
keeps the other models' columns when the rows are the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nhb_core.errors import ConfigError, DatasetError
from nhb_core.fileio import atomic_path
from nhb_core.progress import ProgressCallback, emit
from nhb_core.runs import set_file_stem

AGGREGATES = ("mean", "median", "max")
SLICE_KEYS = ["subject_id", "center", "slice_index", "label"]
SUBJECT_KEYS = ["subject_id", "center", "label"]


def predict_slices(model, images, batch_size: int = 256, device: str = "cpu", amp: bool = False,
                   channels_last: bool | None = None) -> np.ndarray:
    """Probabilities of label 1 for a stack of slices.

    Parameters
    ----------
    model : torch.nn.Module
        One-logit classifier (moved to ``device`` if it is elsewhere; put in eval mode).
    images : np.ndarray or torch.Tensor, float32 [N, C, H, W]
        A memory map is read in chunks of ``batch_size``.
    batch_size : int
    device : str or torch.device
        ``"auto"`` picks CUDA when present.
    amp : bool
        bf16/fp16 autocast on CUDA (ignored on CPU).
    channels_last : bool or None
        NHWC input; None = on CUDA only.

    Returns
    -------
    np.ndarray float64 [N], ``sigmoid(logit)`` in [0, 1].
    """
    import torch

    from nhb_core.device import amp_settings, autocast_ctx, resolve_device

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    amp_dtype, _ = amp_settings(dev, amp)
    cl = dev.type == "cuda" if channels_last is None else bool(channels_last)
    try:
        p0 = next(model.parameters())
        if p0.device != dev:
            model.to(dev)
    except StopIteration:
        pass
    model.eval()
    n = len(images)
    out = np.zeros(n, dtype=np.float64)
    with torch.no_grad():
        for i in range(0, n, max(1, int(batch_size))):
            chunk = images[i:i + batch_size]
            x = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk, dtype=np.float32))
            x = x.to(dev, dtype=torch.float32, non_blocking=True)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_ctx(dev, amp_dtype):
                logits = model(x).reshape(-1)
            out[i:i + len(x)] = torch.sigmoid(logits.float()).cpu().numpy()
    return out


def aggregate_subject_probs(slices_df, column: str, how: str = "mean"):
    """Subject-level rows from slice rows: ``subject_id, center, label, <column>``.

    ``how`` in mean, median, max of the slice probabilities; the subject's label is
    its maximum slice label; sorted by subject_id (as ``nhb_core.stats.aggregate_subjects``).
    """
    from nhb_core.stats import aggregate_subjects

    if how not in AGGREGATES:
        raise ConfigError("--aggregate", f"unknown aggregation {how!r}", f"Use one of {', '.join(AGGREGATES)}")
    df = aggregate_subjects(slices_df[["subject_id", "center", "label", column]], [column], how=how)
    df["label"] = df["label"].astype(int)
    return df[SUBJECT_KEYS + [column]]


def _merge_write(path: Path, new, keys: list[str], column: str) -> None:
    """Write ``new`` to ``path``; when ``path`` holds the same key rows, keep its other
    model columns and add/replace ``column``."""
    import pandas as pd

    if path.exists():
        try:
            old = pd.read_csv(path, dtype={"subject_id": str, "center": str})
        except Exception:  # noqa: BLE001 - an unreadable old file is simply replaced
            old = None
        if old is not None and all(k in old.columns for k in keys) and len(old) == len(new):
            same = all((old[k].astype(str).to_numpy() == new[k].astype(str).to_numpy()).all() for k in keys)
            if same:
                merged = old.copy()
                merged[column] = new[column].to_numpy()
                for c in new.columns:  # reader columns etc. the old file lacked
                    if c not in merged.columns:
                        merged[c] = new[c].to_numpy()
                new = merged
    with atomic_path(path) as tmp:
        new.to_csv(tmp, index=False, float_format="%.8g")


def evaluate_model(model_dir: str | os.PathLike, dataset_dir: str | os.PathLike,
                   split: dict | str | os.PathLike, out_dir: str | os.PathLike,
                   aggregate: str = "mean", progress: ProgressCallback | None = None,
                   batch_size: int = 256, device: str = "auto", sets: list[str] | None = None,
                   model_name: str | None = None) -> dict[str, Path]:
    """Predict every evaluation set of ``split`` and write the predictions CSVs.

    Parameters
    ----------
    model_dir : path
        A trained model folder (``model.safetensors`` + ``model.json``).
    dataset_dir : path
        The prepared slice dataset the split refers to (same size and channels as the model's).
    split : dict or path
    out_dir : path
        The predictions folder (``runs/<run>/predictions``); created when absent.
    aggregate : {"mean", "median", "max"}
        Slice-to-subject aggregation of probabilities.
    progress : callable or None
        ``{"stage": "evaluate", "model", "done", "total", "message": set name}``.
    batch_size : int
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``...
    sets : list of str or None
        Sets to predict; default every set except ``train``.
    model_name : str or None
        Column name; default model.json's ``name``.

    Returns
    -------
    dict set name -> Path of its ``<set>__subjects.csv`` (the slice file sits next to it,
    ``<set>__slices.csv``).
    """
    from nhb_core.models import load_trained
    from nhb_core.slices import load_dataset
    from nhb_core.splits import load_split

    if aggregate not in AGGREGATES:
        raise ConfigError("--aggregate", f"unknown aggregation {aggregate!r}", f"Use one of {', '.join(AGGREGATES)}")
    model, mj = load_trained(model_dir, device="cpu")
    from nhb_core.device import resolve_device

    dev = resolve_device(device)
    model.to(dev)
    name = model_name or mj.get("name") or mj.get("architecture")
    split_d = split if isinstance(split, dict) else load_split(split)
    ds = load_dataset(dataset_dir)
    if int(ds.in_chans) != int(mj.get("in_chans", ds.in_chans)) or \
            list(ds.images.shape[2:]) != list(mj.get("input_size", ds.images.shape[2:])):
        raise DatasetError(dataset_dir, f"slices are {ds.in_chans} x {ds.images.shape[2]} x {ds.images.shape[3]}, "
                           f"the model was trained on {mj.get('in_chans')} x {mj.get('input_size')}",
                           "Evaluate on a dataset prepared with the model's preprocessing")
    return write_predictions(
        lambda rows: predict_slices(model, np.asarray(ds.images[rows]), batch_size=batch_size, device=dev, amp=False),
        name, ds, split_d, out_dir, aggregate=aggregate, progress=progress, sets=sets)


def write_predictions(score_rows, name: str, ds, split: dict, out_dir: str | os.PathLike,
                      aggregate: str = "mean", progress: ProgressCallback | None = None,
                      sets: list[str] | None = None) -> dict[str, Path]:
    """Write the ``name`` column of every evaluation set's predictions files.

    The one writer for networks and baselines (``nhb_core.baselines``) alike.

    Parameters
    ----------
    score_rows : callable
        ``score_rows(rows)`` -> float64 [len(rows)] probabilities of label 1 for dataset
        rows ``rows`` (int64 positions into ``ds.index``).
    name : str
        Column name.
    ds : SliceDataset
    split : dict
    out_dir, aggregate, progress, sets : see :func:`evaluate_model`.

    Returns
    -------
    dict set name -> Path of its ``<set>__subjects.csv``.
    """
    from nhb_core.splits import set_names, set_rows

    todo = list(sets) if sets is not None else [s for s in set_names(split) if s != "train"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = ds.index
    readers = [c for c in ds.subjects.columns if str(c).startswith("reader_")]
    subj_readers = ds.subjects[["subject_id"] + readers].copy() if readers else None
    if subj_readers is not None:
        subj_readers["subject_id"] = subj_readers["subject_id"].astype(str)
    result: dict[str, Path] = {}
    for k, set_name in enumerate(todo):
        emit(progress, "evaluate", model=name, done=k, total=len(todo), message=set_name)
        rows = set_rows(split, index, set_name)
        if len(rows) == 0:
            continue
        probs = score_rows(rows)
        sl = index.iloc[rows][["subject_id", "center", "slice_index", "label"]].copy()
        sl["subject_id"] = sl["subject_id"].astype(str)
        sl["center"] = sl["center"].astype(str)
        sl["label"] = sl["label"].astype(int)
        sl[name] = probs
        sl = sl.reset_index(drop=True)
        sub = aggregate_subject_probs(sl, name, aggregate)
        if subj_readers is not None:
            sub = sub.merge(subj_readers, on="subject_id", how="left")
        stem = set_file_stem(set_name)
        from nhb_core.safety import inside

        inside(out, out / f"{stem}__slices.csv", "predictions file")
        _merge_write(out / f"{stem}__slices.csv", sl, SLICE_KEYS, name)
        _merge_write(out / f"{stem}__subjects.csv", sub, SUBJECT_KEYS, name)
        result[set_name] = out / f"{stem}__subjects.csv"
    emit(progress, "evaluate", model=name, done=len(todo), total=len(todo), message="done")
    return result
