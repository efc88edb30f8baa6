"""Snakemake entry point: export a batch for review in ITK-SNAP, 3D Slicer or MONAI Label."""

from metsflow.jobs.active_learning import run_export_review
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_export_review(
        round_index=int(snakemake.wildcards.round),
        selection_path=snakemake.input.selection,
        studies=snakemake.params.studies,
        pred_root=snakemake.params.pred_root,
        model=snakemake.params.model,
        out_dir=snakemake.params.out_dir,
    )
