"""The Snakemake workflow as users run it: a full tiny run (planning at cohort scale and the lint:
test_workflow_plan.py, a file of its own so the two xdist workers can split them)."""

from __future__ import annotations

import json
import os
import stat

import pandas as pd
import pytest
from _report_checks import check_evaluation_outputs


@pytest.mark.slow
def test_tiny_run_trains_and_uses_the_cascade_and_reseg_in_both_rounds(tiny_run):
    results = tiny_run.results
    for r in (0, 1):
        model_dir = results / f"rounds/round_{r}/model"
        assert (model_dir / "stage2.pt").exists() and (model_dir / "reseg.pt").exists()
        stage2 = json.loads((model_dir / "stage2_summary.json").read_text())
        assert stage2["threshold"] is None or 0.0 <= stage2["threshold"] <= 1.0
        members = stage2["members"]
        assert [m["seed"] for m in members] == [r, r + 1]  # config seed 0 + round
        # Each member's kept weights are from a validation point (every 5 and the last), or
        # its last iteration when the validation studies hold no lesion to select on.
        for member in members:
            assert member["selected_iteration"] in {5, 10}
            assert [s["iteration"] for s in member["selection"]] in ([], [5, 10])
    predicted = pd.concat(
        pd.read_csv(p, sep="\t")
        for p in (results / "rounds/round_1/predictions/shards").glob("*.tsv")
    )
    assert {"stage2_removed", "tracked_lesions", "new_lesions"} <= set(predicted.columns)
    assert predicted.loc[predicted.status == "ok", "uncertainty_disagreement"].notna().all()
    followups = predicted[predicted.study_id.str.endswith("_T1") & (predicted.status == "ok")]
    assert len(followups) and followups.tracked_lesions.notna().any()
    for r in (0, 1):
        summary = json.loads((results / f"rounds/round_{r}/evaluation/summary.json").read_text())
        assert summary["n_validation"] >= 1
        assert 0.0 <= summary["mean_dice"] <= 1.0


@pytest.mark.slow
def test_tiny_run_round_1_label_trains_the_folds_that_do_not_hold_it_out(tiny_run):
    results = tiny_run.results
    selection = pd.read_csv(results / "rounds/round_1/selection.tsv", sep="\t")
    assert len(selection) == 1
    fold_summaries = [
        json.loads(p.read_text())
        for p in (results / "rounds/round_1/model").glob("train_summary*.json")
    ]
    assert len(fold_summaries) == 2
    assert all(f["n_confirmed"] == 1 for f in fold_summaries)
    assert any(selection.study_id[0] in f["train_studies"] for f in fold_summaries)
    confirmed = next((tiny_run.labels / selection.study_id[0]).glob("v*_confirmed.nii.gz"))
    assert not os.stat(confirmed).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)

    rounds = pd.read_csv(results / "report/rounds.tsv", sep="\t")
    assert list(rounds["round"]) == [0, 1]
    assert (results / "report/dice_per_round.png").stat().st_size > 0


@pytest.mark.slow
def test_tiny_run_registers_every_followup_with_qc(tiny_run):
    registered = pd.concat(
        pd.read_csv(p, sep="\t") for p in (tiny_run.results / "registered/shards").glob("*.tsv")
    )
    assert (registered.status == "ok").sum() == 4
    for study in registered.loc[registered.status == "ok", "study_id"]:
        qc = json.loads((tiny_run.results / "registered" / study / "qc.json").read_text())
        assert qc


@pytest.mark.slow
def test_tiny_run_statistics_response_figures_report_and_no_op_rerun(tiny_run):
    check_evaluation_outputs(tiny_run.root, tiny_run.config)
