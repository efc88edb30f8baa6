"""Snakemake entry point: one round's FROC figure (validation predictions, stage 2)."""

from metsflow.jobs.logs import job_logging
from metsflow.jobs.report import run_report_froc

with job_logging(snakemake.log[0]):
    run_report_froc(
        round_index=int(snakemake.wildcards.round),
        froc_table=snakemake.input.froc,
        stage2_summary=snakemake.input.get("stage2") or None,
        out_png=snakemake.output.png,
    )
