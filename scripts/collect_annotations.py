"""Snakemake entry point: gather the confirmed labels of a round's batch."""

from metsflow.jobs.active_learning import run_collect_annotations
from metsflow.jobs.logs import job_logging
from metsflow.layout import Layout

with job_logging(snakemake.log[0]):
    run_collect_annotations(
        Layout.from_config(snakemake.config),
        round_index=int(snakemake.wildcards.round),
        selection_path=snakemake.input.selection,
        annotator=snakemake.params.annotator,
        oracle_sheet=snakemake.params.oracle_sheet,
        label_store=snakemake.params.label_store,
        studies=snakemake.params.studies,
        model=snakemake.params.model,
        out_annotations=snakemake.output.annotations,
    )
