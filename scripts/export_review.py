"""Snakemake entry point: export a batch for review in ITK-SNAP, 3D Slicer or MONAI Label."""

from metsflow.core.layout import Layout
from metsflow.jobs.active_learning import ReviewExport, run_export_review
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_export_review(Layout.from_config(snakemake.config), ReviewExport.from_snakemake(snakemake))
