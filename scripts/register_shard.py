"""Snakemake entry point: register the follow-ups of one CPU shard and propagate labels."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.register import run_register_shard

with job_logging(snakemake.log[0]):
    run_register_shard(
        studies=snakemake.params.studies,
        preprocess_manifest=snakemake.input.preprocessed,
        settings=dict(snakemake.params.settings),
        prep_root=snakemake.params.prep_root,
        out_root=snakemake.params.out_root,
        manifest=snakemake.output.manifest,
        threads=snakemake.threads,
    )
