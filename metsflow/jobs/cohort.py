"""Cohort-level jobs: the plan table and the quarantine (QC) table."""

from __future__ import annotations

import pandas as pd

from metsflow.core.io import write_table
from metsflow.jobs.manifest import read_manifests


def write_plan(plan: pd.DataFrame, out_path: str) -> pd.DataFrame:
    """Write the plan the workflow planned with (computed once, at parse time, by
    ``metsflow.cohort.preflight.prepare_run``), not a second computation of it."""
    write_table(out_path, plan)
    return plan


QUARANTINE_COLUMNS = ["stage", "study_id", "patient_id", "file", "problem"]


def write_quarantine(manifests_by_stage: dict[str, list[str]], out_path: str) -> pd.DataFrame:
    """Every study that failed any stage: the stage, the file at fault and the problem.

    Downstream stages do not read this table: each reads the manifests of the stage before it
    and uses only studies with status ``ok`` (see docs/running.md "When a study fails").
    """
    frames = []
    for stage, paths in manifests_by_stage.items():
        table = read_manifests(paths)
        failed = table[table.status == "failed"].copy()
        failed.insert(0, "stage", stage)
        if "file" not in failed.columns:
            failed["file"] = ""
        frames.append(failed[QUARANTINE_COLUMNS])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table = table.reindex(columns=QUARANTINE_COLUMNS)
    write_table(out_path, table)
    return table
