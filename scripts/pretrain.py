"""Snakemake entry point: train the model round 0 starts from on the pretraining sheet."""

from metsflow.core.layout import Layout
from metsflow.jobs.logs import job_logging
from metsflow.jobs.train import run_pretrain

with job_logging(snakemake.log[0]):
    run_pretrain(
        Layout.from_config(snakemake.config),
        studies=list(snakemake.params.studies),
        preprocess=dict(snakemake.params.preprocess),
        model=dict(snakemake.params.model),
        train=dict(snakemake.params.train),
        spacing=list(snakemake.params.spacing),
        seed=int(snakemake.params.seed),
        iterations=int(snakemake.params.iterations),
        threads=int(snakemake.threads),
    )
