"""Snakemake entry point: per-round tables and figures for the HTML report."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.report import RoundsReport, run_report_rounds

with job_logging(snakemake.log[0]):
    run_report_rounds(RoundsReport.from_snakemake(snakemake))
