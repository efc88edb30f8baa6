"""Snakemake entry point: gather the confirmed labels of a round's batch."""

from metsflow.core.layout import Layout
from metsflow.core.settings import ActiveLearningSettings
from metsflow.jobs.active_learning import BatchAnnotation, run_collect_annotations
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_collect_annotations(
        Layout.from_config(snakemake.config),
        ActiveLearningSettings.from_dict(snakemake.params.settings),
        BatchAnnotation.from_snakemake(snakemake),
    )
