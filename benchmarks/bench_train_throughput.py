"""Training throughput (images/s) of nhb_core's training loop vs a plain PyTorch loop.

For each model, on the same synthetic data (default 64 px, 1 channel), batch size
and thread count, alternately runs (rounds times, best kept, so that other load
on the machine hits both alike):

- ``plain``: ``timm.create_model`` + AdamW + BCEWithLogits, a bare loop over
  tensor slices of an in-memory tensor (no augmentation, no schedule);
- ``nhb``: :func:`nhb_core.train.train_one_epoch` exactly as ``train_model``
  runs it (in-memory loader, class-balanced loss, LR schedule, GradScaler, gradient clipping,
  on-device augmentation);
- ``nhb_noaug``: the same without augmentation.

Prints one JSON object; ``ratio`` = nhb / plain in wall-clock images/s (target >= 0.9),
``ratio_cpu`` the same per CPU-second of the process (robust when other jobs load the machine). GPU throughput is
measured only where CUDA is present (``--device auto``).

With ``--paper-preset`` it instead times the whole default training of the three
models on the synthetic paper preset (synthesize, prepare 64 px, split, train with
the default TrainConfig) and reports wall time and process CPU time.

Usage: python benchmarks/bench_train_throughput.py [--n 128] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import cpu_seconds as _cpu_seconds


def throughput(models, n, size, batch, rounds, device_spec, threads) -> dict:
    import timm
    import torch

    from nhb_core.augment import AugmentConfig
    from nhb_core.models import create_model
    from nhb_core.train import (
        SliceTensors,
        TrainConfig,
        amp_settings,
        autocast_ctx,
        lr_factor,
        make_batches,
        resolve_device,
        train_one_epoch,
    )

    torch.set_num_threads(threads)
    device = resolve_device(device_spec)
    amp_dtype, use_scaler = amp_settings(device, True)
    cl = device.type == "cuda"
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, 1, size, size)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(int)
    cfg = TrainConfig()
    out = {}
    for name in models:
        # --- nhb: the training loop of train_model
        torch.manual_seed(0)
        model = create_model(name, 1).to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        data = SliceTensors(images, np.arange(n), np.zeros(0, dtype=int), labels, device, channels_last=cl)
        crit = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(1.0, device=device))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = len(make_batches(np.arange(n), batch))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10 * steps, steps, 0.01))
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        gen = torch.Generator(device=device).manual_seed(0)
        order = np.random.default_rng(1).permutation(n)
        batches = make_batches(order, batch)

        def run_nhb(aug: bool, batches=batches) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            _, seen = train_one_epoch(model, opt, sched, scaler, crit, data, batches, device, amp_dtype,
                                      gen if aug else None, AugmentConfig(), 1, grad_clip=cfg.grad_clip)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return seen / (time.perf_counter() - t), seen / (time.process_time() - c)

        # --- plain PyTorch
        torch.manual_seed(0)
        pm = timm.create_model(name, pretrained=False, in_chans=1, num_classes=1).to(device)
        if cl:
            pm = pm.to(memory_format=torch.channels_last)
        popt = torch.optim.AdamW(pm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        pcrit = torch.nn.BCEWithLogitsLoss()
        X = torch.from_numpy(images).to(device)
        Y = torch.from_numpy(labels.astype(np.float32)).to(device)
        idx = torch.as_tensor(order, device=device)

        def run_plain(batches=batches) -> float:
            pm.train()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            seen = 0
            for b in batches:
                ii = idx[seen:seen + len(b)]
                x, y = X[ii], Y[ii]
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_ctx(device, amp_dtype):
                    loss = pcrit(pm(x).reshape(-1).float(), y)
                popt.zero_grad(set_to_none=True)
                loss.backward()
                popt.step()
                seen += len(b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return seen / (time.perf_counter() - t), seen / (time.process_time() - c)

        # warm-up (one batch each), then alternate
        run_plain(batches[:1]), run_nhb(True, batches[:1])
        res = {"plain": [], "nhb": [], "nhb_noaug": []}
        for _ in range(rounds):
            res["plain"].append(run_plain())
            res["nhb"].append(run_nhb(True))
            res["nhb_noaug"].append(run_nhb(False))
        wall = {k: max(w for w, _ in v) for k, v in res.items()}
        cpu = {k: max(c for _, c in v) for k, v in res.items()}
        out[name] = {"plain_img_s": round(wall["plain"], 1), "nhb_img_s": round(wall["nhb"], 1),
                     "nhb_noaug_img_s": round(wall["nhb_noaug"], 1),
                     "ratio": round(wall["nhb"] / wall["plain"], 3),
                     "ratio_noaug": round(wall["nhb_noaug"] / wall["plain"], 3),
                     "plain_img_per_cpu_s": round(cpu["plain"], 1), "nhb_img_per_cpu_s": round(cpu["nhb"], 1),
                     "nhb_noaug_img_per_cpu_s": round(cpu["nhb_noaug"], 1),
                     "ratio_cpu": round(cpu["nhb"] / cpu["plain"], 3),
                     "ratio_cpu_noaug": round(cpu["nhb_noaug"] / cpu["plain"], 3),
                     "all_runs_wall_img_s": {k: [round(w, 1) for w, _ in v] for k, v in res.items()}}
    return {"device": str(device), "amp": None if amp_dtype is None else str(amp_dtype),
            "channels_last": cl, "models": out}


def paper_preset(threads: int, workdir: Path) -> dict:
    import torch

    from nhb_core.models import DEFAULT_MODELS
    from nhb_core.slices import PrepareConfig, load_dataset, prepare
    from nhb_core.splits import make_split
    from nhb_core.synth import synthesize
    from nhb_core.train import TrainConfig, train_model

    torch.set_num_threads(threads)
    t0, c0 = time.monotonic(), _cpu_seconds()
    manifest = synthesize(workdir / "cohort", preset="paper", seed=0)
    prepare(manifest, workdir / "ds", PrepareConfig(size=64), workers=1)
    ds = load_dataset(workdir / "ds")
    split = make_split(ds, seed=0)
    t_prep, c_prep = time.monotonic() - t0, _cpu_seconds() - c0
    per_model = {}
    cfg = TrainConfig()
    for name in DEFAULT_MODELS:
        t1, c1 = time.monotonic(), _cpu_seconds()
        out = train_model(workdir / "ds", split, name, workdir / "models" / name, cfg)
        mj = json.loads((out / "model.json").read_text())
        per_model[name] = {"wall_s": round(time.monotonic() - t1, 1), "cpu_s": round(_cpu_seconds() - c1, 1),
                           "epochs_run": mj["epochs_run"], "best_epoch": mj["best_epoch"],
                           "val_auc": round(mj["val_auc"], 4) if mj["val_auc"] is not None else None}
    from nhb_core.splits import set_rows

    return {"preset": "paper", "n_slices": int(len(ds.index)),
            "n_train_slices": int(len(set_rows(split, ds.index, "train"))),
            "train_config": cfg.to_dict(), "prepare_wall_s": round(t_prep, 1), "prepare_cpu_s": round(c_prep, 1),
            "models": per_model,
            "train_wall_s_total": round(sum(m["wall_s"] for m in per_model.values()), 1),
            "train_cpu_s_total": round(sum(m["cpu_s"] for m in per_model.values()), 1),
            "load_average_1m_at_end": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="nhb_core training throughput vs plain PyTorch")
    ap.add_argument("--models", default="resnet18,densenet121,efficientnet_b0")
    ap.add_argument("--n", type=int, default=128, help="images per timed epoch")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the target), auto or cuda")
    ap.add_argument("--paper-preset", action="store_true", help="time the default training on the paper preset")
    args = ap.parse_args(argv)
    info = {"benchmark": "train_throughput", "threads": args.threads, "cpu_count": os.cpu_count(),
            "load_average_1m_at_start": os.getloadavg()[0]}
    if args.paper_preset:
        with tempfile.TemporaryDirectory() as tmp:
            info.update(paper_preset(args.threads, Path(tmp)))
    else:
        info.update({"input": [1, args.size, args.size], "batch_size": args.batch_size, "n": args.n,
                     "rounds": args.rounds})
        info.update(throughput(args.models.split(","), args.n, args.size, args.batch_size, args.rounds,
                               args.device, args.threads))
        info["gpu"] = "measured" if info["device"].startswith("cuda") else "not measured (no GPU here)"
    info["load_average_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
