"""Snakemake entry point: preprocess the studies of one CPU shard."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.preprocess import run_preprocess_shard

with job_logging(snakemake.log[0]):
    run_preprocess_shard(
        studies=snakemake.params.studies,
        settings=dict(snakemake.params.settings),
        out_root=snakemake.params.out_root,
        manifest=snakemake.output.manifest,
        threads=snakemake.threads,
    )
