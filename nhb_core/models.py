"""Classifier networks (timm) with one logit, weight loading and trained-model loading.

Every model is a timm classifier built with ``num_classes=1`` and the dataset's
number of input channels (``in_chans``). Its output is one logit per image;
``sigmoid(logit)`` is the probability of label 1.

Weights: random initialisation, a local file with ImageNet weights in timm or
torchvision layout (safetensors, or a PyTorch state dict read with
``torch.load(weights_only=True)``), or the timm hub (needs a network). The
3-channel stem of ImageNet weights is adapted to ``in_chans`` the timm way
(summed for 1 channel, repeated and rescaled otherwise); the 1000-class
classifier is dropped.

Trained models (``model.safetensors`` + ``model.json``) are loaded without
unpickling anything: :func:`load_trained`.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

from nhb_core.errors import ConfigError, NetworkUnavailableError, RunError

#: The paper's three architectures (timm names); any other timm classifier is accepted.
DEFAULT_MODELS = ("resnet18", "densenet121", "efficientnet_b0")

#: ``weights`` values that ask for the timm hub's ImageNet weights.
HUB_WEIGHTS = ("imagenet", "hub", "timm", "pretrained")


def _timm():
    import timm

    return timm


def check_model_name(name: str) -> str:
    """Return ``name`` when timm knows it, else raise :class:`ConfigError`."""
    timm = _timm()
    if not isinstance(name, str) or not name or not timm.is_model(name):
        raise ConfigError("--model", f"unknown model {name!r} (not a timm model name)",
                          f"Use one of {', '.join(DEFAULT_MODELS)} or another name from timm.list_models()")
    return name


def _network_available(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub can be opened (and HF_HUB_OFFLINE is not set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a weights file without executing code.

    ``.safetensors`` via safetensors; anything else via
    ``torch.load(weights_only=True)``. A checkpoint dict wrapping the weights
    under ``state_dict``, ``model``, ``model_state_dict`` or ``state_dict_ema``
    is unwrapped, and a DDP ``module.`` prefix is removed.

    Returns
    -------
    dict of str -> torch.Tensor
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, "the weights file does not exist", "Give the path of a .safetensors or .pth file")
    sd: Any
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is a user error about this file
        msg = " ".join(str(err).split())[:200]
        raise ConfigError(p, f"cannot read weights ({type(err).__name__}: {msg})",
                          "Give a safetensors file or a plain PyTorch state dict (no pickled code)") from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(p, "not a state dict of tensors", "Give a state dict saved with torch.save(model.state_dict())")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


_HEAD_NAMES = ("classifier", "fc", "head", "heads", "last_linear")


def _positional_remap(sd: dict, name: str) -> dict | None:
    """Rename a foreign-layout state dict (e.g. torchvision's EfficientNet) to timm's
    names by position, when every tensor's shape matches in order; the classifier is
    left out. Tries the file's order, then module order recovered by a natural sort
    (safetensors files store keys alphabetically). None when nothing fits."""
    timm = _timm()
    ref_model = timm.create_model(name, pretrained=False, in_chans=3, num_classes=0)
    ref = ref_model.state_dict()
    body = [(k, v) for k, v in sd.items() if k.split(".")[0] not in _HEAD_NAMES]
    if len(ref) != len(body):
        return None
    leaf_rank = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}

    def _key(k: str):
        parts = k.split(".")
        path = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts[:-1])
        return path, leaf_rank.get(parts[-1], 9), parts[-1]

    for order in (body, sorted(body, key=lambda kv: _key(kv[0]))):
        if all(tuple(rv.shape) == tuple(sv.shape) for rv, (_, sv) in zip(ref.values(), order)):
            return {rk: sv for rk, (_, sv) in zip(ref.keys(), order)}
    return None


def _as_tuple(v) -> tuple:
    if not v:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


def _load_local_weights(name: str, in_chans: int, path: str | os.PathLike, extra: dict | None = None):
    """Model ``name`` with ``in_chans`` inputs and one logit, holding the file's weights
    (every tensor but the classifier's; the stem adapted to ``in_chans``)."""
    from timm.models import adapt_input_conv

    timm = _timm()
    sd = read_state_dict(path)
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=1, **(extra or {}))
    cfg = dict(model.pretrained_cfg or {})
    classifiers = _as_tuple(cfg.get("classifier"))
    cls_keys = {f"{c}.{s}" for c in classifiers for s in ("weight", "bias")}
    target = model.state_dict()
    body = [k for k in sd if k not in cls_keys]
    if not set(body) <= set(target):
        # torchvision layouts with other names (EfficientNet): map by position
        remapped = _positional_remap(sd, name)
        if remapped is None:
            unknown = sorted(set(body) - set(target), key=lambda k: k.split(".")[0] in _HEAD_NAMES)
            raise ConfigError(Path(path), f"the weights do not fit timm's {name} (e.g. unknown tensor {unknown[0]!r})",
                              f"Give ImageNet weights of {name} in timm or torchvision layout")
        sd = remapped
    sd = {k: v for k, v in sd.items() if k not in cls_keys}
    for conv in _as_tuple(cfg.get("first_conv")):
        key = conv + ".weight"
        if key in sd and key in target and sd[key].shape != target[key].shape:
            src_chans = int(sd[key].shape[1])
            sd[key] = adapt_input_conv(in_chans, sd[key], base_chans=src_chans).to(target[key].dtype)
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(target[k].shape)]
    if bad:
        raise ConfigError(Path(path), f"tensor {bad[0]!r} has shape {tuple(sd[bad[0]].shape)}, "
                          f"{name} needs {tuple(target[bad[0]].shape)}",
                          f"Give ImageNet weights of {name} in timm or torchvision layout")
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if k not in cls_keys]
    if missing:
        raise ConfigError(Path(path), f"the weights lack {len(missing)} tensor(s) of {name} (e.g. {missing[0]!r})",
                          f"Give complete ImageNet weights of {name}")
    return model


def _init_head(model):
    """A fresh one-logit head with small weights (std 0.01, bias 0): timm's EfficientNet init
    scales the classifier by 1/sqrt(num_classes), i.e. U(-1, 1) for one logit, whose huge initial
    logits make training from scratch unstable."""
    import torch
    import torch.nn as nn

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            nn.init.normal_(head.weight, std=0.01)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
    return model


def create_model(name: str, in_chans: int, weights: str | os.PathLike | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
    """A timm classifier with one output logit.

    Parameters
    ----------
    name : str
        timm model name (``resnet18``, ``densenet121``, ``efficientnet_b0``, or any other).
    in_chans : int
        Input channels (the dataset's ``in_chans``: 1 for T1, 2 with an ROI channel).
    weights : None, "random", path, or "imagenet"
        None / "random": random initialisation (seed it with ``torch.manual_seed``).
        A path: local ImageNet weights (safetensors or state dict, timm or torchvision
        layout), stem adapted to ``in_chans``, classifier dropped.
        "imagenet" (or "hub"): ImageNet weights from, in order, the folder
        ``$NHB_WEIGHTS_DIR`` (:func:`local_imagenet_weights`), the Hugging Face cache
        (timm's pretrained weights, no download), the hub when a network is reachable;
        else :class:`NetworkUnavailableError` saying how to place them (never a silent
        fall-back to random weights).

    drop_rate, drop_path_rate : float
        Dropout before the classifier and stochastic depth (timm's arguments; only
        passed when non-zero, and not used at evaluation).

    Returns
    -------
    torch.nn.Module
        Input float32 ``[B, in_chans, H, W]``, output ``[B, 1]`` logits.
    """
    timm = _timm()
    check_model_name(name)
    extra: dict[str, float] = {}
    if drop_rate:
        extra["drop_rate"] = float(drop_rate)
    if drop_path_rate:
        extra["drop_path_rate"] = float(drop_path_rate)
    in_chans = int(in_chans)
    if in_chans < 1:
        raise ConfigError("dataset", f"in_chans must be >= 1, got {in_chans}", "Check the prepared dataset")
    if weights is None or (isinstance(weights, str) and weights.lower() in ("", "random", "none")):
        return _init_head(timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=1, **extra))
    weights = os.fspath(weights) if isinstance(weights, os.PathLike) else weights
    if isinstance(weights, str) and weights.lower() in HUB_WEIGHTS:
        local = local_imagenet_weights(name)
        if local is not None:
            return _init_head(_load_local_weights(name, in_chans, local, extra))
        cached = _hf_cached_model(name, in_chans, extra)
        if cached is not None:
            return _init_head(cached)
        if not _network_available():
            wdir = os.environ.get(WEIGHTS_ENV) or "<folder>"
            raise NetworkUnavailableError(
                "--weights", f"ImageNet weights for {name} were requested but none are on this machine "
                f"({WEIGHTS_ENV}, the Hugging Face cache) and no network is reachable",
                f"Place {name}.safetensors (timm or torchvision layout) in {wdir} and set {WEIGHTS_ENV}={wdir}, "
                "pass the local file with --weights FILE, or ask for random weights (weights: random)")
        try:
            return _init_head(timm.create_model(name, pretrained=True, in_chans=in_chans, num_classes=1, **extra))
        except OSError as err:
            raise NetworkUnavailableError("--weights", f"could not fetch hub weights for {name} ({type(err).__name__})",
                                          "Pass a local weights file with --weights FILE") from None
    return _init_head(_load_local_weights(name, in_chans, weights, extra))


#: Environment variable naming a folder of local ImageNet weights (``<model>.safetensors`` ...).
WEIGHTS_ENV = "NHB_WEIGHTS_DIR"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def local_imagenet_weights(name: str) -> Path | None:
    """The ImageNet weights file of ``name`` in the folder ``$NHB_WEIGHTS_DIR``, or None.

    Looks for ``<name>.safetensors`` (then ``.pth``, ``.pt``, ``.bin``), also under the
    timm pretrained tag (``resnet18.a1_in1k.safetensors``) and in a sub-folder
    ``<name>/`` (``model.safetensors``, ``pytorch_model.bin``, as the hub stores them).
    """
    d = os.environ.get(WEIGHTS_ENV)
    if not d:
        return None
    folder = Path(d).expanduser()
    if not folder.is_dir():
        raise ConfigError(WEIGHTS_ENV, f"{folder} is not a folder",
                          f"Set {WEIGHTS_ENV} to the folder that holds <model>.safetensors files")
    stems = [name]
    try:
        tag = getattr(_timm().models.get_pretrained_cfg(name), "tag", None)
        if tag:
            stems.append(f"{name}.{tag}")
    except Exception:  # noqa: BLE001 - no pretrained cfg: plain names only
        pass
    for stem in stems:
        for suf in _WEIGHT_SUFFIXES:
            if (folder / f"{stem}{suf}").is_file():
                return folder / f"{stem}{suf}"
        for inner in ("model.safetensors", "pytorch_model.bin"):
            if (folder / stem / inner).is_file():
                return folder / stem / inner
    return None


def _hf_cached_model(name: str, in_chans: int, extra: dict):
    """timm's pretrained model from the Hugging Face cache alone (no download), or None."""
    timm = _timm()
    prev = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return timm.create_model(name, pretrained=True, in_chans=in_chans, num_classes=1, **extra)
    except Exception:  # noqa: BLE001 - not in the cache (or no pretrained weights for this name)
        return None
    finally:
        if prev is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = prev


def check_input_size(model, name: str, in_chans: int, input_hw: tuple[int, int], source: str = "dataset") -> None:
    """Raise :class:`ConfigError` when ``model`` cannot take ``input_hw`` images.

    Architectures that downsample 32x with pooling (DenseNet's transitions) fail with a
    raw RuntimeError below their minimum size; this turns it into one line before any
    training starts (one forward pass of two zero images, no gradient).
    """
    import torch

    was_training = model.training
    dev = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((2, int(in_chans), *map(int, input_hw)), device=dev))
    except RuntimeError as err:
        h, w = map(int, input_hw)
        small = min(h, w)
        need = 32 if small < 32 else 2 * small
        raise ConfigError(source, f"{name} cannot take {h} x {w} px inputs (its downsampling leaves no pixel: "
                          f"{' '.join(str(err).split())[:120]})",
                          f"Prepare the slices with size >= {need} (prepare: {{size: {need}}}) or use another model"
                          ) from None
    finally:
        model.train(was_training)


def default_target_layer(model, name: str | None = None):
    """The module whose activations Grad-CAM uses: the last convolutional block.

    resnet*: ``layer4[-1]``; densenet*: ``features[-1]`` (final norm + ReLU);
    efficientnet*: ``bn2`` (head conv's norm + activation); any other timm model:
    the module of its last ``feature_info`` entry. Works on a DDP-wrapped model too.
    """
    import torch.nn as nn

    m = getattr(model, "module", model)
    name = (name or getattr(m, "default_cfg", {}).get("architecture", "") or "").lower()
    if name.startswith(("resnet", "resnext", "seresnet", "wide_resnet")) and hasattr(m, "layer4"):
        return m.layer4[-1]
    if name.startswith("densenet") and hasattr(m, "features"):
        return m.features[-1]
    if name.startswith(("efficientnet", "tf_efficientnet", "mobilenet")) and hasattr(m, "bn2"):
        return m.bn2
    info = getattr(m, "feature_info", None)
    if info:
        try:
            mod_name = info[-1]["module"] if isinstance(info, list) else info.module_name(-1)
            return m.get_submodule(mod_name)
        except (AttributeError, KeyError, IndexError, TypeError):
            pass
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    if not convs:
        raise ConfigError(str(name), "the model has no convolution for Grad-CAM", "Use a convolutional model")
    return convs[-1]


def save_weights(model, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict as safetensors (atomic). DDP wrappers are unwrapped."""
    from safetensors.torch import save_file

    from nhb_core.fileio import atomic_path

    m = getattr(model, "module", model)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in m.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata or {})
    return Path(path)


def load_trained(model_dir: str | os.PathLike, device: str = "cpu"):
    """Load a trained model folder (``model.safetensors`` + ``model.json``), no pickle.

    Returns
    -------
    (torch.nn.Module in eval mode on ``device``, dict model_json)
    """
    import torch
    from safetensors.torch import load_file

    from nhb_core.fileio import read_json

    d = Path(model_dir)
    mj_p, w_p = d / "model.json", d / "model.safetensors"
    for p in (mj_p, w_p):
        if not p.exists():
            raise RunError(p, "missing (the model has not finished training)",
                           "Train it with `python -m nhb_core train` or wait for the run to finish")
    try:
        mj = read_json(mj_p)
    except (OSError, ValueError) as err:
        raise RunError(mj_p, f"unreadable ({err})", "Retrain the model") from None
    from nhb_core.safety import check_model_json

    check_model_json(mj, mj_p)  # types and ranges before anything is built from it
    name = mj.get("timm_name") or mj.get("architecture")
    model = create_model(name, int(mj.get("in_chans", 1)))
    try:
        sd = load_file(str(w_p), device="cpu")
        model.load_state_dict(sd, strict=True)
    except Exception as err:  # noqa: BLE001
        msg = " ".join(str(err).split())[:200]
        raise RunError(w_p, f"weights do not load into {name} ({msg})", "Retrain the model") from None
    model.eval()
    return model.to(torch.device(device)), mj


# ---------------------------------------------------------------------------------- a run's models

#: Forward passes and Grad-CAM hooks on a shared (cached) model: one at a time per process (the
#: dashboard serves sessions from threads that share the models of :func:`load_run_model`).
MODEL_LOCK = threading.RLock()

_WEIGHT_SHA: dict[tuple[str, int, int], str] = {}


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 of ``model_dir/model.safetensors`` (memoised by path, size and mtime)."""
    from nhb_core.fileio import sha256_file

    p = Path(model_dir) / "model.safetensors"
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _WEIGHT_SHA:
        _WEIGHT_SHA[key] = sha256_file(p)
    return _WEIGHT_SHA[key]


_MODEL_CACHE: dict[tuple[str, str, str], tuple[Any, dict[str, Any]]] = {}


def load_run_model(run_dir: str | os.PathLike, name: str, device: str = "cpu", cache: bool = True):
    """``(model in eval mode, model_json)`` of model ``name`` of a run (via :func:`load_trained`).

    Loaded models are kept in memory keyed by path and weights hash, so repeated calls (the
    dashboard, a batch of cases) do not rebuild them; a retrained model is reloaded.
    """
    from nhb_core.runs import RunFolder

    run = RunFolder(run_dir).check()
    mdir = run.model_dir(name)
    if not (mdir / "model.json").is_file():
        raise RunError(mdir, f"model {name!r} is not in this run",
                       f"Use one of: {', '.join(run.require_trained_models())}")
    if not (mdir / "model.safetensors").is_file():
        raise RunError(mdir / "model.safetensors", "missing (the model has not finished training)",
                       "Wait for the run to finish")
    key = (str(mdir.resolve()), weights_sha256(mdir), str(device))
    if cache and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    model, mj = load_trained(mdir, device=device)
    model.eval()
    if cache:
        _MODEL_CACHE[key] = (model, mj)
    return model, mj
