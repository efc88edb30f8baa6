"""Snakemake entry point: collect every failed study of every stage into the QC table."""

from metsflow.jobs.cohort import write_quarantine
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    write_quarantine(
        {
            "preprocess": list(snakemake.input.preprocessed),
            "register": list(snakemake.input.registered),
        },
        snakemake.output.table,
    )
