"""Snakemake entry point: lesion tracking and volumetric response from one round's predictions."""

from metsflow.core.layout import Layout
from metsflow.evaluation.longitudinal import ResponseThresholds
from metsflow.jobs.logs import job_logging
from metsflow.jobs.longitudinal import LongitudinalInputs, run_longitudinal

with job_logging(snakemake.log[0]):
    run_longitudinal(
        Layout.from_config(snakemake.config),
        ResponseThresholds.from_config(snakemake.params.settings),
        LongitudinalInputs.from_snakemake(snakemake),
    )
