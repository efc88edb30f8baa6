"""Report tables and figures across rounds (consumed by `snakemake --report`)."""

from __future__ import annotations

import pandas as pd

from metsflow.io import read_json, write_table


def run_report_rounds(
    plan_path: str,
    quarantine_path: str,
    summaries: list[str],
    per_study: list[str],
    selections: list[str],
    out_table: str,
    out_plot: str,
    out_cohort: str,
) -> pd.DataFrame:
    from metsflow.figures import plot_metric_by_round

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
