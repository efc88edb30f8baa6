"""The report, statistics and longitudinal tables from one tiny pipeline run, as users get them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metsflow.active_learning.labelstore import LabelStore
from metsflow.core import io
from metsflow.evaluation.report import SUGGESTION_COLUMNS, best_and_worst, suggestions_table
from metsflow.jobs.report import suggestions_report


def test_best_and_worst_pick_by_whole_lesion_dice_and_break_ties_by_study():
    per_study = pd.DataFrame(
        {
            "study_id": ["c", "a", "b", "d", "e"],
            "group": ["whole_lesion"] * 4 + ["enhancing"],
            "dice": [0.5, 0.9, 0.9, float("nan"), 1.0],
        }
    )
    assert best_and_worst(per_study) == ("b", "c")
    with pytest.raises(ValueError, match="no validation study"):
        best_and_worst(per_study[per_study.group == "enhancing"].assign(dice=float("nan")))


def test_suggestions_table_orders_size_bins_by_size_and_rates_only_the_decided():
    table = suggestions_table(
        {
            2: {
                "ge10mm": {"offered": 1, "accepted": 1, "dismissed": 0},
                "lt3mm": {"offered": 4, "accepted": 1, "dismissed": 2},
            },
            1: {"3to10mm": {"offered": 2, "accepted": 0, "dismissed": 0}},
        }
    )
    assert list(table.columns) == SUGGESTION_COLUMNS
    assert list(zip(table["round"], table.size_bin, strict=True)) == [
        (1, "3to10mm"),
        (2, "lt3mm"),
        (2, "ge10mm"),
    ]
    assert pd.isna(table.accept_rate.iloc[0])  # offered, none decided
    assert table.accept_rate.iloc[1] == pytest.approx(1 / 3)
    assert table.accepted.tolist() == [0, 1, 1] and table.offered.tolist() == [2, 4, 1]
    assert suggestions_table({}).empty


def test_report_counts_the_reviewers_decisions_per_round_and_size_bin(tmp_path):
    """What rule report_rounds writes as suggestions_by_size_bin.tsv: each selected study's
    newest version with decisions, summed per round (the report's own wiring, jobs layer)."""
    reference = tmp_path / "t1c.nii.gz"
    io.save_nifti(reference, np.ones((4, 4, 4)), np.eye(4), dtype=np.float32)
    label = tmp_path / "label.nii.gz"
    io.save_nifti(label, np.zeros((4, 4, 4)), np.eye(4), dtype=np.uint8)
    store = LabelStore(tmp_path / "labels")

    def save(study_id, accepted, dismissed, size_bin="lt3mm"):
        counts = {"offered": accepted + dismissed + 1, "accepted": accepted}
        decisions = {"suggestions_by_size_bin": {size_bin: {**counts, "dismissed": dismissed}}}
        store.import_label(
            study_id, label, "refined", "tina", reference, provenance={"assists": decisions}
        )

    save("A", 0, 1)
    save("A", 2, 0)  # the newest version's decisions count, not both
    save("B", 1, 1, "ge10mm")
    save("C", 1, 0)  # in no selection
    selections = []
    for index, studies in enumerate((["A"], ["B", "D"]), start=1):
        selections.append(tmp_path / f"selection_{index}.tsv")
        pd.DataFrame({"study_id": studies}).to_csv(selections[-1], sep="\t", index=False)

    table = suggestions_report(str(store.root), [str(p) for p in selections])
    rows = table.set_index(["round", "size_bin"])
    assert list(rows.index) == [(1, "lt3mm"), (2, "ge10mm")]
    assert rows.loc[(1, "lt3mm")].tolist()[:3] == [3, 2, 0]
    assert rows.loc[(2, "ge10mm"), "accept_rate"] == 0.5
    assert suggestions_report(str(tmp_path / "no_store"), [str(p) for p in selections]).empty
