"""One round's evaluation on the fixed validation studies, on each study's native T1c grid.

``evaluate_round`` reads each labelled study's reference label and the round's prediction of it,
computes the per-study metrics and the reference/predicted lesion tables (``metsflow.evaluation.metrics``,
on arrays), the nDSC with the validation cohort's positive rate, the round summary, the
size-binned detection table and the FROC. It writes nothing: ``metsflow.jobs.evaluate`` writes
the tables where ``metsflow.core.layout`` says.

The FROC ranks each predicted lesion by its stage-1 foreground probability (``fg_prob``, maximum
inside the lesion, resampled onto the native grid): the predictions a reader would see with a
stricter threshold on the same model. A study without that file still counts (no score map).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from metsflow.cohort.sheet import Study
from metsflow.core.io import voxel_spacing
from metsflow.core.labels import to_internal
from metsflow.core.settings import EvaluateSettings
from metsflow.evaluation.metrics import (
    HEADLINE_GROUP,
    add_normalised_dice,
    detection_summary,
    evaluate_pair,
    flatten,
    lesion_tables,
    summarise_round,
)


@dataclass(frozen=True)
class StudyEvaluation:
    """``flatten`` rows of one study's metrics and its reference / predicted lesion tables."""

    rows: list[dict]
    lesions: pd.DataFrame
    pred_lesions: pd.DataFrame


@dataclass(frozen=True)
class RoundEvaluation:
    """A round's summary (``summary.json`` fields) and its tables by name
    (``metsflow.core.layout.Layout.evaluation_table`` names)."""

    summary: dict
    per_study: pd.DataFrame
    lesions: pd.DataFrame
    detection_by_size: pd.DataFrame
    froc: pd.DataFrame

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "per_study": self.per_study,
            "lesions": self.lesions,
            "detection_by_size": self.detection_by_size,
            "froc": self.froc,
        }


def evaluate_study(
    study: Study, prediction: Path, fg_prob: Path | None, settings: EvaluateSettings
) -> StudyEvaluation:
    """``study``'s prediction (internal labels, native T1c grid) against its reference label;
    ``fg_prob`` (any grid, resampled nearest-neighbour) scores the predicted lesions."""
    pred_img = nib.load(str(prediction))
    ref_img = nib.load(str(study.label))
    pred = np.asarray(pred_img.dataobj).astype(np.uint8)
    ref = to_internal(np.asarray(ref_img.dataobj), study.label_convention)
    spacing = tuple(float(z) for z in voxel_spacing(ref_img))
    iou, size_bins = settings.iou_threshold, settings.size_bins_mm
    result = evaluate_pair(pred, ref, spacing, iou_threshold=iou, size_bins_mm=size_bins)
    score_map = None
    if fg_prob is not None and Path(fg_prob).is_file():
        from metsflow.imaging.grid import resample_nearest

        prob_img = nib.load(str(fg_prob))
        score_map = resample_nearest(
            np.asarray(prob_img.dataobj, dtype=np.float32),
            prob_img.affine,
            pred_img.affine,
            pred.shape,
        )
    ref_lesions, pred_lesions = lesion_tables(
        pred,
        ref,
        spacing,
        groups=[HEADLINE_GROUP],
        iou_threshold=iou,
        study_id=study.study_id,
        size_bins_mm=size_bins,
        score_map=score_map,
    )
    return StudyEvaluation(flatten(study.study_id, result), ref_lesions, pred_lesions)


def evaluate_round(
    round_index: int,
    studies: Iterable[Study],
    predicted: set[str],
    prediction_of: Callable[[str], Path],
    fg_prob_of: Callable[[str], Path | None],
    settings: EvaluateSettings,
) -> RoundEvaluation:
    """Round ``round_index``'s predictions of the labelled ``studies``; a labelled study not in
    ``predicted`` (its inference failed) is listed in the summary's ``skipped``."""
    per_study, lesions, pred_lesions, skipped, patient_of = [], [], [], [], {}
    for study in studies:
        if study.label is None:
            continue
        if study.study_id not in predicted:
            skipped.append(study.study_id)
            continue
        result = evaluate_study(
            study, prediction_of(study.study_id), fg_prob_of(study.study_id), settings
        )
        per_study.extend(result.rows)
        lesions.append(result.lesions)
        pred_lesions.append(result.pred_lesions)
        patient_of[study.study_id] = study.patient_id
    per_study_df = pd.DataFrame(per_study)
    if not per_study_df.empty:
        # nDSC uses the positive rate averaged over the validation cohort (Raina et al. 2023).
        per_study_df = add_normalised_dice(per_study_df)
        per_study_df.insert(0, "round", round_index)
    lesions = [f for f in lesions if not f.empty]
    pred_lesions = [f for f in pred_lesions if not f.empty]
    lesions_df = pd.concat(lesions, ignore_index=True) if lesions else pd.DataFrame()
    summary = summarise_round(round_index, per_study_df, skipped)
    detection = detection_summary(
        round_index,
        lesions_df,
        pd.concat(pred_lesions, ignore_index=True) if pred_lesions else pd.DataFrame(),
        patient_of,
        settings.size_bins_mm,
    )
    summary.update(detection["summary"])
    return RoundEvaluation(
        summary, per_study_df, lesions_df, detection["by_size"], detection["froc"]
    )
