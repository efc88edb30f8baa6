"""Snakemake entry point: train one round's stage-2 candidate classifier."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.train import run_train_stage2

with job_logging(snakemake.log[0]):
    run_train_stage2(
        round_index=int(snakemake.wildcards.round),
        plan_path=snakemake.input.plan,
        preprocess_manifests=list(snakemake.input.preprocessed),
        annotation_tables=list(snakemake.input.get("annotations", [])),
        stage1_models=list(snakemake.input.stage1),
        train=dict(snakemake.params.train),
        infer=dict(snakemake.params.infer),
        seed=snakemake.params.seed,
        prep_root=snakemake.params.prep_root,
        reg_root=snakemake.params.reg_root,
        out_model=snakemake.output.model,
        out_summary=snakemake.output.summary,
        threads=snakemake.threads,
    )
