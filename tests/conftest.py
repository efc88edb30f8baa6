"""Shared test helpers: running the workflow the way a user does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def tiny_config(tmp_path):
    """Write a config overlay that makes the whole pipeline run in a couple of minutes."""

    def make(demo_dir: Path, **overrides) -> Path:
        config = {
            "sheet": str(demo_dir / "studies.tsv"),
            "oracle_sheet": str(demo_dir / "oracle.tsv"),
            "results": str(tmp_path / "results"),
            "label_store": str(tmp_path / "labels"),
            "sharding": {"cpu_shard_size": 4, "gpu_shard_size": 8},
            "validation": {"fraction": 0.34},
            "preprocess": {"spacing": [4.0, 4.0, 4.0]},
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
        for key, value in overrides.items():
            if isinstance(value, dict):
                config.setdefault(key, {}).update(value)
            else:
                config[key] = value
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make
