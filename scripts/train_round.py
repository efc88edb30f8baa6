"""Snakemake entry point: train round 0 (one fold), or fine-tune round r on confirmed labels."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.train import run_train_round

with job_logging(snakemake.log[0]):
    run_train_round(
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
        out_summary=snakemake.output.summary,
        threads=snakemake.threads,
        fold=int(snakemake.params.fold),
        folds=int(snakemake.params.folds),
    )
