"""Evaluate one round's predictions on the fixed validation studies (native T1c grid)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from metsflow.cohort import Study
from metsflow.io import read_json, voxel_spacing, write_json, write_table
from metsflow.jobs.manifest import read_manifests
from metsflow.labels import to_internal
from metsflow.layout import FG_PROB, Layout
from metsflow.settings import EvaluateSettings

log = logging.getLogger(__name__)


def run_evaluate_round(
    layout: Layout,
    settings: EvaluateSettings,
    round_index: int,
    studies: list[dict],
    prediction_manifests: list[str],
) -> dict:
    """Per-study metrics, reference lesions, the round summary, the size-binned detection table
    and the FROC of round ``round_index``'s predictions of ``studies`` (validation records),
    written to ``layout.evaluation_table`` / ``evaluation_summary`` (rule evaluate_round's
    outputs, built by the same methods).

    The FROC ranks each predicted lesion by its stage-1 foreground probability (``fg_prob``,
    maximum inside the lesion, resampled onto the native grid): the predictions a reader would
    see with a stricter threshold on the same model."""
    from metsflow.metrics import (
        HEADLINE_GROUP,
        add_normalised_dice,
        detection_summary,
        evaluate_pair,
        flatten,
        lesion_tables,
        summarise_round,
    )
    from metsflow.preprocess import resample_nearest

    size_bins, iou = settings.size_bins_mm, settings.iou_threshold
    predicted = read_manifests(prediction_manifests)
    ok = set(predicted.loc[predicted.status == "ok", "study_id"])
    per_study, lesions, pred_lesions, skipped, patient_of = [], [], [], [], {}
    for entry in studies:
        study = Study.from_record(entry["study"])
        if study.label is None:
            continue
        if study.study_id not in ok:
            skipped.append(study.study_id)
            continue
        pred_img = nib.load(str(layout.study_prediction(round_index, study.study_id)))
        ref_img = nib.load(str(study.label))
        pred = np.asarray(pred_img.dataobj).astype(np.uint8)
        ref = to_internal(np.asarray(ref_img.dataobj), study.label_convention)
        spacing = tuple(float(z) for z in voxel_spacing(ref_img))
        result = evaluate_pair(pred, ref, spacing, iou_threshold=iou, size_bins_mm=size_bins)
        per_study.extend(flatten(study.study_id, result))
        prob_path = layout.prediction_dir(round_index, study.study_id) / FG_PROB
        score_map = None
        if prob_path.is_file():
            prob_img = nib.load(str(prob_path))
            score_map = resample_nearest(
                np.asarray(prob_img.dataobj, dtype=np.float32),
                prob_img.affine,
                pred_img.affine,
                pred.shape,
            )
        ref_lesions, study_pred_lesions = lesion_tables(
            pred,
            ref,
            spacing,
            groups=[HEADLINE_GROUP],
            iou_threshold=iou,
            study_id=study.study_id,
            size_bins_mm=size_bins,
            score_map=score_map,
        )
        lesions.append(ref_lesions)
        pred_lesions.append(study_pred_lesions)
        patient_of[study.study_id] = study.patient_id
    per_study_df = pd.DataFrame(per_study)
    if not per_study_df.empty:
        # nDSC uses the positive rate averaged over the validation cohort (Raina et al. 2023).
        per_study_df = add_normalised_dice(per_study_df)
        per_study_df.insert(0, "round", round_index)
    write_table(layout.evaluation_table(round_index, "per_study"), per_study_df)
    lesions = [f for f in lesions if not f.empty]
    pred_lesions = [f for f in pred_lesions if not f.empty]
    lesions_df = pd.concat(lesions, ignore_index=True) if lesions else pd.DataFrame()
    write_table(layout.evaluation_table(round_index, "lesions"), lesions_df)
    summary = summarise_round(round_index, per_study_df, skipped)
    detection = detection_summary(
        round_index,
        lesions_df,
        pd.concat(pred_lesions, ignore_index=True) if pred_lesions else pd.DataFrame(),
        patient_of,
        size_bins,
    )
    summary.update(detection["summary"])
    write_table(layout.evaluation_table(round_index, "detection_by_size"), detection["by_size"])
    write_table(layout.evaluation_table(round_index, "froc"), detection["froc"])
    train_summary = Path(layout.train_summary(round_index))
    if train_summary.exists():
        summary["n_train"] = read_json(train_summary).get("n_train")
    write_json(layout.evaluation_summary(round_index), summary)
    log.info("round %d: %s", round_index, summary)
    return summary


def run_compare_rounds(
    settings: EvaluateSettings,
    per_study_new: str,
    per_study_old: str,
    round_new: int,
    round_old: int,
    out_table: str,
) -> pd.DataFrame:
    """Round ``round_new`` (a) against ``round_old`` (b) on the validation studies."""
    new = pd.read_csv(per_study_new, sep="\t", dtype={"study_id": str})
    old = pd.read_csv(per_study_old, sep="\t", dtype={"study_id": str})
    from metsflow.stats import COMPARE_GROUPS, COMPARE_METRICS, compare_per_study

    table = compare_per_study(
        new,
        old,
        metrics=settings.compare_metrics or COMPARE_METRICS,
        groups=settings.compare_groups or COMPARE_GROUPS,
    )
    table.insert(0, "round_b", round_old)
    table.insert(0, "round_a", round_new)
    write_table(out_table, table)
    log.info("round %d vs %d:\n%s", round_new, round_old, table.to_string(index=False))
    return table
