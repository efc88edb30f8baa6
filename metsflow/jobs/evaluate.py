"""Evaluate one round's predictions on the fixed validation studies (``metsflow.evaluation.evaluate``) and
compare rounds (``metsflow.evaluation.stats``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from metsflow.cohort.sheet import Study
from metsflow.core.io import read_json, write_json, write_table
from metsflow.core.layout import FG_PROB, Layout
from metsflow.core.settings import EvaluateSettings
from metsflow.jobs.manifest import ok_studies, read_manifests

log = logging.getLogger(__name__)


def run_evaluate_round(
    layout: Layout,
    settings: EvaluateSettings,
    round_index: int,
    studies: list[dict],
    prediction_manifests: list[str],
) -> dict:
    """``metsflow.evaluation.evaluate.evaluate_round`` of round ``round_index``'s predictions of
    ``studies`` (validation records), written to ``layout.evaluation_table`` /
    ``evaluation_summary`` (rule evaluate_round's outputs, built by the same methods)."""
    from metsflow.evaluation.evaluate import evaluate_round

    predicted = read_manifests(prediction_manifests)
    result = evaluate_round(
        round_index,
        [Study.from_record(entry["study"]) for entry in studies],
        ok_studies(predicted),
        lambda study_id: layout.study_prediction(round_index, study_id),
        lambda study_id: layout.prediction_dir(round_index, study_id) / FG_PROB,
        settings,
    )
    for name, table in result.tables().items():
        write_table(layout.evaluation_table(round_index, name), table)
    summary = dict(result.summary)
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
    from metsflow.evaluation.stats import COMPARE_GROUPS, COMPARE_METRICS, compare_per_study

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
