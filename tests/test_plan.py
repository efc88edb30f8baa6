"""Roles and shards of the cohort plan."""

from __future__ import annotations

import pandas as pd
import pytest
from _sheets import write_sheet

from metsflow.cohort.plan import (
    PlanSettings,
    build_plan,
    choose_validation_patients,
    read_plan,
    restrict,
)
from metsflow.core.io import write_table


@pytest.fixture
def cohort(tmp_path):
    patients = {f"P{i:02d}": (i % 3) + 1 for i in range(10)}
    return write_sheet(tmp_path / "s.tsv", patients, labelled={"P00", "P01", "P02", "P03"})


def test_roles_keep_patients_whole_and_validation_is_labelled(cohort):
    plan = build_plan(cohort, PlanSettings(validation_fraction=0.5, seed=1))
    per_patient = plan.groupby("patient_id").role.nunique()
    assert (per_patient == 1).all(), "a patient's studies must share one role"
    validation = set(plan.loc[plan.role == "validation", "patient_id"])
    assert len(validation) == 2 and validation <= {"P00", "P01", "P02", "P03"}
    assert (
        set(plan.loc[plan.role == "seed", "patient_id"])
        == {"P00", "P01", "P02", "P03"} - validation
    )
    assert not plan.loc[plan.role == "pool", "has_label"].any()


def test_validation_choice_is_seeded_and_leaves_a_training_patient(cohort):
    a = choose_validation_patients(cohort, PlanSettings(validation_fraction=0.9, seed=3))
    b = choose_validation_patients(cohort, PlanSettings(validation_fraction=0.9, seed=3))
    assert a == b and len(a) == 3  # 4 labelled patients: at least one stays for training


def test_explicit_validation_patients_and_unknown_ones(cohort):
    plan = build_plan(cohort, PlanSettings(validation_patients=("P03",)))
    assert set(plan.loc[plan.role == "validation", "patient_id"]) == {"P03"}
    with pytest.raises(ValueError, match="P99"):
        build_plan(cohort, PlanSettings(validation_patients=("P99",)))


def test_shards_hold_whole_patients_near_the_size(cohort):
    plan = build_plan(cohort, PlanSettings(shard_size=4, gpu_shard_size=8))
    assert (plan.groupby("patient_id").shard.nunique() == 1).all()
    assert (plan.groupby("patient_id").gpu_shard.nunique() == 1).all()
    sizes = plan.groupby("shard").size()
    # a shard is only over the size when one patient alone exceeds it (max 3 time points here)
    assert sizes.max() <= 4
    assert plan.shard.nunique() < len(plan)


def test_previous_study_chain(cohort):
    plan = build_plan(cohort, PlanSettings())
    rows = plan[plan.patient_id == "P02"].sort_values("order")
    assert list(rows.previous_study) == ["", "P02_T0", "P02_T1"]


def test_shards_do_not_move_with_a_subset(cohort):
    plan = build_plan(cohort, PlanSettings(shard_size=4))
    subset = restrict(plan, studies=["P05_T0"], patients=["P07"])
    assert set(subset.study_id) == {"P05_T0", *plan.study_id[plan.patient_id == "P07"]}
    assert subset.set_index("study_id").shard.to_dict() == {
        s: plan.set_index("study_id").shard[s] for s in subset.study_id
    }
    with pytest.raises(ValueError, match="NOPE"):
        restrict(plan, studies=["NOPE"])


def test_read_plan_gives_back_the_plan_as_built(tmp_path):
    patients = {"007": 3, "P10": 12}  # a numeric-looking id and more than 10 time points
    cohort = write_sheet(tmp_path / "s.tsv", patients, labelled={"P10"})
    plan = build_plan(cohort, PlanSettings(validation_fraction=0))
    write_table(tmp_path / "plan.tsv", plan)
    read = read_plan(tmp_path / "plan.tsv")
    pd.testing.assert_frame_equal(read, plan, check_dtype=False)
    assert read.patient_id.iloc[0] == "007" and read.previous_study.iloc[0] == ""
    assert read.order.dtype.kind == "i" and read.has_label.dtype == bool
    p10 = read[read.patient_id == "P10"].sort_values("order")
    assert list(p10.order) == list(range(12))  # 10 sorts after 9, not after 1
