"""Training a slice classifier: plain PyTorch, one CPU to multi-GPU / multi-node DDP.

What one call of :func:`train_model` does (see ``docs/runs.md`` for the files):

- loads the prepared slice dataset and the split; keeps the train and validation
  slices in memory as one tensor (on the GPU when it fits, else pinned);
- builds the timm model (:func:`nhb_core.models.create_model`, one logit);
- trains with AdamW, a per-step schedule (linear warm-up then cosine), a class
  balanced loss (``pos_weight``) or a class-balanced sampler, batched on-device
  augmentation (:mod:`nhb_core.augment`), bf16 autocast on CUDA (fp16 +
  GradScaler where bf16 is missing), channels_last on CUDA;
- after every epoch: validation AUC at subject level (mean slice probability),
  early stopping on it, the best weights as ``model.safetensors``, ``history.csv``,
  and a resumable ``checkpoint.pt`` (weights_only-loadable), all written atomically;
- at the end: the decision thresholds (Youden's index on the validation set, at
  subject and slice level) and ``model.json``.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) it runs
DistributedDataParallel (NCCL on GPUs, gloo on CPUs); every rank draws the same
global permutation of the epoch (``DistributedSampler``) and takes its share,
losses and validation predictions are gathered across ranks, and only rank 0
writes files or reports progress.

Reproducibility: the seed fixes the initial weights, the sampling and the
augmentation; every epoch reseeds its generators from (seed, epoch, rank), so a
resumed run continues exactly like an uninterrupted one. On CPU two runs with
the same seed give identical metrics and weights.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nhb_core.device import DistInfo, amp_settings, autocast_ctx, dist_env, resolve_device
from nhb_core.errors import ConfigError, DatasetError, NHBError, RunError
from nhb_core.fileio import atomic_path, atomic_write_json, atomic_write_text, sha256_file, sha256_json
from nhb_core.progress import ProgressCallback, chain, emit

#: Columns of history.csv, in order.
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "val_auc_slice", "lr", "seconds"]
#: Version of the checkpoint.pt layout.
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Training options (the ``train:`` section of a study config).

    Parameters
    ----------
    epochs : int
        Maximum number of epochs (early stopping may end sooner).
    batch_size : int
        Images per optimiser step per process (the global batch is ``batch_size * world_size``).
    lr : float
        Peak learning rate of AdamW (reached after warm-up).
    weight_decay : float
        AdamW decoupled weight decay.
    warmup_epochs : float
        Linear warm-up length in epochs (then cosine decay to ``lr * min_lr_ratio``).
    min_lr_ratio : float
        Final learning rate as a fraction of ``lr``.
    patience : int
        Stop when the validation AUC (subject level) has not improved for this many
        epochs. 0 disables early stopping.
    balance : {"loss", "sampler", "none"}
        ``"loss"``: BCE with ``pos_weight = n_neg / n_pos``; ``"sampler"``: draw training
        slices with class-balanced probabilities (with replacement); ``"none"``.
    augment : bool
        Random augmentation of training batches (never at evaluation).
    augment_params : dict
        Overrides of :class:`nhb_core.augment.AugmentConfig` (ranges).
    seed : int
        Fixes initial weights, sampling and augmentation.
    deterministic : bool
        ``torch.use_deterministic_algorithms`` (warn only) and deterministic cuDNN.
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    num_workers : int
        Unused by the in-memory tensor loader (the whole slice set sits in memory or on
        the GPU, so batches are index gathers); kept for config compatibility.
    amp : bool
        Mixed precision on CUDA (bf16 autocast; fp16 + GradScaler where bf16 is missing).
        Ignored on CPU (always float32).
    channels_last : bool or None
        NHWC memory format; None = on CUDA only (it is slower on CPU).
    eval_batch_size : int
        Batch size of validation prediction.
    aggregate : {"mean", "median", "max"}
        Slice-to-subject aggregation of probabilities for the validation AUC and the threshold.
    grad_clip : float or None
        Clip the global gradient norm to this value (None or 0: no clipping).
    keep_checkpoint : bool
        Keep ``checkpoint.pt`` after a successful run (it is deleted by default: model.json
        and model.safetensors are the result).
    steps : int or None
        Training budget in optimiser steps; when given it replaces ``epochs``
        (``epochs = ceil(steps / steps per epoch)``), so the budget does not change
        with the size of the cohort's training set.
    ema : float or None
        Decay per optimiser step of an exponential moving average of the weights
        (timm ``ModelEmaV3`` with warm-up); validation, the selected checkpoint and
        the thresholds use the averaged weights. None or 0: no averaging.
    select : {"best", "last"}
        Which weights are kept: ``"best"`` validation AUC (subject level) or the
        ``"last"`` epoch's (robust when the validation set is small: its AUC then has
        a standard error near 0.06 and picking its maximum over epochs is noise).
        Early stopping applies to ``"best"`` only.
    label_smoothing : float
        Targets ``y * (1 - a) + a / 2`` in the loss (0 = none).
    mixup : float
        Mixup Beta(alpha, alpha) parameter (0 = none): pairs of training images and
        their labels are blended with one weight per image.
    drop_rate, drop_path_rate : float
        Dropout before the classifier and stochastic depth (timm's arguments).
    weights : str or None
        Initial weights when :func:`train_model` is not given any: None / ``"random"``,
        ``"imagenet"`` (local cache, see :func:`nhb_core.models.create_model`) or a file.
    aux_si : float
        Weight of an auxiliary regression target (0 = none): a linear head on the pooled
        features predicts each training slice's GP / surroundings signal-intensity ratio
        (index.csv ``si_both``, standardised on the train rows), and its mean squared error,
        times ``aux_si``, is added to the classification loss. The ratio is computed from the
        image and its ROI alone (no label), so it teaches the network *what* to measure while
        the label teaches *where the cut lies*. The head is dropped after training: the saved
        model is the plain one-logit classifier.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    patience: int = 4
    balance: str = "loss"
    augment: bool = True
    augment_params: dict = field(default_factory=dict)
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"
    num_workers: int = 0
    amp: bool = True
    channels_last: bool | None = None
    eval_batch_size: int = 256
    aggregate: str = "mean"
    grad_clip: float | None = 1.0
    keep_checkpoint: bool = False
    steps: int | None = None
    ema: float | None = None
    select: str = "best"
    label_smoothing: float = 0.0
    mixup: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    weights: str | None = None
    aux_si: float = 0.0

    def __post_init__(self) -> None:
        src = "train config"
        if self.seed is None:
            self.seed = 0
        if self.device is None:
            self.device = "auto"
        if self.augment_params is None:
            self.augment_params = {}
        try:
            for name in ("epochs", "batch_size", "patience", "seed", "num_workers", "eval_batch_size"):
                v = getattr(self, name)
                if isinstance(v, bool) or float(v) != int(v):
                    raise ValueError(f"{name}={v!r}")
                setattr(self, name, int(v))
            for name in ("lr", "weight_decay", "warmup_epochs", "min_lr_ratio", "label_smoothing", "mixup",
                         "drop_rate", "drop_path_rate", "aux_si"):
                setattr(self, name, float(getattr(self, name)))
            if self.steps is not None:
                if isinstance(self.steps, bool) or float(self.steps) != int(self.steps):
                    raise ValueError(f"steps={self.steps!r}")
                self.steps = int(self.steps)
            if self.ema is not None:
                self.ema = float(self.ema) or None
        except (TypeError, ValueError) as err:
            raise ConfigError(src, f"a numeric option has a bad value ({err})",
                              "Give epochs, batch_size, patience, seed as integers and lr, weight_decay as numbers") from None
        for name in ("augment", "deterministic", "amp", "keep_checkpoint"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise ConfigError(src, f"{name} must be true or false, got {v!r}", f"Set {name} to true or false")
            setattr(self, name, bool(v))
        if self.grad_clip is not None:
            try:
                self.grad_clip = float(self.grad_clip)
            except (TypeError, ValueError):
                raise ConfigError(src, f"grad_clip must be a number or null, got {self.grad_clip!r}",
                                  "Use e.g. grad_clip: 1.0") from None
            if not self.grad_clip >= 0:
                raise ConfigError(src, "grad_clip must be >= 0", "Use e.g. grad_clip: 1.0")
        if self.channels_last is not None and not isinstance(self.channels_last, (bool, np.bool_)):
            raise ConfigError(src, f"channels_last must be true, false or null, got {self.channels_last!r}",
                              "Leave channels_last unset (auto)")
        checks = [
            (self.epochs >= 1, "epochs must be >= 1", "Use e.g. epochs: 10"),
            (self.batch_size >= 2, "batch_size must be >= 2 (batch norm needs 2 images)", "Use e.g. batch_size: 32"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number", "Use e.g. lr: 0.001"),
            (self.weight_decay >= 0, "weight_decay must be >= 0", "Use e.g. weight_decay: 0.05"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0", "Use e.g. warmup_epochs: 1"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]", "Use e.g. min_lr_ratio: 0.01"),
            (self.patience >= 0, "patience must be >= 0 (0 = no early stopping)", "Use e.g. patience: 4"),
            (self.balance in ("loss", "sampler", "none"), f"balance must be loss, sampler or none, got {self.balance!r}",
             "Use balance: loss"),
            (self.num_workers >= 0, "num_workers must be >= 0", "Use num_workers: 0"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1", "Use e.g. eval_batch_size: 256"),
            (self.aggregate in ("mean", "median", "max"), f"aggregate must be mean, median or max, got {self.aggregate!r}",
             "Use aggregate: mean"),
            (self.steps is None or self.steps >= 1, "steps must be >= 1 (or null to use epochs)", "Use e.g. steps: 600"),
            (self.ema is None or 0 < self.ema < 1, "ema must be a decay in (0, 1) or null", "Use e.g. ema: 0.99"),
            (self.select in ("best", "last"), f"select must be best or last, got {self.select!r}", "Use select: last"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)", "Use e.g. label_smoothing: 0.1"),
            (0 <= self.mixup <= 10, "mixup must be in [0, 10] (0 = off)", "Use e.g. mixup: 0.2"),
            (0 <= self.aux_si <= 100 and math.isfinite(self.aux_si), "aux_si must be a weight in [0, 100] (0 = off)",
             "Use e.g. aux_si: 1.0"),
            (0 <= self.drop_rate < 1 and 0 <= self.drop_path_rate < 1, "drop_rate and drop_path_rate must be in [0, 1)",
             "Use e.g. drop_rate: 0.2"),
            (isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")),
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}", "Use device: auto"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise ConfigError(src, problem, fix)
        if not isinstance(self.augment_params, dict):
            raise ConfigError(src, "augment_params must be a mapping", "Give e.g. augment_params: {rotate_deg: 10}")
        from nhb_core.augment import AugmentConfig

        AugmentConfig.from_dict(self.augment_params)  # validates the keys and ranges

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "train config") -> TrainConfig:
        """Build from a dict; unknown keys raise :class:`ConfigError` naming them.
        None values mean "default"."""
        d = {k: v for k, v in dict(d or {}).items() if v is not None}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(source, f"unknown train option(s): {', '.join(unknown)}",
                              f"Use only: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except ConfigError as err:
            raise ConfigError(source, err.problem, err.fix) from None

    def fingerprint(self) -> str:
        """Hash of the options that change the result (not device, workers)."""
        d = self.to_dict()
        for k in ("device", "num_workers", "keep_checkpoint", "eval_batch_size"):
            d.pop(k, None)
        if not d.get("aux_si"):
            d.pop("aux_si", None)  # runs from before the option keep their fingerprints
        return sha256_json(d)


# --------------------------------------------------------------------------- device, precision, distribution


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device):
    """Deterministic algorithms (warn only) and cuDNN settings for the duration of training."""
    import torch

    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    prev_cudnn_det = torch.backends.cudnn.deterministic
    try:
        if enabled:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = device.type == "cuda"
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        torch.backends.cudnn.deterministic = prev_cudnn_det


# --------------------------------------------------------------------------- data in memory


class SliceTensors:
    """The slices one training run needs, held as one tensor.

    ``images`` float32 ``[n, C, H, W]`` holds the train rows then the validation rows
    (positions ``train_pos`` and ``val_pos`` into it). On CUDA it is moved to the GPU
    when it takes less than a third of the free memory, else pinned so that batch
    copies overlap with compute.
    """

    def __init__(self, images_np: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray,
                 labels: np.ndarray, device, channels_last: bool = False, aux: np.ndarray | None = None):
        import torch

        rows = np.concatenate([train_rows, val_rows]).astype(np.int64)
        order = np.argsort(rows, kind="stable")
        # read each needed row once, in file order (fast on a memory map)
        arr = np.empty((len(rows),) + tuple(images_np.shape[1:]), dtype=np.float32)
        arr[order] = np.asarray(images_np[rows[order]], dtype=np.float32)
        self.images = torch.from_numpy(arr)
        self.labels = torch.as_tensor(np.asarray(labels)[rows], dtype=torch.float32)
        # per-row auxiliary regression target (NaN: none for that slice), see TrainConfig.aux_si
        self.aux = None if aux is None else torch.as_tensor(np.asarray(aux)[rows], dtype=torch.float32)
        self.train_pos = np.arange(len(train_rows))
        self.val_pos = np.arange(len(train_rows), len(rows))
        self.device = device
        self.channels_last = channels_last
        self.on_device = device.type == "cpu"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.images.numel() * 4 < free / 3:
                self.images = self.images.to(device)
                self.labels = self.labels.to(device)
                self.on_device = True
            else:
                self.images = self.images.pin_memory()
                self.labels = self.labels.pin_memory()

    def batch(self, pos):
        """(x [B, C, H, W] on the device, y [B] float) for positions ``pos`` (tensor or array)."""
        import torch

        idx = torch.as_tensor(pos, dtype=torch.long)
        if self.on_device:
            idx = idx.to(self.images.device)
            x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        else:
            x = self.images.index_select(0, idx).pin_memory().to(self.device, non_blocking=True)
            y = self.labels.index_select(0, idx).pin_memory().to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def aux_batch(self, pos):
        """The auxiliary targets ``[B]`` (float, NaN where a slice has none) for ``pos``, or None."""
        import torch

        if self.aux is None:
            return None
        return self.aux.index_select(0, torch.as_tensor(pos, dtype=torch.long)).to(self.device)


def _aux_si_target(index, train_rows: np.ndarray, source) -> np.ndarray:
    """Per-row ``si_both`` standardised on the train rows (NaN where a slice has no ratio)."""
    if "si_both" not in index.columns:
        raise DatasetError(source, "aux_si needs the signal-intensity ratios (index.csv si_both), which this "
                                   "dataset lacks", "Prepare the dataset again with this version, or set aux_si: 0")
    si = index["si_both"].to_numpy(dtype=np.float64)
    tr = si[np.asarray(train_rows)]
    tr = tr[np.isfinite(tr)]
    if len(tr) < 2 or not np.std(tr) > 0:
        raise DatasetError(source, "aux_si: the train slices have no usable signal-intensity ratios",
                           "Check the ROIs, or set aux_si: 0")
    return ((si - tr.mean()) / tr.std()).astype(np.float32)


def with_aux_head(model):
    """A training-time wrapper of a timm classifier: a linear head on its pooled features next to the
    classifier; ``forward(x)`` returns ``(logits [B, 1], aux [B])``. Only the classifier is kept."""
    import torch

    class _WithAux(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.aux_head = torch.nn.Linear(int(net.num_features), 1)

        def forward(self, x):
            feats = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
            return self.net.get_classifier()(feats), self.aux_head(feats).reshape(-1)

    return _WithAux(model)


def epoch_positions(n: int, labels: np.ndarray, epoch: int, seed: int, balance: str,
                    world_size: int = 1, rank: int = 0) -> np.ndarray:
    """This rank's training sample order for one epoch (positions in ``[0, n)``).

    ``balance="sampler"``: ``ceil(n / world) * world`` draws with replacement, class
    probabilities equal, then every ``world``-th from ``rank``. Otherwise a
    ``DistributedSampler`` permutation (seeded by ``seed`` and ``epoch``; padded so
    every rank gets the same count). Identical on every rank and across resumes.
    """
    import torch
    from torch.utils.data import DistributedSampler

    if balance == "sampler":
        lab = np.asarray(labels).astype(int)
        counts = np.bincount(lab, minlength=2).astype(float)
        w = 1.0 / counts[lab]
        g = torch.Generator().manual_seed(_mix_seed(seed, epoch, 7))
        total = int(math.ceil(n / world_size)) * world_size
        idx = torch.multinomial(torch.as_tensor(w, dtype=torch.float64), total, replacement=True, generator=g)
        return idx.numpy()[rank::world_size]
    sampler: DistributedSampler = DistributedSampler(range(n),  # type: ignore[arg-type]  # only len() is used
                                                     num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=int(seed) & 0x7FFFFFFF, drop_last=False)
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), dtype=np.int64)


def make_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive chunks of ``order``; a last chunk of one image is dropped (batch norm)."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if batches and len(batches[-1]) < 2:
        batches.pop()
    return batches


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up
    from ``1/warmup_steps`` to 1, then cosine to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- one epoch (also used by the benchmark)


def train_one_epoch(model, optimizer, scheduler, scaler, criterion, data: SliceTensors, batches: list,
                    device, amp_dtype=None, aug_gen=None, aug_config=None, intensity_channels=None,
                    on_step=None, grad_clip: float | None = None, ema=None, label_smoothing: float = 0.0,
                    mixup: float = 0.0, mix_rng: np.random.Generator | None = None,
                    first_step: int = 0, aux_weight: float = 0.0, ema_source=None) -> tuple[float, int]:
    """One pass over ``batches`` (lists of positions into ``data``).

    Returns (sum of per-image losses, number of images) on this rank. ``on_step(i)``
    is called after optimiser step ``i`` (0-based). ``ema`` (a timm ``ModelEmaV3``)
    is updated after every step (global step ``first_step + i + 1``, for its warm-up); ``mixup`` > 0 blends each image and label with
    another of the batch (weights Beta(mixup, mixup) from ``mix_rng``). With ``aux_weight`` > 0
    the model returns ``(logits, aux)`` (:func:`with_aux_head`) and ``aux_weight`` times the mean
    squared error against ``data.aux_batch`` is added; ``ema_source`` is then the classifier
    the average follows.
    """
    import torch

    from nhb_core.augment import augment_batch

    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for i, pos in enumerate(batches):
        x, y = data.batch(pos)
        t = data.aux_batch(pos) if aux_weight > 0 else None
        if aug_gen is not None:
            x = augment_batch(x, aug_gen, aug_config, intensity_channels=intensity_channels)
        if mixup > 0 and mix_rng is not None and len(pos) > 1:
            lam = torch.as_tensor(mix_rng.beta(mixup, mixup, size=len(pos)), dtype=x.dtype, device=x.device)
            perm = torch.as_tensor(mix_rng.permutation(len(pos)), device=x.device)
            x = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]
            y = lam * y + (1 - lam) * y[perm]
            if t is not None:
                t = lam * t + (1 - lam) * t[perm]
        if label_smoothing > 0:
            y = y * (1 - label_smoothing) + 0.5 * label_smoothing
        with autocast_ctx(device, amp_dtype):
            out = model(x)
        if isinstance(out, tuple):
            logits, aux = out[0].reshape(-1), out[1].float()
        else:
            logits, aux = out.reshape(-1), None
        loss = criterion(logits.float(), y)
        if t is not None and aux is not None:
            ok = torch.isfinite(t)
            if bool(ok.any()):
                loss = loss + aux_weight * torch.mean((aux[ok] - t[ok]) ** 2)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(ema_source if ema_source is not None else getattr(model, "module", model),
                       step=first_step + i + 1)
        loss_sum += loss.detach().double() * len(pos)
        n += len(pos)
        if on_step is not None:
            on_step(i)
    return float(loss_sum.item()), n


# --------------------------------------------------------------------------- validation


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def _correct_prior(model, pos_weight: float) -> float:
    """Subtract ``log(pos_weight)`` from the bias of the model's one-logit linear head.

    Returns the shift applied (0.0 when ``pos_weight`` is 1 or the head is not a biased Linear).
    """
    import torch
    import torch.nn as nn

    if not (pos_weight > 0) or pos_weight == 1.0:
        return 0.0
    m = getattr(model, "module", model)
    head = m.get_classifier() if hasattr(m, "get_classifier") else None
    if not isinstance(head, nn.Linear) or head.bias is None or head.bias.numel() != 1:
        return 0.0
    shift = float(math.log(pos_weight))
    with torch.no_grad():
        head.bias.sub_(shift)
    return shift


def _bce(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _predict_positions(model, data: SliceTensors, pos: np.ndarray, batch_size: int, device, amp_dtype) -> np.ndarray:
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pos), batch_size):
            x, _ = data.batch(pos[i:i + batch_size])
            with autocast_ctx(device, amp_dtype):
                logits = model(x).reshape(-1)
            out.append(torch.sigmoid(logits.float()).cpu())
    if not out:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(out).numpy().astype(np.float64)


def _gather_predictions(local: np.ndarray, n_total: int, dist_info: DistInfo) -> np.ndarray:
    """Reassemble predictions of positions ``rank::world`` from every rank."""
    if not dist_info.distributed:
        return local
    import torch
    import torch.distributed as dist

    world = dist_info.world_size
    m = int(math.ceil(n_total / world))
    buf = torch.zeros(m, dtype=torch.float64)
    buf[:len(local)] = torch.as_tensor(local, dtype=torch.float64)
    backend_dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = buf.to(backend_dev)
    parts = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    out = np.zeros(n_total, dtype=np.float64)
    for r in range(world):
        k = len(range(r, n_total, world))
        out[r::world] = parts[r][:k].cpu().numpy()
    return out


def _subject_scores(subject_ids: np.ndarray, labels: np.ndarray, probs: np.ndarray, how: str):
    import pandas as pd

    from nhb_core.stats import aggregate_subjects

    df = pd.DataFrame({"subject_id": subject_ids, "label": labels.astype(int), "p": probs})
    s = aggregate_subjects(df, ["p"], how=how)
    return s["label"].to_numpy().astype(int), s["p"].to_numpy()


def validation_metrics(subject_ids, labels, probs, how: str = "mean") -> dict[str, float]:
    """``{"val_loss", "val_auc" (subject level), "val_auc_slice"}`` of validation predictions."""
    ys, ps = _subject_scores(np.asarray(subject_ids), np.asarray(labels), np.asarray(probs), how)
    return {"val_loss": _bce(labels, probs), "val_auc": _auc(ys, ps), "val_auc_slice": _auc(labels, probs)}


def youden_thresholds(subject_ids, labels, probs, how: str = "mean") -> dict[str, float | None]:
    """Youden-optimal thresholds on validation predictions (positive when p >= threshold):
    ``{"threshold": subject level, "threshold_slice": slice level}``; None when a level has one class."""
    from nhb_core.stats import youden_threshold

    labels = np.asarray(labels).astype(int)
    ys, ps = _subject_scores(np.asarray(subject_ids), labels, np.asarray(probs), how)
    out: dict[str, float | None] = {}
    for key, y, p in (("threshold", ys, ps), ("threshold_slice", labels, np.asarray(probs))):
        out[key] = float(youden_threshold(y, p)) if len(np.unique(y)) == 2 else None
    return out


# --------------------------------------------------------------------------- files


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and not math.isfinite(row[k]))
                        else (repr(row[k]) if isinstance(row[k], float) else row[k])) for k in HISTORY_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_history(model_dir: str | os.PathLike):
    """history.csv as a DataFrame (empty with the columns when absent)."""
    import pandas as pd

    p = Path(model_dir) / "history.csv"
    if not p.exists():
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    return pd.read_csv(p)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, str(tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read checkpoint.pt with ``torch.load(weights_only=True)`` (no code is unpickled)."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        msg = " ".join(str(err).split())[:160]
        raise RunError(path, f"the checkpoint cannot be read ({type(err).__name__}: {msg})",
                       "Delete it and train without --resume") from None


def _versions() -> dict[str, str]:
    from nhb_core.versions import module_versions

    return module_versions("nhb_core", "torch", "timm", "numpy", "python")


def dataset_sha256(dataset_dir: str | os.PathLike) -> str:
    """Fingerprint of a prepared dataset: hash of index.csv and slices.npy bytes."""
    d = Path(dataset_dir)
    return sha256_json([sha256_file(d / "index.csv"), sha256_file(d / "slices.npy")])


def _as_split(split: dict | str | os.PathLike) -> tuple[dict, str | None]:
    from nhb_core.splits import load_split

    if isinstance(split, dict):
        if "sets" not in split or "train" not in split["sets"]:
            raise DatasetError("split", "the split has no train set", "Make the split with `python -m nhb_core split`")
        return split, None
    return load_split(split), str(Path(split).resolve())


# --------------------------------------------------------------------------- the training run


def train_model(dataset_dir: str | os.PathLike, split: dict | str | os.PathLike, model_name: str,
                out_dir: str | os.PathLike, config: TrainConfig | dict | None = None,
                progress: ProgressCallback | None = None, resume: bool = False,
                weights: str | os.PathLike | None = None) -> Path:
    """Train ``model_name`` on the split's train set, select on its val set; write ``out_dir``.

    Parameters
    ----------
    dataset_dir : path
        A prepared slice dataset (``nhb_core.slices.prepare``).
    split : dict or path
        A split (``nhb_core.splits``) with at least ``train`` and ``val`` sets.
    model_name : str
        timm model name.
    out_dir : path
        The model folder (``runs/<run>/models/<name>/`` in a study); receives
        ``model.safetensors``, ``model.json``, ``history.csv``, ``checkpoint.pt`` (while
        running), ``status.json`` and ``events.jsonl`` (see docs/runs.md).
    config : TrainConfig or dict or None
    progress : callable or None
        Called with ``{"stage": "train", "model", "epoch", "epochs", "step", "steps",
        "metrics": {...}, "eta_s"}`` (metrics at the end of each epoch). An exception
        raised by it stops training (status ``cancelled`` for KeyboardInterrupt, else ``failed``).
    resume : bool
        Continue from ``checkpoint.pt`` when present (a finished model is left as is).
    weights : None, path or "imagenet"
        Initial weights (see :func:`nhb_core.models.create_model`).

    Returns
    -------
    Path of ``out_dir``.
    """

    from nhb_core import runs

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config or {})
    out = Path(out_dir)
    dinfo = dist_env()
    if dinfo.is_main:
        out.mkdir(parents=True, exist_ok=True)
        status = runs.read_status(out) or {}
        if resume and status.get("state") == "done" and (out / "model.json").exists() \
                and (out / "model.safetensors").exists():
            emit(progress, "train", model=model_name, message="already trained (status done)")
            return out
        if not resume or not (out / "checkpoint.pt").exists():
            for name in ("checkpoint.pt", "history.csv", "model.safetensors", "model.json", "events.jsonl",
                         "status.json"):
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        cb = chain(progress, runs.event_logger(out, model=model_name))
        runs.write_status(out, "running", stage="train", model=model_name, pid=os.getpid(), error=None)
    else:
        cb = None
    try:
        _train(dataset_dir, split, model_name, out, cfg, cb, resume, weights, dinfo)
    except KeyboardInterrupt:
        if dinfo.is_main:
            runs.write_status(out, "cancelled", error="training interrupted")
        raise
    except NHBError as err:
        if dinfo.is_main:
            runs.write_status(out, "failed", error=err.line())
        raise
    except Exception as err:
        if dinfo.is_main:
            runs.write_status(out, "failed", error=f"{type(err).__name__}: {err}")
        raise
    if dinfo.is_main:
        runs.write_status(out, "done", stage="train", model=model_name)
    return out


def _train(dataset_dir, split_in, model_name: str, out: Path, cfg: TrainConfig, progress, resume: bool,
           weights, dinfo: DistInfo) -> None:
    import torch
    import torch.distributed as dist

    from nhb_core.models import check_model_name
    from nhb_core.slices import load_dataset
    from nhb_core.splits import set_rows

    check_model_name(model_name)
    split, split_path = _as_split(split_in)
    ds = load_dataset(dataset_dir)
    index = ds.index
    if "val" not in split["sets"]:
        raise DatasetError(split_path or "split", "the split has no val set (needed for early stopping and the threshold)",
                           "Make the split with a validation fraction (val_size > 0)")
    train_rows = set_rows(split, index, "train")
    val_rows = set_rows(split, index, "val")
    labels_all = index["label"].to_numpy().astype(int)
    ytr = labels_all[train_rows]
    if len(train_rows) < 2 or len(np.unique(ytr)) < 2:
        raise DatasetError(split_path or "split", "the train set needs slices of both labels",
                           "Check the split and the labels")
    if len(val_rows) == 0:
        raise DatasetError(split_path or "split", "the val set is empty", "Make the split with val_size > 0")

    device = resolve_device(cfg.device, dinfo.local_rank)
    if dinfo.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        dinfo.created_group = True
    try:
        with deterministic_mode(cfg.deterministic, device):
            _fit(ds, dataset_dir, split, split_path, train_rows, val_rows, labels_all, model_name, out, cfg,
                 progress, resume, weights, dinfo, device)
    finally:
        if dinfo.created_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


def _fit(ds, dataset_dir, split, split_path, train_rows, val_rows, labels_all, model_name, out: Path,
         cfg: TrainConfig, progress, resume, weights, dinfo: DistInfo, device) -> None:
    import torch
    import torch.distributed as dist

    from nhb_core.augment import AugmentConfig
    from nhb_core.models import create_model, save_weights

    if weights is None and cfg.weights not in (None, "", "random"):
        weights = cfg.weights
    amp_dtype, use_scaler = amp_settings(device, cfg.amp)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    data_sha = dataset_sha256(dataset_dir)
    split_sha = sha256_json(split)
    fingerprint = sha256_json({"model": model_name, "config": cfg.fingerprint(), "data": data_sha,
                               "split": split_sha, "weights": str(weights), "world_size": dinfo.world_size})

    # model: same initial weights on every rank
    torch.manual_seed(cfg.seed)
    model = create_model(model_name, ds.in_chans, weights=weights, drop_rate=cfg.drop_rate,
                         drop_path_rate=cfg.drop_path_rate).to(device)
    from nhb_core.models import check_input_size

    check_input_size(model, model_name, ds.in_chans, tuple(ds.images.shape[2:]), source=str(dataset_dir))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    aux_target = None
    train_net = model  # what is optimised: the classifier, or the classifier plus the auxiliary head
    if cfg.aux_si > 0:
        aux_target = _aux_si_target(ds.index, train_rows, dataset_dir)
        train_net = with_aux_head(model).to(device)
    ddp_model = train_net
    if dinfo.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(train_net, device_ids=[device.index] if device.type == "cuda" else None)

    data = SliceTensors(ds.images, train_rows, val_rows, labels_all, device, channels_last=channels_last,
                        aux=aux_target)
    ytr = labels_all[train_rows]
    n_pos, n_neg = int(ytr.sum()), int(len(ytr) - ytr.sum())
    pos_weight = torch.tensor(n_neg / n_pos if cfg.balance == "loss" else 1.0, dtype=torch.float32, device=device)
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    per_rank = int(math.ceil(len(train_rows) / dinfo.world_size))
    steps = len(make_batches(np.arange(per_rank), cfg.batch_size))
    if steps == 0:
        raise DatasetError("split", f"the train set ({len(train_rows)} slices) is too small for one batch",
                           "Use a larger train set or fewer processes")
    n_epochs = cfg.epochs if cfg.steps is None else int(math.ceil(cfg.steps / steps))
    total_steps = steps * n_epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps))
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in train_net.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    aug_cfg = AugmentConfig.from_dict(cfg.augment_params)
    intensity_channels = ds.in_chans - (1 if (ds.meta.get("config") or {}).get("roi_channel") else 0)
    aug_gen = torch.Generator(device=device) if cfg.augment else None
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True, device=device)
    # the weights that are validated and kept: the running average when there is one
    eval_model = ema.module if ema is not None else model

    history: list[dict[str, Any]] = []
    start_epoch = 0
    best = {"epoch": 0, "val_auc": float("nan"), "val_loss": float("inf"), "val_auc_slice": float("nan")}
    bad_epochs = 0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck.get("fingerprint") != fingerprint:
            raise RunError(ckpt_path, "the checkpoint was made with another model, config, dataset, split or "
                                      "number of processes", "Train without --resume to start over")
        model.load_state_dict(ck["model"])
        if train_net is not model and ck.get("aux_head"):
            train_net.aux_head.load_state_dict(ck["aux_head"])
        if ema is not None and ck.get("ema"):
            ema.module.load_state_dict(ck["ema"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        history = [dict(h) for h in ck["history"]]
        start_epoch = int(ck["epoch"])
        best = dict(ck["best"])
        bad_epochs = int(ck["bad_epochs"])
        emit(progress, "train", model=model_name, message=f"resuming after epoch {start_epoch}")
        if bad_epochs >= cfg.patience > 0 or start_epoch >= n_epochs:
            start_epoch = n_epochs  # it had already stopped: finish
    emit(progress, "train", model=model_name, epoch=min(start_epoch + 1, n_epochs), epochs=n_epochs,
         step=0 if start_epoch < n_epochs else steps, steps=steps,
         message=f"{model_name}: {len(train_rows)} train / {len(val_rows)} val slices on {device}"
                 + (f" x{dinfo.world_size}" if dinfo.distributed else ""))

    val_sids = ds.index["subject_id"].astype(str).to_numpy()[val_rows]
    val_labels = labels_all[val_rows]
    t_session = time.monotonic()
    steps_session = 0
    epoch = start_epoch
    while epoch < n_epochs:
        t_epoch = time.monotonic()
        torch.manual_seed(_mix_seed(cfg.seed, epoch, dinfo.rank, 1))
        if aug_gen is not None:
            aug_gen.manual_seed(_mix_seed(cfg.seed, epoch, dinfo.rank, 2))
        order = epoch_positions(len(train_rows), ytr, epoch, cfg.seed, cfg.balance, dinfo.world_size, dinfo.rank)
        batches = make_batches(data.train_pos[order], cfg.batch_size)

        def on_step(i: int, epoch: int = epoch) -> None:
            nonlocal steps_session
            steps_session += 1
            if progress is None:
                return
            rate = (time.monotonic() - t_session) / steps_session
            remaining = (n_epochs - epoch - 1) * steps + (steps - i - 1)
            emit(progress, "train", model=model_name, epoch=epoch + 1, epochs=n_epochs, step=i + 1, steps=steps,
                 eta_s=round(rate * remaining, 1))

        mix_rng = np.random.default_rng(_mix_seed(cfg.seed, epoch, dinfo.rank, 3))
        loss_sum, n_seen = train_one_epoch(ddp_model, optimizer, scheduler, scaler, criterion, data, batches, device,
                                           amp_dtype, aug_gen, aug_cfg, intensity_channels, on_step,
                                           grad_clip=cfg.grad_clip, ema=ema, label_smoothing=cfg.label_smoothing,
                                           mixup=cfg.mixup, mix_rng=mix_rng, first_step=epoch * steps,
                                           aux_weight=cfg.aux_si, ema_source=model)
        if dinfo.distributed:
            red = torch.tensor([loss_sum, float(n_seen)], dtype=torch.float64,
                               device=device if device.type == "cuda" else torch.device("cpu"))
            dist.all_reduce(red)
            loss_sum, n_seen = float(red[0]), int(red[1])
            for b in model.buffers():  # one set of batch-norm statistics (rank 0's) for validation
                dist.broadcast(b, 0)
        # validation: each rank predicts positions rank::world, then all of them are gathered
        vpos = data.val_pos[dinfo.rank::dinfo.world_size]
        local = _predict_positions(eval_model, data, vpos, cfg.eval_batch_size, device, amp_dtype)
        vprob = _gather_predictions(local, len(val_rows), dinfo)
        vm = validation_metrics(val_sids, val_labels, vprob, cfg.aggregate)
        lr_now = float(optimizer.param_groups[0]["lr"])
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, n_seen), **vm, "lr": lr_now,
               "seconds": round(time.monotonic() - t_epoch, 3)}
        history.append(row)
        auc, vloss = vm["val_auc"], vm["val_loss"]
        best_auc = best["val_auc"]
        if cfg.select == "last":
            improved = True  # keep the latest weights; "best" records the kept epoch
        elif math.isfinite(auc) and math.isfinite(best_auc):
            improved = auc > best_auc or (auc == best_auc and vloss < best["val_loss"])
        elif math.isfinite(auc):
            improved = True
        elif math.isfinite(best_auc):
            improved = False
        else:
            improved = vloss < best["val_loss"]
        if improved:
            best = {"epoch": epoch + 1, "val_auc": auc, "val_loss": vloss, "val_auc_slice": vm["val_auc_slice"]}
            bad_epochs = 0
        else:
            bad_epochs += 1
        epoch += 1
        stop = cfg.select == "best" and cfg.patience > 0 and bad_epochs >= cfg.patience
        if dinfo.is_main:
            if improved:
                save_weights(eval_model, out / "model.safetensors")
            _write_history(out / "history.csv", history)
            _save_checkpoint(ckpt_path, {
                "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "model_name": model_name,
                "epoch": epoch, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "aux_head": ({k: v.detach().cpu() for k, v in train_net.aux_head.state_dict().items()}
                             if train_net is not model else {}),
                "ema": ({k: v.detach().cpu() for k, v in ema.module.state_dict().items()} if ema is not None else {}),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else {},
                "rng": {"torch": torch.get_rng_state(),
                        "aug": aug_gen.get_state() if aug_gen is not None else torch.zeros(0, dtype=torch.uint8)},
                "history": history, "best": best, "bad_epochs": bad_epochs, "config": cfg.to_dict(),
            })
            metrics = {"loss": row["train_loss"], "val_loss": vloss, "val_auc": auc,
                       "val_auc_slice": vm["val_auc_slice"], "lr": lr_now, "best_epoch": best["epoch"]}
            rate = (time.monotonic() - t_session) / max(1, steps_session)
            emit(progress, "train", model=model_name, epoch=epoch, epochs=n_epochs, step=steps, steps=steps,
                 metrics={k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()},
                 eta_s=0.0 if stop else round(rate * (n_epochs - epoch) * steps, 1))
        if stop:
            break

    # final: best weights -> thresholds on the validation set -> model.json
    if dinfo.is_main:
        from safetensors.torch import load_file

        if not (out / "model.safetensors").exists():
            save_weights(eval_model, out / "model.safetensors")
        eval_model.load_state_dict(load_file(str(out / "model.safetensors"), device="cpu"))
        # The class-balanced loss (pos_weight w) makes the network estimate odds w times too high for
        # positives; subtracting log(w) from the one-logit head's bias restores probabilities on the
        # training prevalence (AUC unchanged), so calibration plots and ACC at 0.5 mean what they say.
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as fh:  # a resumed finish must not shift twice
            done_shift = (fh.metadata() or {}).get("prior_correction_logit")
        if done_shift is None:
            prior_shift = _correct_prior(eval_model, float(pos_weight))
            if prior_shift:
                save_weights(eval_model, out / "model.safetensors",
                             metadata={"prior_correction_logit": repr(prior_shift)})
        else:
            prior_shift = float(done_shift)
        vprob = _predict_positions(eval_model, data, data.val_pos, cfg.eval_batch_size, device, amp_dtype)
        vm = validation_metrics(val_sids, val_labels, vprob, cfg.aggregate)
        thr = youden_thresholds(val_sids, val_labels, vprob, cfg.aggregate)
        h, w = int(ds.images.shape[2]), int(ds.images.shape[3])
        w_info: Any = "random" if weights in (None, "", "random") else str(weights)
        if weights not in (None, "", "random") and Path(str(weights)).is_file():
            w_info = {"file": Path(str(weights)).name, "sha256": sha256_file(weights)}
        model_json = {
            "name": model_name, "architecture": model_name, "timm_name": model_name,
            "in_chans": int(ds.in_chans), "input_size": [h, w], "num_classes": 1,
            "output": "one logit; sigmoid(logit) = probability of label 1",
            "channels": (ds.meta.get("channels") if isinstance(ds.meta.get("channels"), list) else None),
            "preprocessing": ds.meta.get("config", {}),
            "normalization": {"applied_by": "prepare", "norm": (ds.meta.get("config") or {}).get("norm"),
                              "extra": None},
            "threshold": thr["threshold"], "threshold_level": "subject", "threshold_rule": "youden",
            "threshold_slice": thr["threshold_slice"], "aggregate": cfg.aggregate,
            "val_auc": vm["val_auc"], "val_auc_slice": vm["val_auc_slice"], "val_loss": vm["val_loss"],
            "best_epoch": int(best["epoch"]), "epochs_run": len(history), "stopped_early": len(history) < n_epochs,
            "selected": cfg.select, "ema": cfg.ema, "prior_correction_logit": prior_shift,
            "seed": cfg.seed, "train_config": cfg.to_dict(), "weights": w_info,
            "data_sha256": data_sha, "split_sha256": split_sha,
            "dataset_dir": str(Path(dataset_dir).resolve()), "split_path": split_path,
            "n_train_slices": int(len(train_rows)), "n_val_slices": int(len(val_rows)),
            "n_train_pos": n_pos, "n_train_neg": n_neg,
            "device": str(device), "world_size": dinfo.world_size,
            "amp": None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
            "versions": _versions(), "created": __import__("nhb_core.runs", fromlist=["now_iso"]).now_iso(),
        }
        atomic_write_json(out / "model.json", model_json)
        if not cfg.keep_checkpoint:
            with contextlib.suppress(FileNotFoundError):
                ckpt_path.unlink()
        # epochs = epochs run, so that a progress bar of an early-stopped run ends full
        emit(progress, "train", model=model_name, epoch=len(history), epochs=len(history), step=steps, steps=steps,
             eta_s=0.0, message=f"done: best epoch {best['epoch']}, val AUC {vm['val_auc']:.3f}")
