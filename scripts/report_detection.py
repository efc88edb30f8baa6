"""Snakemake entry point: size-binned detection and FP per patient across rounds."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.report import run_report_detection

with job_logging(snakemake.log[0]):
    run_report_detection(
        summaries=list(snakemake.input.summaries),
        detection_tables=list(snakemake.input.detection),
        stage2_summaries=list(snakemake.input.stage2),
        out_table=snakemake.output.table,
        out_lost=snakemake.output.lost,
    )
