"""Snakemake entry point: train one round's stage-2 candidate classifier."""

from metsflow.core.settings import InferSettings
from metsflow.jobs.logs import job_logging
from metsflow.jobs.train import TrainingInputs, run_train_stage2

with job_logging(snakemake.log[0]):
    run_train_stage2(
        TrainingInputs.from_snakemake(snakemake),
        InferSettings.from_dict(snakemake.params.infer),
        stage1_models=list(snakemake.input.stage1),
    )
