"""Snakemake entry point: write the cohort plan (roles and shards) computed at parse time."""

from metsflow.jobs.cohort import write_plan
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    write_plan(snakemake.params.plan, snakemake.output.plan)
