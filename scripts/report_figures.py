"""Snakemake entry point: final-round figures (distributions, volumes, overlays) for the report."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.report import run_report_figures
from metsflow.layout import Layout

with job_logging(snakemake.log[0]):
    run_report_figures(
        Layout.from_config(snakemake.config),
        per_study=list(snakemake.input.per_study),
        final_lesions=snakemake.input.lesions,
        response=snakemake.input.response,
        studies=snakemake.params.studies,
        out_f1_plot=snakemake.output.f1_plot,
        out_distributions=snakemake.output.distributions,
        out_volume_vs_dice=snakemake.output.volume_vs_dice,
        out_trajectories=snakemake.output.trajectories,
        out_overlay_best=snakemake.output.overlay_best,
        out_overlay_worst=snakemake.output.overlay_worst,
    )
