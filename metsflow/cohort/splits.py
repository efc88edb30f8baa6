"""Patient-level data splits for training and validation.

All time points of a patient always land on the same side of a split: follow-ups of one patient
look alike (same anatomy, often the same lesions), so splitting them would leak the validation
patient into training and inflate the validation Dice.

Splits are deterministic functions of (the set of studies, their patients, the seed): patients
are sorted before the seeded shuffle, so the order of the input mapping does not matter.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any


def _patients(study_to_patient: Mapping[str, str]) -> dict[str, list[str]]:
    """Patient -> its study ids (sorted), patients in sorted order."""
    if not study_to_patient:
        raise ValueError("no studies to split")
    groups: dict[str, list[str]] = {}
    for study, patient in study_to_patient.items():
        groups.setdefault(str(patient), []).append(str(study))
    return {p: sorted(groups[p]) for p in sorted(groups)}


def _in_input_order(study_to_patient: Mapping[str, str], chosen: set[str]) -> list[str]:
    return [str(s) for s in study_to_patient if str(s) in chosen]


def patient_kfold(
    study_to_patient: Mapping[str, str], k: int, seed: int = 0
) -> list[tuple[list[str], list[str]]]:
    """``k`` folds of ``(train_ids, val_ids)``; every study is in exactly one validation fold.

    Patients are shuffled with ``seed`` and assigned, largest first, to the fold that holds the
    fewest studies so far, so folds are balanced by study count even when patients have very
    different numbers of time points. Ids keep the order of ``study_to_patient``.
    """
    groups = _patients(study_to_patient)
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    if k > len(groups):
        raise ValueError(f"k={k} folds need at least {k} patients, got {len(groups)}")
    order = list(groups)
    random.Random(seed).shuffle(order)
    # Stable sort: ties in size keep the seeded shuffle order.
    order.sort(key=lambda p: -len(groups[p]))
    fold_studies: list[set[str]] = [set() for _ in range(k)]
    for patient in order:
        target = min(range(k), key=lambda f: (len(fold_studies[f]), f))
        fold_studies[target].update(groups[patient])
    folds = []
    for val in fold_studies:
        train = set().union(*(f for f in fold_studies if f is not val))
        folds.append(
            (_in_input_order(study_to_patient, train), _in_input_order(study_to_patient, val))
        )
    return folds


def patient_holdout(
    study_to_patient: Mapping[str, str], fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """A fixed ``(train_ids, val_ids)`` split holding out ``fraction`` of the patients.

    At least one patient is held out and at least one is kept for training.
    """
    groups = _patients(study_to_patient)
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    if len(groups) < 2:
        raise ValueError("a patient-level holdout needs at least 2 patients")
    n_val = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    val_patients = random.Random(seed).sample(list(groups), n_val)
    val = {s for p in val_patients for s in groups[p]}
    train = {s for studies in groups.values() for s in studies} - val
    return _in_input_order(study_to_patient, train), _in_input_order(study_to_patient, val)


def fold_split(
    items: list[dict[str, Any]], plan: Any, fold: int, folds: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fold ``fold`` of a patient-level ``folds``-fold split (``patient_kfold``) of ``items``
    (dicts with a ``study_id``), as ``(train_items, val_items)``; ``plan`` is the cohort plan
    (its ``study_id`` and ``patient_id`` columns)."""
    patient_of = dict(zip(plan.study_id, plan.patient_id, strict=True))
    study_to_patient = {i["study_id"]: patient_of[i["study_id"]] for i in items}
    train_ids, val_ids = patient_kfold(study_to_patient, folds, seed)[fold]
    by_id = {i["study_id"]: i for i in items}
    return [by_id[s] for s in train_ids], [by_id[s] for s in val_ids]
