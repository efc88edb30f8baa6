"""Lesion-balanced patch sampling: choose a lesion, then a centre inside it.

MONAI's ``RandCropByPosNegLabeld`` draws a positive centre uniformly over lesion *voxels*: at
1 mm a 20 mm lesion (~4,200 voxels) is centred ~500x more often than a 2.5 mm one (~8 voxels),
so a network trained on a heavy-tailed cohort rarely sees its small lesions (issue #23).
``RandLesionCropd`` draws a positive patch in two steps, a lesion (26-connected component of
the whole lesion, ``metsflow.core.labels.lesion_components``) with weight ``volume ** -size_power`` (0: every lesion alike; 1: inversely
proportional to its volume; -1, ``VOXEL_UNIFORM``: proportional to its volume, i.e. uniform
over lesion voxels, the draw of ``RandCropByPosNegLabeld``), then a voxel of that lesion as the
centre; a negative patch is centred on a brain voxel, as before. The ratio of positive to
negative patches is ``pos_neg_ratio``, as for the MONAI crop.

Hard negatives (issue #23): a study may carry a mask of regions a previous model called lesion
and a human did not (``false_positive_mask``: the presegmentation components a reviewer deleted;
``metsflow.models.train.hard_negatives_on_prep_grid``). With ``hard_negative_fraction`` f, a
negative patch of such a study is centred on a voxel of that mask with probability f, else on a
brain voxel; a study without one is unchanged.

``LesionInstancesd`` (deterministic, so ``CacheDataset`` caches it) stores each lesion's flat
voxel indices, and the brain's and the hard negatives', once per study; the random crop reads
them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import MapTransform, Randomizable, SpatialCrop, Transform
from monai.transforms.utils import correct_crop_centers

from metsflow.core import labels as lab
from metsflow.models.networks import HARD_NEGATIVES

LESION_INDICES = "lesion_instance_indices"
BRAIN_INDICES = "brain_indices"
HARD_NEGATIVE_INDICES = "hard_negative_indices"
INDEX_KEYS = (LESION_INDICES, BRAIN_INDICES, HARD_NEGATIVE_INDICES)
# lesion_weights' size power that weights a lesion by its volume: every lesion voxel alike, the
# positive draw of RandCropByPosNegLabeld ("pos_neg" sampling with hard negatives).
VOXEL_UNIFORM = -1.0


def false_positive_mask(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The lesions (``labels.lesion_components``) of the binary ``predicted`` mask that no voxel
    of the binary ``reference`` mask touches: what a reviewer deleted from a presegmentation, or
    a model's false positives against the truth. Boolean, on ``predicted``'s grid."""
    return lab.components_touching(np.asarray(predicted, dtype=bool), reference, keep=False)


class LesionInstancesd(Transform):
    """From the channel-first binary ``lesion_key`` and ``brain_key`` maps: the flat indices of
    each lesion (``labels.lesion_components``; ``lesion_instance_indices``, a list of arrays), of
    the brain voxels (``brain_indices``) and, when the study has a ``hard_negative_key`` mask,
    of its voxels (``hard_negative_indices``; empty without one)."""

    def __init__(
        self,
        lesion_key: str = "lesion",
        brain_key: str = "brain",
        hard_negative_key: str = HARD_NEGATIVES,
    ) -> None:
        self.lesion_key, self.brain_key = lesion_key, brain_key
        self.hard_negative_key = hard_negative_key

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        lesion = np.asarray(out[self.lesion_key])[0]
        components, count = lab.lesion_components(lesion)
        flat = components.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(1, count + 2))
        out[LESION_INDICES] = [order[bounds[i] : bounds[i + 1]] for i in range(count)]
        out[BRAIN_INDICES] = np.flatnonzero(np.asarray(out[self.brain_key])[0].ravel())
        hard = out.get(self.hard_negative_key)
        out[HARD_NEGATIVE_INDICES] = (
            np.zeros(0, dtype=np.int64)
            if hard is None
            else np.flatnonzero(np.asarray(hard)[0].ravel())
        )
        return out


def lesion_weights(sizes: Sequence[int], size_power: float) -> np.ndarray:
    """Probability of choosing each lesion: ``size ** -size_power``, normalised (``size_power``
    ``VOXEL_UNIFORM``: proportional to the size, every lesion voxel alike)."""
    sizes = np.asarray(sizes, dtype=float)
    weights = sizes ** -float(size_power)
    return weights / weights.sum()


class RandLesionCropd(Randomizable, MapTransform):
    """One ``spatial_size`` patch of ``keys``: with probability ``pos / (pos + neg)`` centred on
    a voxel of a lesion chosen by ``lesion_weights``, else a negative patch (a study without
    lesion gives negative patches only). A negative patch is centred, with probability
    ``hard_negative_fraction``, on a voxel of the study's hard negatives when it has any, else on
    a brain voxel. Returns a list of one patch, as the MONAI crop does.

    After each draw ``kind`` says which it was (``"lesion"``, ``"hard_negative"``, ``"brain"``)
    and ``drawn_centre`` is the voxel drawn, before ``centre`` shifts it so the patch fits."""

    def __init__(
        self,
        keys: Sequence[str],
        spatial_size: Sequence[int],
        pos: float = 1.0,
        neg: float = 1.0,
        size_power: float = 0.0,
        hard_negative_fraction: float = 0.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.spatial_size = [int(s) for s in spatial_size]
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise ValueError(f"pos and neg must be >= 0 with a positive sum, got {pos}, {neg}")
        self.pos_ratio = float(pos) / (float(pos) + float(neg))
        self.size_power = float(size_power)
        if not 0.0 <= hard_negative_fraction <= 1.0:
            raise ValueError(
                f"hard_negative_fraction must be in [0, 1], got {hard_negative_fraction}"
            )
        self.hard_negative_fraction = float(hard_negative_fraction)
        self.centre: list[int] | None = None
        self.drawn_centre: tuple[int, ...] | None = None
        self.kind: str | None = None

    def randomize(self, data: dict) -> None:
        lesions = data.get(LESION_INDICES) or []
        shape = np.asarray(data[self.keys[0]]).shape[1:]
        if lesions and self.R.random_sample() < self.pos_ratio:
            weights = lesion_weights([len(v) for v in lesions], self.size_power)
            chosen = lesions[int(self.R.choice(len(lesions), p=weights))]
            flat, self.kind = int(chosen[self.R.randint(len(chosen))]), "lesion"
        else:
            hard = data.get(HARD_NEGATIVE_INDICES)
            brain = data.get(BRAIN_INDICES)
            # The extra draw only where hard negatives exist: without them the random stream,
            # and so every patch, is the one drawn before the lever existed.
            if (
                self.hard_negative_fraction > 0
                and hard is not None
                and len(hard)
                and self.R.random_sample() < self.hard_negative_fraction
            ):
                flat, self.kind = int(hard[self.R.randint(len(hard))]), "hard_negative"
            elif brain is None or not len(brain):
                flat, self.kind = int(self.R.randint(int(np.prod(shape)))), "brain"
            else:
                flat, self.kind = int(brain[self.R.randint(len(brain))]), "brain"
        centre = np.unravel_index(flat, shape)
        self.drawn_centre = tuple(int(c) for c in centre)
        # Shifted so the patch lies inside the volume (as RandCropByPosNegLabeld does).
        self.centre = [int(c) for c in correct_crop_centers(centre, self.spatial_size, shape)]

    def __call__(self, data: dict) -> list[dict]:
        self.randomize(data)
        crop = SpatialCrop(roi_center=self.centre, roi_size=self.spatial_size)
        out = {k: v for k, v in data.items() if k not in INDEX_KEYS}
        for key in self.key_iterator(out):
            out[key] = crop(out[key])
        return [out]
