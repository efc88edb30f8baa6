"""Report tables across rounds: what `snakemake --report` shows next to the figures.

Each function turns what the pipeline already wrote (round summaries, selections, the
correction-burden summary, the cohort plan, stage-2 summaries) or what the job hands it (the
reviewers' decisions on the possible lesions, read from the label store by
``metsflow.active_learning``, a layer above this one) into one table; reading and writing the
files is the job's (``metsflow.jobs.report``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from metsflow.evaluation.metrics import DEFAULT_SIZE_BINS_MM, HEADLINE_GROUP, size_bin_names

# Correction-burden medians shown next to each round's validation metrics in rounds.tsv.
BURDEN_IN_ROUNDS = [
    "n_studies",
    "voxels_changed_median",
    "changed_ml_median",
    "lesion_edits_median",
    "review_seconds_median",
]
# False-positive rates of a round's summary.json, next to its size-binned sensitivity.
FP_RATES = ("n_patients", "fp_per_study", "fp_per_patient")
LOST_LESION_COLUMNS = ["round", "study_id", "lesion_id", "diameter_mm", "size_bin", "best_score"]
SUGGESTION_COLUMNS = ["round", "size_bin", "offered", "accepted", "dismissed", "accept_rate"]


def rounds_table(
    summaries: Iterable[Mapping],
    batch_sizes: Mapping[int, int],
    burden_summary: pd.DataFrame,
) -> pd.DataFrame:
    """One row per round: training/validation sizes, mean Dice and lesion F1, Dice per group,
    the batch size that round fine-tuned on (round 0: 0) and the correction burden of its
    labels (``burden_summary``: ``metsflow.active_learning.burden.summarise_rounds``)."""
    rows = []
    for summary in summaries:
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
    table = pd.DataFrame(rows).sort_values("round")
    table["batch_size"] = table["round"].map({0: 0, **batch_sizes}).fillna(0).astype(int)
    return table.merge(
        burden_summary[["round", *BURDEN_IN_ROUNDS]].rename(
            columns={"n_studies": "burden_studies"}
        ),
        on="round",
        how="left",
    )


def suggestions_table(
    decisions: Mapping[int, Mapping[str, Mapping[str, int]]],
    size_bins_mm=DEFAULT_SIZE_BINS_MM,
) -> pd.DataFrame:
    """Per round and size bin (smallest first): the possible lesions (candidates the cascade's
    stage 2 dropped) offered in the review editor, accepted, dismissed, and the accept rate
    among those decided (NaN when none was). ``decisions``: round -> size bin -> counts, as
    ``metsflow.active_learning.assists.suggestion_decisions`` sums them; bins without an offer
    are left out."""
    order = {name: index for index, name in enumerate(size_bin_names(size_bins_mm))}
    rows = []
    for round_index in sorted(decisions):
        by_bin = decisions[round_index]
        for size_bin in sorted(by_bin, key=lambda b: (order.get(b, len(order)), b)):
            counts = by_bin[size_bin]
            accepted, dismissed = int(counts.get("accepted", 0)), int(counts.get("dismissed", 0))
            decided = accepted + dismissed
            rows.append(
                {
                    "round": int(round_index),
                    "size_bin": size_bin,
                    "offered": int(counts.get("offered", 0)),
                    "accepted": accepted,
                    "dismissed": dismissed,
                    "accept_rate": accepted / decided if decided else float("nan"),
                }
            )
    return pd.DataFrame(rows, columns=SUGGESTION_COLUMNS)


def cohort_table(plan: pd.DataFrame, quarantine: pd.DataFrame) -> pd.DataFrame:
    """Per plan role: studies, patients, CPU and GPU shards, and quarantined studies."""
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
    return cohort.reset_index()


def best_and_worst(per_study: pd.DataFrame, metric: str = "dice") -> tuple[str, str]:
    """Study ids with the highest and lowest ``metric`` (headline group; NaN rows ignored): the
    studies the report shows as overlays.

    Ties go to the first study id in sorted order, so the choice is reproducible.
    """
    rows = per_study[(per_study["group"] == HEADLINE_GROUP) & per_study[metric].notna()]
    if rows.empty:
        raise ValueError(f"no validation study has a {metric} for {HEADLINE_GROUP!r}")
    rows = rows.sort_values(["study_id"]).sort_values(metric, kind="stable")
    return str(rows["study_id"].iloc[-1]), str(rows["study_id"].iloc[0])


def detection_table(summaries: Iterable[Mapping], by_size: pd.DataFrame) -> pd.DataFrame:
    """Size-binned detection rows of every round (``metrics.detection_summary``'s ``by_size``)
    with that round's false-positive rates (``FP_RATES``) from its summary."""
    fp = {s["round"]: {k: s.get(k) for k in FP_RATES} for s in summaries}
    table = by_size.copy()
    for key in FP_RATES:
        table[key] = table["round"].map(lambda r, key=key: fp.get(r, {}).get(key))
    return table


def lost_lesions(stage2_summaries: Iterable[Mapping]) -> pd.DataFrame:
    """The validation lesions each round's stage-2 operating point loses (``LOST_LESION_COLUMNS``;
    empty without stage 2)."""
    lost = [
        {"round": summary.get("round"), **row}
        for summary in stage2_summaries
        for row in summary.get("lost_lesions", [])
    ]
    return pd.DataFrame(lost, columns=LOST_LESION_COLUMNS)


def cascade_ceiling(stage2_summaries: Iterable[Mapping]) -> pd.DataFrame:
    """Per round with stage 2: the stage-1 proposals' validation lesion sensitivity (the
    ceiling stage 2 works under; ``proposal_sensitivity``, or ``sensitivity_before`` for a
    summary written before it existed), the operating point's sensitivity and FP/patient, and
    how many validation lesions the operating point gives up per size bin (``lost <bin>``)."""
    from metsflow.evaluation.metrics import DEFAULT_SIZE_BINS_MM, size_bin_labels

    bins = size_bin_labels(DEFAULT_SIZE_BINS_MM)
    rows = []
    for s in stage2_summaries:
        lost = [row.get("size_bin") for row in s.get("lost_lesions", [])]
        rows.append(
            {
                "round": s.get("round"),
                "proposal_sensitivity": s.get("proposal_sensitivity", s.get("sensitivity_before")),
                "operating_sensitivity": s.get("sensitivity_after"),
                "operating_fp_per_patient": s.get("fp_per_patient_after"),
                **{f"lost {b}": lost.count(b) for b in bins},
            }
        )
    columns = [
        "round",
        "proposal_sensitivity",
        "operating_sensitivity",
        "operating_fp_per_patient",
        *(f"lost {b}" for b in bins),
    ]
    return pd.DataFrame(rows, columns=columns)


def froc_curves(
    froc: pd.DataFrame, stage2_summary: Mapping | None
) -> tuple[dict[str, pd.DataFrame], dict[str, tuple[float, float]], float | None]:
    """(curves, operating points, FP-per-patient limit) of one round's FROC figure
    (``metsflow.evaluation.figures.plot_froc``): the validation predictions ranked by stage-1 foreground
    probability and, with stage 2, its validation FROC and chosen operating point."""
    curves = {"validation predictions (stage-1 probability)": froc}
    points: dict[str, tuple[float, float]] = {}
    limit = None
    if stage2_summary is not None:
        s2 = stage2_summary
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
    return curves, points, limit
