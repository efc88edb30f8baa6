"""Report tables and figures across rounds (consumed by `snakemake --report`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from metsflow.cohort.plan import read_plan
from metsflow.core.io import read_json, write_table
from metsflow.core.layout import Layout
from metsflow.evaluation.metrics import HEADLINE_GROUP
from metsflow.evaluation.report import (
    best_and_worst,
    cascade_ceiling,
    cohort_table,
    detection_table,
    froc_curves,
    lost_lesions,
    rounds_table,
    suggestions_table,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundsReport:
    """What rule report_rounds reads (every round's summary, per-study table, selection and
    correction burden; the plan and the quarantine table; the label store, read only, for the
    reviewers' decisions on the possible lesions) and writes."""

    plan_path: str
    quarantine_path: str
    summaries: list[str]
    per_study: list[str]
    selections: list[str]
    burdens: list[str]
    out_table: str
    out_plot: str
    out_cohort: str
    out_burden: str
    out_burden_plot: str
    label_store: str = ""
    out_suggestions: str = ""

    @classmethod
    def from_snakemake(cls, smk) -> RoundsReport:
        return cls(
            plan_path=smk.input.plan,
            quarantine_path=smk.input.quarantine,
            summaries=list(smk.input.summaries),
            per_study=list(smk.input.per_study),
            selections=list(smk.input.selections),
            burdens=list(smk.input.burdens),
            out_table=smk.output.table,
            out_plot=smk.output.dice_plot,
            out_cohort=smk.output.cohort,
            out_burden=smk.output.burden,
            out_burden_plot=smk.output.burden_plot,
            label_store=str(smk.params.label_store),
            out_suggestions=smk.output.suggestions,
        )


def run_report_rounds(job: RoundsReport) -> pd.DataFrame:
    """The rounds table and Dice plot, the correction-burden summary and plot, the cohort
    summary."""
    from metsflow.active_learning.burden import read_burden_tables, summarise_rounds
    from metsflow.evaluation.figures import plot_correction_burden, plot_metric_by_round

    summaries_read = [read_json(path) for path in job.summaries]
    batch_sizes = {
        index: len(pd.read_csv(path, sep="\t"))
        for index, path in enumerate(job.selections, start=1)
    }
    # The correction burden of the labels each round's model was fine-tuned on, next to its Dice.
    burden = read_burden_tables(job.burdens)
    rounds = sorted(s["round"] for s in summaries_read)
    burden_summary = summarise_rounds(burden, rounds=[r for r in rounds if r > 0])
    write_table(job.out_burden, burden_summary)
    plot_correction_burden(burden, job.out_burden_plot)
    table = rounds_table(summaries_read, batch_sizes, burden_summary)
    write_table(job.out_table, table)
    if job.out_suggestions:
        write_table(job.out_suggestions, suggestions_report(job.label_store, job.selections))

    frames = [pd.read_csv(p, sep="\t") for p in job.per_study]
    frames = [f for f in frames if not f.empty]
    per_study_all = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    plot_metric_by_round(per_study_all, job.out_plot, metric="dice", group=HEADLINE_GROUP)

    plan = read_plan(job.plan_path)
    quarantine = pd.read_csv(job.quarantine_path, sep="\t", dtype=str, keep_default_na=False)
    write_table(job.out_cohort, cohort_table(plan, quarantine))
    return table


def suggestions_report(label_store: str, selections: list[str]) -> pd.DataFrame:
    """Per round and size bin, the possible lesions reviewers accepted and dismissed in the
    editor (``evaluation.report.suggestions_table``), read here from the label store's history
    (``active_learning.assists``: the evaluation layer cannot import it). ``selections``: the
    selection tables of rounds 1, 2, ... in order; no store: an empty table."""
    from metsflow.active_learning.assists import round_suggestion_decisions
    from metsflow.active_learning.labelstore import LabelStore

    decisions = {}
    if label_store and Path(label_store).is_dir():
        store = LabelStore(label_store, create=False)
        rounds = dict(enumerate(selections, start=1))
        decisions = round_suggestion_decisions(store, rounds)
    return suggestions_table(decisions)


def _overlay_for(study_record: dict, prediction: Path, out_png: str, title_metric: float) -> None:
    import nibabel as nib
    import numpy as np

    from metsflow.cohort.sheet import Study
    from metsflow.core.labels import to_internal
    from metsflow.evaluation.figures import overlay_png

    study = Study.from_record(study_record)
    image = nib.load(str(study.t1c))
    pred = nib.load(str(prediction))
    ref = to_internal(np.asarray(nib.load(str(study.label)).dataobj), study.label_convention)
    overlay_png(
        np.asarray(image.dataobj),
        np.asarray(pred.dataobj),
        ref,
        out_png,
        spacing=image.header.get_zooms()[:3],
        title=f"{study.study_id}: whole-lesion Dice {title_metric:.3f}",
    )


@dataclass(frozen=True)
class FiguresReport:
    """What rule report_figures reads (every round's per-study table, the final round's lesions
    and response, the validation records) and the figures it writes."""

    per_study: list[str]
    final_lesions: str
    response: str
    studies: list[dict]
    out_f1_plot: str
    out_distributions: str
    out_volume_vs_dice: str
    out_trajectories: str
    out_overlay_best: str
    out_overlay_worst: str

    @classmethod
    def from_snakemake(cls, smk) -> FiguresReport:
        return cls(
            per_study=list(smk.input.per_study),
            final_lesions=smk.input.lesions,
            response=smk.input.response,
            studies=list(smk.params.studies),
            out_f1_plot=smk.output.f1_plot,
            out_distributions=smk.output.distributions,
            out_volume_vs_dice=smk.output.volume_vs_dice,
            out_trajectories=smk.output.trajectories,
            out_overlay_best=smk.output.overlay_best,
            out_overlay_worst=smk.output.overlay_worst,
        )


def run_report_figures(layout: Layout, job: FiguresReport) -> dict[str, str]:
    """Figures of the final round (the last in ``job.per_study``) and across rounds; returns the
    overlay study ids (overlays of the final round's predictions)."""
    from metsflow.evaluation.figures import (
        plot_metric_by_round,
        plot_metric_distributions,
        plot_volume_trajectories,
        plot_volume_vs_dice,
    )

    frames = [pd.read_csv(p, sep="\t", dtype={"study_id": str}) for p in job.per_study]
    frames = [f for f in frames if not f.empty]
    if not frames:
        raise ValueError(f"no evaluated validation study in {job.per_study}")
    all_rounds = pd.concat(frames, ignore_index=True)
    plot_metric_by_round(all_rounds, job.out_f1_plot, metric="lesion_f1", group=HEADLINE_GROUP)
    final_round = int(all_rounds["round"].max())
    final = all_rounds[all_rounds["round"] == final_round]
    plot_metric_distributions(final, job.out_distributions)
    plot_volume_vs_dice(pd.read_csv(job.final_lesions, sep="\t"), job.out_volume_vs_dice)

    trajectories = pd.read_csv(job.response, sep="\t", dtype={"study_id": str, "patient_id": str})
    if trajectories.empty:
        # No patient could be tracked (e.g. no follow-up registered): an empty panel says so.
        log.warning("%s: no tracked time points, the trajectory figure is empty", job.response)
        trajectories = pd.DataFrame(columns=["patient_id", "order", "total_volume_mm3"])
    plot_volume_trajectories(trajectories, job.out_trajectories, volume_col="total_volume_mm3")

    best, worst = best_and_worst(final)
    records = {entry["study"]["study_id"]: entry["study"] for entry in job.studies}
    dice = final[final["group"] == HEADLINE_GROUP].set_index("study_id")["dice"]
    for study_id, out_png in ((best, job.out_overlay_best), (worst, job.out_overlay_worst)):
        prediction = layout.study_prediction(final_round, study_id)
        _overlay_for(records[study_id], prediction, out_png, float(dice[study_id]))
    return {"best": best, "worst": worst}


# --------------------------------------------------------------------------------------------
# Small-lesion detection: size-binned sensitivity, FP per patient, FROC, stage-2 losses
# --------------------------------------------------------------------------------------------


def run_report_detection(
    summaries: list[str],
    detection_tables: list[str],
    stage2_summaries: list[str],
    out_table: str,
    out_lost: str,
) -> pd.DataFrame:
    """Size-binned lesion sensitivity (Wilson 95% CI) with FP per study / patient, every round;
    and the validation lesions each round's stage-2 operating point loses (empty without
    stage 2)."""
    frames = [pd.read_csv(p, sep="\t") for p in detection_tables]
    frames = [f for f in frames if not f.empty]
    by_size = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["round"])
    table = detection_table([read_json(p) for p in summaries], by_size)
    stage2 = [read_json(p) for p in stage2_summaries]
    ceiling = cascade_ceiling(stage2)
    if not ceiling.empty:
        # Stage 1's proposal sensitivity (the cascade's ceiling) and what the operating point
        # gives up per size bin, beside each round's figures.
        table = table.merge(ceiling, on="round", how="left")
    write_table(out_table, table)
    write_table(out_lost, lost_lesions(stage2))
    return table


def run_report_froc(
    round_index: int, froc_table: str, stage2_summary: str | None, out_png: str
) -> None:
    """FROC figure of one round: the validation predictions ranked by stage-1 foreground
    probability, and with stage 2 its validation FROC and chosen operating point."""
    from metsflow.evaluation.figures import plot_froc

    curves, points, limit = froc_curves(
        pd.read_csv(froc_table, sep="\t"), read_json(stage2_summary) if stage2_summary else None
    )
    plot_froc(curves, out_png, points, title=f"FROC, round {round_index}", max_fp_per_patient=limit)
