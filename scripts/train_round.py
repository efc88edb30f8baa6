"""Snakemake entry point: train round 0 (one fold), or fine-tune round r on confirmed labels."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.train import TrainingInputs, run_train_round

with job_logging(snakemake.log[0]):
    run_train_round(
        TrainingInputs.from_snakemake(snakemake),
        init_checkpoint=snakemake.input.get("init"),
        model=dict(snakemake.params.model),
        spacing=list(snakemake.params.spacing),
        out_model=snakemake.output.model,
        out_log=snakemake.output.train_log,
        out_summary=snakemake.output.summary,
        fold=int(snakemake.params.fold),
        folds=int(snakemake.params.folds),
    )
