"""Devices, mixed precision and the process layout of (distributed) training.

Used by training (``nhb_core.train``), evaluation (``nhb_core.evaluate``), new cohorts and the
study runner; nothing here trains.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from nhb_core.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process sits in a (possibly) distributed run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistInfo:
    """World size and ranks from torchrun's environment (1 process when absent)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        world, rank, local = 1, 0, 0
    return DistInfo(world_size=max(1, world), rank=rank, local_rank=local)


def resolve_device(spec: str = "auto", local_rank: int = 0):
    """The torch.device to train on: CUDA when present (``auto``), ``cuda:local_rank`` under DDP."""
    import torch

    spec = spec or "auto"
    if spec == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if spec == "auto":
        spec = "cuda" if has_cuda else "cpu"
        if spec == "cpu":
            return torch.device("cpu")
    if not has_cuda:
        raise ConfigError("--device", f"device {spec!r} was asked for but no CUDA GPU is available",
                          "Use device: auto or cpu")
    if spec == "cuda":
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device(spec)


def amp_settings(device, enabled: bool = True):
    """(autocast dtype or None, use GradScaler) for ``device``.

    CUDA with ``enabled``: bfloat16 where supported (no scaler), else float16 with a
    GradScaler. CPU: None (float32 everywhere).
    """
    import torch

    if not enabled or device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def autocast_ctx(device, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
