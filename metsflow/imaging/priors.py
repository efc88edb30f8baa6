"""Priors for the re-segmentation model: fictitious priors for training, the follow-up merge.

Re-segmentation reads the follow-up T1c plus the previous study's whole-lesion mask propagated
onto the follow-up grid (the ``prior`` channel, see ``metsflow.models.networks``). A real propagated prior
is imperfect: the lesion grew or shrank since, and registration leaves a residual shift. Training
therefore never uses the true label as the prior: ``fictitious_prior`` makes one from the current
label by a random dilation in [0, 6] voxels *or* an erosion in [0, 3] voxels (one of the two per
sample: growth or shrinkage since the previous study) followed by a random integer translation in
[-6, 6] voxels per axis (registration error). The network learns to find the current lesion
*near* the prior, not to copy it.

At inference on a follow-up, re-segmentation runs beside the new-lesion detector (the stage-1 /
stage-2 cascade) and ``merge_followup`` combines them: lesions that overlap the prior are tracked
lesions and come from re-segmentation; lesions away from the prior are new and come from the
cascade.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage

from metsflow.core import labels as lab

DILATION_RANGE = (0, 6)
EROSION_RANGE = (0, 3)
TRANSLATION_RANGE = 6
# Voxels a cascade lesion may lie from the prior and still count as tracked (not new): the
# residual registration error of the propagated prior.
TRACKING_MARGIN = 2


def _ball_distance_op(mask: np.ndarray, radius: int, grow: bool) -> np.ndarray:
    """Dilate (``grow``) or erode ``mask`` by a Euclidean ball of ``radius`` voxels.

    Works on the bounding box of the lesions plus a margin, so its cost scales with lesion size,
    not with the volume (it runs for every training sample)."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    margin = radius + 1
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = tuple(
        slice(max(0, s.start - margin), min(n, s.stop + margin))
        for s, n in zip(box, mask.shape, strict=True)
    )
    sub = mask[box]
    out = np.zeros_like(mask)
    if grow:
        out[box] = ndimage.distance_transform_edt(~sub) <= radius
    else:
        # Voxels outside the volume count as background for erosion.
        padded = np.pad(sub, 1)
        out[box] = (ndimage.distance_transform_edt(padded) > radius)[1:-1, 1:-1, 1:-1]
    return out


def translate(mask: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """Integer shift of a binary mask, zero-filled (nothing wraps around)."""
    out = np.zeros_like(mask)
    src, dst = [], []
    for s, n in zip(shift, mask.shape, strict=True):
        s = int(s)
        if abs(s) >= n:
            return out
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def fictitious_prior(
    lesion: np.ndarray,
    rng: np.random.Generator,
    dilation: tuple[int, int] = DILATION_RANGE,
    erosion: tuple[int, int] = EROSION_RANGE,
    translation: int = TRANSLATION_RANGE,
) -> tuple[np.ndarray, dict]:
    """A plausible propagated prior made from the current whole-lesion mask ``lesion``.

    Returns ``(prior, draw)`` with ``prior`` boolean and ``draw`` = ``{"op": "dilate"|"erode",
    "radius": int, "shift": [dx, dy, dz]}`` (so tests and logs can check the bounds).
    """
    lesion = np.asarray(lesion, dtype=bool)
    grow = bool(rng.integers(2))
    low, high = dilation if grow else erosion
    radius = int(rng.integers(low, high + 1))
    shift = [int(v) for v in rng.integers(-translation, translation + 1, size=3)]
    prior = translate(_ball_distance_op(lesion, radius, grow), shift)
    return prior, {"op": "dilate" if grow else "erode", "radius": radius, "shift": shift}


class RandFictitiousPriord(Randomizable, MapTransform):
    """Write a fictitious prior made from the label into ``keys`` (channel-first, 1 channel).

    Runs on the whole cached volume before cropping and spatial augmentation, so the prior is
    cropped, rotated and flipped together with the image and label. ``lesion_classes``: the
    target classes that form the whole lesion (enhancing + necrosis)."""

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        lesion_classes: Sequence[int],
        dilation: tuple[int, int] = DILATION_RANGE,
        erosion: tuple[int, int] = EROSION_RANGE,
        translation: int = TRANSLATION_RANGE,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        self.lesion_classes = list(lesion_classes)
        self.dilation = tuple(dilation)
        self.erosion = tuple(erosion)
        self.translation = int(translation)
        self._seed = 0

    def randomize(self, data=None) -> None:
        self._seed = int(self.R.randint(2**31 - 1))

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict:
        self.randomize()
        out = dict(data)
        lesion = np.isin(np.asarray(out[self.label_key])[0], self.lesion_classes)
        prior, _ = fictitious_prior(
            lesion,
            np.random.default_rng(self._seed),
            self.dilation,
            self.erosion,
            self.translation,
        )
        for key in self.keys:
            out[key] = prior[None].astype(np.float32)
        return out


def merge_followup(
    reseg: np.ndarray,
    cascade: np.ndarray,
    prior: np.ndarray,
    margin: int = TRACKING_MARGIN,
) -> tuple[np.ndarray, dict]:
    """Combine re-segmentation and cascade outputs (internal labels) of one follow-up.

    * tracked lesions: whole-lesion components of ``reseg`` that overlap the prior dilated by
      ``margin`` voxels, with their labels from ``reseg``;
    * new lesions: whole-lesion components of ``cascade`` that touch neither that dilated prior
      nor a tracked lesion, with their labels from ``cascade``;
    * edema (label 2) around them from ``reseg`` first, then ``cascade``, where no lesion is.

    Re-seg components away from the prior are dropped (the prior-conditioned network is not
    trained to find new lesions) and cascade components near the prior are dropped (there the
    re-seg output is the better delineation). Returns ``(labels, counts)`` with ``counts`` =
    ``{"tracked": n, "new": m}``.
    """
    reseg = np.asarray(reseg, dtype=np.uint8)
    cascade = np.asarray(cascade, dtype=np.uint8)
    if reseg.shape != cascade.shape or reseg.shape != np.shape(prior):
        raise ValueError(
            f"merge inputs differ in shape: reseg {reseg.shape}, cascade {cascade.shape}, "
            f"prior {np.shape(prior)}"
        )
    near_prior = _ball_distance_op(np.asarray(prior) > 0, margin, grow=True)
    tracked = lab.components_touching(lab.whole_lesion(reseg), near_prior)
    new = lab.components_touching(lab.whole_lesion(cascade), near_prior | tracked, keep=False)
    out = np.zeros_like(reseg)
    out[tracked] = reseg[tracked]
    out[new] = cascade[new]
    free = out == 0
    out[free & (reseg == lab.EDEMA)] = lab.EDEMA
    out[(out == 0) & (cascade == lab.EDEMA)] = lab.EDEMA
    counts = {"tracked": _count(tracked), "new": _count(new)}
    return out, counts


def _count(mask: np.ndarray) -> int:
    return lab.lesion_components(mask)[1]
