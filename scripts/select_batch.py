"""Snakemake entry point: pick the next active-learning batch."""

from metsflow.jobs.active_learning import run_select_batch
from metsflow.jobs.logs import job_logging
from metsflow.settings import ActiveLearningSettings

with job_logging(snakemake.log[0]):
    run_select_batch(
        ActiveLearningSettings.from_dict(snakemake.params.settings),
        round_index=int(snakemake.wildcards.round),
        prediction_manifests=list(snakemake.input.predictions),
        previous_selections=list(snakemake.input.previous),
        previous_evaluation=snakemake.input.evaluation,
        seed=snakemake.params.seed,
        label_store=snakemake.params.label_store,
        out_selection=snakemake.output.selection,
        candidates_path=snakemake.input.candidates,
    )
