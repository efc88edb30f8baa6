"""Metrics on hand-built masks whose values are known exactly."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from metsflow.core import io, labels
from metsflow.core.labels import ENHANCING, NECROSIS
from metsflow.evaluation import metrics


def box(shape, *ranges, value=1, out=None):
    """Array of ``shape`` (or ``out``) with ``value`` in the box given by (start, stop) ranges."""
    arr = np.zeros(shape, dtype=np.uint8) if out is None else out
    arr[tuple(slice(a, b) for a, b in ranges)] = value
    return arr


def whole(pred, ref, spacing=(1, 1, 1), **kw):
    return metrics.evaluate_pair(pred, ref, spacing, groups=["whole_lesion"], **kw)["whole_lesion"]


# ---------------------------------------------------------------- voxel metrics


def test_two_cubes_with_known_overlap():
    shape = (10, 10, 10)
    ref = box(shape, (2, 6), (2, 6), (2, 6))  # 64 voxels
    pred = box(shape, (4, 8), (2, 6), (2, 6))  # 64 voxels, 32 shared
    m = whole(pred, ref, spacing=(1.0, 2.0, 3.0))
    assert m["dice"] == pytest.approx(2 * 32 / 128)
    assert m["sensitivity"] == pytest.approx(0.5)
    # TN = 1000 - (32 TP + 32 FP + 32 FN)
    assert m["specificity"] == pytest.approx(904 / (904 + 32))
    assert m["ref_volume_mm3"] == pytest.approx(64 * 6.0)
    assert m["pred_volume_mm3"] == pytest.approx(64 * 6.0)
    assert (m["tp_voxels"], m["fp_voxels"], m["fn_voxels"], m["n_voxels"]) == (32, 32, 32, 1000)


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [((2.0, 0.5, 0.7), 20.0), ((0.5, 2.0, 0.7), 5.0), ((1.0, 1.0, 1.0), 10.0)],
)
def test_hd95_of_shifted_cube_uses_the_spacing_of_the_shift_axis(spacing, expected):
    # 4^3 cubes 10 voxels apart along axis 0: every surface voxel of one cube is (10 - d)
    # voxels from the other, d in 0..3; 16 of the 56 surface voxels are at the full 10, so the
    # 95th percentile in both directions is exactly 10 voxels along axis 0.
    shape = (24, 12, 12)
    ref = box(shape, (2, 6), (4, 8), (4, 8))
    pred = box(shape, (12, 16), (4, 8), (4, 8))
    assert metrics.hd95(pred > 0, ref > 0, spacing) == pytest.approx(expected)
    assert whole(pred, ref, spacing)["hd95"] == pytest.approx(expected)


def test_hd95_ignores_a_single_far_outlier_voxel():
    shape = (40, 40, 40)
    ref = box(shape, (5, 15), (5, 15), (5, 15))
    pred = ref.copy()
    pred[35, 35, 35] = 1  # 1 surface voxel out of ~490
    assert metrics.hd95(pred > 0, ref > 0, (1, 1, 1)) == 0.0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice
def test_hd95_matches_monai_on_random_blobs_with_anisotropic_spacing():
    from monai.metrics import compute_hausdorff_distance
    from scipy import ndimage

    rng = np.random.default_rng(3)
    spacing = (0.9, 1.3, 2.5)
    ref = ndimage.binary_opening(rng.random((30, 28, 20)) > 0.55, iterations=1)
    pred = ndimage.binary_opening(rng.random((30, 28, 20)) > 0.55, iterations=1)
    ours = metrics.hd95(pred, ref, spacing)
    theirs = compute_hausdorff_distance(
        pred[None, None].astype(np.float32),
        ref[None, None].astype(np.float32),
        percentile=95,
        spacing=spacing,
    )
    assert ours == pytest.approx(float(theirs), rel=1e-4)


def test_cropping_does_not_change_the_result():
    rng = np.random.default_rng(0)
    ref = np.zeros((20, 20, 20), np.uint8)
    pred = np.zeros_like(ref)
    ref[4:9, 4:9, 4:9] = ENHANCING
    ref[11:13, 5:8, 5:8] = NECROSIS  # one voxel gap from the first lesion: BraTS merges them
    pred[5:10, 4:9, 4:9] = ENHANCING
    pred[rng.random(pred.shape) > 0.995] = NECROSIS
    padded = [np.pad(a, ((7, 30), (3, 11), (0, 9))) for a in (pred, ref)]
    small = metrics.evaluate_pair(pred, ref, (1, 1.5, 2))
    large = metrics.evaluate_pair(*padded, (1, 1.5, 2))
    for group in small:
        for key, value in small[group].items():
            if key not in ("specificity", "n_voxels"):  # these depend on the image size
                assert large[group][key] == pytest.approx(value, nan_ok=True), (group, key)


# ---------------------------------------------------------------- normalised Dice


def test_ndsc_equals_dice_when_rate_is_the_studys_own_positive_rate():
    shape = (10, 10, 10)
    ref = box(shape, (2, 6), (2, 6), (2, 6))
    pred = box(shape, (3, 7), (2, 6), (2, 7))
    own_rate = ref.sum() / ref.size
    assert metrics.normalised_dice(pred, ref, own_rate) == pytest.approx(metrics.dice(pred, ref))


def test_ndsc_equals_dice_at_rate_one_half_only_when_half_the_image_is_positive():
    # Raina et al.: k = (1 - r) h / (r (N - h)); r = 0.5 gives k = 1 only when h = N / 2.
    shape = (10, 10, 10)
    ref = box(shape, (0, 5), (0, 10), (0, 10))  # exactly half the voxels
    pred = box(shape, (1, 7), (0, 10), (0, 10))
    assert metrics.normalised_dice(pred, ref, 0.5) == pytest.approx(metrics.dice(pred, ref))
    small_ref = box(shape, (2, 6), (2, 6), (2, 6))
    assert metrics.normalised_dice(pred, small_ref, 0.5) != pytest.approx(
        metrics.dice(pred, small_ref)
    )


def test_ndsc_matches_raina_formula_by_hand():
    shape = (10, 10, 10)
    ref = box(shape, (2, 6), (2, 6), (2, 6))  # h = 64
    pred = box(shape, (4, 8), (2, 6), (2, 6))  # TP 32, FP 32, FN 32
    r = 0.01
    k = (1 - r) * 64 / (r * (1000 - 64))
    expected = 2 * 32 / (2 * 32 + 32 + k * 32)
    assert metrics.normalised_dice(pred, ref, r) == pytest.approx(expected)
    assert whole(pred, ref, nsd_rate=r)["ndsc"] == pytest.approx(expected)
    assert math.isnan(whole(pred, ref)["ndsc"])  # no rate: filled at cohort level
    with pytest.raises(ValueError, match="rate"):
        metrics.normalised_dice(pred, ref, 0.0)


def test_cohort_rate_and_add_normalised_dice():
    shape = (10, 10, 10)
    ref_a = box(shape, (2, 6), (2, 6), (2, 6))  # rate 0.064
    ref_b = box(shape, (0, 2), (0, 2), (0, 4))  # rate 0.016
    pred = box(shape, (4, 8), (2, 6), (2, 6))
    rows = metrics.flatten("a", metrics.evaluate_pair(pred, ref_a, (1, 1, 1)))
    rows += metrics.flatten("b", metrics.evaluate_pair(pred, ref_b, (1, 1, 1)))
    table = pd.DataFrame(rows)
    rate = metrics.cohort_positive_rate(table)
    assert rate["whole_lesion"] == pytest.approx((0.064 + 0.016) / 2)
    assert rate["edema"] == 0.0
    filled = metrics.add_normalised_dice(table)
    row = filled[(filled.study_id == "a") & (filled.group == "whole_lesion")].iloc[0]
    assert row["ndsc"] == pytest.approx(metrics.normalised_dice(pred, ref_a, 0.04))
    edema = filled[filled.group == "edema"]
    assert (edema["ndsc"] == 1.0).all()  # both empty in every study: r does not matter


# ---------------------------------------------------------------- lesion detection


def _column_pair(overlap):
    """Reference and predicted 2x2x100 columns overlapping by ``overlap`` slices along z."""
    shape = (6, 6, 220)
    ref = box(shape, (2, 4), (2, 4), (10, 110))
    pred = box(shape, (2, 4), (2, 4), (110 - overlap, 210 - overlap))
    return pred, ref


@pytest.mark.parametrize(
    ("overlap", "iou", "matched"),
    [(41, 41 / 159, True), (40, 40 / 160, False), (39, 39 / 161, False)],
)
def test_lesion_match_requires_iou_strictly_above_threshold(overlap, iou, matched):
    pred, ref = _column_pair(overlap)
    m = whole(pred, ref)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == ((1, 0, 0) if matched else (0, 1, 1))
    table = metrics.lesion_table(pred, ref, (1, 1, 1), groups=["whole_lesion"])
    assert bool(table["detected"].iloc[0]) is matched
    if matched:
        assert table["iou"].iloc[0] == pytest.approx(iou)


def test_iou_threshold_is_a_parameter():
    pred, ref = _column_pair(40)  # IoU exactly 0.25
    assert whole(pred, ref, iou_threshold=0.2499)["lesion_tp"] == 1


def test_split_lesion_counts_one_tp_and_one_fp():
    shape = (8, 8, 12)
    ref = box(shape, (2, 6), (2, 6), (2, 10))  # 4x4x8
    pred = box(shape, (2, 6), (2, 6), (2, 5))  # IoU 3/8 each half
    box(shape, (2, 6), (2, 6), (7, 10), out=pred)
    m = whole(pred, ref)
    assert (m["n_ref_lesions"], m["n_pred_lesions"]) == (1, 2)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (1, 1, 0)
    assert m["lesion_f1"] == pytest.approx(2 / 3)
    assert m["lesion_tpr"] == 1.0
    assert m["lesion_fdr"] == pytest.approx(0.5)


def test_merged_lesions_count_one_tp_and_one_fn():
    shape = (8, 8, 14)
    ref = box(shape, (2, 6), (2, 6), (2, 6))
    box(shape, (2, 6), (2, 6), (8, 12), out=ref)  # two lesions, 2-voxel gap
    pred = box(shape, (2, 6), (2, 6), (2, 12))  # one lesion covering both: IoU 0.4 each
    m = whole(pred, ref)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (1, 0, 1)
    assert m["lesion_tpr"] == pytest.approx(0.5)
    assert m["lesion_fdr"] == 0.0


def test_corner_touching_voxels_are_one_lesion_26_connectivity():
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1, 1, 1] = ref[2, 2, 2] = 1
    assert whole(ref, ref)["n_ref_lesions"] == 1


# ---------------------------------------------------------------- BraTS lesion-wise


def test_brats_dilation_merges_lesions_one_voxel_apart_only():
    shape = (10, 10, 30)
    near = box(shape, (3, 7), (3, 7), (2, 6))
    box(shape, (3, 7), (3, 7), (7, 11), out=near)  # 1-voxel gap: merged by the dilation
    far = box(shape, (3, 7), (3, 7), (2, 6))
    box(shape, (3, 7), (3, 7), (9, 13), out=far)  # 3-voxel gap: two lesions
    assert whole(near, near)["brats_lesion_tp"] == 1
    assert whole(far, far)["brats_lesion_tp"] == 2
    assert whole(near, near)["n_ref_lesions"] == 2  # detection uses plain components


def test_brats_false_positive_lesion_scores_zero_and_374():
    shape = (30, 30, 30)
    ref = box(shape, (3, 8), (3, 8), (3, 8))
    pred = ref.copy()
    box(shape, (20, 24), (20, 24), (20, 24), out=pred)
    m = whole(pred, ref)
    assert m["brats_lesion_dice"] == pytest.approx(0.5)
    assert m["brats_lesion_hd95"] == pytest.approx(374 / 2)
    assert (m["brats_lesion_tp"], m["brats_lesion_fp"], m["brats_lesion_fn"]) == (1, 1, 0)


def test_brats_drops_reference_lesions_of_at_most_2_mm3():
    shape = (30, 30, 30)
    ref = box(shape, (3, 8), (3, 8), (3, 8))
    ref[20, 20, 20:22] = 1  # 2 voxels = 2 mm^3: not scored
    pred = box(shape, (3, 8), (3, 8), (3, 8))
    m = whole(pred, ref)
    assert (m["brats_lesion_dice"], m["brats_lesion_hd95"], m["brats_lesion_fn"]) == (1, 0, 0)
    assert m["lesion_fn"] == 1  # the detection counts keep every component
    # with larger voxels the same two voxels are 2 * 1.2 mm^3 and are scored (missed)
    m = whole(pred, ref, spacing=(1.2, 1.0, 1.0))
    assert m["brats_lesion_fn"] == 1
    assert m["brats_lesion_dice"] == pytest.approx(0.5)


# ---------------------------------------------------------------- empty cases

EMPTY = np.zeros((12, 12, 12), np.uint8)
CUBE = box((12, 12, 12), (3, 7), (3, 7), (3, 7))


def test_both_empty():
    m = whole(EMPTY, EMPTY, nsd_rate=0.01)
    expected = {
        "dice": 1.0, "ndsc": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0,
        "lesion_f1": 1.0, "lesion_tpr": 1.0, "lesion_fdr": 0.0, "brats_lesion_dice": 1.0,
        "brats_lesion_hd95": 0.0, "lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 0,
    }  # fmt: skip
    assert {k: m[k] for k in expected} == expected


def test_empty_reference_with_prediction():
    m = whole(CUBE, EMPTY, nsd_rate=0.01)
    expected = {
        "dice": 0.0, "ndsc": 0.0, "hd95": 374.0, "sensitivity": 1.0, "lesion_f1": 0.0,
        "lesion_tpr": 1.0, "lesion_fdr": 1.0, "lesion_fp": 1, "brats_lesion_dice": 0.0,
        "brats_lesion_hd95": 374.0,
    }  # fmt: skip
    assert {k: m[k] for k in expected} == expected


def test_reference_with_empty_prediction():
    m = whole(EMPTY, CUBE, nsd_rate=0.01)
    expected = {
        "dice": 0.0, "ndsc": 0.0, "hd95": 374.0, "sensitivity": 0.0, "specificity": 1.0,
        "lesion_f1": 0.0, "lesion_tpr": 0.0, "lesion_fdr": 0.0, "lesion_fn": 1,
        "brats_lesion_dice": 0.0, "brats_lesion_hd95": 374.0,
    }  # fmt: skip
    assert {k: m[k] for k in expected} == expected


# ---------------------------------------------------------------- groups and conventions


def _tumour(shape=(16, 16, 16)):
    """Internal labels: edema shell, enhancing rim, necrotic core."""
    arr = box(shape, (2, 14), (2, 14), (2, 14), value=labels.EDEMA)
    box(shape, (4, 12), (4, 12), (4, 12), value=ENHANCING, out=arr)
    box(shape, (6, 10), (6, 10), (6, 10), value=NECROSIS, out=arr)
    return arr


def test_brats_groups_match_internal_groups_on_the_same_array():
    ref = _tumour()
    pred = ref.copy()
    pred[pred == NECROSIS] = ENHANCING  # necrosis called enhancing: core still right
    internal = metrics.evaluate_pair(pred, ref, (1, 1, 1))
    brats = metrics.evaluate_pair(
        labels.from_internal(pred, "brats"),
        labels.from_internal(ref, "brats"),
        (1, 1, 1),
        convention="brats",
    )
    assert set(internal) == set(labels.INTERNAL_GROUPS)
    assert set(brats) == set(labels.INTERNAL_GROUPS) | set(labels.BRATS_GROUPS)
    for group in labels.INTERNAL_GROUPS:
        assert brats[group] == pytest.approx(internal[group], nan_ok=True)
    assert brats["ET"] == pytest.approx(internal["enhancing"], nan_ok=True)
    assert brats["TC"] == pytest.approx(internal["whole_lesion"], nan_ok=True)
    assert brats["TC"]["dice"] == 1.0 and brats["WT"]["dice"] == 1.0
    assert brats["ET"]["dice"] < 1.0 and brats["necrosis"]["dice"] == 0.0
    # Reading BraTS labels as internal would swap enhancing and necrosis: it must differ.
    misread = metrics.evaluate_pair(
        labels.from_internal(pred, "brats"), labels.from_internal(ref, "brats"), (1, 1, 1)
    )
    assert misread["enhancing"]["dice"] != pytest.approx(internal["enhancing"]["dice"])


def test_groups_argument_and_bad_input():
    ref = _tumour()
    assert list(metrics.evaluate_pair(ref, ref, (1, 1, 1), groups=["edema"])) == ["edema"]
    with pytest.raises(ValueError, match="unknown label groups"):
        metrics.evaluate_pair(ref, ref, (1, 1, 1), groups=["tumour"])
    with pytest.raises(ValueError, match="not part of"):
        metrics.evaluate_pair(ref + 3, ref, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        metrics.evaluate_pair(ref, ref, (1, 0, 1))
    with pytest.raises(ValueError, match="one shape"):
        metrics.evaluate_pair(ref[:-1], ref, (1, 1, 1))


# ---------------------------------------------------------------- files


def test_evaluate_files_reads_spacing_and_checks_the_grid(tmp_path):
    ref = _tumour()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    io.save_nifti(tmp_path / "ref.nii.gz", ref, affine, dtype=np.uint8)
    io.save_nifti(tmp_path / "pred.nii.gz", ref, affine, dtype=np.uint8)
    result = metrics.evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")
    assert result["whole_lesion"]["dice"] == 1.0
    assert result["whole_lesion"]["ref_volume_mm3"] == pytest.approx(8**3 * 2.0)

    shifted = affine.copy()
    shifted[0, 3] = 0.01
    io.save_nifti(tmp_path / "shifted.nii.gz", ref, shifted, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"shifted\.nii\.gz.*ref\.nii\.gz"):
        metrics.evaluate_files(tmp_path / "shifted.nii.gz", tmp_path / "ref.nii.gz")
    nib.save(nib.Nifti1Image(ref[:-1], affine), tmp_path / "cut.nii.gz")
    with pytest.raises(ValueError, match=r"cut\.nii\.gz.*ref\.nii\.gz.*shapes"):
        metrics.evaluate_files(tmp_path / "cut.nii.gz", tmp_path / "ref.nii.gz")


# ---------------------------------------------------------------- tables


def test_lesion_table_and_spearman():
    shape = (40, 12, 12)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    # three lesions of growing size; the prediction is one slice short on each
    for start, size in ((2, 2), (8, 4), (18, 8)):
        ref[start : start + size, 2:6, 2:6] = ENHANCING
        pred[start + 1 : start + size, 2:6, 2:6] = ENHANCING
    ref[32:34, 8:10, 8:10] = ENHANCING  # missed lesion
    table = metrics.lesion_table(pred, ref, (1, 1, 2), groups=["whole_lesion"], study_id="s1")
    assert list(table.columns) == metrics.LESION_COLUMNS
    table = table.sort_values("centroid_i").reset_index(drop=True)
    assert table["volume_mm3"].tolist() == [64.0, 128.0, 256.0, 16.0]
    assert table["detected"].tolist() == [True, True, True, False]
    assert table["dice"].tolist() == pytest.approx([2 / 3, 6 / 7, 14 / 15, 0.0])
    assert (table["study_id"] == "s1").all()
    corr = metrics.spearman_volume_vs_dice(table, group="whole_lesion")
    assert corr["n"] == 4 and corr["rho"] == pytest.approx(1.0)  # bigger lesion, better Dice
    assert math.isnan(metrics.spearman_volume_vs_dice(table.head(2))["rho"])


def test_flatten_and_summarise():
    ref = _tumour()
    rows = []
    for i, shift in enumerate((0, 1, 2)):
        pred = np.roll(ref, shift, axis=0)
        rows += metrics.flatten(f"s{i}", metrics.evaluate_pair(pred, ref, (1, 1, 1)))
    per_study = pd.DataFrame(rows)
    assert len(per_study) == 3 * len(labels.INTERNAL_GROUPS)
    assert {"study_id", "group", "dice", "hd95", "lesion_f1"} <= set(per_study.columns)
    summary = metrics.summarise(per_study)
    row = summary[(summary.group == "whole_lesion") & (summary.metric == "dice")].iloc[0]
    dice = per_study.loc[per_study.group == "whole_lesion", "dice"].to_numpy()
    assert row["n"] == 3
    assert row["mean"] == pytest.approx(dice.mean())
    assert row["median"] == pytest.approx(np.median(dice))
    half = 4.302652729911275 * dice.std(ddof=1) / np.sqrt(3)  # t(0.975, df=2)
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx(
        (dice.mean() - half, dice.mean() + half)
    )
    assert "study_id" not in set(summary.metric)


# ---------------------------------------------------------------- command line


def test_cli_evaluate_prints_one_strict_json_object_per_group(tmp_path, capsys, monkeypatch):
    from metsflow.cli import main

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ref = box((12, 12, 12), (2, 6), (2, 6), (2, 6), value=ENHANCING)  # 64 voxels
    pred = box((12, 12, 12), (2, 6), (2, 6), (4, 8), value=ENHANCING)  # overlap 32
    for name, arr in (("pred", pred), ("ref", ref)):
        io.save_nifti(tmp_path / f"{name}.nii.gz", arr, affine, dtype=np.uint8)
    out = tmp_path / "m.json"
    argv = [
        "evaluate",
        "--pred",
        str(tmp_path / "pred.nii.gz"),
        "--ref",
        str(tmp_path / "ref.nii.gz"),
    ]
    assert main([*argv, "--json", str(out)]) == 0

    def strict(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    printed = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert printed == json.loads(out.read_text(), parse_constant=strict)
    assert set(printed) == {"enhancing", "edema", "necrosis", "whole_lesion"}
    whole_metrics = printed["whole_lesion"]
    assert whole_metrics["dice"] == 0.5
    assert whole_metrics["pred_volume_mm3"] == whole_metrics["ref_volume_mm3"] == 64 * 8.0
    assert whole_metrics["hd95"] == 4.0  # shifted 2 voxels of 2 mm along the last axis
    assert whole_metrics["lesion_tp"] == 1  # IoU 1/3 > 0.25
    assert whole_metrics["ndsc"] is None  # no cohort rate given
    assert printed["edema"]["dice"] == 1.0  # both empty

    assert main([*argv, "--ndsc-rate", str(64 / 12**3), "--iou-threshold", "0.5"]) == 0
    rerun = json.loads(capsys.readouterr().out)["whole_lesion"]
    assert rerun["ndsc"] == pytest.approx(0.5)  # the study's own rate: nDSC equals Dice
    assert rerun["lesion_tp"] == 0 and rerun["lesion_fn"] == 1

    assert main([*argv, "--convention", "brats"]) == 0
    assert {"ET", "TC", "WT"} <= set(json.loads(capsys.readouterr().out))

    # Without --iou-threshold the library's default (EvaluateSettings.iou_threshold) decides.
    monkeypatch.setattr(metrics, "DEFAULT_IOU_THRESHOLD", 0.4)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["whole_lesion"]["lesion_tp"] == 0  # IoU 1/3


def test_cli_alternative_is_checked_against_the_stats_module(capsys):
    from metsflow.cli import main

    with pytest.raises(SystemExit):
        main(["stats", "compare", "a.tsv", "b.tsv", "--alternative", "bigger"])
    assert "use one of greater, less, two-sided" in capsys.readouterr().err


def test_cli_evaluate_names_the_bad_file(tmp_path, capsys):
    from metsflow.cli import main

    io.save_nifti(tmp_path / "ref.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    missing = tmp_path / "missing.nii.gz"
    assert main(["evaluate", "--pred", str(missing), "--ref", str(tmp_path / "ref.nii.gz")]) == 2
    assert "missing.nii.gz" in capsys.readouterr().err


def test_evaluate_round_skips_unpredicted_studies_and_scores_lesions_by_fg_prob(tmp_path):
    """metsflow.evaluation.evaluate: labelled studies only; a failed prediction is listed as skipped;
    FP per patient and the FROC count every evaluated patient."""
    from metsflow.cohort.sheet import Study
    from metsflow.core.settings import EvaluateSettings
    from metsflow.evaluation.evaluate import evaluate_round

    shape, affine = (20, 20, 20), np.eye(4)
    lesion_a, lesion_b, false_b = (
        ((2, 5), (2, 5), (2, 5)),
        ((12, 15),) * 3,
        ((2, 5), (12, 15), (2, 5)),
    )
    arrays = {
        "A": (box(shape, *lesion_a), box(shape, *lesion_a), {lesion_a: 0.9}),
        # B: one of its two lesions found, plus one false positive (lower probability)
        "B": (
            box(shape, *lesion_a, out=box(shape, *lesion_b)),
            box(shape, *lesion_b, out=box(shape, *false_b)),
            {lesion_b: 0.8, false_b: 0.6},
        ),
    }
    studies = []
    for k, name in enumerate(("A", "B", "C", "D")):
        label = None
        if name in arrays:
            ref, pred, probs = arrays[name]
            label = tmp_path / f"{name}_ref.nii.gz"
            io.save_nifti(label, ref, affine, dtype=np.uint8)
            io.save_nifti(tmp_path / f"{name}_pred.nii.gz", pred, affine, dtype=np.uint8)
            prob = np.zeros(shape, np.float32)
            for ranges, value in probs.items():
                box(shape, *ranges, value=value, out=prob)
            io.save_nifti(tmp_path / f"{name}_fg.nii.gz", prob, affine)
        elif name == "D":  # labelled, but its inference failed
            label = tmp_path / "A_ref.nii.gz"
        studies.append(Study(f"P{k}", name, "0", 0, None, tmp_path / "t1c.nii.gz", label=label))

    result = evaluate_round(
        3,
        studies,
        {"A", "B", "C"},
        lambda s: tmp_path / f"{s}_pred.nii.gz",
        lambda s: tmp_path / f"{s}_fg.nii.gz",
        EvaluateSettings(),
    )
    assert result.summary["skipped"] == ["D"] and result.summary["n_validation"] == 2
    headline = result.per_study[result.per_study.group == metrics.HEADLINE_GROUP]
    assert dict(zip(headline.study_id, headline.dice, strict=True))["A"] == pytest.approx(1.0)
    assert result.lesions.detected.sum() == 2 and len(result.lesions) == 3
    assert result.summary["fp_per_patient"] == pytest.approx(0.5)
    assert set(result.tables()) == {"per_study", "lesions", "detection_by_size", "froc"}
    assert result.froc.sensitivity.max() == pytest.approx(2 / 3)
    assert result.froc.threshold.max() == pytest.approx(0.9)


def test_pooled_lesion_tables_count_every_study_and_match_per_study():
    """Several studies' whole-lesion tables in one: a study without false positives (or
    without any prediction) still counts, with 0, so FP per patient has the right denominator."""
    from metsflow.evaluation.metrics import false_positive_rates, pooled_lesion_tables

    ref0, pred0 = np.zeros((20, 20, 20), np.uint8), np.zeros((20, 20, 20), np.uint8)
    ref0[2:5, 2:5, 2:5] = 1
    pred0[2:5, 2:5, 2:5] = 1  # found
    pred0[12:15, 12:15, 12:15] = 1  # false positive
    ref1, pred1 = np.zeros_like(ref0), np.zeros_like(ref0)
    ref1[8:11, 8:11, 8:11] = 1  # missed, nothing predicted
    lesions, predicted, false = pooled_lesion_tables(
        {"S0": pred0, "S1": pred1}, {"S0": ref0, "S1": ref1}, (1.0, 1.0, 1.0), 0.25
    )
    assert false == {"S0": 1, "S1": 0}
    assert sorted(zip(lesions.study_id, lesions.detected, strict=True)) == [
        ("S0", True),
        ("S1", False),
    ]
    assert len(predicted) == 2
    rates = false_positive_rates(false, {"S0": "P0", "S1": "P1"})
    assert rates["fp_per_patient"] == 0.5


def test_sensitivity_at_fp_reads_the_froc_at_fixed_false_positive_rates():
    """The highest sensitivity at or under each FP/patient rate; 0 below the curve's first point
    (keeping nothing), NaN without reference lesions."""
    # 4 lesions, 2 patients: 0.9 a | 0.8 FP | 0.7 b | 0.6 FP | 0.5 c | 0.4 FP | 0.3 d
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    hits = [["a"], [], ["b"], [], ["c"], [], ["d"]]
    curve = metrics.froc(scores, hits, n_reference=4, n_patients=2)
    assert metrics.sensitivity_at_fp(curve, [0, 0.5, 1, 2]) == pytest.approx([0.25, 0.5, 0.75, 1])
    late = metrics.froc([0.9, 0.5], [[], ["a"]], n_reference=1, n_patients=2)
    assert metrics.sensitivity_at_fp(late, [0.25, 0.5]) == [0.0, 1.0]
    empty = metrics.froc([0.9], [[]], n_reference=0, n_patients=1)
    assert all(math.isnan(v) for v in metrics.sensitivity_at_fp(empty, [1, 2]))
