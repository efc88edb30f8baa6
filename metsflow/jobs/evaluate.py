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

log = logging.getLogger(__name__)

HEADLINE_GROUP = "whole_lesion"


def run_evaluate_round(
    round_index: int,
    studies: list[dict],
    prediction_manifests: list[str],
    pred_root: str,
    settings: dict,
    train_summary: str | None,
    out_per_study: str,
    out_lesions: str,
    out_summary: str,
    out_detection: str | None = None,
    out_froc: str | None = None,
) -> dict:
    """Per-study metrics, reference lesions, the round summary and, when their paths are given,
    the size-binned detection table and the FROC of the round's predictions.

    The FROC ranks each predicted lesion by its stage-1 foreground probability (``fg_prob``,
    maximum inside the lesion, resampled onto the native grid): the predictions a reader would
    see with a stricter threshold on the same model."""
    from metsflow.metrics import (
        DEFAULT_SIZE_BINS_MM,
        add_normalised_dice,
        evaluate_pair,
        flatten,
        lesion_tables,
    )
    from metsflow.preprocess import resample_nearest

    size_bins = settings.get("size_bins_mm") or DEFAULT_SIZE_BINS_MM
    iou = settings.get("iou_threshold", 0.25)
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
        pred_img = nib.load(str(Path(pred_root) / study.study_id / "pred_native.nii.gz"))
        ref_img = nib.load(str(study.label))
        pred = np.asarray(pred_img.dataobj).astype(np.uint8)
        ref = to_internal(np.asarray(ref_img.dataobj), study.label_convention)
        spacing = tuple(float(z) for z in voxel_spacing(ref_img))
        result = evaluate_pair(pred, ref, spacing, iou_threshold=iou, size_bins_mm=size_bins)
        per_study.extend(flatten(study.study_id, result))
        prob_path = Path(pred_root) / study.study_id / "fg_prob.nii.gz"
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
    write_table(out_per_study, per_study_df)
    lesions = [f for f in lesions if not f.empty]
    pred_lesions = [f for f in pred_lesions if not f.empty]
    lesions_df = pd.concat(lesions, ignore_index=True) if lesions else pd.DataFrame()
    write_table(out_lesions, lesions_df)
    summary = summarise_round(round_index, per_study_df, skipped)
    detection = detection_summary(
        round_index,
        lesions_df,
        pd.concat(pred_lesions, ignore_index=True) if pred_lesions else pd.DataFrame(),
        patient_of,
        size_bins,
    )
    summary.update(detection["summary"])
    if out_detection:
        write_table(out_detection, detection["by_size"])
    if out_froc:
        write_table(out_froc, detection["froc"])
    if train_summary and Path(train_summary).exists():
        summary["n_train"] = read_json(train_summary).get("n_train")
    write_json(out_summary, summary)
    log.info("round %d: %s", round_index, summary)
    return summary


def detection_summary(
    round_index: int,
    lesions: pd.DataFrame,
    pred_lesions: pd.DataFrame,
    patient_of: dict[str, str],
    size_bins,
) -> dict:
    """Size-binned sensitivity (Wilson 95% CI), FP per study / patient and the FROC of a round.

    Returns ``{"by_size": table, "froc": table, "summary": fields for summary.json}``; every
    evaluated study counts in the FP denominators, with or without lesions."""
    from metsflow.metrics import (
        FROC_COLUMNS,
        LESION_COLUMNS,
        PRED_LESION_COLUMNS,
        detection_by_size,
        false_positive_rates,
        froc_from_tables,
    )

    if lesions.empty:
        lesions = pd.DataFrame(columns=LESION_COLUMNS)
    if pred_lesions.empty:
        pred_lesions = pd.DataFrame(columns=PRED_LESION_COLUMNS)
    by_size = detection_by_size(lesions, size_bins)
    false = (pred_lesions["matched_lesion_id"] == 0).groupby(pred_lesions["study_id"]).sum()
    rates = false_positive_rates(false.to_dict(), patient_of) if patient_of else {}
    scored = pred_lesions[pred_lesions["score"].notna()]
    curve = (
        froc_from_tables(lesions, scored, patient_of)
        if patient_of and len(scored) == len(pred_lesions)
        else pd.DataFrame(columns=FROC_COLUMNS)
    )
    if patient_of and len(scored) != len(pred_lesions):
        log.warning("round %d: no foreground probabilities for some studies; no FROC", round_index)
    by_size.insert(0, "round", round_index)
    curve.insert(0, "round", round_index)
    summary = {
        # A list, smallest bin first (JSON objects are written with sorted keys).
        "sensitivity_by_size": [
            {
                "size_bin": row.size_bin,
                "n_ref_lesions": int(row.n_ref_lesions),
                "n_detected": int(row.n_detected),
                "sensitivity": None if pd.isna(row.sensitivity) else float(row.sensitivity),
                "ci95": [
                    None if pd.isna(row.ci95_low) else float(row.ci95_low),
                    None if pd.isna(row.ci95_high) else float(row.ci95_high),
                ],
            }
            for row in by_size.itertuples()
        ],
        **{k: rates[k] for k in ("n_patients", "fp_per_study", "fp_per_patient") if k in rates},
    }
    return {"by_size": by_size, "froc": curve, "summary": summary}


def summarise_round(round_index: int, per_study: pd.DataFrame, skipped: list[str]) -> dict:
    summary: dict = {"round": round_index, "n_validation": 0, "skipped": skipped}
    if per_study.empty:
        summary["mean_dice"] = None
        return summary
    headline = per_study[per_study.group == HEADLINE_GROUP]
    summary["n_validation"] = int(headline.study_id.nunique())
    summary["mean_dice"] = float(headline["dice"].mean())
    summary["mean_ndsc"] = float(headline["ndsc"].mean())
    summary["mean_lesion_f1"] = float(headline["lesion_f1"].mean())
    summary["per_group_dice"] = {
        group: float(rows["dice"].mean()) for group, rows in per_study.groupby("group")
    }
    return summary


COMPARE_METRICS = ("dice", "ndsc", "hd95", "lesion_f1")
COMPARE_GROUPS = ("whole_lesion", "enhancing")


def compare_per_study(
    per_study_a: pd.DataFrame,
    per_study_b: pd.DataFrame,
    metrics: list[str] | tuple[str, ...] = COMPARE_METRICS,
    groups: list[str] | tuple[str, ...] = COMPARE_GROUPS,
    alternative: str | None = None,
) -> pd.DataFrame:
    """Paired statistics of two per-study tables on the studies both evaluated.

    A study evaluated in only one table (e.g. its inference failed in one round) cannot be
    paired: it is left out, logged, and counted in ``n_unpaired``. Metrics or groups absent
    from either table are skipped with a log line rather than failing the whole table.
    """
    from metsflow.stats import compare_tables

    common = set(per_study_a["study_id"]) & set(per_study_b["study_id"])
    unpaired = (set(per_study_a["study_id"]) | set(per_study_b["study_id"])) - common
    if unpaired:
        log.warning("left out of the paired comparison: %s", sorted(unpaired))
    a = per_study_a[per_study_a["study_id"].isin(common)]
    b = per_study_b[per_study_b["study_id"].isin(common)]
    groups = [g for g in groups if g in set(a["group"]) and g in set(b["group"])]
    metrics = [m for m in metrics if m in a.columns and m in b.columns]
    if not common or not groups or not metrics:
        log.warning("nothing to compare: %d paired studies", len(common))
        return pd.DataFrame(columns=["group", "metric", "n", "n_unpaired"])
    table = compare_tables(a, b, metrics=metrics, groups=groups, alternative=alternative)
    table.insert(3, "n_unpaired", len(unpaired))
    return table


def run_compare_rounds(
    per_study_new: str,
    per_study_old: str,
    round_new: int,
    round_old: int,
    settings: dict,
    out_table: str,
) -> pd.DataFrame:
    """Round ``round_new`` (a) against ``round_old`` (b) on the validation studies."""
    new = pd.read_csv(per_study_new, sep="\t", dtype={"study_id": str})
    old = pd.read_csv(per_study_old, sep="\t", dtype={"study_id": str})
    table = compare_per_study(
        new,
        old,
        metrics=settings.get("compare_metrics", COMPARE_METRICS),
        groups=settings.get("compare_groups", COMPARE_GROUPS),
    )
    table.insert(0, "round_b", round_old)
    table.insert(0, "round_a", round_new)
    write_table(out_table, table)
    log.info("round %d vs %d:\n%s", round_new, round_old, table.to_string(index=False))
    return table
