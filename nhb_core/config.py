"""Study configuration: defaults, YAML loading, merging and CLI overrides.

A study config is a plain nested ``dict`` (what ``config.yaml`` in a run folder
holds). Every key has a default in :data:`DEFAULTS`; a user file or dict only
names what it changes::

    models: [resnet18, densenet121, efficientnet_b0]
    seed: 0
    prepare: {size: 64}                 # nhb_core.slices.PrepareConfig fields (+ workers)
    split: {unit: subject, dev_centers: [A], test_size: 0.2, val_size: 0.15}
    train: {epochs: 12, batch_size: 32}  # nhb_core.train.TrainConfig fields
    stats: {n_boot: 1000}
    saliency: {n_cases: 4}

Sections ``prepare`` and ``train`` are passed to the dataclasses of their
modules; their keys are checked against those dataclasses when the study runs
(an unknown key is a :class:`~nhb_core.errors.ConfigError`). The other
sections are checked here by :func:`resolve_config`.

Seeds: the top-level ``seed`` is used for the split and for training unless
``split.seed`` / ``train.seed`` are given explicitly.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nhb_core.errors import ConfigError
from nhb_core.fileio import atomic_write_text
from nhb_core.models import DEFAULT_MODELS  # the paper's three architectures: one list, in models.py

#: Default study configuration. The demo (``python -m nhb_core demo``) uses it as
#: is, so it is sized to finish the paper preset (277 subjects, about 700 slices,
#: three models) in about 10 minutes on 2 CPU cores: 64 px slices (1 mm per pixel over
#: the 64 mm crop) and 25 epochs (benchmarks/bench_recipe.py, docs/training.md).
DEFAULTS: dict[str, Any] = {
    "name": None,            # free text shown in the report; defaults to the run folder's name
    "manifest": None,        # absolute path of the manifest (filled in by run_study)
    "models": list(DEFAULT_MODELS),
    "baselines": ["si_ratio"],  # domain baselines fitted next to the networks (nhb_core.baselines)
    "seed": 0,
    "seeds": None,           # repeats: e.g. [0, 1, 2]; the run itself uses the first, the others go to RUN/seeds/
    "device": "auto",        # "auto" | "cpu" | "cuda" | "cuda:1" ...
    "n_gpus": 1,             # > 1: each training stage runs under torchrun with this many processes
    "cache_dir": None,       # None: the prepared dataset lives in RUNDIR/dataset; else shared, keyed by its fingerprint
    "validate": {"nbna_threshold": 37, "check_images": True},
    # the GP sign is brightness relative to the surroundings: normalise against the tissue around the
    # ROI, keep the GP's 5 mm neighbourhood and give the network the ROI as a second channel
    # (docs/training.md: the ablation behind every default)
    "prepare": {"size": 64, "norm": "reference", "ref_ring_mm": 6.0, "roi_window_mm": 5.0, "roi_channel": True,
                "workers": None},
    "split": {"unit": "subject", "dev_centers": None, "test_size": 0.2, "val_size": 0.15, "seed": None},
    # geometric augmentation and noise only (an intensity scale/shift/bias field of a ratio image is as
    # large as the injury), 25 epochs, an EMA of the weights and the last epoch's weights (a 35-subject
    # validation set cannot pick an epoch): see docs/training.md
    # aux_si: an auxiliary head regresses each slice's GP/ring ratio (a label-free target) so that the
    # network learns to measure the GP from 157 neonates (docs/training.md)
    "train": {"epochs": 25, "batch_size": 32, "augment": True, "seed": None, "ema": 0.99, "select": "last",
              "aggregate": "max", "aux_si": 4.0,
              "augment_params": {"intensity_scale": 0.0, "intensity_shift": 0.0, "bias_field": 0.0,
                                 "noise_std": 0.04}},
    # a subject's probability is that of its slice through the GP's core (the highest): partial-volume
    # slices at the GP's ends dilute a mean (docs/training.md)
    "evaluate": {"aggregate": "max", "batch_size": 128},
    "stats": {"n_boot": 1000},
    # LayerCAM (Jiang et al. 2021) keeps the detail of the 16 x 16 layer that a GP-sized map needs
    "saliency": {"n_cases": 4, "method": "layercam", "faithfulness": False, "enabled": True},
    "report": {"enabled": True},
}

# Sections whose keys are checked against a dataclass at run time (free here).
_OPEN_SECTIONS = {"prepare", "train", "stats", "saliency", "evaluate"}


def default_config() -> dict[str, Any]:
    """A deep copy of :data:`DEFAULTS`."""
    return copy.deepcopy(DEFAULTS)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """A new dict: ``base`` updated by ``override`` recursively (lists and scalars replace)."""
    out = copy.deepcopy(dict(base))
    for k, v in (override or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict (``ConfigError`` naming the file when invalid)."""
    import yaml

    from nhb_core.safety import check_regular_file, max_config_bytes, safe_yaml_load

    path = Path(path)
    if not path.exists():
        raise ConfigError(path, "config file not found", "Give the path of an existing YAML file")
    check_regular_file(path, max_config_bytes(), "config", "NHB_MAX_CONFIG_BYTES", error=ConfigError)
    if not path.is_file():
        raise ConfigError(path, "config file not found", "Give the path of an existing YAML file")
    try:
        data = safe_yaml_load(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError:
        raise ConfigError(path, "config is not UTF-8 text", "Save the YAML file as UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        row = mark.line + 1 if mark is not None else None
        raise ConfigError(path, f"not valid YAML ({getattr(err, 'problem', None) or err})",
                          "Fix the YAML syntax", row=row) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "the top level is not a mapping of options", "Write 'key: value' lines")
    return data


def _parse_models(models: Any, source: str) -> list[str]:
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",")]
    if not isinstance(models, (list, tuple)) or not models:
        raise ConfigError(source, "'models' must be a non-empty list of model names",
                          "Write e.g. models: [resnet18, densenet121]")
    out = [str(m).strip() for m in models if str(m).strip()]
    if not out:
        raise ConfigError(source, "'models' is empty", "Name at least one model, e.g. resnet18")
    if len(set(out)) != len(out):
        raise ConfigError(source, f"'models' lists a model twice ({', '.join(out)})", "List each model once")
    from nhb_core.safety import check_name

    for m in out:  # each name becomes RUNDIR/models/<name>: one plain path component
        check_name(m, "model name", source, "Use a timm model name such as resnet18")
    return out


def _parse_seeds(value: Any, source: str) -> list[int] | None:
    if value is None or value == []:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        seeds = [int(v) for v in value if not isinstance(v, bool) and float(v) == int(v)]
    except (TypeError, ValueError):
        seeds = []
    if not isinstance(value, (list, tuple)) or len(seeds) != len(value) or any(s < 0 for s in seeds):
        raise ConfigError(source, f"'seeds' must be a list of non-negative integers, not {value!r}",
                          "Write e.g. seeds: [0, 1, 2] (or --seeds 0,1,2)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(source, f"'seeds' lists a seed twice ({', '.join(map(str, seeds))})", "List each seed once")
    if len(seeds) > 20:
        raise ConfigError(source, f"'seeds' lists {len(seeds)} repeats", "Use at most 20 seeds")
    return seeds


def _parse_baselines(value: Any, source: str) -> list[str]:
    from nhb_core.baselines import BASELINES

    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(source, "'baselines' must be a list of baseline names",
                          f"Write e.g. baselines: [{', '.join(BASELINES)}] (or [] for none)")
    bad = [v for v in value if v not in BASELINES]
    if bad:
        raise ConfigError(source, f"unknown baseline {bad[0]!r}", f"Use one of: {', '.join(BASELINES)}")
    return list(dict.fromkeys(value))


def resolve_config(config: Mapping[str, Any] | str | os.PathLike | None = None,
                   overrides: Mapping[str, Any] | None = None,
                   source: str = "config") -> dict[str, Any]:
    """The full study config: defaults < ``config`` (dict or YAML path) < ``overrides``.

    Parameters
    ----------
    config : dict, path or None
        A (partial) config dict or the path of a YAML file.
    overrides : dict or None
        Flat CLI-style overrides applied last: ``models`` (list or comma string),
        ``epochs``, ``split_unit``, ``seed``, ``device``, ``n_gpus``, ``n_boot``; None values are ignored.
    source : str
        The name used in error messages when ``config`` is a dict.

    Returns
    -------
    dict
        A new dict with every section of :data:`DEFAULTS`; seeds propagated.

    Raises
    ------
    ConfigError
        Unknown top-level key or section, wrong types, bad split unit.
    """
    if isinstance(config, (str, os.PathLike)):
        source = str(config)
        user = load_yaml(config)
    else:
        user = copy.deepcopy(dict(config or {}))
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ConfigError(source, f"unknown option(s) {', '.join(map(repr, unknown))}",
                          f"Use only {', '.join(sorted(DEFAULTS))}")
    for k, v in user.items():
        if isinstance(DEFAULTS[k], dict) and not isinstance(v, Mapping) and v is not None:
            raise ConfigError(source, f"'{k}' must be a mapping of options, not {type(v).__name__}",
                              f"Write '{k}:' followed by indented 'option: value' lines")
        if isinstance(DEFAULTS[k], dict) and v is None:
            user[k] = {}
        if isinstance(DEFAULTS[k], dict) and k not in _OPEN_SECTIONS:
            bad = sorted(set(user[k]) - set(DEFAULTS[k]))
            if bad:
                raise ConfigError(source, f"unknown option(s) {', '.join(repr(f'{k}.{b}') for b in bad)}",
                                  f"Use only {', '.join(f'{k}.{o}' for o in DEFAULTS[k])}")
    cfg = deep_merge(DEFAULTS, user)
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "models" in ov:
        cfg["models"] = ov.pop("models")
    if "epochs" in ov:
        cfg["train"]["epochs"] = int(ov.pop("epochs"))
    if "split_unit" in ov:
        cfg["split"]["unit"] = ov.pop("split_unit")
    if "seeds" in ov:
        cfg["seeds"] = ov.pop("seeds")
    if "seed" in ov:
        seed = int(ov.pop("seed"))
        cfg["seed"] = seed
        cfg["split"]["seed"] = None
        cfg["train"]["seed"] = None
    if "n_boot" in ov:
        cfg["stats"]["n_boot"] = int(ov.pop("n_boot"))
    for k in ("device", "n_gpus", "cache_dir", "name", "manifest"):
        if k in ov:
            cfg[k] = ov.pop(k)
    if ov:
        raise ConfigError("command line", f"unknown override(s) {', '.join(sorted(ov))}", "Check the options")

    cfg["models"] = _parse_models(cfg["models"], "--models" if "models" in (overrides or {}) and
                                  (overrides or {}).get("models") is not None else source)
    cfg["baselines"] = _parse_baselines(cfg.get("baselines"), source)
    cfg["seeds"] = _parse_seeds(cfg.get("seeds"), source)
    if cfg["seeds"]:
        cfg["seed"] = cfg["seeds"][0]
        cfg["split"]["seed"] = cfg["train"]["seed"] = None
    try:
        cfg["seed"] = int(cfg["seed"])
        cfg["n_gpus"] = int(cfg["n_gpus"] or 1)
    except (TypeError, ValueError):
        raise ConfigError(source, "'seed' and 'n_gpus' must be integers", "Write e.g. seed: 0") from None
    if cfg["n_gpus"] < 1:
        raise ConfigError(source, "'n_gpus' must be at least 1", "Write n_gpus: 1 for one device")
    unit = cfg["split"].get("unit")
    if unit not in ("subject", "slice"):
        raise ConfigError(source, f"split.unit must be 'subject' or 'slice', not {unit!r}",
                          "Use subject (recommended) or slice (leaky, for teaching)")
    if cfg["split"].get("seed") is None:
        cfg["split"]["seed"] = cfg["seed"]
    if cfg["train"].get("seed") is None:
        cfg["train"]["seed"] = cfg["seed"]
    dc = cfg["split"].get("dev_centers")
    if isinstance(dc, str):
        cfg["split"]["dev_centers"] = [c.strip() for c in dc.split(",") if c.strip()]
    ep = cfg["train"].get("epochs")
    if ep is not None and (not isinstance(ep, int) or ep < 1):
        raise ConfigError("--epochs" if (overrides or {}).get("epochs") is not None else source,
                          f"train.epochs must be a positive integer, not {ep!r}", "Write e.g. epochs: 10")
    validate_config(cfg, source, cli={k for k, v in (overrides or {}).items() if v is not None})
    return cfg


# ----------------------------------------------------------------------------- up-front validation

#: (section, key) -> (type, low, high) range checks done before any work starts.
_RANGES: dict[tuple[str, str], tuple[type, float, float]] = {
    ("prepare", "size"): (int, 8, 1024),
    ("prepare", "crop_mm"): (float, 1, 1000),
    ("split", "test_size"): (float, 0, 1),
    ("split", "val_size"): (float, 0, 1),
    ("train", "epochs"): (int, 1, 100000),
    ("train", "batch_size"): (int, 1, 65536),
    ("train", "eval_batch_size"): (int, 1, 65536),
    ("train", "lr"): (float, 0, 10),
    ("train", "patience"): (int, 0, 100000),
    ("train", "num_workers"): (int, 0, 256),
    ("evaluate", "batch_size"): (int, 1, 65536),
    ("stats", "n_boot"): (int, 0, 1_000_000),
    ("stats", "level"): (float, 0, 1),
    ("saliency", "n_cases"): (int, 0, 1000),
    ("validate", "nbna_threshold"): (float, 0, 1000),
}

#: where a value given on the command line comes from (for the message)
_CLI_NAMES = {"epochs": ("train", "epochs"), "seed": ("", "seed"), "n_gpus": ("", "n_gpus"),
              "device": ("", "device"), "n_boot": ("stats", "n_boot"), "split_unit": ("split", "unit")}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is dict:
        return isinstance(value, Mapping)
    return True


def _section_fields(section: str) -> dict[str, Any] | None:
    """Field name -> default of the dataclass (or function) behind an open section, or None."""
    import dataclasses
    import inspect

    if section == "prepare":
        from nhb_core.slices import PrepareConfig
        return {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                for f in dataclasses.fields(PrepareConfig)} | {"workers": None}
    if section == "train":
        from nhb_core.train import TrainConfig
        out = {}
        for f in dataclasses.fields(TrainConfig):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = None
        return out
    if section == "stats":
        from nhb_core.stats import study_metrics
        params = inspect.signature(study_metrics).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return None  # takes any option: nothing to check here
        return {k: (p.default if p.default is not p.empty else None) for k, p in params.items()
                if k not in ("pred_dir", "thresholds", "readers", "progress")}
    return None


def validate_config(cfg: Mapping[str, Any], source: str = "config", cli: set | None = None) -> None:
    """Check a resolved config's keys, types and ranges; one :class:`ConfigError` naming ``source``.

    Runs before any work starts (``resolve_config`` calls it), so a bad ``stats.n_boot`` or an
    unknown ``train.`` key is reported against the user's file, not after training. Values given
    on the command line (``cli``: override names) are reported against their option.
    """
    cli = cli or set()
    src_of = {v: f"--{k.replace('_', '-')}" for k, v in _CLI_NAMES.items() if k in cli}
    for section in ("prepare", "train", "stats"):
        fields = _section_fields(section)
        if fields is None:
            continue
        sec = cfg.get(section) or {}
        bad = sorted(set(sec) - set(fields))
        if bad:
            raise ConfigError(source, f"unknown option(s) {', '.join(repr(f'{section}.{b}') for b in bad)}",
                              f"Valid {section} options: {', '.join(sorted(fields))}")
        for k, v in sec.items():
            default = fields.get(k)
            if v is None or default is None:
                continue
            kind = bool if isinstance(default, bool) else int if isinstance(default, int) else \
                float if isinstance(default, float) else str if isinstance(default, str) else \
                dict if isinstance(default, dict) else None
            if kind is float and isinstance(default, int):
                kind = int
            if kind is not None and not _type_ok(v, kind):
                raise ConfigError(src_of.get((section, k), source),
                                  f"{section}.{k} must be {_KIND_WORDS[kind]}, not {v!r}",
                                  f"Write e.g. {section}: {{{k}: {default!r}}}".replace("True", "true")
                                  .replace("False", "false"))
    for (section, k), (rkind, lo, hi) in _RANGES.items():
        v = (cfg.get(section) or {}).get(k)
        if v is None:
            continue
        where = src_of.get((section, k), source)
        if not _type_ok(v, rkind):
            raise ConfigError(where, f"{section}.{k} must be {_KIND_WORDS[rkind]}, not {v!r}",
                              f"Write a number between {lo:g} and {hi:g}")
        open_range = (section, k) in (("split", "test_size"), ("split", "val_size"), ("stats", "level"),
                                      ("train", "lr"))
        if (v <= lo or v >= hi) if open_range else (v < lo or v > hi):
            raise ConfigError(where, f"{section}.{k} = {v!r} is out of range "
                              f"({'between' if open_range else 'from'} {lo:g} {'and' if open_range else 'to'} {hi:g})",
                              f"Give a value {'strictly between' if open_range else 'from'} {lo:g} "
                              f"{'and' if open_range else 'to'} {hi:g}")
    sp = cfg.get("split") or {}
    if _type_ok(sp.get("test_size", 0.2), float) and _type_ok(sp.get("val_size", 0.15), float) \
            and float(sp.get("test_size", 0.2)) + float(sp.get("val_size", 0.15)) >= 1:
        raise ConfigError(source, f"split.test_size + split.val_size = "
                          f"{float(sp.get('test_size', 0.2)) + float(sp.get('val_size', 0.15)):g} leaves no training data",
                          "Make their sum less than 1 (e.g. 0.2 and 0.15)")
    agg = (cfg.get("evaluate") or {}).get("aggregate")
    if agg is not None:
        from nhb_core.evaluate import AGGREGATES
        if agg not in AGGREGATES:
            raise ConfigError(source, f"evaluate.aggregate must be one of {', '.join(AGGREGATES)}, not {agg!r}",
                              "Write e.g. evaluate: {aggregate: mean}")
    meth = (cfg.get("saliency") or {}).get("method")
    if meth is not None:
        from nhb_core.saliency import _ALIASES, METHODS
        if not isinstance(meth, str) or (meth.lower() not in METHODS and meth.lower() not in _ALIASES):
            raise ConfigError(source, f"saliency.method must be one of {', '.join(METHODS)}, not {meth!r}",
                              "Write e.g. saliency: {method: gradcam}")
    for sec, key in (("saliency", "enabled"), ("saliency", "faithfulness"), ("report", "enabled"),
                     ("validate", "check_images")):
        v = (cfg.get(sec) or {}).get(key)
        if v is not None and not isinstance(v, bool):
            raise ConfigError(source, f"{sec}.{key} must be true or false, not {v!r}", f"Write {sec}: {{{key}: true}}")
    dev = cfg.get("device")
    if dev is not None and (not isinstance(dev, str) or not _DEVICE_RE.match(dev)):
        raise ConfigError(src_of.get(("", "device"), source), f"device {dev!r} is not one of auto, cpu, cuda, cuda:N, mps",
                          "Write e.g. device: cpu")
    name = cfg.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise ConfigError(source, "'name' must be a short text (at most 200 characters)", "Write e.g. name: my study")
    dc = (cfg.get("split") or {}).get("dev_centers")
    if dc is not None and (not isinstance(dc, list) or not all(isinstance(c, (str, int)) for c in dc)):
        raise ConfigError(source, f"split.dev_centers must be a list of center names, not {dc!r}",
                          "Write e.g. split: {dev_centers: [A]}")


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a text", dict: "a mapping"}
_DEVICE_RE = __import__("re").compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


def to_yaml(cfg: Mapping[str, Any]) -> str:
    """The config as YAML text (keys in :data:`DEFAULTS` order)."""
    import json

    import yaml

    from nhb_core.fileio import to_json

    plain = json.loads(to_json(dict(cfg)))  # numpy/Path-safe plain types
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=None, allow_unicode=True)


def save_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML atomically (a run's ``config.yaml``)."""
    header = "# NHB Lab study config: rerun with  python -m nhb_core study --config <this file> --out <run dir>\n"
    return atomic_write_text(path, header + to_yaml(cfg))


def dataclass_kwargs(cls: type, section: Mapping[str, Any], section_name: str, source: str = "config.yaml",
                     drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """``section`` filtered for the dataclass ``cls`` (None values dropped, ``drop`` keys removed).

    Raises ConfigError naming the unknown keys, listing the valid ones.
    """
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in section.items() if k not in drop and v is not None}
    bad = sorted(set(kw) - names)
    if bad:
        raise ConfigError(source, f"unknown option(s) {', '.join(repr(f'{section_name}.{b}') for b in bad)}",
                          f"Valid {section_name} options: {', '.join(sorted(names))}")
    return kw
