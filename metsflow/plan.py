"""Cohort plan: each study's role in active learning and the shards that batch the work.

Why shards: at 11,892 studies, one Snakemake job per study and stage would be ~50,000 SLURM jobs
and a slow DAG. metsflow instead groups whole patients into CPU shards (preprocessing and
registration; a patient is never split so a follow-up always finds its previous time point in the
same job) and larger GPU shards (inference; the model loads once per shard). Shard membership is
a pure function of the sheet order and the shard sizes, so it is stable across runs and subsets.

Roles (per patient, so no patient is both trained on and validated on):
    validation  labelled patients held out to measure every round's model (fixed for all rounds)
    seed        labelled studies of the other patients: the round-0 training set
    pool        unlabelled studies: segmented each round, the acquisition function picks from them
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from metsflow.cohort import Cohort

ROLES = ("seed", "validation", "pool")


@dataclass(frozen=True)
class PlanSettings:
    shard_size: int = 16
    gpu_shard_size: int = 64
    validation_fraction: float = 0.3
    validation_patients: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def from_config(cls, config: dict) -> PlanSettings:
        sharding = config.get("sharding", {})
        validation = config.get("validation", {})
        return cls(
            shard_size=int(sharding.get("cpu_shard_size", cls.shard_size)),
            gpu_shard_size=int(sharding.get("gpu_shard_size", cls.gpu_shard_size)),
            validation_fraction=float(validation.get("fraction", cls.validation_fraction)),
            validation_patients=tuple(validation.get("patients", []) or ()),
            seed=int(config.get("seed", 0)),
        )


def choose_validation_patients(cohort: Cohort, settings: PlanSettings) -> list[str]:
    """Patients held out for validation: the configured list, else a seeded fraction of the
    labelled patients (at least one when two or more patients are labelled)."""
    labelled = [p for p, studies in cohort.patients.items() if any(s.label for s in studies)]
    if settings.validation_patients:
        unknown = sorted(set(settings.validation_patients) - set(cohort.patients))
        if unknown:
            raise ValueError(f"validation.patients not in the sheet: {', '.join(unknown)}")
        return [p for p in cohort.patients if p in set(settings.validation_patients)]
    if len(labelled) < 2 or settings.validation_fraction <= 0:
        return []
    n = max(1, round(settings.validation_fraction * len(labelled)))
    n = min(n, len(labelled) - 1)  # keep at least one labelled patient to train on
    chosen = set(random.Random(settings.seed).sample(labelled, n))
    return [p for p in labelled if p in chosen]


def _chunk_patients(cohort: Cohort, size: int, prefix: str) -> dict[str, str]:
    """Map patient -> shard id, filling shards with whole patients up to ~``size`` studies."""
    shard_of: dict[str, str] = {}
    index, filled = 0, 0
    for patient, studies in cohort.patients.items():
        if filled and filled + len(studies) > size:
            index, filled = index + 1, 0
        shard_of[patient] = f"{prefix}{index:04d}"
        filled += len(studies)
    return shard_of


def build_plan(cohort: Cohort, settings: PlanSettings) -> pd.DataFrame:
    """One row per study: ids, order, role, cpu shard, gpu shard, previous study."""
    validation = set(choose_validation_patients(cohort, settings))
    cpu_shard = _chunk_patients(cohort, settings.shard_size, "s")
    gpu_shard = _chunk_patients(cohort, settings.gpu_shard_size, "g")
    rows = []
    for patient, studies in cohort.patients.items():
        previous = None
        for study in studies:
            if patient in validation:
                role = "validation"
            elif study.label is not None:
                role = "seed"
            else:
                role = "pool"
            rows.append(
                {
                    "study_id": study.study_id,
                    "patient_id": patient,
                    "order": study.order,
                    "timepoint": study.timepoint,
                    "role": role,
                    "has_label": study.label is not None,
                    "shard": cpu_shard[patient],
                    "gpu_shard": gpu_shard[patient],
                    "previous_study": previous or "",
                }
            )
            previous = study.study_id
    return pd.DataFrame(rows)


def restrict(plan: pd.DataFrame, studies: Iterable[str] = (), patients: Iterable[str] = ()):
    """Rows of ``plan`` for the given studies and/or patients (a rerun subset).

    Unknown ids are an error: a typo must not silently select nothing.
    """
    studies, patients = list(studies), list(patients)
    if not studies and not patients:
        return plan
    unknown = sorted(set(studies) - set(plan.study_id)) + sorted(
        set(patients) - set(plan.patient_id)
    )
    if unknown:
        raise ValueError(f"subset names ids that are not in the sheet: {', '.join(unknown)}")
    keep = plan.study_id.isin(studies) | plan.patient_id.isin(patients)
    return plan[keep]


def dry_run_job_counts(stdout: str) -> dict[str, int]:
    """Jobs per rule (and ``total``) from the 'Job stats' table of ``snakemake -n`` output;
    empty when the output has no such table."""
    counts: dict[str, int] = {}
    if "Job stats:" not in stdout:
        return counts
    for line in stdout.split("Job stats:", 1)[1].splitlines()[3:]:
        match = re.match(r"^(\S+)\s+(\d+)\s*$", line)
        if not match:
            if counts:
                break
            continue
        counts[match.group(1)] = int(match.group(2))
    return counts
