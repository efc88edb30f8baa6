"""Report tables and figures across rounds (consumed by `snakemake --report`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from metsflow.io import read_json, write_table
from metsflow.layout import Layout
from metsflow.metrics import HEADLINE_GROUP
from metsflow.report import (
    best_and_worst,
    cohort_table,
    detection_table,
    froc_curves,
    lost_lesions,
    rounds_table,
)

log = logging.getLogger(__name__)


def run_report_rounds(
    plan_path: str,
    quarantine_path: str,
    summaries: list[str],
    per_study: list[str],
    selections: list[str],
    burdens: list[str],
    out_table: str,
    out_plot: str,
    out_cohort: str,
    out_burden: str,
    out_burden_plot: str,
) -> pd.DataFrame:
    from metsflow.active_learning.burden import read_burden_tables, summarise_rounds
    from metsflow.figures import plot_correction_burden, plot_metric_by_round

    summaries_read = [read_json(path) for path in summaries]
    batch_sizes = {
        index: len(pd.read_csv(path, sep="\t")) for index, path in enumerate(selections, start=1)
    }
    # The correction burden of the labels each round's model was fine-tuned on, next to its Dice.
    burden = read_burden_tables(burdens)
    rounds = sorted(s["round"] for s in summaries_read)
    burden_summary = summarise_rounds(burden, rounds=[r for r in rounds if r > 0])
    write_table(out_burden, burden_summary)
    plot_correction_burden(burden, out_burden_plot)
    table = rounds_table(summaries_read, batch_sizes, burden_summary)
    write_table(out_table, table)

    frames = [pd.read_csv(p, sep="\t") for p in per_study]
    frames = [f for f in frames if not f.empty]
    per_study_all = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    plot_metric_by_round(per_study_all, out_plot, metric="dice", group=HEADLINE_GROUP)

    plan = pd.read_csv(plan_path, sep="\t", dtype=str, keep_default_na=False)
    quarantine = pd.read_csv(quarantine_path, sep="\t", dtype=str, keep_default_na=False)
    write_table(out_cohort, cohort_table(plan, quarantine))
    return table


def _overlay_for(study_record: dict, prediction: Path, out_png: str, title_metric: float) -> None:
    import nibabel as nib
    import numpy as np

    from metsflow.cohort import Study
    from metsflow.figures import overlay_png
    from metsflow.labels import to_internal

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


def run_report_figures(
    layout: Layout,
    per_study: list[str],
    final_lesions: str,
    response: str,
    studies: list[dict],
    out_f1_plot: str,
    out_distributions: str,
    out_volume_vs_dice: str,
    out_trajectories: str,
    out_overlay_best: str,
    out_overlay_worst: str,
) -> dict[str, str]:
    """Figures of the final round (the last in ``per_study``) and across rounds; returns the
    overlay study ids (overlays of the final round's predictions)."""
    from metsflow.figures import (
        plot_metric_by_round,
        plot_metric_distributions,
        plot_volume_trajectories,
        plot_volume_vs_dice,
    )

    frames = [pd.read_csv(p, sep="\t", dtype={"study_id": str}) for p in per_study]
    frames = [f for f in frames if not f.empty]
    if not frames:
        raise ValueError(f"no evaluated validation study in {per_study}")
    all_rounds = pd.concat(frames, ignore_index=True)
    plot_metric_by_round(all_rounds, out_f1_plot, metric="lesion_f1", group=HEADLINE_GROUP)
    final_round = int(all_rounds["round"].max())
    final = all_rounds[all_rounds["round"] == final_round]
    plot_metric_distributions(final, out_distributions)
    plot_volume_vs_dice(pd.read_csv(final_lesions, sep="\t"), out_volume_vs_dice)

    trajectories = pd.read_csv(response, sep="\t", dtype={"study_id": str, "patient_id": str})
    if trajectories.empty:
        # No patient could be tracked (e.g. no follow-up registered): an empty panel says so.
        log.warning("%s: no tracked time points, the trajectory figure is empty", response)
        trajectories = pd.DataFrame(columns=["patient_id", "order", "total_volume_mm3"])
    plot_volume_trajectories(trajectories, out_trajectories, volume_col="total_volume_mm3")

    best, worst = best_and_worst(final)
    records = {entry["study"]["study_id"]: entry["study"] for entry in studies}
    dice = final[final["group"] == HEADLINE_GROUP].set_index("study_id")["dice"]
    for study_id, out_png in ((best, out_overlay_best), (worst, out_overlay_worst)):
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
    write_table(out_table, table)
    write_table(out_lost, lost_lesions([read_json(p) for p in stage2_summaries]))
    return table


def run_report_froc(
    round_index: int, froc_table: str, stage2_summary: str | None, out_png: str
) -> None:
    """FROC figure of one round: the validation predictions ranked by stage-1 foreground
    probability, and with stage 2 its validation FROC and chosen operating point."""
    from metsflow.figures import plot_froc

    curves, points, limit = froc_curves(
        pd.read_csv(froc_table, sep="\t"), read_json(stage2_summary) if stage2_summary else None
    )
    plot_froc(curves, out_png, points, title=f"FROC, round {round_index}", max_fp_per_patient=limit)
