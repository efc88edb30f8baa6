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

import os
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from metsflow.cohort.sheet import Cohort
from metsflow.core.layout import CPU_SHARD_PREFIX, GPU_SHARD_PREFIX, shard_id

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


def _pack_patients(counts: Iterable[tuple[str, int]], size: int, prefix: str) -> dict[str, str]:
    """Map patient -> shard id, filling shards in order with whole patients (``counts``:
    (patient, studies) pairs) up to ~``size`` studies."""
    shard_of: dict[str, str] = {}
    index, filled = 0, 0
    for patient, count in counts:
        if filled and filled + count > size:
            index, filled = index + 1, 0
        shard_of[patient] = shard_id(prefix, index)
        filled += count
    return shard_of


def _chunk_patients(cohort: Cohort, size: int, prefix: str) -> dict[str, str]:
    return _pack_patients(((p, len(s)) for p, s in cohort.patients.items()), size, prefix)


def build_plan(cohort: Cohort, settings: PlanSettings) -> pd.DataFrame:
    """One row per study: ids, order, role, cpu shard, gpu shard, previous study."""
    validation = set(choose_validation_patients(cohort, settings))
    cpu_shard = _chunk_patients(cohort, settings.shard_size, CPU_SHARD_PREFIX)
    gpu_shard = _chunk_patients(cohort, settings.gpu_shard_size, GPU_SHARD_PREFIX)
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


def read_plan(path: str | os.PathLike) -> pd.DataFrame:
    """The plan table as ``build_plan`` made it (``Layout.plan``, written with ``write_table``).

    Ids, roles and shards stay text (study "007" stays "007", an empty ``previous_study`` is ""
    not NaN), ``order`` is an integer (so a patient's time points sort 2 before 10) and
    ``has_label`` a boolean. The one reader of the table: every job asks it."""
    plan = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if "order" in plan.columns:
        plan["order"] = plan["order"].astype(int)
    if "has_label" in plan.columns:
        plan["has_label"] = plan["has_label"] == "True"
    return plan


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


# --- Candidate subsets: which pool studies a round's models segment ------------------------
#
# Why: at 11,892 studies every round re-segmented the whole pool with the round's models
# (1,146 of the campaign's 2,841 jobs, most of its GPU-hours), although acquisition only picks
# ``batch_size`` (150) of them. With ``active_learning.candidates: N`` the models of round r < R
# segment the validation studies (always: they measure the round) and a seeded, patient-stratified
# subset of N pool studies, from which round r + 1 selects; the final round's models segment the
# whole pool once, for the final labels. ``all`` keeps segmenting the whole pool every round.

ALL_CANDIDATES = "all"


def candidate_seed(seed: int, selection_round: int) -> list[int]:
    """The random seed of round ``selection_round``'s candidates (recorded with them)."""
    return [int(seed), int(selection_round)]


def candidate_studies(
    plan: pd.DataFrame, candidates: int | str, seed: int, selection_round: int
) -> pd.DataFrame:
    """Pool rows (plan order) that round ``selection_round`` selects its batch from.

    Patient-stratified: patients are visited in a seeded random order and each gives one
    (randomly chosen) study per pass, so N candidates come from min(N, pool patients) different
    patients, and a patient with many time points is not over-represented.
    ``candidates`` >= the pool size, or ``all``, returns the whole pool.
    """
    pool = plan[plan.role == "pool"]
    if candidates == ALL_CANDIDATES or int(candidates) >= len(pool):
        return pool
    n = int(candidates)
    rng = np.random.default_rng(candidate_seed(seed, selection_round))
    by_patient = {p: list(rows.study_id) for p, rows in pool.groupby("patient_id", sort=False)}
    patients = list(by_patient)
    rng.shuffle(patients)
    for studies in by_patient.values():
        rng.shuffle(studies)
    chosen: set[str] = set()
    depth = 0
    while len(chosen) < n:
        for patient in patients:
            if depth < len(by_patient[patient]):
                chosen.add(by_patient[patient][depth])
                if len(chosen) == n:
                    break
        depth += 1
    return pool[pool.study_id.isin(chosen)]


def round_inference_plan(
    plan: pd.DataFrame,
    round_index: int,
    final_round: int,
    candidates: int | str,
    seed: int,
    gpu_shard_size: int,
) -> pd.DataFrame:
    """The studies round ``round_index``'s models segment, with the GPU shard of each.

    The final round, and every round with ``candidates: all``, segments every validation and
    pool study in the plan's own GPU shards (``gpu_shard``). Otherwise the validation studies
    and round r + 1's candidates are packed (whole patients, plan order) into
    ``ceil(n / gpu_shard_size)``-ish shards of their own, so a round costs ~(validation + N) / 64
    jobs instead of one job per plan shard.
    """
    segmented = plan[plan.role != "seed"]
    if round_index >= final_round or candidates == ALL_CANDIDATES:
        return segmented
    chosen = candidate_studies(plan, candidates, seed, round_index + 1)
    if len(chosen) == (segmented.role == "pool").sum():
        return segmented
    rows = segmented[(segmented.role == "validation") | segmented.study_id.isin(chosen.study_id)]
    counts = rows.groupby("patient_id", sort=False).size()
    rows = rows.copy()
    rows["gpu_shard"] = rows.patient_id.map(
        _pack_patients(counts.items(), gpu_shard_size, GPU_SHARD_PREFIX)
    )
    return rows
