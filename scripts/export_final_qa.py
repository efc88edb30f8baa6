"""Snakemake entry point: export the final model's QA sample for review, like a batch."""

from metsflow.core.layout import Layout
from metsflow.jobs.active_learning import ReviewExport, run_export_review
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_export_review(
        Layout.from_config(snakemake.config), ReviewExport.final_qa_from_snakemake(snakemake)
    )
