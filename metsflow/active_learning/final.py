"""The labels the active-learning loop ends with, and the QA sample of the model-labelled ones.

Every pool study gets one final label: its confirmed human label when it has one (``source``
``human_confirmed``), else the final model's segmentation (``model``), or none when inference
failed for it (``failed``). The QA sample is a seeded uniform draw of model-labelled studies (no
acquisition bias: it estimates the quality of what the model alone labelled), in the
selection-table format so it is exported for review like a batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import pandas as pd

from metsflow.active_learning.acquisition import select_batch

FINAL_LABEL_COLUMNS = ["study_id", "patient_id", "source", "label", "model", "round"]
HUMAN_CONFIRMED = "human_confirmed"
MODEL = "model"
FAILED = "failed"
QA_STRATEGY = "final_qa_random"


def final_label_table(
    pool: pd.DataFrame,
    predicted_ok: set[str],
    confirmed: Mapping[str, os.PathLike | str],
    prediction_for: Callable[[str], os.PathLike | str],
    model: str,
    final_round: int,
) -> pd.DataFrame:
    """One row per pool study (``pool``: study_id, patient_id, in plan order) with its final
    label (``FINAL_LABEL_COLUMNS``): ``confirmed`` human label, else ``prediction_for(study)``
    when the final model segmented it (``predicted_ok``), else no label."""
    rows = []
    for study_id, patient_id in pool[["study_id", "patient_id"]].itertuples(index=False):
        row = {"study_id": study_id, "patient_id": patient_id, "model": model}
        if study_id in confirmed:
            row.update(source=HUMAN_CONFIRMED, label=str(confirmed[study_id]), round="")
        elif study_id in predicted_ok:
            row.update(source=MODEL, label=str(prediction_for(study_id)), round=str(final_round))
        else:
            row.update(source=FAILED, label="", round=str(final_round))
        rows.append(row)
    return pd.DataFrame(rows, columns=FINAL_LABEL_COLUMNS)


def qa_sample(labels: pd.DataFrame, sample_size: int, seed: int) -> pd.DataFrame:
    """A seeded uniform draw of up to ``sample_size`` model-labelled studies of
    ``final_label_table``, as a selection table with strategy ``QA_STRATEGY``."""
    model_labelled = labels[labels.source == MODEL][["study_id", "patient_id"]]
    sample = select_batch(
        model_labelled, n=min(int(sample_size), len(model_labelled)), strategy="random", seed=seed
    )
    sample["strategy"] = QA_STRATEGY
    return sample
