"""Snakemake entry point: register the follow-ups of one CPU shard and propagate labels."""

from metsflow.core.layout import Layout
from metsflow.jobs.logs import job_logging
from metsflow.jobs.register import run_register_shard

with job_logging(snakemake.log[0]):
    run_register_shard(
        Layout.from_config(snakemake.config),
        dict(snakemake.params.settings),
        studies=snakemake.params.studies,
        preprocess_manifest=snakemake.input.preprocessed,
        manifest=snakemake.output.manifest,
        threads=snakemake.threads,
    )
