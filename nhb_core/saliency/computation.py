"""CAM computation: methods, the target layer, Grad-CAM / Grad-CAM++ / EigenCAM / LayerCAM maps
(``pytorch_grad_cam``) of the model's single "injury" logit, min-max normalised per slice."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from nhb_core.errors import InputError
from nhb_core.models import MODEL_LOCK

#: Accepted method names (lower case) -> pytorch_grad_cam class name.
METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
}
_ALIASES = {
    "gradcampp": "gradcam++",
    "gradcam_pp": "gradcam++",
    "gradcamplusplus": "gradcam++",
    "grad-cam": "gradcam",
    "grad-cam++": "gradcam++",
    "eigen-cam": "eigencam",
    "layer-cam": "layercam",
}

#: Grad-CAM hooks the model's layers: one computation at a time per process (the dashboard
#: serves sessions from threads that share the cached models); the same lock as every forward pass.
_CAM_LOCK = MODEL_LOCK

#: Fractions of the crop's pixels removed by :func:`faithfulness` (most relevant first).
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


def normalize_method(method: str) -> str:
    """The canonical method name (``gradcam``, ``gradcam++``, ``eigencam``, ``layercam``).

    Raises :class:`~nhb_core.errors.InputError` for an unknown name.
    """
    m = str(method).strip().lower()
    m = _ALIASES.get(m, m)
    if m not in METHODS:
        raise InputError("--method", f"unknown saliency method {method!r}",
                         f"Use one of: {', '.join(METHODS)}")
    return m


# ---------------------------------------------------------------------------------------------
# target layer


def _timm_feature_module(model, input_hw: tuple[int, int] | None = None):
    """The deepest timm ``feature_info`` stage whose map keeps at least ``MIN_CAM_CELLS`` cells a side at ``input_hw``.

    Falls back to the last stage when ``input_hw`` is unknown or every stage is coarser.
    """
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    try:
        stages = [(f["module"], int(f["reduction"])) for f in info]
    except (TypeError, KeyError):
        try:
            stages = [(n, int(r)) for n, r in zip(info.module_name(), info.reduction())]
        except Exception:
            return None
    if not stages:
        return None
    name = stages[-1][0]
    if input_hw is not None:
        fitting = [n for n, r in stages if min(input_hw) // r >= MIN_CAM_CELLS]
        if fitting:
            name = fitting[-1]
    return model.get_submodule(name)


#: A target layer whose map has fewer cells a side than this (at the crop size) is replaced by
#: a shallower stage: a 1 x 1 or 2 x 2 map cannot say where in a 32-64 px crop the model looks,
#: and a cell must not be larger than a globus pallidus (5 x 8 mm): on the 64 mm crop that takes
#: 16 cells (4 mm each; 64 px: ResNet layer1, DenseNet denseblock1, EfficientNet blocks.1). Measured on
#: resnet18's true positives (docs/training.md): 8 x 8 cells put 4 x chance of the energy on the GP,
#: 16 x 16 cells 7 x (Grad-CAM) to 11 x (LayerCAM, made for such layers).
MIN_CAM_CELLS = 16


def _output_hw(model, layer, in_chans: int, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """Spatial size of ``layer``'s output for a zero input of ``input_hw`` (one no-grad pass)."""
    import torch

    seen: list[tuple[int, int]] = []

    def hook(_m, _i, out):
        t = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(t, torch.Tensor) and t.ndim == 4:
            seen.append((int(t.shape[-2]), int(t.shape[-1])))

    with _CAM_LOCK:
        return _output_hw_locked(model, layer, in_chans, input_hw, hook, seen)


def _output_hw_locked(model, layer, in_chans, input_hw, hook, seen):
    import torch

    h = layer.register_forward_hook(hook)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, in_chans, *input_hw), device=_model_device(model)))
    finally:
        h.remove()
        model.train(was_training)
    return seen[0] if seen else None


def resolve_target_layer(model, model_name: str | None = None, input_hw: tuple[int, int] | None = None,
                         in_chans: int | None = None):
    """The layer Grad-CAM reads.

    ``nhb_core.models.default_target_layer(model, name)`` (the last convolutional block) unless,
    at the crop size ``input_hw``, its map has fewer than :data:`MIN_CAM_CELLS` cells a side; then
    the deepest timm ``feature_info`` stage that keeps that many (a 64 px crop: ResNet ``layer1``,
    DenseNet ``features.denseblock1``, EfficientNet ``blocks.1``, 16 x 16 cells).
    """
    from nhb_core.models import default_target_layer

    layer = default_target_layer(model, model_name)
    if input_hw is None:
        return layer
    if in_chans is None:
        conv = next((m for m in model.modules() if hasattr(m, "in_channels")), None)
        in_chans = int(getattr(conv, "in_channels", 1))
    memo = _LAYER_MEMO.setdefault(model, {})
    key = (str(model_name), tuple(input_hw), int(in_chans))
    if key in memo:
        return memo[key]
    hw_in = (int(input_hw[0]), int(input_hw[1]))
    hw = _output_hw(model, layer, in_chans, hw_in)
    if hw is None or min(hw) < MIN_CAM_CELLS:
        shallower = _timm_feature_module(getattr(model, "module", model), hw_in)
        layer = shallower if shallower is not None else layer
    memo[key] = layer
    return layer


#: model -> {(name, input_hw, in_chans): target layer}; forgotten with the model.
_LAYER_MEMO: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------
# CAM computation


def _as_batch(images) -> Any:
    import torch

    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, dtype=np.float32, copy=True))
    t = t.detach().float()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise InputError(None, f"image batch has shape {tuple(t.shape)}, expected [N, C, H, W] or [C, H, W]",
                         "Pass one slice as [C, H, W] float32")
    return t


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        import torch

        return torch.device("cpu")


def compute_cams(model, images, method: str = "gradcam", target_layer=None, model_name: str | None = None,
                 batch_size: int = 32, return_probs: bool = False):
    """Class-activation maps for a batch of crops.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier with one output logit (the "injury" class), as built by ``nhb_core.models``.
    images : np.ndarray or torch.Tensor, shape [N, C, H, W] (or [C, H, W]), float32
        Model-ready crops (already normalised as the model was trained).
    method : {"gradcam", "gradcam++", "eigencam", "layercam"}
    target_layer : torch.nn.Module, optional
        Layer whose activations are used; default :func:`resolve_target_layer`.
    model_name : str, optional
        Architecture name (``"resnet18"``...) for the default target layer.
    batch_size : int
        Crops per forward/backward pass.

    return_probs : bool
        Also return the model's probabilities, ``sigmoid(logit)`` float64 [N], from the same
        forward pass.

    Returns
    -------
    np.ndarray, shape [N, H, W], float32 in [0, 1]
        One map per crop at the crop's resolution, min-max normalised per crop; a map with no
        positive evidence is all zeros. The target is always the positive (injury) logit.
        With ``return_probs``: ``(maps, probs)``.
    """
    m = normalize_method(method)
    x = _as_batch(images)
    n, _, h, w = x.shape
    if target_layer is None:
        target_layer = resolve_target_layer(model, model_name, (h, w), in_chans=int(x.shape[1]))
    with _CAM_LOCK:
        return _compute_cams_locked(model, x, m, target_layer, batch_size, return_probs)


def _compute_cams_locked(model, x, m, target_layer, batch_size, return_probs):
    import pytorch_grad_cam as pgc
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    n, _, h, w = x.shape
    was_training = model.training
    model.eval()
    cam_cls = getattr(pgc, METHODS[m])
    out = np.zeros((n, h, w), dtype=np.float32)
    probs = np.zeros(n, dtype=np.float64)
    # Only the gradient at the target layer is needed: no parameter gradients, and the autograd
    # graph starts at the target layer's output (made a leaf that requires grad), so the backward
    # pass stops there instead of running through the whole network down to the input.
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]

    def _leaf(_mod, _inp, output):
        if isinstance(output, torch.Tensor):
            return output.detach().requires_grad_(True) * 1.0
        return None

    hook = target_layer.register_forward_hook(_leaf, prepend=True)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad(), cam_cls(model=model, target_layers=[target_layer]) as cam:
            for i in range(0, n, batch_size):
                xb = x[i:i + batch_size].to(_model_device(model))
                targets = [ClassifierOutputTarget(0) for _ in range(len(xb))]
                maps = cam(input_tensor=xb, targets=targets)
                out[i:i + len(xb)] = np.asarray(maps, dtype=np.float32).reshape(len(xb), h, w)
                logits = cam.outputs.detach().reshape(len(xb), -1)[:, 0]
                probs[i:i + len(xb)] = torch.sigmoid(logits).cpu().numpy()
    finally:
        hook.remove()
        for p, r in zip(params, saved):
            p.requires_grad_(r)
        model.train(was_training)
    out = np.clip(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0).astype(np.float32)
    return (out, probs) if return_probs else out


def compute_cam(model, image, method: str = "gradcam", target_layer=None, model_name: str | None = None) -> np.ndarray:
    """Class-activation map of one crop.

    Parameters
    ----------
    model : torch.nn.Module
        One-logit classifier.
    image : np.ndarray or torch.Tensor, shape [C, H, W], float32
        A model-ready crop.
    method : {"gradcam", "gradcam++", "eigencam", "layercam"}
    target_layer : torch.nn.Module, optional
        Default :func:`resolve_target_layer` (``models.default_target_layer``).
    model_name : str, optional
        Architecture name, for the default target layer.

    Returns
    -------
    np.ndarray, shape [H, W], float32 in [0, 1] (normalised per slice).
    """
    x = _as_batch(image)
    if x.shape[0] != 1:
        raise InputError(None, f"compute_cam takes one image [C, H, W], got {tuple(x.shape)}", "Use compute_cams for a batch")
    return compute_cams(model, x, method=method, target_layer=target_layer, model_name=model_name)[0]

