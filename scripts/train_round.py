"""Snakemake entry point: train round 0 (one fold), or fine-tune round r on confirmed labels."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.train import TrainingInputs, run_train_round

with job_logging(snakemake.log[0]):
    run_train_round(
        TrainingInputs.from_snakemake(snakemake),
        model=dict(snakemake.params.model),
        spacing=list(snakemake.params.spacing),
    )
