"""Snakemake entry point: record the pool studies a round selects its batch from."""

from metsflow.jobs.active_learning import run_round_candidates
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_round_candidates(
        selection_round=int(snakemake.wildcards.round),
        plan_path=snakemake.input.plan,
        candidates=snakemake.params.candidates,
        seed=int(snakemake.params.seed),
        out_candidates=snakemake.output.candidates,
    )
