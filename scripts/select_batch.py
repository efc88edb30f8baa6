"""Snakemake entry point: pick the next active-learning batch."""

from metsflow.jobs.active_learning import run_select_batch
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_select_batch(
        round_index=int(snakemake.wildcards.round),
        prediction_manifests=list(snakemake.input.predictions),
        previous_selections=list(snakemake.input.previous),
        previous_evaluation=snakemake.input.evaluation,
        settings=dict(snakemake.params.settings),
        seed=snakemake.params.seed,
        label_store=snakemake.params.label_store,
        out_selection=snakemake.output.selection,
        candidates_path=snakemake.input.candidates,
    )
