"""Snakemake entry point: check every oracle label's values before the first round."""

from metsflow.jobs.active_learning import run_check_oracle
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_check_oracle(snakemake.params.oracle_sheet, snakemake.output.table)
