"""Snakemake entry point: paired statistics of the final round against round 0."""

from metsflow.jobs.evaluate import run_compare_rounds
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_compare_rounds(
        per_study_new=snakemake.input.new,
        per_study_old=snakemake.input.old,
        round_new=int(snakemake.wildcards.round),
        round_old=0,
        settings=dict(snakemake.params.settings),
        out_table=snakemake.output.table,
    )
