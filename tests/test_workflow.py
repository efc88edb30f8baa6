"""The Snakemake workflow as users run it: planning at cohort scale and a full tiny run."""

from __future__ import annotations

import json
import os
import stat
import time

import pandas as pd
import pytest
from _dry_run import dry_run_job_counts as job_counts
from _dry_run import synthetic_oracle
from _report_checks import check_evaluation_outputs
from conftest import run_snakemake

from metsflow.cohort.sheet import synthetic_sheet

COHORT_SIZE = 11_892


@pytest.mark.slow
def test_dry_run_plans_the_full_cohort(tmp_path):
    sheet = tmp_path / "cohort.tsv"
    # The data root must exist (parse-time check); the files in it need not.
    (tmp_path / "cohort").mkdir()
    synthetic_sheet(COHORT_SIZE, sheet, seed=0, root=tmp_path / "cohort")
    # The whole campaign at once: with people (cohort.yaml) planning stops at the first batch
    # without confirmed labels, so the simulated annotator plans every round (its oracle
    # sheet is checked at parse time: every pool study needs a label file).
    oracle = synthetic_oracle(sheet, tmp_path / "oracle" / "oracle.tsv")
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(f"oracle_sheet: {oracle}\nactive_learning:\n  annotator: simulated\n")
    start = time.perf_counter()
    proc = run_snakemake(
        [
            "-n",
            "--quiet",
            "rules",
            "--configfile",
            "config/cohort.yaml",
            str(campaign),
            "--config",
            f"sheet={sheet}",
            # synthetic paths lie under tmp_path/cohort, outside the sheet's folder
            f"data_roots=['{tmp_path / 'cohort'}']",
            f"results={tmp_path / 'results'}",
            f"label_store={tmp_path / 'labels'}",
        ],
        timeout=900,
    )
    seconds = time.perf_counter() - start
    counts = job_counts(proc.stdout)
    print(f"\ndry run over {COHORT_SIZE} studies: {seconds:.1f} s, jobs by rule: {counts}")
    assert counts["preprocess_shard"] < 1000 and counts["register_shard"] < 1000
    assert counts["total"] <= 3000, "the cohort must stay within a few thousand SLURM jobs"
    assert counts["train_round"] == 6  # rounds 0..5 of config/cohort.yaml
    # Jobs that need every shard read one gathered manifest per stage (keeps the DAG small).
    assert counts["gather_manifests"] == 1


@pytest.mark.slow
def test_snakemake_lint_is_clean(tmp_path):
    """`snakemake --lint` over a paths-only sheet: every rule has log/benchmark, no lint."""
    sheet = tmp_path / "cohort.tsv"
    (tmp_path / "cohort").mkdir()
    synthetic_sheet(40, sheet, seed=0, root=tmp_path / "cohort")
    oracle = synthetic_oracle(sheet, tmp_path / "oracle" / "oracle.tsv")
    proc = run_snakemake(
        [
            "--lint",
            "--config",
            f"sheet={sheet}",
            f"oracle_sheet={oracle}",
            f"data_roots=['{tmp_path / 'cohort'}']",
            f"results={tmp_path / 'results'}",
            f"label_store={tmp_path / 'labels'}",
        ],
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert "Lints for" not in output, output[-4000:]
    assert "Congratulations" in output


@pytest.mark.slow
def test_tiny_run_trains_and_uses_the_cascade_and_reseg_in_both_rounds(tiny_run):
    results = tiny_run.results
    for r in (0, 1):
        model_dir = results / f"rounds/round_{r}/model"
        assert (model_dir / "stage2.pt").exists() and (model_dir / "reseg.pt").exists()
        stage2 = json.loads((model_dir / "stage2_summary.json").read_text())
        assert stage2["threshold"] is None or 0.0 <= stage2["threshold"] <= 1.0
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
