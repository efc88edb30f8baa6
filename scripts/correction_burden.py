"""Snakemake entry point: how much people changed the pre-segmentation of a confirmed batch."""

import os

from metsflow.jobs.active_learning import run_correction_burden
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_correction_burden(
        round_index=int(snakemake.wildcards.round),
        annotations_path=snakemake.input.annotations,
        review_dir=os.path.dirname(snakemake.input.review),
        label_store=snakemake.params.label_store,
        out_table=snakemake.output.table,
    )
