"""Snakemake entry point: the final labels as a BIDS derivative dataset."""

import os

from metsflow.jobs.export import run_export_bids
from metsflow.jobs.logs import job_logging
from metsflow.layout import Layout
from metsflow.longitudinal import ResponseThresholds

with job_logging(snakemake.log[0]):
    run_export_bids(
        Layout.from_config(snakemake.config),
        ResponseThresholds.from_config(snakemake.params.settings),
        final_labels=snakemake.input.labels,
        plan_path=snakemake.input.plan,
        studies=list(snakemake.params.studies),
        registration_manifests=list(snakemake.input.registered),
        model_round=int(snakemake.params.model_round),
        out_root=os.path.dirname(snakemake.output.description),
        out_manifest=snakemake.output.manifest,
    )
