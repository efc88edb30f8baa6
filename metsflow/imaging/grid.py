"""Label maps between the preprocessed grid and other grids, without ANTs.

The grid convention is ``metsflow.imaging.preprocess``'s. These helpers need only nibabel and
scipy, so the jobs that map labels or probabilities between grids (inference, fine-tuning on
confirmed labels, evaluation, review assists, exports) do not import ANTs with the preprocessing
module: ``import ants`` costs 3.4 CPU-s per job (`python -X importtime`, 2-core machine).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from metsflow.core.io import read_json
from metsflow.core.layout import GEOMETRY


def crop_box(mask: np.ndarray, spacing: np.ndarray, margin_mm: float) -> tuple[list, list]:
    """Bounding box of ``mask`` plus ``margin_mm`` on each side, clipped to the grid."""
    where = np.argwhere(mask)
    margin = np.ceil(float(margin_mm) / np.asarray(spacing, dtype=float)).astype(int)
    start = np.maximum(where.min(axis=0) - margin, 0)
    stop = np.minimum(where.max(axis=0) + 1 + margin, mask.shape)
    return start.tolist(), stop.tolist()


def to_native(labels: np.ndarray, prep_dir: str | Path) -> nib.Nifti1Image:
    """Map a label map on the final preprocessed grid back to the native T1c grid.

    Nearest neighbour through the affines (world position of each native voxel centre ->
    preprocessed index), on the native T1c grid *as stored in the original file* (its axis
    order and orientation, not RAS). Native voxels outside the cropped box get 0.
    """
    geometry = read_json(Path(prep_dir) / GEOMETRY)
    labels = np.asarray(labels)
    final_shape = tuple(geometry["final"]["shape"])
    if labels.shape != final_shape:
        raise ValueError(
            f"labels have shape {labels.shape}, expected the preprocessed grid {final_shape} "
            f"of {prep_dir}"
        )
    native_affine = np.asarray(geometry["native"]["affine"], dtype=float)
    out = resample_nearest(
        labels,
        np.asarray(geometry["final"]["affine"], dtype=float),
        native_affine,
        tuple(geometry["native"]["shape"]),
    )
    img = nib.Nifti1Image(out.astype(np.uint8), native_affine)
    img.header.set_xyzt_units("mm", "sec")
    return img


def resample_nearest(
    values: np.ndarray,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, ...],
) -> np.ndarray:
    """``values`` (on the grid of ``source_affine``) sampled at the target grid's voxel centres
    by nearest neighbour, 0 outside: how predictions (labels, foreground probabilities) go
    from the preprocessed grid back to the native one (``to_native``)."""
    target_to_source = np.linalg.inv(np.asarray(source_affine, dtype=float)) @ np.asarray(
        target_affine, dtype=float
    )
    return ndimage.affine_transform(
        np.asarray(values),
        target_to_source[:3, :3],
        offset=target_to_source[:3, 3],
        output_shape=tuple(int(n) for n in target_shape),
        order=0,
        mode="constant",
        cval=0,
        prefilter=False,
    )


def label_to_grid(label_path: str | Path, reference_path: str | Path) -> np.ndarray:
    """The label map at ``label_path`` on the grid of ``reference_path`` (nearest neighbour).

    Works in world coordinates (both affines), so any orientation or obliquity of the source
    (for example a native-space human correction) lands on the preprocessed grid: how
    confirmed labels join training (``metsflow.models.train``) and final labels are tracked
    (``metsflow.jobs.export``)."""
    source = nib.load(str(label_path))
    reference = nib.load(str(reference_path))
    data = np.asarray(source.dataobj).astype(np.uint8)
    return resample_nearest(data, source.affine, reference.affine, reference.shape[:3]).astype(
        np.uint8
    )
