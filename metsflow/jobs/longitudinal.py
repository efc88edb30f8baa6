"""Track enhancing lesions across each patient's time points and classify volumetric response.

Works on the preprocessed grid, where registration and label propagation live: follow-up ``t``
was registered to its reference study (``reference_study`` in the registration manifest), and
the reference's lesion-id map is warped with ``metsflow.imaging.register.propagate_label``, the same
transforms that make the priors. Volumes are therefore in mm^3 of the preprocessed grid
(resampled to ``preprocess.spacing``; partial-volume differences to the native grid are small
against the response thresholds).

Two segmentation sources are tracked separately: ``prediction`` (the given round's
``pred.nii.gz``, every predicted validation and pool study) and ``reference`` (the preprocessed
sheet label, where a study has one), so predicted and reference responses can be compared.
A patient's series in a source is its time points with a segmentation in that source, each
registered to the one before; where that chain breaks (a missing segmentation or a failed
registration) the series stops and the log says why.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from metsflow.core.io import write_table
from metsflow.core.layout import LABEL, PRED, Layout
from metsflow.evaluation.longitudinal import (
    ResponseThresholds,
    TimePoint,
    first_registered_series,
    response_table,
    track_patient,
)
from metsflow.imaging.register import lesion_id_warp
from metsflow.jobs.manifest import read_manifests

log = logging.getLogger(__name__)

SOURCES = ("prediction", "reference")


def _segmentation_paths(
    plan: pd.DataFrame, predicted_ok: set[str], layout: Layout, round_index: int
) -> dict[str, dict[str, Path]]:
    paths: dict[str, dict[str, Path]] = {source: {} for source in SOURCES}
    for study_id in plan["study_id"]:
        if study_id in predicted_ok:
            paths["prediction"][study_id] = layout.prediction_dir(round_index, study_id) / PRED
        label = layout.preprocessed_dir(study_id) / LABEL
        if label.exists():
            paths["reference"][study_id] = label
    return paths


@dataclass(frozen=True)
class LongitudinalInputs:
    """What one longitudinal_response job reads and writes (rule longitudinal_response)."""

    round_index: int
    plan: str
    prediction_manifests: list[str]
    registration_manifests: list[str]
    lesions: str
    response: str

    @classmethod
    def from_snakemake(cls, smk) -> LongitudinalInputs:
        return cls(
            round_index=int(smk.wildcards.round),
            plan=smk.input.plan,
            prediction_manifests=list(smk.input.predictions),
            registration_manifests=list(smk.input.registered),
            lesions=smk.output.lesions,
            response=smk.output.response,
        )


def run_longitudinal(
    layout: Layout, thresholds: ResponseThresholds, job: LongitudinalInputs
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Round ``job.round_index``'s predictions and the sheet labels, tracked per patient."""
    plan = pd.read_csv(job.plan, sep="\t", dtype={"study_id": str, "patient_id": str})
    predicted = read_manifests(job.prediction_manifests)
    predicted_ok = set(predicted.loc[predicted.status == "ok", "study_id"])
    registered = read_manifests(job.registration_manifests)
    registered = registered[registered.status == "ok"]
    reference_of = dict(
        zip(registered.study_id, registered.reference_study.astype(str), strict=True)
    )
    prep, reg = layout.stage_root("preprocessed"), layout.stage_root("registered")
    paths = _segmentation_paths(plan, predicted_ok, layout, job.round_index)

    lesion_frames, response_frames = [], []
    with tempfile.TemporaryDirectory(prefix="metsflow_longitudinal_") as scratch:
        for source in SOURCES:
            available = paths[source]
            tracked_points = []
            for patient_id, rows in plan.groupby("patient_id", sort=True):
                chain = first_registered_series(
                    list(rows.sort_values("order")["study_id"]), available, reference_of
                )
                if not chain:
                    continue
                order = dict(zip(rows.study_id, rows.order.astype(int), strict=True))
                points, affines, spacings = [], {}, []
                for study_id in chain:
                    img = nib.load(str(available[study_id]))
                    zooms = [float(z) for z in img.header.get_zooms()[:3]]
                    affines[study_id] = img.affine
                    spacings += zooms
                    points.append(
                        TimePoint.from_labels(
                            study_id, order[study_id], np.asarray(img.dataobj), zooms
                        )
                    )
                tracked = track_patient(
                    patient_id,
                    points,
                    lesion_id_warp(prep, reg, affines, Path(scratch)),
                    thresholds.min_overlap_voxels,
                    thresholds.margin_voxels(spacings),
                )
                lesion_frames.append(tracked.assign(source=source))
                tracked_points += [
                    {"patient_id": patient_id, "study_id": p.study_id, "order": p.order}
                    for p in points
                ]
            if tracked_points:
                source_lesions = _concat(
                    [f for f in lesion_frames if (f.source == source).all()],
                    like=lesion_frames[0],
                )
                response_frames.append(
                    response_table(source_lesions, pd.DataFrame(tracked_points), thresholds).assign(
                        source=source
                    )
                )
            log.info("%s: %d time points tracked", source, len(tracked_points))
    lesions = _with_source_first(lesion_frames)
    response = _with_source_first(response_frames)
    write_table(job.lesions, lesions)
    write_table(job.response, response)
    return lesions, response


def _concat(frames: list[pd.DataFrame], like: pd.DataFrame) -> pd.DataFrame:
    """Concatenate the non-empty frames (pandas warns about empty ones); ``like``'s columns."""
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else like.iloc[:0]


def _with_source_first(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["source", "patient_id", "study_id", "order"])
    table = pd.concat(frames, ignore_index=True)
    return table[["source", *[c for c in table.columns if c != "source"]]]
