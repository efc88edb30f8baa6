"""Simulated annotator: answers an active-learning batch from phantom ground truth.

Stands in for the trainee + neuroradiologist so that a full active-learning loop can run
unattended (tests, the demo, strategy comparisons). It goes through exactly the same
``LabelStore.import_label`` calls as real reviewers, so the no-overwrite rules hold: the
trainee's label is imported as ``refined`` by ``sim-trainee`` and then ``confirmed`` unchanged
by ``sim-neuroradiologist``; a study that is already confirmed is skipped, never replaced.

Optional noise (``AnnotatorNoise``) models what real labels look like: a one-voxel boundary
disagreement on some lesions and small lesions that the annotator missed. The confirmed
label keeps that noise (it is what training will see).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from metsflow.active_learning.labelstore import LabelImportError, LabelStore
from metsflow.active_learning.review import Provider, provide
from metsflow.core import io, labels

TRAINEE = "sim-trainee"
VIA = "simulated"  # history field: how the label arrived (files | web | simulated)
NEURORADIOLOGIST = "sim-neuroradiologist"
RESULT_COLUMNS = [
    "study_id",
    "result",  # confirmed | skipped | missing | rejected
    "refined_version",
    "confirmed_version",
    "changed_voxels",
    "lesions_dropped",
    "problem",
]


@dataclass(frozen=True)
class AnnotatorNoise:
    """How an imperfect annotator deviates from the ground truth (all off by default).

    boundary_prob: probability, per lesion, of a one-voxel boundary change.
    erode_fraction: share of those boundary changes that shrink (the rest grow) the lesion.
    drop_prob: probability that a lesion smaller than ``small_lesion_mm3`` is missed.
    small_lesion_mm3: the size under which a lesion can be missed (whole lesion incl. edema).
    """

    boundary_prob: float = 0.0
    erode_fraction: float = 0.5
    drop_prob: float = 0.0
    small_lesion_mm3: float = 50.0

    def __post_init__(self) -> None:
        for name in ("boundary_prob", "erode_fraction", "drop_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AnnotatorNoise.{name} must be in [0, 1], got {value}")
        if self.small_lesion_mm3 < 0:
            raise ValueError("AnnotatorNoise.small_lesion_mm3 must be >= 0")

    @classmethod
    def from_config(cls, config: AnnotatorNoise | Mapping | None) -> AnnotatorNoise | None:
        if config is None or isinstance(config, AnnotatorNoise):
            return config
        unknown = set(config) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown annotator noise settings: {sorted(unknown)}")
        return cls(**config)


def apply_noise(
    label_map: np.ndarray,
    spacing_mm: Iterable[float],
    noise: AnnotatorNoise,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict]:
    """Return a noisy copy of an internal label map and ``{changed_voxels, lesions_dropped}``.

    A lesion is a 26-connected component of all tumour labels (enhancing, edema, necrosis),
    i.e. what a reviewer sees as one metastasis. Boundary changes are one voxel (in voxel,
    not mm, units: annotators edit voxels); grown voxels take the label of the nearest voxel
    of the same lesion and only grow into background.
    """
    original = np.asarray(label_map, dtype=np.uint8)
    noisy = original.copy()
    voxel_mm3 = float(np.prod(np.asarray(list(spacing_mm), dtype=float)))
    components, count = labels.lesion_components(original)
    dropped = 0
    for component_id, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        # One voxel of margin so dilation and erosion see the lesion's surroundings.
        box = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, n))
            for s, n in zip(box, original.shape, strict=True)
        )
        mask = components[box] == component_id
        volume = float(mask.sum()) * voxel_mm3
        # Draw every random number for every lesion so one setting does not shift the others.
        drop_draw, boundary_draw, erode_draw = rng.random(3)
        crop = noisy[box]
        if volume < noise.small_lesion_mm3 and drop_draw < noise.drop_prob:
            crop[mask] = labels.BACKGROUND
            dropped += 1
        elif boundary_draw < noise.boundary_prob:
            if erode_draw < noise.erode_fraction:
                shell = mask & ~ndimage.binary_erosion(mask)
                # Never erode a lesion away entirely: that is the "dropped" case above.
                if shell.sum() < mask.sum():
                    crop[shell] = labels.BACKGROUND
            else:
                ring = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3))) & (crop == 0)
                _, nearest = ndimage.distance_transform_edt(~mask, return_indices=True)
                crop[ring] = crop[tuple(axis[ring] for axis in nearest)]
    stats = {
        "changed_voxels": int(np.count_nonzero(noisy != original)),
        "lesions_dropped": dropped,
        "lesions": int(count),
    }
    return noisy, stats


def _study_rng(seed: int, round_index: int, study_id: str) -> np.random.Generator:
    """Per-study generator: a study's noise does not depend on the batch it came in."""
    study_key = int.from_bytes(hashlib.sha256(study_id.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), int(round_index), study_key])


def simulate_batch(
    study_ids: Iterable[str],
    oracle: Mapping[str, str | os.PathLike],
    store: LabelStore,
    round_index: int,
    reference_for: Provider,
    noise: AnnotatorNoise | Mapping | None = None,
    seed: int = 0,
    convention: str = "internal",
    source: str | None = None,
    conventions: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Label ``study_ids`` from ``oracle`` (study -> ground-truth label path) into ``store``.

    ``reference_for`` (mapping/callable) gives each study's native T1c for the grid check;
    ``convention`` is the oracle files' label convention, ``conventions`` (study -> convention)
    overrides it per study (the oracle sheet's column); ``source`` is recorded as what
    pre-segmented the label (default ``round_<r>``). Returns one row per study
    (``RESULT_COLUMNS``): ``confirmed``, ``skipped`` (already confirmed: left untouched),
    ``missing`` (no ground truth) or ``rejected`` (the store refused it; problem given).
    """
    noise = AnnotatorNoise.from_config(noise)
    labels.check_convention(convention)
    conventions = dict(conventions or {})
    for value in set(conventions.values()):
        labels.check_convention(value)
    source = source or f"round_{int(round_index)}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="metsflow-simannot-") as staging:
        for study_id in (str(s) for s in study_ids):
            row = dict.fromkeys(RESULT_COLUMNS)
            row.update(study_id=study_id, problem="", changed_voxels=0, lesions_dropped=0)
            if store.status(study_id) == "confirmed":
                rows.append({**row, "result": "skipped", "problem": "already confirmed"})
                continue
            if study_id not in oracle or oracle[study_id] is None:
                rows.append({**row, "result": "missing", "problem": "no ground truth label"})
                continue
            try:
                truth = io.load_nifti(oracle[study_id], study_id, "ground-truth label")
                answer = labels.to_internal(
                    np.asanyarray(truth.dataobj), conventions.get(study_id, convention)
                )
                if noise is not None:
                    spacing = io.voxel_spacing(truth)
                    rng = _study_rng(seed, round_index, study_id)
                    answer, stats = apply_noise(answer, spacing, noise, rng)
                    row["changed_voxels"] = stats["changed_voxels"]
                    row["lesions_dropped"] = stats["lesions_dropped"]
                answer_path = Path(staging) / f"{study_id}.nii.gz"
                io.save_nifti(answer_path, answer, truth.affine, dtype=np.uint8)
                reference = provide(reference_for, study_id)
                if reference is None:
                    raise LabelImportError(study_id, "no reference (native T1c) image given")
                note = "simulated annotator" + (f" with noise {noise}" if noise else "")
                row["refined_version"] = store.import_label(
                    study_id,
                    answer_path,
                    "refined",
                    TRAINEE,
                    reference,
                    source=source,
                    note=note,
                    provenance={"via": VIA},
                )
                row["confirmed_version"] = store.import_label(
                    study_id,
                    answer_path,
                    "confirmed",
                    NEURORADIOLOGIST,
                    reference,
                    source=source,
                    note="confirmed the simulated trainee's label unchanged",
                    provenance={"via": VIA},
                )
            except (LabelImportError, io.StudyError) as exc:
                rows.append({**row, "result": "rejected", "problem": exc.problem})
                continue
            except ValueError as exc:  # label values outside the named convention
                rows.append({**row, "result": "rejected", "problem": str(exc)})
                continue
            rows.append({**row, "result": "confirmed"})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
