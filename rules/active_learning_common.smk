# Named input functions of the active-learning rounds (rules/active_learning.smk).
import sys

FINAL_OUTPUTS = [
    LAYOUT.final_labels,
    LAYOUT.final_review_manifest,
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
    done = [LAYOUT.evaluation_summary(r), LAYOUT.model(r)]
    done += [LAYOUT.burden(k) for k in range(1, r + 1)]
    if r == FINAL_ROUND:
        done += FINAL_OUTPUTS
    if SETTINGS.active_learning.annotator != "human":
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
            return [LAYOUT.burden(j) for j in range(1, k)] + [LAYOUT.annotations(k)]
    return done


def final_label_inputs(wildcards):
    return {
        "plan": LAYOUT.plan,
        "model": LAYOUT.model(FINAL_ROUND),
        "predictions": round_prediction_manifests(FINAL_ROUND, "pool"),
        "annotations": [LAYOUT.annotations(k) for k in ROUNDS[1:]],
    }
