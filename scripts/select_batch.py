"""Snakemake entry point: pick the next active-learning batch."""

from metsflow.core.settings import ActiveLearningSettings
from metsflow.jobs.active_learning import BatchSelection, run_select_batch
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_select_batch(
        ActiveLearningSettings.from_dict(snakemake.params.settings),
        BatchSelection.from_snakemake(snakemake),
    )
