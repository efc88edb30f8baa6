"""What the review server serves: the current round's review batch and the final QA sample.

Both are review packages written by ``metsflow.active_learning.review.export_batch``
(``results/rounds/round_<r>/review/`` and ``results/final/qa_review/``): a ``manifest.csv``
and per study ``image_<seq>.nii.gz`` on the native T1c grid and ``presegmentation.nii.gz``.
The catalog reads the manifests (again whenever one changes) and answers "which study is this,
which files may be served for it" -- a study id that is not a manifest row is unknown, so
no request can name a file outside the batch.

Lesion list (``lesions``): every lesion of the pre-segmentation's labels > 0
(``metsflow.core.labels.lesion_components``, the lesions the metrics count), largest first, with its dominant
label, volume and centroid. The model's uncertain lesions are flagged:

- when the inference wrote ``fg_prob.nii.gz`` for the study (foreground probability on the
  preprocessed grid, ``results/rounds/round_<m>/predictions/<study>/``, m = the round of the
  model named in the manifest), each lesion voxel is looked up there through the two affines
  (world mm, nearest voxel) and the lesion is ``uncertain`` when its mean normalised binary
  entropy H(p)/log 2 exceeds ``UNCERTAIN_ENTROPY`` (0.5: on average p between 0.11 and 0.89);
- without that map (a package copied elsewhere, a pruned results folder) a lesion is flagged by
  size alone: below ``SMALL_LESION_ML`` (0.1 ml, a sphere of 5.8 mm) -- the lesions whose
  detection is least reliable (BraTS-METS reports its lowest lesion-wise sensitivity there,
  and metsflow's own cascade stage 2 exists because the small candidates are the false
  positives). ``uncertainty_source`` says which rule applied.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np

from metsflow.active_learning.review import (
    IMAGE_NAME,
    MANIFEST_NAME,
    VIEW_IMAGE_NAME,
    read_manifest,
)
from metsflow.core.labels import lesion_components
from metsflow.core.layout import FG_PROB, PRESEGMENTATION_NAME, Layout
from metsflow.core.sequences import SEQUENCES

UNCERTAIN_ENTROPY = 0.5
SMALL_LESION_ML = 0.1
FINAL_BATCH = "final"
_MODEL_ROUND = re.compile(r"round_(\d+)")


def round_review_dir(results: Path, round_index: int) -> Path:
    return Path(Layout(results).review_dir(round_index))


def final_review_dir(results: Path) -> Path:
    return Path(Layout(results).final_review_dir)


def review_rounds(results: str | os.PathLike) -> list[int]:
    """The rounds with an exported review batch, in order."""
    layout = Layout(results)
    return sorted(
        r for r, _ in layout.existing_rounds() if Path(layout.review_manifest(r)).is_file()
    )


def current_round(results: str | os.PathLike) -> int | None:
    """The newest round with an exported review batch, or None."""
    found = review_rounds(results)
    return found[-1] if found else None


@dataclass(frozen=True)
class StudyEntry:
    study_id: str
    patient_id: str
    batch: str  # "round_<r>" or "final"
    round: int | None
    review_dir: Path
    model: str
    images: dict[str, Path] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.review_dir / self.study_id

    @property
    def presegmentation(self) -> Path:
        return self.folder / PRESEGMENTATION_NAME

    @property
    def t1c(self) -> Path:
        return self.images["t1c"]

    def view_image(self, sequence: str) -> Path:
        """What the editor downloads for ``sequence``: the package's int16 view copy of a
        floating-point image (``review.write_view_image``), else the image itself (packages
        exported before view copies existed, integer images)."""
        view = self.folder / VIEW_IMAGE_NAME.format(sequence=sequence)
        return view if view.is_file() else self.images[sequence]


class Catalog:
    """The studies being reviewed, from the batches' manifests (re-read when they change)."""

    def __init__(self, results: str | os.PathLike, round_index: int | None = None):
        self.results = Path(results)
        self.fixed_round = round_index
        self._stamp: tuple | None = None
        self._studies: dict[str, StudyEntry] = {}
        self.round: int | None = None

    def _batches(self) -> list[tuple[str, int | None, Path]]:
        round_index = self.fixed_round
        if round_index is None:
            round_index = current_round(self.results)
        batches = []
        if round_index is not None:
            batches.append(
                (f"round_{round_index}", round_index, round_review_dir(self.results, round_index))
            )
        batches.append((FINAL_BATCH, None, final_review_dir(self.results)))
        self.round = round_index
        return batches

    def refresh(self) -> None:
        batches = self._batches()
        stamp = tuple(
            (name, (folder / MANIFEST_NAME).stat().st_mtime_ns)
            if (folder / MANIFEST_NAME).is_file()
            else (name, None)
            for name, _, folder in batches
        )
        if stamp == self._stamp:
            return
        studies: dict[str, StudyEntry] = {}
        for name, round_index, folder in batches:
            manifest = read_manifest(folder)
            for row in manifest.to_dict("records"):
                study_id = str(row["study_id"])
                if study_id in studies:  # a round batch wins over the QA sample
                    continue
                images = {"t1c": folder / row["image"]}
                for relative in filter(None, str(row.get("other_images", "")).split(";")):
                    sequence = _sequence_of(relative)
                    if sequence in SEQUENCES:
                        images[sequence] = folder / relative
                studies[study_id] = StudyEntry(
                    study_id=study_id,
                    patient_id=str(row.get("patient_id") or study_id),
                    batch=name,
                    round=round_index if round_index is not None else _int(row.get("round")),
                    review_dir=folder,
                    model=str(row.get("model", "")),
                    images=images,
                )
        self._studies, self._stamp = studies, stamp

    def studies(self) -> dict[str, StudyEntry]:
        self.refresh()
        return self._studies

    def get(self, study_id: str) -> StudyEntry | None:
        return self.studies().get(study_id)

    def batch_names(self) -> list[str]:
        return list(dict.fromkeys(s.batch for s in self.studies().values()))

    def uncertainty_map(self, entry: StudyEntry) -> Path | None:
        """``fg_prob.nii.gz`` of the model that pre-segmented the study, if it is there."""
        match = _MODEL_ROUND.search(entry.model)
        if not match:
            return None
        path = Layout(self.results).prediction_dir(match.group(1), entry.study_id) / FG_PROB
        return path if path.is_file() else None


def _sequence_of(relative: str) -> str:
    name = Path(relative).name
    prefix, suffix = IMAGE_NAME.split("{sequence}")
    return name[len(prefix) : -len(suffix)] if name.startswith(prefix) else ""


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------- lesions


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)


def _lesion_uncertainty(
    voxels: np.ndarray, components: np.ndarray, count: int, affine: np.ndarray, fg_prob_path: Path
) -> np.ndarray:
    """Mean normalised binary entropy of each component, sampled from ``fg_prob`` by world
    position (nearest voxel; lesion voxels outside that grid count as fully uncertain)."""
    prob_img = nib.load(str(fg_prob_path))
    prob = np.asanyarray(prob_img.dataobj).astype(np.float32)
    to_prob = np.linalg.inv(prob_img.affine) @ affine
    index = np.rint(voxels @ to_prob[:3, :3].T + to_prob[:3, 3]).astype(int)
    inside = np.all((index >= 0) & (index < np.array(prob.shape)), axis=1)
    entropy = np.ones(len(voxels))
    entropy[inside] = _binary_entropy(prob[tuple(index[inside].T)])
    owner = components[tuple(voxels.T)]
    sums = np.bincount(owner, weights=entropy, minlength=count + 1)
    counts = np.bincount(owner, minlength=count + 1)
    return sums[1:] / np.maximum(counts[1:], 1)


@functools.lru_cache(maxsize=256)
def _lesions_cached(
    preseg_path: str, preseg_mtime: int, fg_prob_path: str | None, fg_mtime: int | None
) -> tuple[tuple[dict, ...], str]:
    img = nib.load(preseg_path)
    data = np.asanyarray(img.dataobj).astype(np.uint8)
    components, count = lesion_components(data)
    if count == 0:
        return (), "fg_prob" if fg_prob_path else "size_rule"
    stats = cc3d.statistics(components)
    sizes = np.asarray(stats["voxel_counts"], dtype=np.int64)[1:]
    centroids = np.asarray(stats["centroids"])[1:]
    # Dominant label per component: counts of (component, value) pairs.
    pairs = np.bincount(
        components[data > 0].astype(np.int64) * 4 + data[data > 0], minlength=(count + 1) * 4
    ).reshape(count + 1, 4)[1:]
    voxel_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    if fg_prob_path:
        voxels = np.argwhere(components > 0)
        uncertainty = _lesion_uncertainty(voxels, components, count, img.affine, Path(fg_prob_path))
        source = "fg_prob"
    else:
        uncertainty = None
        source = "size_rule"
    order = sorted(range(count), key=lambda c: (-sizes[c], c))
    lesions = []
    for rank, c in enumerate(order, start=1):
        centre = centroids[c]
        world = img.affine[:3, :3] @ centre + img.affine[:3, 3]
        volume = float(sizes[c]) * voxel_ml
        lesion = {
            "id": rank,
            "label": int(np.argmax(pairs[c][1:]) + 1),
            "voxels": int(sizes[c]),
            "volume_ml": round(volume, 4),
            "centroid_vox": [round(float(v), 2) for v in centre],
            "centroid_mm": [round(float(v), 2) for v in world],
        }
        if uncertainty is not None:
            lesion["mean_entropy"] = round(float(uncertainty[c]), 4)
            lesion["uncertain"] = bool(uncertainty[c] > UNCERTAIN_ENTROPY)
        else:
            lesion["uncertain"] = bool(volume < SMALL_LESION_ML)
        lesions.append(lesion)
    return tuple(lesions), source


def lesions(entry: StudyEntry, fg_prob: Path | None) -> tuple[list[dict], str]:
    """(lesion list, uncertainty source) of a study's pre-segmentation (see module docstring)."""
    fg_mtime = fg_prob.stat().st_mtime_ns if fg_prob else None
    found, source = _lesions_cached(
        str(entry.presegmentation),
        entry.presegmentation.stat().st_mtime_ns,
        str(fg_prob) if fg_prob else None,
        fg_mtime,
    )
    return [dict(lesion) for lesion in found], source
