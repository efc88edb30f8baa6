"""The network's resolution plan from the model settings alone (no torch): levels, strides and
the patch-size rule they impose.

Pure arithmetic, so the workflow checks a patch size while it parses (``metsflow.core.config``):
``model.patch_size: [47, 48, 48]`` used to be refused only when training started, after every
study's preprocessing and registration. ``metsflow.models.networks`` builds the network from the
same plan (one owner of the stride rule); importing it at parse time would cost torch's 5.6 s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# nnU-Net stops downsampling an axis once its feature map would drop below this many voxels.
_MIN_FEATURE_SIZE = 4
# MONAI SegResNet with blocks_down [1, 2, 2, 4] (metsflow.models.networks) halves 3 times.
SEGRESNET_STRIDE = 8


def dynunet_plan(
    patch_size: Sequence[int], spacing: Sequence[float], max_levels: int | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides per resolution level, following nnU-Net's planning.

    An axis is downsampled (stride 2) while its feature map stays >= 4 voxels and its spacing is
    at most twice the finest spacing (anisotropic axes wait until the others catch up); an axis
    much coarser than the finest gets a 1-wide kernel until then. The first level has stride 1.
    ``max_levels`` truncates the plan (the number of filters sets the depth). A patch size that
    is not a multiple of the total stride raises ``ValueError``.
    """
    sizes = [float(s) for s in patch_size]
    spacings = [float(s) for s in spacing]
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1, 1, 1]]
    while max_levels is None or len(strides) < max_levels:
        ratios = [sp / min(spacings) for sp in spacings]
        stride = [
            2 if ratio <= 2 and size >= 2 * _MIN_FEATURE_SIZE else 1
            for ratio, size in zip(ratios, sizes, strict=True)
        ]
        if all(s == 1 for s in stride):
            break
        kernels.append([3 if ratio <= 2 else 1 for ratio in ratios])
        sizes = [size / s for size, s in zip(sizes, stride, strict=True)]
        spacings = [sp * s for sp, s in zip(spacings, stride, strict=True)]
        strides.append(stride)
    # The last level's kernel is always isotropic 3 (the spacing has equalised by then).
    kernels.append([3, 3, 3])
    total = [math.prod(axis) for axis in zip(*strides, strict=True)]
    bad = [int(p) for p, t in zip(patch_size, total, strict=True) if p % t]
    if bad:
        raise ValueError(
            f"patch size {list(patch_size)} is not divisible by the network's total stride "
            f"{total}; choose a patch size that is a multiple of it"
        )
    return kernels, strides


def patch_size_problem(
    arch: str, patch_size: Sequence[int], spacing: Sequence[float], filters: Sequence[int]
) -> str | None:
    """Why the network of ``arch`` cannot take ``patch_size`` at ``spacing`` (None: it can)."""
    if arch == "segresnet":
        if any(int(p) % SEGRESNET_STRIDE for p in patch_size):
            return (
                f"segresnet needs a patch size divisible by {SEGRESNET_STRIDE}, "
                f"got {list(patch_size)}"
            )
        return None
    try:
        dynunet_plan(patch_size, spacing, max_levels=len(filters))
    except ValueError as exc:
        return str(exc)
    return None
