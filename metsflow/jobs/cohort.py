"""Cohort-level jobs: the plan table and the quarantine (QC) table."""

from __future__ import annotations

import pandas as pd

from metsflow.cohort import read_sheet
from metsflow.io import write_table
from metsflow.jobs.manifest import read_manifests
from metsflow.plan import PlanSettings, build_plan


def write_plan(config: dict, out_path: str) -> pd.DataFrame:
    cohort = read_sheet(
        config["sheet"],
        data_roots=config.get("data_roots", []),  # [] = the sheet's own folder
        allow_outside_roots=config.get("allow_paths_outside_roots", False),
    )
    plan = build_plan(cohort, PlanSettings.from_config(config))
    write_table(out_path, plan)
    return plan


QUARANTINE_COLUMNS = ["stage", "study_id", "patient_id", "file", "problem"]


def write_quarantine(manifests_by_stage: dict[str, list[str]], out_path: str) -> pd.DataFrame:
    """Every study that failed any stage: the stage, the file at fault and the problem.

    Downstream stages do not read this table: each reads the manifests of the stage before it
    and uses only studies with status ``ok`` (see README "When a study fails").
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
