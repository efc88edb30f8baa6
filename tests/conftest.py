"""Shared test helpers: running the workflow the way a user does."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Files in the order they start: test.sh runs the suite on 2 pytest-xdist workers that take
# whole files (`--dist loadfile`) in collection order, so the longest go first and the short
# ones fill in behind them; the SLURM run, which mostly waits on scheduling and status polls,
# then overlaps the computing ones instead of running alone at the end.
LONGEST_FIRST = (
    "test_slurm.py",
    "test_workflow.py",
    "test_subset_resume.py",
    "test_rounds.py",
    "test_faults.py",
    "test_workflow_plan.py",
)


def pytest_configure(config):
    """Under pytest-xdist, each worker's in-process torch/ITK/BLAS gets its share of the cores.

    torch otherwise starts one OpenMP thread per core in every worker, beside the other worker
    and its snakemake jobs: its threads spin at each barrier waiting for a descheduled sibling.
    Beside a 2-core load: tests/test_infer_levers.py alone 302 -> 64 CPU s, 527 -> 61 s wall
    with one thread (its fast_norm test 218 -> 3.7 s); the 9 torch/ANTs unit files (train,
    models, infer, infer_levers, cascade, followup, detection_levers, data_safety, preprocess) on
    2 workers 472 -> 101 CPU s, 650 -> 278 s wall."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if os.environ.get("PYTEST_XDIST_WORKER") and workers:
        from metsflow.core.runtime import set_threads

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        set_threads((cores or 1) // workers)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: keep the file order (fast files first for `pytest -x`)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def run_snakemake(args: list[str], timeout: int = 1200, check: bool = True):
    """Run snakemake from the checkout (as the README does) with this interpreter's install."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-12000:]}"
        )
    return proc


# The tiny pipeline's settings: 4 mm grid, small network, a dozen iterations, and
# registration/co-registration schedules cut to one coarse level each. ANTs at the default
# schedules took 93% of the suite's time (17.5 min on 2 idle cores before this was shared).
TINY_SETTINGS = {
    "sharding": {"cpu_shard_size": 4, "gpu_shard_size": 8},
    "validation": {"fraction": 0.34},
    "preprocess": {
        "spacing": [4.0, 4.0, 4.0],
        "coreg_resolution_mm": 6.0,
        "coreg_iterations": [40],
        "coreg_shrink_factors": [1],
        "coreg_smoothing_sigmas": [0],
        "atlas_resolution_mm": 6.0,
        "atlas_iterations": [60],
        "atlas_shrink_factors": [1],
        "atlas_smoothing_sigmas": [0],
    },
    # One SyN level, as the demo's config: a 4 mm level on the 4 mm grid took 12.5 of the 14.6 s
    # a follow-up pair took (NCC after 0.914 vs 0.891 with the 8 mm level alone); the
    # multi-level schedule is tested in test_register.py.
    "register": {
        "aff_iterations": [50],
        "aff_levels_mm": [8.0],
        "aff_smoothing_mm": [2.0],
        "reg_iterations": [20],
        "levels_mm": [8.0],
        "smoothing_mm": [2.0],
    },
    "model": {"filters": [8, 16, 32], "patch_size": [32, 32, 32]},
    "train": {
        "iterations": 12,
        "finetune_iterations": 6,
        "val_interval": 6,
        "checkpoint_interval": 6,
    },
    "active_learning": {"rounds": 1, "batch_size": 1},
    "threads": {"preprocess": 1, "register": 1, "train": 1, "infer": 1},
}


def write_tiny_config(folder: Path, demo_dir: Path, name: str = "tiny.yaml", **overrides) -> Path:
    """A config overlay that runs the whole pipeline on a phantom in a couple of minutes.

    ``results`` and ``label_store`` go to ``folder``; a dict override updates that section.
    """
    config = {
        "sheet": str(demo_dir / "studies.tsv"),
        "oracle_sheet": str(demo_dir / "oracle.tsv"),
        "results": str(folder / "results"),
        "label_store": str(folder / "labels"),
        **copy.deepcopy(TINY_SETTINGS),
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_config(tmp_path):
    """``make(demo_dir, **overrides)`` -> path of a tiny config writing under ``tmp_path``."""

    def make(demo_dir: Path, **overrides) -> Path:
        return write_tiny_config(tmp_path, demo_dir, **overrides)

    return make


@dataclass(frozen=True)
class TinyRun:
    """One finished tiny pipeline run, shared by every test that only reads its outputs."""

    root: Path  # holds demo/, results/, labels/, tiny.yaml
    demo: Path
    config: Path
    results: Path
    labels: Path


def make_tiny_cohort(demo: Path, n_patients: int, labelled_patients: int, **options) -> dict:
    """The pipeline tests' phantom cohort: 2 time points at native 2x2x3 mm (instead of the
    demo's 1x1x3). Separate grids per sequence, skull and the atlas mask are all still
    exercised, at a quarter of the voxels: 5.5 instead of 21 CPU-s for 3 patients.
    ``options`` go to make_demo_cohort (e.g. ``skull=False``)."""
    from metsflow.cohort.phantom import make_demo_cohort

    settings = {"n_timepoints": 2, "native_spacing": (2.0, 2.0, 3.0), "model_spacing": 4.0}
    return make_demo_cohort(
        demo,
        n_patients=n_patients,
        labelled_patients=labelled_patients,
        seed=0,
        **{**settings, **options},
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The whole pipeline once per session: 4 patients x 2 time points, round 0 and one
    simulated active-learning round, with the full model set of config/cohort.yaml in miniature
    (a 2-fold stage-1 ensemble, cascade stage 2, follow-up re-segmentation with the propagated
    prior; round 1's batch chosen by the ensemble's disagreement).

    Tests that read it must not write into it: copy what a test changes (as test_rounds does).
    """

    root = tmp_path_factory.mktemp("tiny_run")
    demo = root / "demo"
    make_tiny_cohort(demo, n_patients=4, labelled_patients=3)
    models = {
        "folds": 2,
        # A 2-member seed ensemble, each member's weights chosen on validation every 5
        # iterations (config/cohort.yaml's selection), as the cohort config would run it.
        "stage2": {"enabled": True, "iterations": 10, "ensemble": 2, "select_every": 5},
        "reseg": {"enabled": True, "iterations": 12, "finetune_iterations": 6},
    }
    config = write_tiny_config(
        root, demo, train=models, active_learning={"strategy": "disagreement"}
    )
    run_snakemake(["--profile", "profiles/local", "--cores", "2", "--configfile", str(config)])
    return TinyRun(root, demo, config, root / "results", root / "labels")
