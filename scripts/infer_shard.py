"""Snakemake entry point: segment the studies of one GPU shard with one round's model(s)."""

from metsflow.core.layout import Layout
from metsflow.core.settings import InferSettings
from metsflow.jobs.infer import InferShard, run_infer_shard
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_infer_shard(
        Layout.from_config(snakemake.config),
        InferSettings.from_dict(snakemake.params.settings),
        InferShard.from_snakemake(snakemake),
    )
