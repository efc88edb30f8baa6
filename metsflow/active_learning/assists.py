"""Review assists: what a review package carries beyond the pre-segmentation, per study.

Written by ``write_assists`` into the study's folder of a review package, all on the study's
native T1c grid (the grid the reviewer edits), names owned by ``metsflow.core.layout``:

- ``suggestions.nii.gz`` (uint8 ids 1..n, cropped, see below) and, in ``assists.json``, one row
  per id: the stage-1 candidates that the cascade's stage 2 dropped
  (``metsflow.models.cascade.dropped_candidates``, written next to the prediction at inference),
  with their stage-1 score (peak foreground probability), stage-2 score, native voxel count,
  volume, equivalent diameter, size bin and centroid. The editor lists them as "Possible
  lesions", highest stage-2 score first.
- ``fg_prob_u8.nii.gz``: the model's foreground probability quantised to uint8 (p * 255, values
  below ``PROB_FLOOR`` set to 0: the editor needs it only around lesions, to grow or shrink one
  along its probability map).
- Both are cropped to the box of their non-zero voxels (``save_cropped``): the file's affine is
  the T1c's moved to the box's corner, so every viewer places it, and the editor reads the
  voxel offset from it (``review_server.assists``). A 1 mm map is then a box around the
  lesions instead of 8.9 M voxels that the browser inflates and reorders.
- for a follow-up, ``previous_label.nii.gz`` and ``previous_t1c.nii.gz``: the previous time
  point's label (confirmed in the label store, else its newest refined version, else the
  model's prediction; ``assists.json`` says which) and its T1c, warped onto this study with the
  registration the pipeline already computed (``metsflow.imaging.register``: previous native ->
  previous preprocessed grid -> follow-up preprocessed grid -> follow-up native grid), and in
  ``assists.json`` under ``matching`` each lesion of the pre-segmentation marked *new* or
  *persisting* against it and the previous lesions that are *gone* (``previous_matching``).
  Matched here once rather than by the review server on the editor's request: at 1 mm the
  matching (components and a dilation of the whole volume) took the server 1-6 s.

A missing input (no stage 2, no registration) only leaves that assist out; a failing one is
recorded under ``problems`` in ``assists.json`` and the study is still exported: assists never
cost a reviewer the study.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from metsflow.core import io
from metsflow.core.layout import (
    ASSISTS_NAME,
    FG_PROB,
    PRESEGMENTATION_NAME,
    PREVIOUS_LABEL_NAME,
    PREVIOUS_T1C_NAME,
    REVIEW_PROB_NAME,
    REVIEW_SUGGESTIONS_NAME,
    SUGGESTIONS,
    SUGGESTIONS_TABLE,
    T1C,
)
from metsflow.evaluation.metrics import (
    DEFAULT_SIZE_BINS_MM,
    equivalent_diameter_mm,
    size_bin_index,
    size_bin_names,
)

log = logging.getLogger(__name__)

# Probabilities below 5/255 (~0.02) are stored as 0: a grow-shrink threshold that low would
# flood the brain anyway, and the zeros make a 1 mm map gzip to a few hundred KB instead of MB.
PROB_FLOOR = 5
# How the previous label was chosen, most trusted first.
PREVIOUS_SOURCES = ("confirmed", "refined", "model")


@dataclass(frozen=True)
class PreviousScan:
    """The previous time point of a follow-up, and how to bring it here."""

    study_id: str
    label: Path  # on the previous study's native T1c grid
    label_source: str  # one of PREVIOUS_SOURCES
    prep_dir: Path  # the previous study's preprocessed folder
    reg_dir: Path  # this study's registration folder (follow-up <-> previous transforms)


@dataclass(frozen=True)
class StudyAssistInputs:
    """Where one study's assists come from (any part may be missing)."""

    prep_dir: Path | None  # this study's preprocessed folder (geometry.json: model <-> native)
    prediction_dir: Path | None  # SUGGESTIONS, SUGGESTIONS_TABLE, FG_PROB on the model grid
    previous: PreviousScan | None = None


def _geometry(prep_dir: Path) -> dict:
    return io.read_json(prep_dir / "geometry.json")


def _native(values: np.ndarray, prep_dir: Path) -> np.ndarray:
    """Model-grid values -> this study's native grid (nearest; what ``to_native`` does)."""
    from metsflow.imaging.grid import resample_nearest

    geometry = _geometry(prep_dir)
    return resample_nearest(
        values,
        np.asarray(geometry["final"]["affine"], dtype=float),
        np.asarray(geometry["native"]["affine"], dtype=float),
        tuple(geometry["native"]["shape"]),
    )


def suggestion_rows(
    ids: np.ndarray,
    table: list[dict],
    affine: np.ndarray,
    size_bins_mm=DEFAULT_SIZE_BINS_MM,
) -> list[dict]:
    """The suggestion table with sizes and centroids measured on the native map ``ids``; ids
    that vanished in the resampling are left out. Highest stage-2 score first."""
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    counts = np.bincount(ids.ravel(), minlength=len(table) + 1)
    names = size_bin_names(size_bins_mm)
    rows = []
    for row in table:
        sid = int(row["id"])
        if sid >= len(counts) or counts[sid] == 0:
            continue
        voxels = np.argwhere(ids == sid)
        centre = voxels.mean(axis=0)
        volume = float(counts[sid]) * voxel_mm3
        diameter = float(equivalent_diameter_mm(volume))
        rows.append(
            {
                "id": sid,
                "stage1_score": float(row["stage1_score"]),
                "stage2_score": float(row["stage2_score"]),
                "voxels": int(counts[sid]),
                "volume_ml": round(volume / 1000.0, 4),
                "diameter_mm": round(diameter, 2),
                "size_bin": names[int(size_bin_index(diameter, size_bins_mm))],
                "centroid_vox": [round(float(v), 2) for v in centre],
                "centroid_mm": [
                    round(float(v), 2) for v in affine[:3, :3] @ centre + affine[:3, 3]
                ],
            }
        )
    return sorted(rows, key=lambda r: (-r["stage2_score"], r["id"]))


def _suggestions(folder: Path, inputs: StudyAssistInputs, t1c: nib.Nifti1Image) -> list[dict]:
    source = inputs.prediction_dir / SUGGESTIONS
    table_path = inputs.prediction_dir / SUGGESTIONS_TABLE
    if not (source.is_file() and table_path.is_file()):
        return []
    ids = np.asarray(nib.load(str(source)).dataobj).astype(np.uint8)
    native = _native(ids, inputs.prep_dir).astype(np.uint8)
    save_cropped(folder / REVIEW_SUGGESTIONS_NAME, native, t1c.affine)
    return suggestion_rows(native, io.read_json(table_path), t1c.affine)


def save_cropped(path: Path, values: np.ndarray, affine: np.ndarray) -> bool:
    """Save uint8 ``values`` cropped to the box of their non-zero voxels, on ``affine`` moved to
    the box's corner (nibabel's slicer); nothing when every voxel is 0. Returns whether it
    wrote the file."""
    from metsflow.imaging.grid import crop_box

    if not values.any():
        return False
    start, stop = crop_box(values > 0, np.ones(3), 0.0)
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    cropped = nib.Nifti1Image(values, affine).slicer[box]
    io.save_nifti(path, np.asarray(cropped.dataobj), cropped.affine, dtype=np.uint8)
    return True


def quantise_probability(prob: np.ndarray) -> np.ndarray:
    """p in [0, 1] -> uint8 p * 255, below ``PROB_FLOOR`` -> 0."""
    q = np.rint(np.clip(np.asarray(prob, dtype=np.float32), 0, 1) * 255).astype(np.uint8)
    q[q < PROB_FLOOR] = 0
    return q


def _probability(folder: Path, inputs: StudyAssistInputs, t1c: nib.Nifti1Image) -> bool:
    source = inputs.prediction_dir / FG_PROB
    if not source.is_file():
        return False
    quantised = quantise_probability(np.asarray(nib.load(str(source)).dataobj))
    native = _native(quantised, inputs.prep_dir).astype(np.uint8)
    return save_cropped(folder / REVIEW_PROB_NAME, native, t1c.affine)


def _previous(folder: Path, inputs: StudyAssistInputs, t1c: nib.Nifti1Image, scratch: Path) -> dict:
    """Warp the previous label and T1c here; returns the description for ``assists.json``."""
    from metsflow.imaging.grid import resample_nearest
    from metsflow.imaging.register import propagate_label, warp_previous_image

    previous = inputs.previous
    geometry = _geometry(previous.prep_dir)
    label = io.load_nifti(previous.label, previous.study_id, "previous label")
    on_prep = resample_nearest(
        np.asarray(label.dataobj).astype(np.uint8),
        label.affine,
        np.asarray(geometry["final"]["affine"], dtype=float),
        tuple(geometry["final"]["shape"]),
    )
    moving = scratch / "previous_label_prep.nii.gz"
    warped = scratch / "previous_label_warped.nii.gz"
    io.save_nifti(moving, on_prep, geometry["final"]["affine"], dtype=np.uint8)
    propagate_label(moving, previous.reg_dir, inputs.prep_dir, warped)
    native = _native(np.asarray(nib.load(str(warped)).dataobj), inputs.prep_dir)
    io.save_nifti(folder / PREVIOUS_LABEL_NAME, native.astype(np.uint8), t1c.affine, np.uint8)

    image = warp_previous_image(previous.prep_dir / T1C, previous.reg_dir, inputs.prep_dir)
    # Display only: uint8 between the 0.5th and 99.5th percentiles inside the head.
    inside = image[image > 0]
    low, high = np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0)
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
    native_image = _native(np.rint(scaled).astype(np.uint8), inputs.prep_dir)
    io.save_nifti(folder / PREVIOUS_T1C_NAME, native_image.astype(np.uint8), t1c.affine, np.uint8)
    return {"study_id": previous.study_id, "label_source": previous.label_source}


def previous_matching(preseg: nib.spatialimages.SpatialImage, previous: np.ndarray) -> dict:
    """Each lesion of the pre-segmentation (by size rank of its 26-connected components, the
    review catalog's lesion ids, as strings) *new* or *persisting* (with the previous volume and
    the change), and the previous lesions that are *gone* (volume, centroid in mm), by
    ``evaluation.longitudinal.match_previous``: the longitudinal tables' rule."""
    from metsflow.evaluation.longitudinal import ResponseThresholds, match_previous

    current = np.asanyarray(preseg.dataobj) > 0
    zooms = preseg.header.get_zooms()[:3]
    thresholds = ResponseThresholds()
    components, matched, previous_components, gone = match_previous(
        current,
        np.asarray(previous) > 0,
        thresholds.min_overlap_voxels,
        thresholds.margin_voxels(zooms),
    )
    voxel_ml = float(np.prod(zooms)) / 1000.0
    sizes = np.bincount(components.ravel())
    before_sizes = np.bincount(previous_components.ravel())
    count = len(sizes) - 1
    order = sorted(range(count), key=lambda c: (-sizes[c + 1], c))
    status = {}
    for rank, c in enumerate(order, start=1):
        lesion = matched[c + 1]
        volume = float(sizes[c + 1]) * voxel_ml
        if lesion is None:
            status[str(rank)] = {"status": "new"}
        else:
            before_ml = float(before_sizes[lesion]) * voxel_ml
            status[str(rank)] = {
                "status": "persisting",
                "previous_volume_ml": round(before_ml, 4),
                "volume_change_pct": round(100.0 * (volume - before_ml) / before_ml, 1),
            }
    affine = preseg.affine
    gone_rows = []
    for lesion in gone:
        centre = np.argwhere(previous_components == lesion).mean(axis=0)
        gone_rows.append(
            {
                "previous_volume_ml": round(float(before_sizes[lesion]) * voxel_ml, 4),
                "centroid_mm": [
                    round(float(v), 2) for v in affine[:3, :3] @ centre + affine[:3, 3]
                ],
            }
        )
    return {"lesions": status, "gone": gone_rows}


def write_assists(
    folder: str | os.PathLike, study_id: str, t1c: nib.Nifti1Image, inputs: StudyAssistInputs
) -> dict:
    """Write a study's assists into its (staging) package folder and ``assists.json``; returns
    that JSON's content. Never raises for a bad input: the problem is recorded instead."""
    folder = Path(folder)
    info: dict = {"suggestions": [], "probability": False, "previous": None, "problems": []}
    if inputs.prep_dir is not None and inputs.prediction_dir is not None:
        for key, step in (("suggestions", _suggestions), ("probability", _probability)):
            try:
                info[key] = step(folder, inputs, t1c)
            except (io.StudyError, OSError, ValueError, KeyError) as exc:
                info["problems"].append(f"{key}: {getattr(exc, 'problem', exc)}")
                log.warning("study %s: no %s assist: %s", study_id, key, exc)
    if inputs.previous is not None and inputs.prep_dir is not None:
        scratch = folder / ".assists-scratch"
        scratch.mkdir(exist_ok=True)
        try:
            info["previous"] = _previous(folder, inputs, t1c, scratch)
            info["matching"] = previous_matching(
                nib.load(str(folder / PRESEGMENTATION_NAME)),
                np.asanyarray(nib.load(str(folder / PREVIOUS_LABEL_NAME)).dataobj),
            )
        except (io.StudyError, OSError, ValueError, KeyError, RuntimeError) as exc:
            info["problems"].append(f"previous scan: {getattr(exc, 'problem', exc)}")
            log.warning("study %s: no previous-scan assist: %s", study_id, exc)
        finally:
            for path in scratch.iterdir():
                path.unlink()
            scratch.rmdir()
    io.write_json(folder / ASSISTS_NAME, info)
    return info


def size_bin_counts(rows: list[dict], decisions: dict) -> dict[str, dict[str, int]]:
    """Per size bin: suggestions offered, accepted, dismissed (``decisions``: id -> verdict)."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        entry = counts.setdefault(row["size_bin"], {"offered": 0, "accepted": 0, "dismissed": 0})
        entry["offered"] += 1
        verdict = decisions.get(str(row["id"]))
        if verdict in ("accepted", "dismissed"):
            entry[verdict] += 1
    return counts


def previous_label_for(
    store, model_prediction: Path | None, study_id: str
) -> tuple[Path, str] | None:
    """The previous time point's label and its source: confirmed, else the newest refined
    version, else the model's prediction (marked ``model``); None if there is none."""
    if store is not None:
        confirmed = store.confirmed(study_id)
        if confirmed is not None:
            return Path(confirmed), "confirmed"
        latest = store.latest(study_id)
        if latest is not None:
            return Path(latest), "refined"
    if model_prediction is not None and Path(model_prediction).is_file():
        return Path(model_prediction), "model"
    return None


def round_suggestion_decisions(store, selections: dict[int, str | os.PathLike]) -> dict:
    """Round -> ``suggestion_decisions`` of that round's batch (``selections``: round -> its
    selection table); a round whose table is missing or unreadable is left out (``al status``
    reports it)."""
    import pandas as pd

    decisions = {}
    for round_index, path in sorted(selections.items()):
        try:
            studies = pd.read_csv(path, sep="\t", dtype={"study_id": str})["study_id"]
        except (OSError, ValueError, KeyError):
            continue
        found = suggestion_decisions(store, studies)
        if found:
            decisions[int(round_index)] = found
    return decisions


def suggestion_decisions(store, study_ids) -> dict[str, dict[str, int]]:
    """Per size bin, summed over ``study_ids``: suggestions offered, accepted and dismissed, from
    each study's newest saved version that carries assist decisions (its history record)."""
    total: dict[str, dict[str, int]] = {}
    for study_id in study_ids:
        records = [r for r in store.history(str(study_id)) if isinstance(r.get("assists"), dict)]
        if not records:
            continue
        by_bin = records[-1]["assists"].get("suggestions_by_size_bin", {})
        for size_bin, counts in by_bin.items():
            entry = total.setdefault(size_bin, {"offered": 0, "accepted": 0, "dismissed": 0})
            for key in entry:
                entry[key] += int(counts.get(key, 0))
    return total
