"""Lesion-balanced patch sampling: choose a lesion, then a centre inside it.

MONAI's ``RandCropByPosNegLabeld`` draws a positive centre uniformly over lesion *voxels*: at
1 mm a 20 mm lesion (~4,200 voxels) is centred ~500x more often than a 2.5 mm one (~8 voxels),
so a network trained on a heavy-tailed cohort rarely sees its small lesions (issue #23).
``RandLesionCropd`` draws a positive patch in two steps, a lesion (26-connected component of
the whole lesion, ``metsflow.core.labels.lesion_components``) with weight ``volume ** -size_power`` (0: every lesion alike; 1: inversely
proportional to its volume), then a voxel of that lesion as the centre; a negative patch is
centred on a brain voxel, as before. The ratio of positive to negative patches is
``pos_neg_ratio``, as for the MONAI crop.

``LesionInstancesd`` (deterministic, so ``CacheDataset`` caches it) stores each lesion's flat
voxel indices once per study; the random crop reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import MapTransform, Randomizable, SpatialCrop, Transform
from monai.transforms.utils import correct_crop_centers

from metsflow.core import labels as lab

LESION_INDICES = "lesion_instance_indices"
BRAIN_INDICES = "brain_indices"


class LesionInstancesd(Transform):
    """From the channel-first binary ``lesion_key`` and ``brain_key`` maps: the flat indices of
    each lesion (``labels.lesion_components``; ``lesion_instance_indices``, a list of arrays) and of the brain
    voxels (``brain_indices``)."""

    def __init__(self, lesion_key: str = "lesion", brain_key: str = "brain") -> None:
        self.lesion_key, self.brain_key = lesion_key, brain_key

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        lesion = np.asarray(out[self.lesion_key])[0]
        components, count = lab.lesion_components(lesion)
        flat = components.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(1, count + 2))
        out[LESION_INDICES] = [order[bounds[i] : bounds[i + 1]] for i in range(count)]
        out[BRAIN_INDICES] = np.flatnonzero(np.asarray(out[self.brain_key])[0].ravel())
        return out


def lesion_weights(sizes: Sequence[int], size_power: float) -> np.ndarray:
    """Probability of choosing each lesion: ``size ** -size_power``, normalised."""
    sizes = np.asarray(sizes, dtype=float)
    weights = sizes ** -float(size_power)
    return weights / weights.sum()


class RandLesionCropd(Randomizable, MapTransform):
    """One ``spatial_size`` patch of ``keys``: with probability ``pos / (pos + neg)`` centred on
    a voxel of a lesion chosen by ``lesion_weights``, else on a brain voxel (a study without
    lesion gives brain-centred patches). Returns a list of one patch, as the MONAI crop does."""

    def __init__(
        self,
        keys: Sequence[str],
        spatial_size: Sequence[int],
        pos: float = 1.0,
        neg: float = 1.0,
        size_power: float = 0.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.spatial_size = [int(s) for s in spatial_size]
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise ValueError(f"pos and neg must be >= 0 with a positive sum, got {pos}, {neg}")
        self.pos_ratio = float(pos) / (float(pos) + float(neg))
        self.size_power = float(size_power)
        self.centre: list[int] | None = None

    def randomize(self, data: dict) -> None:
        lesions = data.get(LESION_INDICES) or []
        shape = np.asarray(data[self.keys[0]]).shape[1:]
        if lesions and self.R.random_sample() < self.pos_ratio:
            weights = lesion_weights([len(v) for v in lesions], self.size_power)
            chosen = lesions[int(self.R.choice(len(lesions), p=weights))]
            flat = int(chosen[self.R.randint(len(chosen))])
        else:
            brain = data.get(BRAIN_INDICES)
            if brain is None or not len(brain):
                flat = int(self.R.randint(int(np.prod(shape))))
            else:
                flat = int(brain[self.R.randint(len(brain))])
        centre = np.unravel_index(flat, shape)
        # Shifted so the patch lies inside the volume (as RandCropByPosNegLabeld does).
        self.centre = [int(c) for c in correct_crop_centers(centre, self.spatial_size, shape)]

    def __call__(self, data: dict) -> list[dict]:
        self.randomize(data)
        crop = SpatialCrop(roi_center=self.centre, roi_size=self.spatial_size)
        out = {k: v for k, v in data.items() if k not in (LESION_INDICES, BRAIN_INDICES)}
        for key in self.key_iterator(out):
            out[key] = crop(out[key])
        return [out]
