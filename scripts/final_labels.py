"""Snakemake entry point: final label of every pool study and the seeded QA sample."""

from metsflow.jobs.active_learning import run_final_labels
from metsflow.jobs.logs import job_logging
from metsflow.layout import Layout

with job_logging(snakemake.log[0]):
    run_final_labels(
        Layout.from_config(snakemake.config),
        final_round=int(snakemake.params.final_round),
        plan_path=snakemake.input.plan,
        prediction_manifests=list(snakemake.input.predictions),
        label_store=snakemake.params.label_store,
        sample_size=int(snakemake.params.sample_size),
        seed=int(snakemake.params.seed),
    )
