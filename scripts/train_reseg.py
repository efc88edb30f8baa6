"""Snakemake entry point: train (round 0) or fine-tune one round's re-segmentation model."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.train import TrainingInputs, run_train_reseg

with job_logging(snakemake.log[0]):
    run_train_reseg(
        TrainingInputs.from_snakemake(snakemake),
        model=dict(snakemake.params.model),
        spacing=list(snakemake.params.spacing),
    )
