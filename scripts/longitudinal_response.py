"""Snakemake entry point: lesion tracking and volumetric response from one round's predictions."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.longitudinal import run_longitudinal

with job_logging(snakemake.log[0]):
    run_longitudinal(
        plan_path=snakemake.input.plan,
        prediction_manifests=list(snakemake.input.predictions),
        registration_manifests=list(snakemake.input.registered),
        prep_root=snakemake.params.prep_root,
        reg_root=snakemake.params.reg_root,
        pred_root=snakemake.params.pred_root,
        settings=dict(snakemake.params.settings),
        out_lesions=snakemake.output.lesions,
        out_response=snakemake.output.response,
    )
