"""Snakemake entry point: final-round figures (distributions, volumes, overlays) for the report."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.report import run_report_figures

with job_logging(snakemake.log[0]):
    run_report_figures(
        per_study=list(snakemake.input.per_study),
        final_lesions=snakemake.input.lesions,
        response=snakemake.input.response,
        studies=snakemake.params.studies,
        pred_root=snakemake.params.pred_root,
        out_f1_plot=snakemake.output.f1_plot,
        out_distributions=snakemake.output.distributions,
        out_volume_vs_dice=snakemake.output.volume_vs_dice,
        out_trajectories=snakemake.output.trajectories,
        out_overlay_best=snakemake.output.overlay_best,
        out_overlay_worst=snakemake.output.overlay_worst,
    )
