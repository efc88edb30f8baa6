"""Snakemake entry point: final label of every pool study and the seeded QA sample."""

from metsflow.core.layout import Layout
from metsflow.jobs.active_learning import FinalLabelInputs, run_final_labels
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_final_labels(
        Layout.from_config(snakemake.config), FinalLabelInputs.from_snakemake(snakemake)
    )
