"""The Snakemake workflow as users run it: planning at cohort scale and a full tiny run."""

from __future__ import annotations

import json
import os
import stat
import time

import pandas as pd
import pytest
from conftest import run_snakemake
from test_report import check_evaluation_outputs

from metsflow.cohort import synthetic_oracle, synthetic_sheet
from metsflow.plan import dry_run_job_counts as job_counts

COHORT_SIZE = 11_892


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
def test_demo_pipeline_end_to_end(tmp_path, tiny_config):
    from metsflow.phantom import make_demo_cohort

    demo = tmp_path / "demo"
    make_demo_cohort(
        demo, n_patients=4, n_timepoints=2, model_spacing=4.0, labelled_patients=3, seed=0
    )
    # The full model set of config/cohort.yaml in miniature: a 2-fold stage-1 ensemble, cascade
    # stage 2 and the follow-up re-segmentation with the propagated prior, trained and used by
    # inference in both rounds; round 1's batch is chosen by the ensemble's disagreement.
    models = {
        "folds": 2,
        "stage2": {"enabled": True, "iterations": 10},
        "reseg": {"enabled": True, "iterations": 12, "finetune_iterations": 6},
    }
    config = tiny_config(demo, train=models, active_learning={"strategy": "disagreement"})
    run_snakemake(["--profile", "profiles/local", "--cores", "2", "--configfile", str(config)])

    results = tmp_path / "results"
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
    summaries = [
        json.loads((results / f"rounds/round_{r}/evaluation/summary.json").read_text())
        for r in (0, 1)
    ]
    for summary in summaries:
        assert summary["n_validation"] >= 1
        assert 0.0 <= summary["mean_dice"] <= 1.0
    selection = pd.read_csv(results / "rounds/round_1/selection.tsv", sep="\t")
    assert len(selection) == 1
    # With folds the new label trains the fold(s) that do not hold its patient out.
    fold_summaries = [
        json.loads(p.read_text())
        for p in (results / "rounds/round_1/model").glob("train_summary*.json")
    ]
    assert len(fold_summaries) == 2
    assert all(f["n_confirmed"] == 1 for f in fold_summaries)
    assert any(selection.study_id[0] in f["train_studies"] for f in fold_summaries)
    confirmed = next((tmp_path / "labels" / selection.study_id[0]).glob("v*_confirmed.nii.gz"))
    assert not os.stat(confirmed).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)

    rounds = pd.read_csv(results / "report/rounds.tsv", sep="\t")
    assert list(rounds["round"]) == [0, 1]
    assert (results / "report/dice_per_round.png").stat().st_size > 0

    # Every follow-up was registered to its previous time point with QC recorded.
    registered = pd.concat(
        pd.read_csv(p, sep="\t") for p in (results / "registered/shards").glob("*.tsv")
    )
    assert (registered.status == "ok").sum() == 4
    for study in registered.loc[registered.status == "ok", "study_id"]:
        qc = json.loads((results / "registered" / study / "qc.json").read_text())
        assert qc

    # Statistics, longitudinal response, figures, the HTML report, and a no-op second run.
    check_evaluation_outputs(tmp_path, config)
