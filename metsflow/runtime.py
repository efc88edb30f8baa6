"""Per-job runtime settings: thread counts, device choice, seeding."""

from __future__ import annotations

import os
import random

import numpy as np


def set_threads(threads: int) -> None:
    """Make ITK/ANTs, BLAS and torch use exactly the job's Snakemake ``threads``.

    ITK otherwise takes every core of the node, which oversubscribes a shared SLURM node.
    Must run before ANTs builds its first filter; torch is set if it is importable.
    """
    threads = max(1, int(threads))
    for var in (
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
    ):
        os.environ[var] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def select_device(preference: str = "auto"):
    """``auto`` picks CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as given."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config asks for device 'cuda' but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (and make torch deterministic on CPU)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
