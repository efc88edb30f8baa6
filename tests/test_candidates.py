"""Candidate subsets: which pool studies each round's models segment (active_learning.candidates)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from _sheets import write_sheet

from metsflow.cohort.plan import (
    PlanSettings,
    build_plan,
    candidate_studies,
    round_inference_plan,
)
from metsflow.core.settings import ActiveLearningSettings
from metsflow.jobs.active_learning import (
    BatchSelection,
    run_round_candidates,
    run_select_batch,
)


@pytest.fixture
def plan(tmp_path):
    # 30 patients with 1-4 time points; 6 labelled (validation/seed), the rest pool.
    patients = {f"P{i:02d}": (i % 4) + 1 for i in range(30)}
    cohort = write_sheet(tmp_path / "s.tsv", patients, labelled={f"P{i:02d}" for i in range(6)})
    return build_plan(cohort, PlanSettings(gpu_shard_size=8, validation_fraction=0.5, seed=1))


def test_candidates_are_seeded_per_round_and_spread_over_patients(plan):
    pool = plan[plan.role == "pool"]
    a = candidate_studies(plan, 10, seed=0, selection_round=1)
    assert len(a) == 10 and set(a.study_id) <= set(pool.study_id)
    assert list(a.study_id) == list(candidate_studies(plan, 10, 0, 1).study_id)
    assert set(a.study_id) != set(candidate_studies(plan, 10, 0, 2).study_id)
    # fewer candidates than pool patients: one study per patient at most
    assert a.patient_id.nunique() == 10
    # more than the patients: every pool patient is represented
    b = candidate_studies(plan, pool.patient_id.nunique() + 3, 0, 1)
    assert b.patient_id.nunique() == pool.patient_id.nunique()
    assert len(candidate_studies(plan, "all", 0, 1)) == len(pool)
    assert len(candidate_studies(plan, 10_000, 0, 1)) == len(pool)


def test_rounds_before_the_last_segment_validation_and_candidates_in_own_shards(plan):
    segmented = plan[plan.role != "seed"]
    final = round_inference_plan(plan, 3, 3, 10, seed=0, gpu_shard_size=8)
    # the last round: every validation and pool study, in the plan's own GPU shards
    pd.testing.assert_frame_equal(final, segmented)
    pd.testing.assert_frame_equal(round_inference_plan(plan, 0, 3, "all", 0, 8), segmented)

    r0 = round_inference_plan(plan, 0, 3, 10, seed=0, gpu_shard_size=8)
    validation = set(plan.study_id[plan.role == "validation"])
    assert validation <= set(r0.study_id)
    # round 0's models segment exactly the candidates round 1 selects from
    assert set(r0.study_id[r0.role == "pool"]) == set(candidate_studies(plan, 10, 0, 1).study_id)
    assert (r0.groupby("patient_id").gpu_shard.nunique() == 1).all()
    assert r0.groupby("gpu_shard").size().max() <= 8 or plan.groupby("patient_id").size().max() > 8
    assert r0.gpu_shard.nunique() < segmented.gpu_shard.nunique()


def test_candidates_are_recorded_and_selection_stays_inside_them(tmp_path, plan):
    plan_path = tmp_path / "cohort.tsv"
    plan.to_csv(plan_path, sep="\t", index=False)
    out = tmp_path / "round_1" / "candidates.tsv"
    table = run_round_candidates(1, str(plan_path), 5, 7, str(out))
    written = pd.read_csv(out, sep="\t", dtype=str)
    assert list(written.study_id) == list(candidate_studies(plan, 5, 7, 1).study_id)
    assert set(written.seed) == {"7:1"} and set(written.candidates) == {"5"}
    assert len(table) == 5

    # prediction manifest listing every pool study: only the recorded candidates are eligible
    pool = plan[plan.role == "pool"]
    manifest = tmp_path / "pred.tsv"
    pool.assign(status="ok", problem="", uncertainty_entropy=0.5).to_csv(
        manifest, sep="\t", index=False
    )
    evaluation = tmp_path / "summary.json"
    evaluation.write_text(json.dumps({"mean_dice": 0.1}))
    batch = run_select_batch(
        ActiveLearningSettings(
            batch_size=20, strategy="random", dice_threshold=0.9, per_patient_max=None
        ),
        BatchSelection(
            round_index=1,
            prediction_manifests=[str(manifest)],
            previous_selections=[],
            previous_evaluation=str(evaluation),
            seed=0,
            label_store=str(tmp_path / "labels"),
            selection=str(tmp_path / "selection.tsv"),
            candidates=str(out),
        ),
    )
    assert set(batch.study_id) == set(written.study_id)
