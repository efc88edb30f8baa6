"""The report, statistics and longitudinal tables from one tiny pipeline run, as users get them."""

from __future__ import annotations

import pandas as pd
import pytest

from metsflow.evaluation.report import best_and_worst


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
