"""Per-job runtime settings: thread counts, device choice, seeding, heap reuse."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import random
import sys

import numpy as np


def set_threads(threads: int) -> None:
    """Make ITK/ANTs, BLAS and torch use exactly the job's Snakemake ``threads``.

    ITK otherwise takes every core of the node, which oversubscribes a shared SLURM node.
    Must run before ANTs builds its first filter. torch is set here if it is already imported;
    imported later, it takes ``OMP_NUM_THREADS``. Why not import it: the preprocessing and
    registration jobs (ANTs only) paid ~2 CPU-s each for an unused torch import, 8 of the tiny
    pipeline run's 250 CPU-s (py-spy, tests/test_workflow.py).
    """
    threads = max(1, int(threads))
    for var in (
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
    ):
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


# glibc mallopt parameters (malloc.h) and the value both are set to: freed blocks up to 1 GiB go
# back to malloc's free lists instead of munmap/trim, so the next forward pass reuses pages that
# are already mapped. glibc otherwise serves every block above its (dynamic, <= 32 MiB) mmap
# threshold with a fresh mmap: the demo net's forward on 4 windows of 48^3 (compiled,
# channels-last) page-faulted 390-560k times and took 0.27-0.29 s; with both set 186k faults,
# 0.24-0.25 s (1.10-1.17x; eager 0.38-0.41 -> 0.35 s). Setting only the trim threshold was worse
# (0.33 s: it also switches the dynamic mmap threshold off), a 32 MiB cap in between (0.25 s,
# 312k faults; the 56 MiB activations of a 32-channel 48^3 batch still mmap). Memory kept is
# memory the job held a moment before, so the peak barely moves: peak RSS of the inference
# benchmark's path 834 -> 878 MiB (untrained demo net), 867 -> 857 MiB (trained).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_KEEP_BYTES = 1 << 30


@functools.cache
def reuse_freed_memory() -> bool:
    """Make this process's glibc malloc keep freed blocks for reuse (the ``heap_reuse``
    inference lever; process-wide, once). False where the C library is not glibc (musl, macOS):
    then nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _HEAP_KEEP_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, _HEAP_KEEP_BYTES)
    )


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
    if "torch._inductor" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        # The public call also sets the flag of inductor (torch.compile), and imports it for
        # that, with dynamo and sympy: ~2 CPU-s per training job, 16 of the tiny pipeline run's
        # 250 CPU-s (py-spy). Training compiles nothing; the eager kernels read this flag, and
        # a later compile copies it (``compiler_follows_determinism``).
        torch._C._set_deterministic_algorithms(True, warn_only=True)


def compiler_follows_determinism() -> None:
    """Give inductor (torch.compile) the eager determinism flag, as
    ``torch.use_deterministic_algorithms`` would have: call before compiling. ``seed_everything``
    sets only the eager flag unless inductor is loaded already."""
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
