"""Export a run's trained models to ONNX for deployment outside PyTorch.

Each model becomes ``<out>/<model>.onnx`` (default ``<run>/export/``) with one input
``input`` float32 ``[batch, in_chans, H, W]`` (dynamic batch axis) and two outputs ``logit``
``[batch, 1]`` and ``prob`` ``[batch, 1]`` (``sigmoid(logit)``, the probability of label 1),
plus ``<model>.json``: the model.json facts a deployment needs (architecture, input size,
preprocessing, threshold) and the parity check against PyTorch.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` is used first; it
exports the three paper architectures (resnet18, densenet121, efficientnet_b0) in seconds with
outputs equal to PyTorch's within 1e-6 under onnxruntime. Where it fails (a future torch without
it, an unsupported operator), the ``torch.export``-based exporter (``dynamo=True``) is tried.
Every file is checked with ``onnx.checker`` and onnxruntime on a batch of 3 before it is kept.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from nhb_core.errors import InputError, RunError
from nhb_core.fileio import atomic_path, atomic_write_json
from nhb_core.progress import ProgressCallback, emit

PathLike = str | os.PathLike

#: Largest allowed |ONNX - PyTorch| on the logits for an export to be kept.
PARITY_ATOL = 1e-4
OPSET = 17


def _wrap(model):
    import torch

    class _LogitProb(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            logit = self.m(x)
            return logit, torch.sigmoid(logit)

    return _LogitProb(model).eval()


def _export_file(model, example, path: Path, opset: int) -> str:
    """Write ``path``; returns the exporter used ("torchscript" or "dynamo")."""
    import torch

    wrapped = _wrap(model)
    kw: dict[str, Any] = dict(input_names=["input"], output_names=["logit", "prob"], opset_version=opset)
    errors = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), str(path), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logit": {0: "batch"}, "prob": {0: "batch"}}, **kw)
        return "torchscript"
    except Exception as err:  # noqa: BLE001 - fall back to the other exporter
        errors.append(f"torchscript: {type(err).__name__}: {err}")
    try:
        import contextlib
        import io

        batch = torch.export.Dim("batch", min=1, max=4096)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes={"x": {0: batch}}, verbose=False, **kw)
        return "dynamo"
    except Exception as err:  # noqa: BLE001
        errors.append(f"dynamo: {type(err).__name__}: {err}")
    raise RunError(path, "ONNX export failed (" + "; ".join(e[:160] for e in errors) + ")",
                   "Report the problem with the model name; the PyTorch model still works")


def check_parity(onnx_path: PathLike, model, in_chans: int, input_hw: tuple[int, int], batch: int = 3,
                 seed: int = 0) -> float:
    """Largest |ONNX - PyTorch| over the logits of a random batch (also checks the prob output).

    Parameters
    ----------
    onnx_path : path of the .onnx file
    model : the PyTorch model (eval mode)
    in_chans, input_hw : input shape
    batch : batch size of the check (not 1: the batch axis must be dynamic)
    seed : seed of the random batch

    Returns
    -------
    float: max absolute logit difference.
    """
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(str(onnx_path))
    rng = np.random.default_rng(seed)
    x = rng.random((batch, in_chans, *input_hw), dtype=np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, min(2, os.cpu_count() or 1))
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    logit, prob = sess.run(["logit", "prob"], {"input": x})
    dev = next(model.parameters()).device
    with torch.no_grad():
        ref = model(torch.from_numpy(x).to(dev)).cpu().numpy()
    diff = float(np.max(np.abs(logit.astype(np.float64) - ref)))
    pdiff = float(np.max(np.abs(prob.astype(np.float64) - 1.0 / (1.0 + np.exp(-ref.astype(np.float64))))))
    return max(diff, pdiff)


def export_onnx(run_dir: PathLike, out_dir: PathLike | None = None, models: list[str] | None = None,
                opset: int = OPSET, progress: ProgressCallback | None = None) -> list[Path]:
    """Export every trained model of a run to ONNX.

    Parameters
    ----------
    run_dir : path
        A finished run (``models/<name>/model.safetensors`` + ``model.json``).
    out_dir : path, optional
        Destination folder (default ``<run>/export``).
    models : list of str, optional
        A subset of the run's models.
    opset : int
        ONNX opset version.
    progress : callable, optional
        ``{"stage": "export", "model", "done", "total"}``.

    Returns
    -------
    list of Path: the ``.onnx`` files written (one per model, in the run's model order). Each
    has a sidecar ``<model>.json`` with ``input`` (name, shape with ``"batch"``, dtype),
    ``outputs``, ``preprocessing``, ``threshold``, ``architecture``, ``exporter``, ``opset`` and
    ``parity_max_abs_diff``. A file whose outputs differ from PyTorch by more than
    :data:`PARITY_ATOL` is not kept (:class:`~nhb_core.errors.RunError`).
    """
    import torch

    from nhb_core.models import load_run_model, weights_sha256
    from nhb_core.runs import RunFolder

    names = RunFolder(run_dir).require_trained_models()
    rd = Path(run_dir)
    if models:
        bad = [m for m in models if m not in names]
        if bad:
            raise InputError("--model", f"model {bad[0]!r} is not in the run", f"Use one of: {', '.join(names)}")
        names = [n for n in names if n in models]
    out = Path(out_dir) if out_dir is not None else rd / "export"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    emit(progress, "export", done=0, total=len(names))
    for k, name in enumerate(names):
        model, mj = load_run_model(rd, name, device="cpu", cache=False)
        in_chans = int(mj.get("in_chans", 1))
        hw = mj.get("input_size") or [int((mj.get("preprocessing") or {}).get("size", 64))] * 2
        hw = (int(hw[0]), int(hw[1]))
        example = torch.zeros((2, in_chans, *hw), dtype=torch.float32)
        dest = out / f"{name}.onnx"
        with atomic_path(dest) as tmp:
            exporter = _export_file(model, example, tmp, opset)
            diff = check_parity(tmp, model, in_chans, hw)
            if not diff <= PARITY_ATOL:
                raise RunError(dest, f"the ONNX outputs differ from PyTorch by {diff:.2e} (> {PARITY_ATOL:g})",
                               "Do not deploy this file; report the model name")
        atomic_write_json(out / f"{name}.json", {
            "model": name,
            "architecture": mj.get("architecture"),
            "timm_name": mj.get("timm_name"),
            "file": dest.name,
            "input": {"name": "input", "shape": ["batch", in_chans, hw[0], hw[1]], "dtype": "float32"},
            "outputs": {"logit": ["batch", 1], "prob": ["batch", 1]},
            "preprocessing": mj.get("preprocessing"),
            "threshold": mj.get("threshold"),
            "threshold_level": mj.get("threshold_level"),
            "weights_sha256": weights_sha256(RunFolder(rd).model_dir(name)),
            "exporter": exporter,
            "opset": opset,
            "parity_max_abs_diff": diff,
            "torch": torch.__version__,
        })
        written.append(dest)
        emit(progress, "export", model=name, done=k + 1, total=len(names), message=f"{exporter}, max diff {diff:.1e}")
    return written
