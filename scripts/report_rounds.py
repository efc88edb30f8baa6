"""Snakemake entry point: per-round tables and figures for the HTML report."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.report import run_report_rounds

with job_logging(snakemake.log[0]):
    run_report_rounds(
        plan_path=snakemake.input.plan,
        quarantine_path=snakemake.input.quarantine,
        summaries=list(snakemake.input.summaries),
        per_study=list(snakemake.input.per_study),
        selections=list(snakemake.input.selections),
        burdens=list(snakemake.input.burdens),
        out_table=snakemake.output.table,
        out_plot=snakemake.output.dice_plot,
        out_cohort=snakemake.output.cohort,
        out_burden=snakemake.output.burden,
        out_burden_plot=snakemake.output.burden_plot,
    )
