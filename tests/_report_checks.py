"""Checks of a finished tiny pipeline run's evaluation outputs (``check_evaluation_outputs``),
shared by the workflow test that runs the pipeline once."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import run_snakemake

from metsflow.cohort.plan import read_plan
from metsflow.evaluation.longitudinal import BASELINE, RESPONSE_CATEGORIES
from metsflow.evaluation.report import SUGGESTION_COLUMNS

REPORT_FIGURES = (
    "dice_per_round.png",
    "lesion_f1_per_round.png",
    "metric_distributions.png",
    "volume_vs_dice.png",
    "volume_trajectories.png",
    "overlay_best.png",
    "overlay_worst.png",
    "correction_burden_per_round.png",
)


def check_evaluation_outputs(run_dir, config):
    """Statistics, longitudinal tables, figures and the HTML report of a finished tiny run
    (``run_dir`` holds results/; one follow-up per patient, rounds 0 and 1). Callable from any
    test that already ran the tiny pipeline, so the suite needs only one such run."""
    results = run_dir / "results"
    plan = read_plan(results / "plan/cohort.tsv")

    # Paired statistics: round 1 against round 0 on every validation study.
    compare = pd.read_csv(results / "rounds/round_1/evaluation/compare_round_0.tsv", sep="\t")
    n_validation = (plan.role == "validation").sum()
    assert set(compare.metric) == {"dice", "ndsc", "hd95", "lesion_f1"}
    assert set(compare.group) == {"whole_lesion", "enhancing"}
    assert (compare.n == n_validation).all() and (compare.n_unpaired == 0).all()
    assert set(compare.loc[compare.metric == "hd95", "alternative"]) == {"less"}
    for column in ("ttest_p", "wilcoxon_p", "mannwhitney_p", "shapiro_p", "ci95_low"):
        assert column in compare.columns

    # Longitudinal response from the final round's predictions: one row per predicted time
    # point of each non-seed patient (every follow-up registered), baseline first.
    response = pd.read_csv(
        results / "rounds/round_1/longitudinal/response.tsv", sep="\t", dtype={"study_id": str}
    )
    predicted = response[response.source == "prediction"]
    non_seed = plan[plan.role != "seed"]
    assert sorted(predicted.study_id) == sorted(non_seed.study_id)
    for _, rows in predicted.groupby("patient_id"):
        rows = rows.sort_values("order")
        assert rows.response.iloc[0] == BASELINE
        assert set(rows.response.iloc[1:]) <= set(RESPONSE_CATEGORIES)
        assert (rows.total_volume_mm3 >= 0).all()
    # The sheet labels of labelled patients are tracked too, for comparison.
    assert set(response.source) == {"prediction", "reference"}
    lesions = pd.read_csv(results / "rounds/round_1/longitudinal/lesions.tsv", sep="\t")
    assert set(lesions.status) <= {"baseline", "tracked", "new", "resolved"}
    totals = lesions[lesions.source == "prediction"].groupby("study_id").volume_mm3.sum()
    indexed = predicted.set_index("study_id").total_volume_mm3
    assert totals.to_dict() == pytest.approx(indexed[totals.index].to_dict())

    for name in REPORT_FIGURES:
        assert (results / "report" / name).stat().st_size > 5_000, name

    # Correction burden of round 1's batch (simulated annotator vs the exported
    # pre-segmentation): one measured row per selected study, summarised in the report.
    selection = pd.read_csv(results / "rounds/round_1/selection.tsv", sep="\t", dtype=str)
    burden = pd.read_csv(results / "rounds/round_1/correction_burden.tsv", sep="\t", dtype=str)
    assert sorted(burden.study_id) == sorted(selection.study_id)
    assert burden.problem.isna().all() and set(burden.via) == {"simulated"}
    assert (burden.voxels_changed.astype(int) >= 0).all()
    per_round = pd.read_csv(results / "report/correction_burden.tsv", sep="\t")
    assert per_round.set_index("round").loc[1, "n_studies"] == len(selection)
    rounds = pd.read_csv(results / "report/rounds.tsv", sep="\t").set_index("round")
    assert rounds.loc[1, "burden_studies"] == len(selection)
    # Possible lesions decided in the editor: none by the simulated annotator, so the table
    # is there with its columns and no row.
    suggestions = pd.read_csv(results / "report/suggestions_by_size_bin.tsv", sep="\t")
    assert list(suggestions.columns) == SUGGESTION_COLUMNS and suggestions.empty

    report = run_dir / "report.html"
    run_snakemake(["--configfile", str(config), "--report", str(report)])
    html = report.read_text(errors="replace")
    tables = (
        "compare_round_0.tsv",
        "response.tsv",
        "rounds.tsv",
        "correction_burden.tsv",
        "suggestions_by_size_bin.tsv",
    )
    for name in (*REPORT_FIGURES, *tables):
        assert name in html, f"{name} is not in the report"

    again = run_snakemake(["-n", "--configfile", str(config)])
    assert "Nothing to be done" in again.stdout + again.stderr
