"""Evaluate one round's predictions on the fixed validation studies (native T1c grid)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from metsflow.cohort import Study
from metsflow.io import read_json, write_json, write_table
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
) -> dict:
    from metsflow.metrics import add_normalised_dice, evaluate_pair, flatten, lesion_table

    predicted = read_manifests(prediction_manifests)
    ok = set(predicted.loc[predicted.status == "ok", "study_id"])
    per_study, lesions, skipped = [], [], []
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
        spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
        result = evaluate_pair(
            pred, ref, spacing, iou_threshold=settings.get("iou_threshold", 0.25)
        )
        per_study.extend(flatten(study.study_id, result))
        lesions.append(
            lesion_table(
                pred,
                ref,
                spacing,
                groups=[HEADLINE_GROUP],
                iou_threshold=settings.get("iou_threshold", 0.25),
                study_id=study.study_id,
            )
        )
    per_study_df = pd.DataFrame(per_study)
    if not per_study_df.empty:
        # nDSC uses the positive rate averaged over the validation cohort (Raina et al. 2023).
        per_study_df = add_normalised_dice(per_study_df)
        per_study_df.insert(0, "round", round_index)
    write_table(out_per_study, per_study_df)
    write_table(out_lesions, pd.concat(lesions, ignore_index=True) if lesions else pd.DataFrame())
    summary = summarise_round(round_index, per_study_df, skipped)
    if train_summary and Path(train_summary).exists():
        summary["n_train"] = read_json(train_summary).get("n_train")
    write_json(out_summary, summary)
    log.info("round %d: %s", round_index, summary)
    return summary


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
