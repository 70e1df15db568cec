"""Training-time augmentation as batched tensor operations on the training device.

One call transforms a whole batch ``[B, C, H, W]`` where it lives (CPU or GPU):
a random affine warp (small rotation, isotropic scale, translation, left-right
flip) through ``affine_grid``/``grid_sample``, then, on the intensity channels
only, a smooth multiplicative bias field, an intensity scale and shift, and
Gaussian noise. Nothing is applied at evaluation.

Every random draw comes from the ``torch.Generator`` passed in, so a seed fixes
the augmentation exactly (on CPU bit for bit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nhb_core.errors import ConfigError


@dataclass
class AugmentConfig:
    """Ranges of the random transforms (each drawn uniformly per image).

    Parameters
    ----------
    rotate_deg : float
        Rotation in [-rotate_deg, +rotate_deg] degrees.
    scale : float
        Isotropic zoom factor in [1 - scale, 1 + scale].
    translate : float
        Shift in [-translate, +translate] of the half-width (fraction of the field of view / 2).
    flip_lr : bool
        Mirror left-right with probability 0.5 (the two globi pallidi are symmetric).
    intensity_scale : float
        Multiply intensities by a factor in [1 - intensity_scale, 1 + intensity_scale].
    intensity_shift : float
        Add an offset in [-intensity_shift, +intensity_shift] (units of the normalised image).
    bias_field : float
        Multiply by ``exp(f)`` where ``f`` is a random 2nd-order polynomial of the pixel
        coordinates (in [-1, 1]) with coefficients in [-bias_field, +bias_field].
    noise_std : float
        Add Gaussian noise with standard deviation drawn in [0, noise_std].
    blur_sigma : float
        Smooth with a Gaussian of sigma drawn in [0, blur_sigma] pixels (another scanner's
        point-spread function; at most 2).
    padding : {"border", "zeros", "reflection"}
        ``grid_sample`` padding for pixels warped in from outside the image.
    """

    rotate_deg: float = 10.0
    scale: float = 0.10
    translate: float = 0.08
    flip_lr: bool = True
    intensity_scale: float = 0.10
    intensity_shift: float = 0.05
    bias_field: float = 0.15
    noise_std: float = 0.03
    blur_sigma: float = 0.0
    padding: str = "border"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "padding":
                if v not in ("border", "zeros", "reflection"):
                    raise ConfigError("augment config", f"padding must be border, zeros or reflection, got {v!r}",
                                      "Use padding: border")
            elif f.name == "flip_lr":
                setattr(self, f.name, bool(v))
            else:
                try:
                    fv = float(v)
                except (TypeError, ValueError):
                    raise ConfigError("augment config", f"{f.name} must be a number, got {v!r}",
                                      f"Give {f.name} as a number") from None
                if not fv >= 0:
                    raise ConfigError("augment config", f"{f.name} must be >= 0, got {v!r}", f"Give {f.name} >= 0")
                setattr(self, f.name, fv)
        if self.blur_sigma > 2:
            raise ConfigError("augment config", f"blur_sigma must be at most 2 pixels, got {self.blur_sigma}",
                              "Use e.g. blur_sigma: 0.6")
        if self.scale >= 1:
            raise ConfigError("augment config", f"scale must be < 1, got {self.scale}", "Use e.g. scale: 0.1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AugmentConfig:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError("augment config", f"unknown augmentation option(s): {', '.join(unknown)}",
                              f"Use only: {', '.join(sorted(known))}")
        return cls(**d)


def _uniform(n: int, lo: float, hi: float, gen, device, dtype):
    import torch

    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device, dtype=dtype)


def _random_blur(x, sigma):
    """Blur each image of ``x`` [B, K, H, W] with its own Gaussian ``sigma`` [B] (pixels, 5 x 5 kernel)."""
    import torch
    import torch.nn.functional as F

    b, k, h, w = x.shape
    r = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).view(b, 1)
    g1 = torch.exp(-0.5 * (r.view(1, 5) / s) ** 2)
    g1 = g1 / g1.sum(dim=1, keepdim=True)  # [B, 5]; sigma -> 0 gives the identity kernel
    ker = (g1.view(b, 5, 1) * g1.view(b, 1, 5)).repeat_interleave(k, dim=0).view(b * k, 1, 5, 5)
    y = F.conv2d(F.pad(x.reshape(1, b * k, h, w), (2, 2, 2, 2), mode="replicate"), ker, groups=b * k)
    return y.view(b, k, h, w)


def augment_batch(x, generator, config: AugmentConfig | None = None, intensity_channels: int | None = None):
    """Randomly transform a batch (a new tensor; ``x`` is not modified).

    Parameters
    ----------
    x : torch.Tensor, float [B, C, H, W]
        Images on any device (memory format kept).
    generator : torch.Generator
        On the same device type as ``x``; the only source of randomness.
    config : AugmentConfig or None
        Ranges (defaults when None).
    intensity_channels : int or None
        The first ``intensity_channels`` channels get the intensity transforms; the
        others (e.g. an ROI mask channel) only the geometric warp. None: all.

    Returns
    -------
    torch.Tensor, same shape, dtype and device as ``x``.
    """
    import math

    import torch
    import torch.nn.functional as F

    cfg = config or AugmentConfig()
    b, c, h, w = x.shape
    dev, dt = x.device, torch.float32
    g = generator
    xf = x.float()

    # geometric: output pixel (u, v) in [-1, 1] samples input at A @ (u, v, 1)
    ang = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, g, dev, dt) * (math.pi / 180.0)
    zoom = _uniform(b, 1.0 - cfg.scale, 1.0 + cfg.scale, g, dev, dt)
    tx = _uniform(b, -cfg.translate, cfg.translate, g, dev, dt)
    ty = _uniform(b, -cfg.translate, cfg.translate, g, dev, dt)
    flip = torch.rand(b, generator=g, device=dev, dtype=dt) < 0.5 if cfg.flip_lr else torch.zeros(b, dtype=torch.bool, device=dev)
    sx = torch.where(flip, -1.0, 1.0) / zoom
    sy = 1.0 / zoom
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, tx], dim=1),
                         torch.stack([sin * sx, cos * sy, ty], dim=1)], dim=1)  # [B, 2, 3]
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode=cfg.padding, align_corners=False)

    k = c if intensity_channels is None else max(0, min(int(intensity_channels), c))
    if k > 0:
        inten = out[:, :k]
        if cfg.bias_field > 0:
            yy = torch.linspace(-1.0, 1.0, h, device=dev, dtype=dt).view(1, h, 1)
            xx = torch.linspace(-1.0, 1.0, w, device=dev, dtype=dt).view(1, 1, w)
            basis = torch.stack([xx.expand(1, h, w), yy.expand(1, h, w), (xx * yy), xx.expand(1, h, w) ** 2,
                                 yy.expand(1, h, w) ** 2], dim=1)  # [1, 5, H, W]
            coef = (torch.rand(b, 5, generator=g, device=dev, dtype=dt) * 2.0 - 1.0) * cfg.bias_field
            field = torch.exp((coef.view(b, 5, 1, 1) * basis).sum(dim=1, keepdim=True))  # [B, 1, H, W]
            inten = inten * field
        a = _uniform(b, 1.0 - cfg.intensity_scale, 1.0 + cfg.intensity_scale, g, dev, dt).view(b, 1, 1, 1)
        s = _uniform(b, -cfg.intensity_shift, cfg.intensity_shift, g, dev, dt).view(b, 1, 1, 1)
        inten = inten * a + s
        if cfg.blur_sigma > 0:
            inten = _random_blur(inten, _uniform(b, 0.0, cfg.blur_sigma, g, dev, dt))
        if cfg.noise_std > 0:
            sd = _uniform(b, 0.0, cfg.noise_std, g, dev, dt).view(b, 1, 1, 1)
            inten = inten + sd * torch.randn(inten.shape, generator=g, device=dev, dtype=dt)
        out = torch.cat([inten, out[:, k:]], dim=1) if k < c else inten
    out = out.to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
