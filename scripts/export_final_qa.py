"""Snakemake entry point: export the final model's QA sample for review, like a batch."""

import os

from metsflow.jobs.active_learning import run_export_review
from metsflow.jobs.logs import job_logging
from metsflow.layout import Layout

with job_logging(snakemake.log[0]):
    run_export_review(
        Layout.from_config(snakemake.config),
        round_index=int(snakemake.params.round_index),
        model_round=int(snakemake.params.round_index),
        selection_path=snakemake.input.selection,
        studies=snakemake.params.studies,
        model=snakemake.input.model,
        out_dir=os.path.dirname(snakemake.output.manifest),
    )
