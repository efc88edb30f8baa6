"""Snakemake entry point: paired statistics of the final round against round 0."""

from metsflow.core.settings import EvaluateSettings
from metsflow.jobs.evaluate import run_compare_rounds
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_compare_rounds(
        EvaluateSettings.from_dict(snakemake.params.settings),
        per_study_new=snakemake.input.new,
        per_study_old=snakemake.input.old,
        round_new=int(snakemake.wildcards.round),
        round_old=0,
        out_table=snakemake.output.table,
    )
