"""Snakemake entry point: one cohort-wide manifest per stage from the per-shard manifests."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.manifest import gather_manifests

with job_logging(snakemake.log[0]):
    gather_manifests(list(snakemake.input.preprocessed), snakemake.output.preprocessed)
    gather_manifests(list(snakemake.input.registered), snakemake.output.registered)
