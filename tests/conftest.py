"""Shared fixtures. Expensive artefacts (a small synthetic cohort, its prepared
slice dataset, a tiny finished study run) are built once per test session with
the library's own functions and shared read-only by the tests that need them:
tests must not modify them (copy to tmp_path first)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared next to the repo root; tests that need it skip cleanly where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (reference data not available here)")
    return SHARED


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """The synthetic 'small' preset (seed 0): returns the manifest.csv path."""
    from nhb_core.synth import synthesize

    out = tmp_path_factory.mktemp("cohort_small")
    return Path(synthesize(out, preset="small", seed=0))


@pytest.fixture(scope="session")
def small_dataset(small_cohort, tmp_path_factory) -> Path:
    """The small cohort prepared into a slice dataset at 32 x 32 px: returns the dataset dir."""
    from nhb_core.slices import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("dataset_small")
    prepare(small_cohort, out, PrepareConfig(size=32), workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_study_config() -> dict:
    """A study config that finishes in well under a minute on 2 CPU cores."""
    return {
        "models": ["resnet18", "densenet121", "efficientnet_b0"],
        "prepare": {"size": 32},
        "train": {"epochs": 2, "batch_size": 16, "patience": 5},
        "split": {"unit": "subject", "seed": 0},
        "seed": 0,
        "saliency": {"n_cases": 2},
    }


@pytest.fixture(scope="session")
def small_run(small_cohort, tiny_study_config, tmp_path_factory) -> Path:
    """A finished tiny study run on the small cohort: returns the run dir (status done)."""
    from nhb_core.study import run_study

    runs = tmp_path_factory.mktemp("runs")
    run_dir = runs / "tiny"
    run_study(small_cohort, run_dir, tiny_study_config)
    return run_dir
