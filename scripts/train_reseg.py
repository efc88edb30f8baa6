"""Snakemake entry point: train (round 0) or fine-tune one round's re-segmentation model."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.train import run_train_reseg

with job_logging(snakemake.log[0]):
    run_train_reseg(
        round_index=int(snakemake.wildcards.round),
        plan_path=snakemake.input.plan,
        preprocess_manifests=list(snakemake.input.preprocessed),
        annotation_tables=list(snakemake.input.get("annotations", [])),
        init_checkpoint=snakemake.input.get("init"),
        model=dict(snakemake.params.model),
        train=dict(snakemake.params.train),
        spacing=list(snakemake.params.spacing),
        seed=snakemake.params.seed,
        prep_root=snakemake.params.prep_root,
        reg_root=snakemake.params.reg_root,
        out_model=snakemake.output.model,
        out_log=snakemake.output.train_log,
        threads=snakemake.threads,
    )
