"""Report tables and figures across rounds (consumed by `snakemake --report`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from metsflow.io import read_json, write_table

log = logging.getLogger(__name__)
# Correction-burden medians shown next to each round's validation metrics in rounds.tsv.
BURDEN_IN_ROUNDS = [
    "n_studies",
    "voxels_changed_median",
    "changed_ml_median",
    "lesion_edits_median",
    "review_seconds_median",
]


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

    rows = []
    for path in summaries:
        summary = read_json(path)
        row = {
            "round": summary["round"],
            "n_train": summary.get("n_train"),
            "n_validation": summary.get("n_validation"),
            "mean_dice": summary.get("mean_dice"),
            "mean_lesion_f1": summary.get("mean_lesion_f1"),
        }
        for group, value in (summary.get("per_group_dice") or {}).items():
            row[f"dice_{group}"] = value
        rows.append(row)
    batch_sizes = {0: 0}
    for index, path in enumerate(selections, start=1):
        batch_sizes[index] = len(pd.read_csv(path, sep="\t"))
    table = pd.DataFrame(rows).sort_values("round")
    table["batch_size"] = table["round"].map(batch_sizes).fillna(0).astype(int)
    # The correction burden of the labels each round's model was fine-tuned on, next to its Dice.
    burden = read_burden_tables(burdens)
    burden_summary = summarise_rounds(burden, rounds=[r for r in table["round"] if r > 0])
    write_table(out_burden, burden_summary)
    plot_correction_burden(burden, out_burden_plot)
    table = table.merge(
        burden_summary[["round", *BURDEN_IN_ROUNDS]].rename(
            columns={"n_studies": "burden_studies"}
        ),
        on="round",
        how="left",
    )
    write_table(out_table, table)

    frames = [pd.read_csv(p, sep="\t") for p in per_study]
    frames = [f for f in frames if not f.empty]
    per_study_all = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    plot_metric_by_round(per_study_all, out_plot, metric="dice", group="whole_lesion")

    plan = pd.read_csv(plan_path, sep="\t", dtype=str, keep_default_na=False)
    quarantine = pd.read_csv(quarantine_path, sep="\t", dtype=str, keep_default_na=False)
    cohort = plan.groupby("role").agg(
        studies=("study_id", "size"),
        patients=("patient_id", "nunique"),
        cpu_shards=("shard", "nunique"),
        gpu_shards=("gpu_shard", "nunique"),
    )
    cohort["quarantined"] = [
        int(quarantine.study_id.isin(plan.study_id[plan.role == role]).sum())
        if len(quarantine)
        else 0
        for role in cohort.index
    ]
    write_table(out_cohort, cohort.reset_index())
    return table


OVERLAY_GROUP = "whole_lesion"


def best_and_worst(per_study: pd.DataFrame, metric: str = "dice") -> tuple[str, str]:
    """Study ids with the highest and lowest ``metric`` (whole lesion; NaN rows ignored).

    Ties go to the first study id in sorted order, so the choice is reproducible.
    """
    rows = per_study[(per_study["group"] == OVERLAY_GROUP) & per_study[metric].notna()]
    if rows.empty:
        raise ValueError(f"no validation study has a {metric} for {OVERLAY_GROUP!r}")
    rows = rows.sort_values(["study_id"]).sort_values(metric, kind="stable")
    return str(rows["study_id"].iloc[-1]), str(rows["study_id"].iloc[0])


def _overlay_for(study_record: dict, pred_root: str, out_png: str, title_metric: float) -> None:
    import nibabel as nib
    import numpy as np

    from metsflow.cohort import Study
    from metsflow.figures import overlay_png
    from metsflow.labels import to_internal

    study = Study.from_record(study_record)
    image = nib.load(str(study.t1c))
    pred = nib.load(str(Path(pred_root) / study.study_id / "pred_native.nii.gz"))
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
    per_study: list[str],
    final_lesions: str,
    response: str,
    studies: list[dict],
    pred_root: str,
    out_f1_plot: str,
    out_distributions: str,
    out_volume_vs_dice: str,
    out_trajectories: str,
    out_overlay_best: str,
    out_overlay_worst: str,
) -> dict[str, str]:
    """Figures of the final round and across rounds; returns the overlay study ids."""
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
    plot_metric_by_round(all_rounds, out_f1_plot, metric="lesion_f1", group=OVERLAY_GROUP)
    final = all_rounds[all_rounds["round"] == all_rounds["round"].max()]
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
    dice = final[final["group"] == OVERLAY_GROUP].set_index("study_id")["dice"]
    for study_id, out_png in ((best, out_overlay_best), (worst, out_overlay_worst)):
        _overlay_for(records[study_id], pred_root, out_png, float(dice[study_id]))
    return {"best": best, "worst": worst}


# --------------------------------------------------------------------------------------------
# Small-lesion detection: size-binned sensitivity, FP per patient, FROC, stage-2 losses
# --------------------------------------------------------------------------------------------

LOST_LESION_COLUMNS = ["round", "study_id", "lesion_id", "diameter_mm", "size_bin", "best_score"]


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
    fp = {}
    for path in summaries:
        summary = read_json(path)
        fp[summary["round"]] = {
            k: summary.get(k) for k in ("n_patients", "fp_per_study", "fp_per_patient")
        }
    frames = [pd.read_csv(p, sep="\t") for p in detection_tables]
    frames = [f for f in frames if not f.empty]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["round"])
    for key in ("n_patients", "fp_per_study", "fp_per_patient"):
        table[key] = table["round"].map(lambda r, key=key: fp.get(r, {}).get(key))
    write_table(out_table, table)
    lost = []
    for path in stage2_summaries:
        summary = read_json(path)
        lost += [{"round": summary.get("round"), **row} for row in summary.get("lost_lesions", [])]
    write_table(out_lost, pd.DataFrame(lost, columns=LOST_LESION_COLUMNS))
    return table


def run_report_froc(
    round_index: int, froc_table: str, stage2_summary: str | None, out_png: str
) -> None:
    """FROC figure of one round: the validation predictions ranked by stage-1 foreground
    probability, and with stage 2 its validation FROC and chosen operating point."""
    from metsflow.figures import plot_froc

    curves = {
        "validation predictions (stage-1 probability)": pd.read_csv(froc_table, sep="\t"),
    }
    points, limit = {}, None
    if stage2_summary:
        s2 = read_json(stage2_summary)
        curves["stage 2 on its validation candidates (score)"] = pd.DataFrame(
            s2.get("froc") or [], columns=["threshold", "sensitivity", "fp_per_patient"]
        )
        rule = s2.get("operating_rule", "target_sensitivity")
        points[f"stage-2 operating point ({rule})"] = (
            s2.get("fp_per_patient_after", float("nan")),
            s2.get("sensitivity_after", float("nan")),
        )
        if rule == "max_fp_per_patient":
            limit = s2.get("max_fp_per_patient")
    plot_froc(curves, out_png, points, title=f"FROC, round {round_index}", max_fp_per_patient=limit)
