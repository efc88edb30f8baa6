"""Snakemake entry point: the final labels as a BIDS derivative dataset."""

from metsflow.jobs.export import run_export_bids
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_export_bids(
        final_labels=snakemake.input.labels,
        plan_path=snakemake.input.plan,
        studies=list(snakemake.params.studies),
        registration_manifests=list(snakemake.input.registered),
        prep_root=snakemake.params.prep_root,
        reg_root=snakemake.params.reg_root,
        settings=dict(snakemake.params.settings),
        model_round=int(snakemake.params.model_round),
        out_root=snakemake.params.out_root,
        out_manifest=snakemake.output.manifest,
    )
