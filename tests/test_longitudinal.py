"""Lesion tracking and volumetric response on hand-built masks with known answers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from metsflow.evaluation.longitudinal import (
    BASELINE,
    COMPLETE_RESPONSE,
    NO_DISEASE,
    PARTIAL_RESPONSE,
    PROGRESSION,
    STABLE,
    ResponseThresholds,
    TimePoint,
    classify_response,
    identity_warp,
    response_table,
    track_chains,
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


def test_track_chains_names_each_series_and_lists_its_time_points():
    from metsflow.core.labels import EDEMA, ENHANCING

    labels = {}
    for study_id, corner in (("A0", (2, 2, 2)), ("A1", (3, 2, 2)), ("A2", (12, 12, 12))):
        labels[study_id] = np.zeros(SHAPE, dtype=np.uint8)
        labels[study_id][cube(corner, 4)] = ENHANCING
    labels["A2"][cube((2, 2, 2), 3)] = EDEMA  # edema is not tracked
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    warps = []

    def warp_for(affines):
        warps.append(sorted(affines))
        return identity_warp

    lesions, points = track_chains(
        [("A", "A", ["A0", "A1"]), ("A", "A2", ["A2"])],  # registration broke before A2
        lambda study_id: (labels[study_id], affine, (2.0, 2.0, 2.0)),
        {"A0": 0, "A1": 1, "A2": 2},
        warp_for,
        ResponseThresholds(match_margin_mm=0),
    )
    assert warps == [["A0", "A1"], ["A2"]]  # one warp per series, over its own studies
    assert set(lesions.patient_id) == {"A"}
    assert by_lesion(lesions, "A1") == {"A-L1": (64 * VOXEL_MM3, "tracked")}
    assert by_lesion(lesions, "A2") == {"A2-L1": (64 * VOXEL_MM3, "baseline")}
    assert points.to_dict("list") == {
        "patient_id": ["A", "A", "A"],
        "study_id": ["A0", "A1", "A2"],
        "order": [0, 1, 2],
    }
    empty, no_points = track_chains([], None, {}, warp_for, ResponseThresholds())
    assert empty.empty and list(empty.columns)[:4] == [
        "patient_id",
        "study_id",
        "order",
        "lesion_id",
    ]
    assert no_points.empty


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


# ---------------------------------------------------------------- the job on a results tree


def test_run_longitudinal_tracks_predictions_and_references_through_the_registration(tmp_path):
    from _synthetic_images import identity_registration

    from metsflow.core.io import save_nifti
    from metsflow.core.labels import EDEMA, ENHANCING
    from metsflow.core.layout import Layout
    from metsflow.evaluation.longitudinal import ResponseThresholds
    from metsflow.jobs.longitudinal import LongitudinalInputs, run_longitudinal

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    layout = Layout(tmp_path)
    prep, reg = Path(layout.stage_root("preprocessed")), Path(layout.stage_root("registered"))
    pred = Path(layout.prediction_root(2))
    # P1: baseline lesion shrinks (PR) in the prediction; reference labels only at baseline,
    # so the reference series has one time point. P2: follow-up registration failed.
    masks = {
        "P1_a": cube((2, 2, 2), 6),  # 216 voxels
        "P1_b": cube((3, 3, 3), 3),  # 27 voxels, inside: tracked, -87.5%
        "P2_a": cube((10, 10, 10), 2),
        "P2_b": cube((10, 10, 10), 2),
    }
    for study_id, mask in masks.items():
        (prep / study_id).mkdir(parents=True)
        save_nifti(prep / study_id / "t1c.nii.gz", np.ones(SHAPE, np.float32), affine)
        labels = np.where(mask, ENHANCING, 0).astype(np.uint8)
        labels[0, 0, 0] = EDEMA  # edema is not enhancing disease: ignored
        save_nifti(pred / study_id / "pred.nii.gz", labels, affine, dtype=np.uint8)
    save_nifti(prep / "P1_a" / "label.nii.gz", masks["P1_a"].astype(np.uint8), affine)
    img = nib.load(str(prep / "P1_b" / "t1c.nii.gz"))
    identity_registration(reg / "P1_b", img)

    plan = pd.DataFrame(
        {
            "study_id": list(masks),
            "patient_id": ["P1", "P1", "P2", "P2"],
            "order": [0, 1, 0, 1],
        }
    )
    plan.to_csv(tmp_path / "plan.tsv", sep="\t", index=False)
    manifest = pd.DataFrame(
        {"study_id": list(masks), "patient_id": plan.patient_id, "status": "ok", "problem": ""}
    )
    manifest.to_csv(tmp_path / "pred.tsv", sep="\t", index=False)
    registered = manifest.assign(
        status=["baseline", "ok", "baseline", "failed"], reference_study=["", "P1_a", "", "P2_a"]
    )
    registered.to_csv(tmp_path / "reg.tsv", sep="\t", index=False)

    lesions, response = run_longitudinal(
        layout,
        ResponseThresholds.from_config({"new_lesion_min_mm3": 65.0}),
        LongitudinalInputs(
            round_index=2,
            plan=str(tmp_path / "plan.tsv"),
            prediction_manifests=[str(tmp_path / "pred.tsv")],
            registration_manifests=[str(tmp_path / "reg.tsv")],
            lesions=str(tmp_path / "out" / "lesions.tsv"),
            response=str(tmp_path / "out" / "response.tsv"),
        ),
    )
    written = pd.read_csv(tmp_path / "out" / "response.tsv", sep="\t")
    assert len(written) == len(response)
    predicted = response[response.source == "prediction"].set_index("study_id")
    # P2's follow-up failed registration: its series stops at the baseline.
    assert list(predicted.index) == ["P1_a", "P1_b", "P2_a"]
    assert predicted.loc["P1_b", "response"] == PARTIAL_RESPONSE
    assert predicted.loc["P1_b", "total_volume_mm3"] == 27 * 8.0
    assert predicted.loc["P1_a", "total_volume_mm3"] == 216 * 8.0
    followup = lesions[(lesions.source == "prediction") & (lesions.study_id == "P1_b")]
    assert list(followup.status) == ["tracked"] and list(followup.lesion_id) == ["P1-L1"]
    reference = response[response.source == "reference"]
    assert list(reference.study_id) == ["P1_a"] and list(reference.response) == [BASELINE]


def test_match_margin_tracks_a_small_lesion_displaced_by_registration_error():
    old = cube((5, 5, 5), 1)
    shifted = cube((6, 6, 5), 1)  # one voxel off diagonally: no overlap
    points = [point("t0", 0, old), point("t1", 1, shifted)]
    exact = track_patient("P", points)
    assert sorted(exact[exact.study_id == "t1"].status) == ["new", "resolved"]
    tolerant = track_patient("P", points, margin_voxels=1)
    assert list(tolerant[tolerant.study_id == "t1"].status) == ["tracked"]
    # The margin never paints over another lesion: each keeps its own id.
    a, b = cube((2, 2, 2), 2), cube((5, 2, 2), 2)
    both = track_patient("P", [point("t0", 0, a, b), point("t1", 1, a, b)], margin_voxels=2)
    assert list(both[both.study_id == "t1"].lesion_id) == ["P-L1", "P-L2"]
