"""Size-resolved lesion detection, FP per patient, FROC and operating points (hand-built)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from metsflow.cohort import phantom
from metsflow.evaluation import metrics
from metsflow.models import cascade

# A voxel of this volume is a sphere of exactly 3 mm (10 mm) equivalent diameter.
Z_3MM = math.pi * 27 / 6
Z_10MM = math.pi * 1000 / 6
LABELS = metrics.size_bin_labels(metrics.DEFAULT_SIZE_BINS_MM)  # < 3, 3-10, >= 10 mm


def put(volume, start, shape):
    i, j, k = start
    volume[i : i + shape[0], j : j + shape[1], k : k + shape[2]] = 1


def study_a():
    """Spacing (1, 1, Z_3MM): n voxels have diameter 3 n^(1/3) mm."""
    ref = np.zeros((24, 24, 8), np.uint8)
    put(ref, (1, 1, 1), (1, 1, 1))  # 3.000 mm: on the 3 mm edge -> 3-10 mm
    put(ref, (4, 1, 1), (2, 2, 2))  # 6.000 mm
    put(ref, (1, 8, 1), (3, 3, 4))  # 36 voxels ...
    ref[4, 8, 1] = 1  # ... + 1 touching = 37: 9.997 mm -> 3-10 mm
    put(ref, (10, 10, 1), (3, 3, 4))  # 36 ...
    put(ref, (13, 10, 1), (1, 1, 2))  # ... + 2 = 38: 10.086 mm -> >= 10 mm
    pred = np.zeros_like(ref)
    put(pred, (1, 1, 1), (1, 1, 1))  # the 3.000 mm lesion found
    pred[10:14, 10:13, 1:5] = ref[10:14, 10:13, 1:5]  # the 38-voxel lesion found
    return pred, ref, (1.0, 1.0, Z_3MM)


def study_b():
    """Isotropic 1 mm: 1 voxel = 1.24 mm, 14 voxels = 2.99 mm (both < 3 mm); 2 false positives."""
    ref = np.zeros((24, 24, 8), np.uint8)
    put(ref, (1, 1, 1), (1, 1, 1))
    put(ref, (5, 5, 1), (2, 7, 1))
    pred = np.zeros_like(ref)
    put(pred, (15, 15, 1), (2, 2, 2))
    put(pred, (20, 20, 5), (1, 1, 1))
    return pred, ref, (1.0, 1.0, 1.0)


def study_c():
    """One voxel of exactly 10 mm (on the edge -> >= 10 mm), found."""
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[2, 2, 2] = 1
    return ref.copy(), ref, (1.0, 1.0, Z_10MM)


def study_d():
    """No reference lesion, one false positive."""
    ref = np.zeros((8, 8, 8), np.uint8)
    pred = ref.copy()
    pred[3, 3, 3] = 1
    return pred, ref, (1.0, 1.0, 1.0)


def study_e():
    """Nothing at all."""
    ref = np.zeros((8, 8, 8), np.uint8)
    return ref.copy(), ref, (1.0, 1.0, 1.0)


STUDIES = {"A": study_a, "B": study_b, "C": study_c, "D": study_d, "E": study_e}
PATIENT_OF = {"A": "P1", "B": "P1", "C": "P2", "D": "P3", "E": "P4"}


def tables():
    ref_rows, pred_rows = [], []
    for study_id, make in STUDIES.items():
        pred, ref, spacing = make()
        lesions, predicted = metrics.lesion_tables(
            pred, ref, spacing, groups=["whole_lesion"], study_id=study_id
        )
        ref_rows.append(lesions)
        pred_rows.append(predicted)
    return concat(ref_rows), concat(pred_rows)


def concat(frames):
    return pd.concat([f for f in frames if not f.empty], ignore_index=True)


def test_bins_are_half_open_and_edges_land_on_the_upper_bin():
    assert metrics.size_bin_names((3, 10)) == ["lt3mm", "3to10mm", "ge10mm"]
    assert metrics.size_bin_names((2.5,)) == ["lt2p5mm", "ge2p5mm"]
    assert LABELS == ["< 3 mm", "3-10 mm", ">= 10 mm"]
    d = metrics.equivalent_diameter_mm(np.array([Z_3MM, Z_10MM, 14.0, 15.0]))
    assert d[0] == pytest.approx(3.0) and d[1] == pytest.approx(10.0)
    assert metrics.size_bin_index(d, (3, 10)).tolist() == [1, 2, 0, 1]
    # Floating-point noise around an edge does not move the lesion.
    assert metrics.size_bin_index([3.0 - 1e-12, 10.0 - 1e-12], (3, 10)).tolist() == [1, 2]
    for bad in ([], [10, 3], [0, 3], [3, 3]):
        with pytest.raises(ValueError, match="size bins"):
            metrics.check_size_bins(bad)


def test_lesion_table_diameters_and_bins():
    lesions, _ = tables()
    a = lesions[lesions.study_id == "A"].sort_values("volume_mm3")
    assert a.diameter_mm.round(3).tolist() == [3.0, 6.0, 9.997, 10.086]
    assert a.size_bin.tolist() == [LABELS[1], LABELS[1], LABELS[1], LABELS[2]]
    assert a.detected.tolist() == [True, False, False, True]
    b = lesions[lesions.study_id == "B"].sort_values("volume_mm3")
    assert b.diameter_mm.round(2).tolist() == [1.24, 2.99]
    assert set(b.size_bin) == {LABELS[0]}
    assert lesions[lesions.study_id == "C"].size_bin.tolist() == [LABELS[2]]


def test_detection_by_size_counts_and_wilson_intervals():
    lesions, _ = tables()
    table = metrics.detection_by_size(lesions).set_index("size_bin")
    assert table.loc[LABELS[0], ["n_ref_lesions", "n_detected"]].tolist() == [2, 0]
    assert table.loc[LABELS[1], ["n_ref_lesions", "n_detected"]].tolist() == [3, 1]
    assert table.loc[LABELS[2], ["n_ref_lesions", "n_detected"]].tolist() == [2, 2]
    assert table.loc["all", ["n_ref_lesions", "n_detected"]].tolist() == [7, 3]
    assert table.loc[LABELS[1], "sensitivity"] == pytest.approx(1 / 3)
    # Wilson score interval, closed form.
    z, n, p = 1.959963984540054, 3, 1 / 3
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert table.loc[LABELS[1], "ci95_low"] == pytest.approx(centre - half)
    assert table.loc[LABELS[1], "ci95_high"] == pytest.approx(centre + half)
    assert table.loc[LABELS[0], "ci95_low"] == 0.0 and table.loc[LABELS[2], "ci95_high"] == 1.0
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))


def test_per_study_bin_metrics_and_empty_bins_are_nan():
    pred, ref, spacing = study_a()
    a = metrics.evaluate_pair(pred, ref, spacing, groups=["whole_lesion"])["whole_lesion"]
    assert a["n_ref_lesions_lt3mm"] == 0 and math.isnan(a["lesion_tpr_lt3mm"])
    assert (a["n_ref_lesions_3to10mm"], a["lesion_tp_3to10mm"]) == (3, 1)
    assert (a["n_ref_lesions_ge10mm"], a["lesion_tpr_ge10mm"]) == (1, 1.0)
    custom = metrics.evaluate_pair(pred, ref, spacing, groups=["whole_lesion"], size_bins_mm=[7])
    assert custom["whole_lesion"]["n_ref_lesions_lt7mm"] == 2
    assert custom["whole_lesion"]["n_ref_lesions_ge7mm"] == 2


def test_false_positives_per_patient_count_patients_without_lesions():
    _, predicted = tables()
    false = (predicted.matched_lesion_id == 0).groupby(predicted.study_id).sum().to_dict()
    rates = metrics.false_positive_rates(false, PATIENT_OF)
    # B: 2, D: 1 (a patient with no reference lesion); E has nothing but still counts.
    assert rates["false_positives"] == 3
    assert (rates["n_studies"], rates["n_patients"]) == (5, 4)
    assert rates["fp_per_study"] == pytest.approx(3 / 5)
    assert rates["fp_per_patient"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="without a patient"):
        metrics.false_positive_rates({"X": 1}, PATIENT_OF)


def test_froc_is_monotone_and_ends_at_keeping_everything():
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(size=60), 2)  # ties on purpose
    hits = [[int(h)] if h < 25 else [] for h in rng.integers(0, 40, size=60)]
    curve = metrics.froc(scores, hits, n_reference=30, n_patients=7)
    assert (np.diff(curve.threshold) < 0).all()
    assert (np.diff(curve.sensitivity) >= 0).all() and (np.diff(curve.fp_per_patient) >= 0).all()
    found = {h[0] for h in hits if h}
    assert curve.sensitivity.iloc[-1] == pytest.approx(len(found) / 30)
    assert curve.false_positives.iloc[-1] == sum(1 for h in hits if not h)
    # A lesion hit by two candidates counts once, from the higher score on.
    two = metrics.froc([0.9, 0.5], [["x"], ["x"]], n_reference=1, n_patients=1)
    assert two.true_positives.tolist() == [1, 1]
    with pytest.raises(ValueError, match="NaN"):
        metrics.froc([math.nan], [[]], 1, 1)


def test_froc_from_evaluated_tables_uses_scores():
    score_maps = {}
    ref_rows, pred_rows = [], []
    for study_id, make in STUDIES.items():
        pred, ref, spacing = make()
        # Found lesions score high, false positives low.
        score_maps[study_id] = np.where(ref > 0, 0.9, 0.2).astype(np.float32)
        lesions, predicted = metrics.lesion_tables(
            pred, ref, spacing, groups=["whole_lesion"], study_id=study_id,
            score_map=score_maps[study_id],
        )  # fmt: skip
        ref_rows.append(lesions)
        pred_rows.append(predicted)
    curve = metrics.froc_from_tables(concat(ref_rows), concat(pred_rows), PATIENT_OF)
    assert curve.threshold.tolist() == pytest.approx([0.9, 0.2])
    assert curve.sensitivity.tolist() == pytest.approx([3 / 7, 3 / 7])
    assert curve.fp_per_patient.tolist() == pytest.approx([0.0, 3 / 4])


# 4 reference lesions a-d, 2 patients; FROC (threshold: tp, fp/patient):
# 0.9: 1, 0 | 0.8: 1, .5 | 0.7: 2, .5 | 0.6: 2, 1 | 0.5: 3, 1 | 0.4: 3, 1.5 | 0.3: 4, 1.5
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
HITS = [["a"], [], ["b"], [], ["c"], [], ["d"]]


@pytest.mark.parametrize(
    ("max_fp", "threshold", "sensitivity", "met"),
    [(1.0, 0.5, 0.75, True), (0.5, 0.7, 0.5, True), (0.0, 0.9, 0.25, True), (2.0, 0.3, 1.0, True)],
)
def test_max_fp_per_patient_rule(max_fp, threshold, sensitivity, met):
    curve = metrics.froc(SCORES, HITS, 4, 2)
    point = metrics.choose_operating_point(curve, "max_fp_per_patient", max_fp_per_patient=max_fp)
    assert point["threshold"] == pytest.approx(threshold)
    assert point["sensitivity"] == pytest.approx(sensitivity)
    assert point["fp_per_patient"] <= max_fp and point["rule_met"] is met


def test_max_fp_rule_prefers_fewer_false_positives_and_reports_an_unmet_limit():
    tie = metrics.froc([0.9, 0.8], [["a"], []], 1, 1)
    assert metrics.choose_operating_point(tie, max_fp_per_patient=1.0)["threshold"] == 0.9
    first_false = metrics.froc([0.9, 0.8], [[], ["a"]], 1, 1)
    point = metrics.choose_operating_point(first_false, max_fp_per_patient=0.0)
    assert point["threshold"] == 0.9 and point["rule_met"] is False


@pytest.mark.parametrize(
    ("n_ref", "target", "threshold", "met"),
    [(4, 0.75, 0.5, True), (4, 1.0, 0.3, True), (5, 1.0, 0.3, False), (4, 0.5, 0.7, True)],
)
def test_target_sensitivity_rule(n_ref, target, threshold, met):
    curve = metrics.froc(SCORES, HITS, n_ref, 2)
    point = metrics.choose_operating_point(curve, "target_sensitivity", target_sensitivity=target)
    assert point["threshold"] == pytest.approx(threshold) and point["rule_met"] is met


def test_operating_rules_are_checked():
    with pytest.raises(ValueError, match="operating rule"):
        metrics.choose_operating_point(metrics.froc(SCORES, HITS, 4, 2), "best_f1")
    with pytest.raises(ValueError, match="operating_rule"):
        cascade.resolve_params({"operating_rule": "best_f1"})
    empty = metrics.choose_operating_point(metrics.froc([], [], 0, 1))
    assert empty["threshold"] == 0.0  # nothing to choose on: keep every candidate


def test_cascade_threshold_by_rule_stores_froc_and_lost_lesions():
    hits = [[("S1", 1)], [], [("S1", 2)], [], [("S2", 1)], [], [("S2", 2)]]
    by_fp = cascade.choose_threshold(SCORES, hits, 4, n_patients=2, max_fp_per_patient=1.0)
    assert by_fp["operating_rule"] == "max_fp_per_patient"
    assert by_fp["threshold"] == pytest.approx(0.5)
    assert by_fp["sensitivity_after"] == 0.75 and by_fp["fp_per_patient_after"] == 1.0
    assert by_fp["fp_per_patient_before"] == 1.5 and len(by_fp["froc"]) == 7
    by_target = cascade.choose_threshold(
        SCORES, hits, 4, n_patients=2, rule="target_sensitivity", target_sensitivity=1.0
    )
    assert by_target["threshold"] == pytest.approx(0.3)
    diameters = {("S1", 1): 12.0, ("S1", 2): 5.0, ("S2", 1): 2.0, ("S2", 2): 2.5}
    lost = cascade.lost_lesions(SCORES, hits, by_fp["threshold"], diameters)
    assert lost == [
        {
            "study_id": "S2",
            "lesion_id": 2,
            "diameter_mm": 2.5,
            "size_bin": "< 3 mm",
            "best_score": 0.3,
        }
    ]


def test_heavy_tailed_phantom_radii_are_mostly_small():
    plan = phantom._plan_lesions(0, 12, 1, 15, "heavy_tailed")
    radii = np.array([lesion.radii_mm[0] for lesions in plan for lesion in lesions])
    assert len(radii) > 40
    assert (radii < 1.5).mean() > 0.5  # most under 3 mm diameter
    assert radii.max() > 3 * np.median(radii)  # a heavy tail
    classes = phantom._plan_lesions(0, 12, 1, 15)
    assert min(les.radii_mm[0] for p in classes for les in p) >= phantom.SMALL_RADIUS_MM[0]
    with pytest.raises(ValueError, match="radius_law"):
        phantom.make_demo_cohort("/nonexistent", radius_law="uniform")


def scored_tables():
    ref_rows, pred_rows = [], []
    for study_id, make in STUDIES.items():
        pred, ref, spacing = make()
        lesions, predicted = metrics.lesion_tables(
            pred, ref, spacing, groups=["whole_lesion"], study_id=study_id,
            score_map=np.where(ref > 0, 0.9, 0.2),
        )  # fmt: skip
        ref_rows.append(lesions)
        pred_rows.append(predicted)
    return concat(ref_rows), concat(pred_rows)


def test_round_tables_status_and_report(tmp_path):
    from metsflow.active_learning.status import detection_status
    from metsflow.core.io import write_json, write_table
    from metsflow.evaluation.metrics import detection_summary
    from metsflow.jobs.report import run_report_detection, run_report_froc

    lesions, predicted = scored_tables()
    out = detection_summary(1, lesions, predicted, PATIENT_OF, (3, 10))
    assert out["by_size"]["round"].eq(1).all() and len(out["froc"]) == 2
    summary = out["summary"]
    assert summary["fp_per_patient"] == pytest.approx(0.75) and summary["n_patients"] == 4
    by_size = summary["sensitivity_by_size"]
    assert [b["size_bin"] for b in by_size] == [*LABELS, "all"]
    assert by_size[1]["n_detected"] == 1

    evaluation = tmp_path / "results" / "rounds" / "round_1" / "evaluation"
    write_json(evaluation / "summary.json", {"round": 1, **summary})
    write_table(evaluation / "detection_by_size.tsv", out["by_size"])
    write_table(evaluation / "froc.tsv", out["froc"])
    text = detection_status(tmp_path / "results")
    header = text.splitlines()[1]
    assert header.index("< 3 mm") < header.index("3-10 mm") < header.index(">= 10 mm")
    assert "0/2 0.00 [0.00-0.66]" in text and "1/3 0.33" in text
    assert text.splitlines()[-1].split()[-2:] == ["0.75", "0.60"]
    assert detection_status(tmp_path / "nothing") == ""

    stage2 = tmp_path / "stage2_summary.json"
    write_json(
        stage2,
        {
            "round": 1,
            "operating_rule": "max_fp_per_patient",
            "max_fp_per_patient": 1.0,
            "sensitivity_after": 0.75,
            "fp_per_patient_after": 1.0,
            "froc": metrics.froc(SCORES, HITS, 4, 2).to_dict("records"),
            "lost_lesions": [{"study_id": "S2", "lesion_id": 2, "diameter_mm": 2.5,
                              "size_bin": "< 3 mm", "best_score": 0.3}],
        },
    )  # fmt: skip
    png = tmp_path / "froc.png"
    run_report_froc(1, str(evaluation / "froc.tsv"), str(stage2), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run_report_detection(
        [str(evaluation / "summary.json")],
        [str(evaluation / "detection_by_size.tsv")],
        [str(stage2)],
        str(tmp_path / "detection.tsv"),
        str(tmp_path / "lost.tsv"),
    )
    assert table.fp_per_patient.eq(0.75).all() and len(table) == 4
    lost = pd.read_csv(tmp_path / "lost.tsv", sep="\t")
    assert lost[["round", "study_id", "size_bin"]].values.tolist() == [[1, "S2", "< 3 mm"]]
