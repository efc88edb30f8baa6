"""Snakemake entry point: export the final model's QA sample for review, like a batch."""

from metsflow.jobs.active_learning import run_export_review
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_export_review(
        round_index=int(snakemake.params.round_index),
        selection_path=snakemake.input.selection,
        studies=snakemake.params.studies,
        pred_root=snakemake.params.pred_root,
        model=snakemake.input.model,
        out_dir=snakemake.params.out_dir,
    )
