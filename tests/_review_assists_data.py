"""A review batch with assists, as the pipeline leaves it: preprocessed folders (geometry.json),
predictions with the stage-2-dropped candidates and fg_prob, and a follow-up registered to its
baseline (identity ANTs transforms, so propagation is exact and checkable), exported through
``export_batch`` with ``assists_for``. Shared by tests/test_review_assists*.py."""

from __future__ import annotations

from pathlib import Path

import ants
import cc3d
import nibabel as nib
import numpy as np
from scipy import ndimage

from metsflow.active_learning.assists import PreviousScan, StudyAssistInputs
from metsflow.active_learning.review import export_batch
from metsflow.core import io, labels
from metsflow.core.layout import FG_PROB, SUGGESTIONS, SUGGESTIONS_TABLE, T1C
from metsflow.imaging.brainmask import nifti_to_ants

BASELINE, FOLLOW_UP, PATIENT = "S01", "S02", "P01"


def _identity_registration(reg_dir: Path, grid: nib.Nifti1Image) -> None:
    """affine.mat (identity) and zero displacement fields: what register_followup would write
    for two studies already aligned."""
    reg_dir.mkdir(parents=True, exist_ok=True)
    ants.write_transform(
        ants.create_ants_transform(transform_type="AffineTransform", dimension=3),
        str(reg_dir / "affine.mat"),
    )
    reference = nifti_to_ants(grid)
    zeros = np.zeros((*grid.shape[:3], 3), dtype=np.float32)
    field = ants.from_numpy(
        zeros,
        origin=reference.origin,
        spacing=reference.spacing,
        direction=reference.direction,
        has_components=True,
    )
    for name in ("warp.nii.gz", "inverse_warp.nii.gz"):
        ants.image_write(field, str(reg_dir / name))


def sphere(shape, centre, radius) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def write_assisted_batch(
    root: Path, t1c: np.ndarray, flair: np.ndarray, affine: np.ndarray, preseg: np.ndarray
) -> dict:
    """Export a round-1 batch of one patient (baseline + follow-up, same images) with assists.

    Follow-up: the pre-segmentation ``preseg``; two dropped candidates (a 3-voxel-radius ball,
    stage-2 0.41, and a 1.5-voxel-radius one, 0.12); the previous label = ``preseg`` with its
    smallest lesion removed and one extra lesion (gone now). Returns the paths and the
    suggestion masks."""
    shape = preseg.shape
    native = root / "native"
    results = root / "results"
    images, presegs, assists = {}, {}, {}
    geometry = {
        "native": {"affine": affine.tolist(), "shape": list(shape)},
        "final": {"affine": affine.tolist(), "shape": list(shape)},
    }
    # Candidates and the gone lesion inside the head, well apart from the lesions and from
    # each other: greedy picks of voxels far from everything placed so far.
    taken = preseg > 0
    masks = []
    smooth = ndimage.gaussian_filter(t1c, 1.5)
    inside = ndimage.binary_erosion(smooth > 0.5 * smooth.max(), iterations=3)
    for radius in (2.5, 1.5, 2.0):
        room = ndimage.distance_transform_edt(~taken) * inside
        centre = np.unravel_index(int(np.argmax(room)), shape)
        masks.append(sphere(shape, centre, radius) & ~taken)
        taken = taken | masks[-1]
    suggestion_a, suggestion_b, gone = masks
    previous_label = preseg.copy()
    # The smallest lesion is new at the follow-up.
    comps, n = cc3d.connected_components(preseg > 0, connectivity=26, return_N=True)
    sizes = np.bincount(comps.ravel())[1:]
    previous_label[comps == int(np.argmin(sizes)) + 1] = 0
    previous_label[gone] = labels.ENHANCING
    for study_id in (BASELINE, FOLLOW_UP):
        folder = native / study_id
        images[study_id] = {"t1c": folder / "t1c.nii.gz", "flair": folder / "flair.nii.gz"}
        io.save_nifti(folder / "t1c.nii.gz", t1c, affine, dtype=np.float32)
        io.save_nifti(folder / "flair.nii.gz", flair, affine, dtype=np.float32)
        presegs[study_id] = folder / "pred_native.nii.gz"
        io.save_nifti(presegs[study_id], preseg, affine, dtype=np.uint8)
        prep = root / "preprocessed" / study_id
        prep.mkdir(parents=True)
        io.write_json(prep / "geometry.json", geometry)
        io.save_nifti(prep / T1C, t1c, affine, dtype=np.float32)
        pred_dir = root / "predictions" / study_id
        ids = np.zeros(shape, np.uint8)
        ids[suggestion_a], ids[suggestion_b] = 1, 2
        io.save_nifti(pred_dir / SUGGESTIONS, ids, affine, dtype=np.uint8)
        io.write_json(
            pred_dir / SUGGESTIONS_TABLE,
            [
                {"id": 1, "stage1_score": 0.81, "stage2_score": 0.41, "voxels": 0},
                {"id": 2, "stage1_score": 0.55, "stage2_score": 0.12, "voxels": 0},
            ],
        )
        prob = np.where(preseg > 0, 0.9, 0.0).astype(np.float32)
        prob[suggestion_a], prob[suggestion_b] = 0.6, 0.4
        io.save_nifti(pred_dir / FG_PROB, prob, affine, dtype=np.float32)
        assists[study_id] = StudyAssistInputs(prep_dir=prep, prediction_dir=pred_dir)
    previous_path = native / BASELINE / "confirmed_label.nii.gz"
    io.save_nifti(previous_path, previous_label, affine, dtype=np.uint8)
    reg_dir = root / "registered" / FOLLOW_UP
    _identity_registration(reg_dir, nib.Nifti1Image(t1c, affine))
    assists[FOLLOW_UP] = StudyAssistInputs(
        prep_dir=assists[FOLLOW_UP].prep_dir,
        prediction_dir=assists[FOLLOW_UP].prediction_dir,
        previous=PreviousScan(
            study_id=BASELINE,
            label=previous_path,
            label_source="confirmed",
            prep_dir=root / "preprocessed" / BASELINE,
            reg_dir=reg_dir,
        ),
    )
    studies = [BASELINE, FOLLOW_UP]
    exported = export_batch(
        studies,
        images,
        presegs,
        results / "rounds" / "round_1" / "review",
        1,
        "round_0/model",
        patient_for=dict.fromkeys(studies, PATIENT),
        assists_for=assists,
    )
    assert list(exported["result"]) == ["exported"] * 2, exported.to_dict("records")
    return {
        "results": results,
        "review_dir": results / "rounds" / "round_1" / "review",
        "suggestion_a": suggestion_a,
        "suggestion_b": suggestion_b,
        "previous_label": previous_label,
        "gone": gone,
    }
