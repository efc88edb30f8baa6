"""Lesion tracking and volumetric response on hand-built masks with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metsflow.longitudinal import (
    BASELINE,
    COMPLETE_RESPONSE,
    NO_DISEASE,
    PARTIAL_RESPONSE,
    PROGRESSION,
    STABLE,
    ResponseThresholds,
    TimePoint,
    classify_response,
    response_table,
    track_patient,
)

SHAPE = (24, 24, 24)
VOXEL_MM3 = 8.0  # 2 mm isotropic


def cube(corner, size):
    mask = np.zeros(SHAPE, dtype=bool)
    x, y, z = corner
    mask[x : x + size, y : y + size, z : z + size] = True
    return mask


def point(study_id, order, *cubes):
    mask = np.zeros(SHAPE, dtype=bool)
    for c in cubes:
        mask |= c
    return TimePoint(study_id, order, mask, VOXEL_MM3)


def by_lesion(table, study_id):
    rows = table[table.study_id == study_id]
    return {r.lesion_id: (r.volume_mm3, r.status) for r in rows.itertuples()}


def test_lesions_keep_their_identity_and_new_and_resolved_are_flagged():
    a0, b0 = cube((2, 2, 2), 4), cube((14, 14, 14), 3)
    # t1: A shrinks inside its old extent, B vanishes, C appears far from both.
    a1, c1 = cube((3, 3, 3), 2), cube((2, 16, 2), 3)
    # t2: A shrinks to two corner-touching voxels inside its t1 extent.
    a2 = cube((3, 3, 3), 1) | cube((4, 4, 4), 1)
    table = track_patient(
        "P1", [point("P1_t2", 2, a2, c1), point("P1_t0", 0, a0, b0), point("P1_t1", 1, a1, c1)]
    )
    assert by_lesion(table, "P1_t0") == {
        "P1-L1": (64 * VOXEL_MM3, BASELINE),
        "P1-L2": (27 * VOXEL_MM3, BASELINE),
    }
    assert by_lesion(table, "P1_t1") == {
        "P1-L1": (8 * VOXEL_MM3, "tracked"),
        "P1-L2": (0.0, "resolved"),
        "P1-L3": (27 * VOXEL_MM3, "new"),
    }
    # cubes (3,3,3) and (4,4,4) touch at a corner: 26-connectivity makes them one component
    t2 = table[table.study_id == "P1_t2"].set_index("lesion_id")
    assert t2.loc["P1-L1", "volume_mm3"] == 2 * VOXEL_MM3
    assert t2.loc["P1-L1", "previous_volume_mm3"] == 8 * VOXEL_MM3
    assert t2.loc["P1-L3", "status"] == "tracked"
    assert "P1-L2" not in t2.index  # a resolved lesion is not carried forward


def test_split_lesion_sums_its_parts_and_largest_overlap_wins():
    big = cube((2, 2, 2), 8)
    # Two separate pieces inside the old lesion; a third piece mostly over another old lesion.
    other = cube((14, 2, 2), 4)
    parts = cube((2, 2, 2), 2) | cube((7, 7, 7), 2)
    bridge = np.zeros(SHAPE, dtype=bool)
    bridge[9:17, 3, 3] = True  # 1 voxel in `big` (x=9), 3 in `other` (x=14..16)
    table = track_patient("P", [point("t0", 0, big, other), point("t1", 1, parts, bridge)])
    t1 = table[table.study_id == "t1"].set_index("lesion_id")
    assert t1.loc["P-L1", "volume_mm3"] == 16 * VOXEL_MM3
    assert t1.loc["P-L1", "n_components"] == 2
    assert t1.loc["P-L2", "volume_mm3"] == 8 * VOXEL_MM3
    assert t1.loc["P-L2", "status"] == "tracked"


def test_min_overlap_turns_a_grazing_component_into_a_new_lesion():
    old = cube((2, 2, 2), 4)
    grazing = cube((5, 5, 5), 3)  # overlaps `old` in exactly one voxel (5,5,5)
    tracked = track_patient("P", [point("t0", 0, old), point("t1", 1, grazing)])
    assert set(tracked[tracked.study_id == "t1"].status) == {"tracked"}
    strict = track_patient(
        "P", [point("t0", 0, old), point("t1", 1, grazing)], min_overlap_voxels=2
    )
    assert sorted(strict[strict.study_id == "t1"].status) == ["new", "resolved"]


def test_warp_is_applied_to_the_previous_lesion_ids():
    old = cube((2, 2, 2), 3)
    moved = cube((12, 2, 2), 3)  # the patient moved 10 voxels along x

    def shift(ids, previous, current):
        assert (previous.study_id, current.study_id) == ("t0", "t1")
        return np.roll(ids, 10, axis=0)

    table = track_patient("P", [point("t0", 0, old), point("t1", 1, moved)], warp=shift)
    assert list(table[table.study_id == "t1"].status) == ["tracked"]
    unwarped = track_patient("P", [point("t0", 0, old), point("t1", 1, moved)])
    assert sorted(unwarped[unwarped.study_id == "t1"].status) == ["new", "resolved"]


def test_mismatched_grids_need_a_warp():
    small = TimePoint("t1", 1, np.ones((4, 4, 4), bool), 1.0)
    with pytest.raises(ValueError, match="t1.*identity warp"):
        track_patient("P", [point("t0", 0, cube((0, 0, 0), 2)), small])


THRESHOLDS = ResponseThresholds()


@pytest.mark.parametrize(
    "volume, baseline, nadir, new, expected",
    [
        (0.0, 1000.0, 1000.0, [], COMPLETE_RESPONSE),
        (343.0, 1000.0, 1000.0, [], PARTIAL_RESPONSE),  # 65.7% decrease: PR exactly at threshold
        (344.0, 1000.0, 1000.0, [], STABLE),
        (1727.0, 1000.0, 1000.0, [], STABLE),  # +72.7%: just under progression
        (1728.0, 1000.0, 1000.0, [], PROGRESSION),
        (600.0, 1000.0, 300.0, [], PROGRESSION),  # +100% from the nadir, PR-range from baseline
        (100.0, 1000.0, 100.0, [65.0], PROGRESSION),  # a significant new lesion
        (100.0, 1000.0, 1000.0, [64.0], PARTIAL_RESPONSE),  # an equivocal small new lesion
        (0.0, 0.0, 0.0, [], NO_DISEASE),
        (50.0, 0.0, 0.0, [50.0], STABLE),  # equivocal new lesion without prior disease
        (40.0, 1000.0, 0.0, [], PROGRESSION),  # tracked disease regrows after reaching zero
    ],
)
def test_response_categories_at_the_documented_thresholds(volume, baseline, nadir, new, expected):
    assert classify_response(volume, baseline, nadir, new, THRESHOLDS) == expected


def test_thresholds_come_from_config_and_are_checked():
    assert ResponseThresholds.from_config({"progression_increase": 0.4}).progression_increase == 0.4
    assert ResponseThresholds.from_config(None) == ResponseThresholds()
    with pytest.raises(ValueError, match="partial_response_decrease"):
        ResponseThresholds.from_config({"partial_response_decrease": 1.5})


def test_response_table_uses_baseline_and_running_nadir():
    lesions = track_patient(
        "P",
        [
            point("t0", 0, cube((2, 2, 2), 5)),  # 125 voxels = 1000 mm^3
            point("t1", 1, cube((2, 2, 2), 3)),  # 27 -> 216 mm^3: PR (-78%)
            point("t2", 2, cube((2, 2, 2), 4)),  # 64 -> 512 mm^3: +137% from nadir: PD
            point("t3", 3),  # nothing left: CR
        ],
    )
    points = pd.DataFrame(
        {"patient_id": "P", "study_id": ["t0", "t1", "t2", "t3"], "order": [0, 1, 2, 3]}
    )
    table = response_table(lesions, points, THRESHOLDS).set_index("study_id")
    assert list(table.response) == [BASELINE, PARTIAL_RESPONSE, PROGRESSION, COMPLETE_RESPONSE]
    assert list(table.total_volume_mm3) == [1000.0, 216.0, 512.0, 0.0]
    assert list(table.nadir_volume_mm3) == [1000.0, 1000.0, 216.0, 216.0]
    assert table.loc["t1", "change_from_baseline"] == pytest.approx(-0.784)
    assert table.loc["t2", "change_from_nadir"] == pytest.approx(512 / 216 - 1)
    assert table.loc["t3", "n_lesions"] == 0


def test_response_table_flags_new_lesions():
    lesions = track_patient(
        "P",
        [
            point("t0", 0, cube((2, 2, 2), 5)),
            point("t1", 1, cube((2, 2, 2), 5), cube((15, 15, 15), 3)),  # new: 216 mm^3
        ],
    )
    points = pd.DataFrame({"patient_id": "P", "study_id": ["t0", "t1"], "order": [0, 1]})
    table = response_table(lesions, points, THRESHOLDS).set_index("study_id")
    assert table.loc["t1", "response"] == PROGRESSION
    assert table.loc["t1", "n_new_lesions"] == 1
    assert table.loc["t1", "new_lesion_volume_mm3"] == 216.0
    assert table.loc["t0", "change_from_nadir"] == 0.0
    assert table.loc["t0", "n_new_lesions"] == 0
