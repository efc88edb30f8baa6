"""Snakemake entry point: final-round figures (distributions, volumes, overlays) for the report."""

from metsflow.core.layout import Layout
from metsflow.jobs.logs import job_logging
from metsflow.jobs.report import FiguresReport, run_report_figures

with job_logging(snakemake.log[0]):
    run_report_figures(
        Layout.from_config(snakemake.config), FiguresReport.from_snakemake(snakemake)
    )
