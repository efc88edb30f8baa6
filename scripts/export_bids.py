"""Snakemake entry point: the final labels as a BIDS derivative dataset."""

from metsflow.core.layout import Layout
from metsflow.evaluation.longitudinal import ResponseThresholds
from metsflow.jobs.export import FinalExport, run_export_bids
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_export_bids(
        Layout.from_config(snakemake.config),
        ResponseThresholds.from_config(snakemake.params.settings),
        FinalExport.from_snakemake(snakemake),
    )
