# Named input functions of the active-learning rounds (rules/active_learning.smk).
import sys

FINAL_OUTPUTS = [
    f"{RESULTS}/final/labels.tsv",
    f"{RESULTS}/final/qa_review/manifest.csv",
    *EXPORT_OUTPUTS,  # rules/export.smk: BIDS derivatives and DICOM SEG of the final labels
]


def pending_review(selection):
    """Studies of a round's batch without a confirmed label in the store (read at planning)."""
    from metsflow.active_learning.labelstore import unconfirmed_studies

    return unconfirmed_studies(selection, config["label_store"])


def round_target_inputs(r):
    """What `snakemake round_<r>` must produce: round r evaluated (and, for the last round, the
    final labels and QA export), or with people, everything up to the first unconfirmed batch.
    """
    done = [evaluation_summary(r), model_path(r)]
    done += [burden_table(k) for k in range(1, r + 1)]
    if r == FINAL_ROUND:
        done += FINAL_OUTPUTS
    if config["active_learning"]["annotator"] != "human":
        return done
    for k in range(1, r + 1):
        selection = checkpoints.select_batch.get(round=str(k)).output.selection
        pending = pending_review(selection)
        if pending:
            print(
                f"round {k}: {len(pending)} studies wait for a confirmed label "
                f"({', '.join(pending[:10])}{' ...' if len(pending) > 10 else ''}); "
                f"this run stops before training round {k}. Import with "
                f"`metsflow al import --round {k} --stage confirmed ...`.",
                file=sys.stderr,
            )
            return [burden_table(j) for j in range(1, k)] + [annotation_table(k)]
    return done


def final_label_inputs(wildcards):
    return {
        "plan": PLAN_TABLE,
        "model": model_path(FINAL_ROUND),
        "predictions": round_prediction_manifests(FINAL_ROUND, "pool"),
        "annotations": [annotation_table(k) for k in ROUNDS[1:]],
    }
