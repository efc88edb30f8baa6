"""Snakemake entry point: segment the studies of one GPU shard with one round's model(s)."""

from metsflow.jobs.infer import run_infer_shard
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_infer_shard(
        studies=snakemake.params.studies,
        preprocess_manifests=list(snakemake.input.preprocessed),
        model_path=snakemake.input.model,
        settings=dict(snakemake.params.settings),
        prep_root=snakemake.params.prep_root,
        reg_root=snakemake.params.reg_root,
        out_root=snakemake.params.out_root,
        manifest=snakemake.output.manifest,
        threads=snakemake.threads,
        fold_models=list(snakemake.input.get("folds", [])),
        stage2_model=snakemake.input.get("stage2"),
        reseg_models=list(snakemake.input.get("reseg", [])) or None,
        previous=dict(snakemake.params.previous) or None,
    )
