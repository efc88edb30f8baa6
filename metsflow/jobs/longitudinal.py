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

from metsflow.cohort.plan import read_plan
from metsflow.core.io import write_table
from metsflow.core.layout import LABEL, PRED, Layout
from metsflow.evaluation.longitudinal import (
    ResponseThresholds,
    first_registered_series,
    response_table,
    track_chains,
)
from metsflow.imaging.register import lesion_id_warp
from metsflow.jobs.manifest import ok_studies, read_manifests, registration_references

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
    plan = read_plan(job.plan)
    predicted_ok = ok_studies(read_manifests(job.prediction_manifests))
    reference_of = registration_references(read_manifests(job.registration_manifests))
    prep, reg = layout.stage_root("preprocessed"), layout.stage_root("registered")
    paths = _segmentation_paths(plan, predicted_ok, layout, job.round_index)
    order = dict(zip(plan.study_id, plan.order, strict=True))

    lesion_frames, response_frames = [], []
    with tempfile.TemporaryDirectory(prefix="metsflow_longitudinal_") as scratch:
        for source in SOURCES:
            available = paths[source]
            series = []
            for patient_id, rows in plan.groupby("patient_id", sort=True):
                ordered = list(rows.sort_values("order")["study_id"])
                chain = first_registered_series(ordered, available, reference_of)
                if chain:
                    series.append((patient_id, patient_id, chain))

            def load(study_id: str, available=available):
                img = nib.load(str(available[study_id]))
                return np.asarray(img.dataobj), img.affine, img.header.get_zooms()[:3]

            lesions, points = track_chains(
                series,
                load,
                order,
                lambda affines: lesion_id_warp(prep, reg, affines, Path(scratch)),
                thresholds,
            )
            lesion_frames.append(lesions.assign(source=source))
            if len(points):
                response_frames.append(
                    response_table(lesions, points, thresholds).assign(source=source)
                )
            log.info("%s: %d time points tracked", source, len(points))
    lesions = _with_source_first(lesion_frames)
    response = _with_source_first(response_frames)
    write_table(job.lesions, lesions)
    write_table(job.response, response)
    return lesions, response


def _with_source_first(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["source", "patient_id", "study_id", "order"])
    table = pd.concat(frames, ignore_index=True)
    return table[["source", *[c for c in table.columns if c != "source"]]]
