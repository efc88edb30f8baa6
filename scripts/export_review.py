"""Snakemake entry point: export a batch for review in ITK-SNAP, 3D Slicer or MONAI Label."""

import os

from metsflow.jobs.active_learning import run_export_review
from metsflow.jobs.logs import job_logging
from metsflow.layout import Layout

with job_logging(snakemake.log[0]):
    run_export_review(
        Layout.from_config(snakemake.config),
        round_index=int(snakemake.wildcards.round),
        model_round=int(snakemake.wildcards.round) - 1,
        selection_path=snakemake.input.selection,
        studies=snakemake.params.studies,
        model=snakemake.params.model,
        out_dir=os.path.dirname(snakemake.output.manifest),
    )
