"""Snakemake entry point: preprocess the studies of one CPU shard."""

from metsflow.core.layout import Layout
from metsflow.jobs.logs import job_logging
from metsflow.jobs.preprocess import run_preprocess_shard

with job_logging(snakemake.log[0]):
    run_preprocess_shard(
        Layout.from_config(snakemake.config),
        dict(snakemake.params.settings),
        studies=snakemake.params.studies,
        manifest=snakemake.output.manifest,
        threads=snakemake.threads,
    )
