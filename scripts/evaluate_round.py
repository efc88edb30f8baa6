"""Snakemake entry point: evaluate one round's model on the validation studies."""

from metsflow.core.layout import Layout
from metsflow.core.settings import EvaluateSettings
from metsflow.jobs.evaluate import run_evaluate_round
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_evaluate_round(
        Layout.from_config(snakemake.config),
        EvaluateSettings.from_dict(snakemake.params.settings),
        round_index=int(snakemake.wildcards.round),
        studies=snakemake.params.studies,
        prediction_manifests=list(snakemake.input.predictions),
    )
