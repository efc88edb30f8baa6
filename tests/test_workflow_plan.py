"""The Snakemake workflow as users plan it: a dry run over the full cohort and `snakemake --lint`."""

from __future__ import annotations

import time

import pytest
from _dry_run import dry_run_job_counts as job_counts
from _dry_run import synthetic_oracle
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
