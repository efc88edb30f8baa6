"""Longitudinal registration on a synthetic pair with a known deformation (4 mm, threads=1)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest
from _synthetic_images import (
    brain_centre,
    compose,
    oblique_affine,
    phantom,
    rigid_map,
    sample,
    smooth_deformation,
)

from metsflow.core.io import StudyError, read_json, save_nifti
from metsflow.imaging import register
from metsflow.imaging.brainmask import nifti_to_ants

SPACING = 4.0
PREV_SHAPE = (45, 54, 43)
FU_SHAPE = (43, 55, 42)
# Follow-up anatomy at world x is the previous anatomy at phi(x): rigid motion after a smooth
# deformation of up to 6 mm.
PHI = compose(rigid_map((3, -2, 4), (5, -4, 3)), smooth_deformation(6.0, seed=0))
# The default pyramid (levels in mm) is used as it is: on these 4 mm images it becomes shrink
# factors 2 then 1 for both stages; only the iteration counts are cut for speed.
TEST_PARAMS = {"aff_iterations": (100, 50), "reg_iterations": (40, 10, 5)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def _prep_folder(folder: Path, affine: np.ndarray, shape, world_map) -> np.ndarray:
    """Preprocessed-style folder (z-scored T1c, brain mask, internal label); returns label."""
    ph = phantom()
    folder.mkdir(parents=True)
    image = sample(ph["t1c"], ph["affine"], affine, shape, world_map=world_map)
    brain = sample(ph["brain"].astype(float), ph["affine"], affine, shape, world_map, 0) > 0.5
    label = sample(ph["label"].astype(float), ph["affine"], affine, shape, world_map, 0)
    zscored = np.where(brain, (image - image[brain].mean()) / image[brain].std(), 0.0)
    save_nifti(folder / "t1c.nii.gz", zscored, affine, np.float32)
    save_nifti(folder / "brain_mask.nii.gz", brain, affine, np.uint8)
    save_nifti(folder / "label.nii.gz", label, affine, np.uint8)
    return label.astype(np.uint8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("longitudinal")
    previous = root / "prep" / "s1"
    followup = root / "prep" / "s2"
    _prep_folder(previous, oblique_affine(SPACING, (0, 0, 0), PREV_SHAPE), PREV_SHAPE, None)
    fu_affine = oblique_affine(
        SPACING, (2, 0, -3), FU_SHAPE, centre=brain_centre() + np.array([2.0, -3.0, 1.0])
    )
    truth = _prep_folder(followup, fu_affine, FU_SHAPE, PHI)
    reg_dir = root / "registered" / "s2"
    sys_tmp = root / "systmp"
    sys_tmp.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # catch anything ANTs would leave in /tmp
        mp.setattr(tempfile, "tempdir", str(sys_tmp))
        qc = register.register_followup(followup, previous, reg_dir, TEST_PARAMS, threads=1)
        counts = register.propagate_label(
            previous / "label.nii.gz", reg_dir, followup, reg_dir / "prior.nii.gz"
        )
    return {
        "previous": previous,
        "followup": followup,
        "reg_dir": reg_dir,
        "qc": qc,
        "counts": counts,
        "truth": truth,
        "left_in_tmp": sorted(p.name for p in sys_tmp.iterdir()),
    }


def test_transforms_and_qc_written_no_temp_left(pair):
    reg_dir = pair["reg_dir"]
    assert sorted(p.name for p in reg_dir.iterdir()) == sorted(
        ["affine.mat", "warp.nii.gz", "inverse_warp.nii.gz", "qc.json", "prior.nii.gz"]
    )
    assert pair["left_in_tmp"] == []
    qc = read_json(reg_dir / "qc.json")
    for key in (
        "ncc_before",
        "ncc_after",
        "mask_dice_before",
        "mask_dice_after",
        "jacobian_min",
        "seconds",
        "params",
        "flag",
        "flag_reasons",
    ):
        assert key in qc
    assert qc["followup"] == "s2" and qc["previous"] == "s1"
    assert qc["params"]["syn_metric"] == "CC" and qc["params"]["cc_radius"] == 2
    # Levels 8/4/2 mm on the 4 mm grid: the 4 and 2 mm levels merge at full resolution.
    assert qc["spacing_mm"] == pytest.approx(SPACING)
    assert qc["schedule"]["syn"]["shrink_factors"] == [2, 1]
    assert qc["schedule"]["syn"]["iterations"] == [40, 10]
    assert qc["schedule"]["affine"]["shrink_factors"] == [2, 1]
    assert qc["ncc_after"] > qc["ncc_before"] + 0.2
    assert qc["mask_dice_after"] > max(0.95, qc["mask_dice_before"])
    assert qc["jacobian_min"] > 0
    assert qc["flag"] is False and qc["flag_reasons"] == []


def test_propagated_label_matches_truth_and_beats_no_registration(pair):
    prior = nib.load(str(pair["reg_dir"] / "prior.nii.gz"))
    followup_t1c = nib.load(str(pair["followup"] / "t1c.nii.gz"))
    assert prior.shape == FU_SHAPE
    assert prior.get_data_dtype() == np.uint8
    np.testing.assert_allclose(prior.affine, followup_t1c.affine, atol=1e-5)
    warped = np.asarray(prior.dataobj)
    truth = pair["truth"]
    assert set(np.unique(warped)) <= {0, 1, 2, 3}
    registered = dice(warped > 0, truth > 0)

    # Without registration: the previous label resampled in scanner space only.
    unregistered = ants.resample_image_to_target(
        nifti_to_ants(nib.load(str(pair["previous"] / "label.nii.gz"))),
        nifti_to_ants(followup_t1c),
        interp_type="genericLabel",
    ).numpy()
    baseline = dice(unregistered > 0.5, truth > 0)
    assert registered > 0.85
    assert registered > baseline + 0.15
    assert sum(pair["counts"].values()) == int((warped > 0).sum())


@pytest.mark.parametrize(
    ("spacing", "shrinks", "iterations"),
    [(1.0, (8, 4, 2), (40, 20, 5)), (2.0, (4, 2, 1), (40, 20, 5)), (4.0, (2, 1), (40, 20))],
)
def test_pyramid_levels_in_mm_at_any_spacing(spacing, shrinks, iterations):
    """The default 8/4/2 mm SyN levels give the same level sizes (mm) on any grid."""
    d = register.DEFAULTS
    schedule = register.pyramid(d["levels_mm"], d["reg_iterations"], d["smoothing_mm"], spacing)
    assert schedule["shrink_factors"] == shrinks
    assert schedule["iterations"] == iterations
    level_sizes = [max(spacing, s * spacing) for s in shrinks]
    assert level_sizes == [max(spacing, mm) for mm in d["levels_mm"]][: len(shrinks)]
    args = register.ants_command("f", "m", "fm", "mm", "o_", register.DEFAULTS, spacing)
    assert "x".join(map(str, shrinks)) in args
    assert all(not a.endswith("vox") for a in args)


def test_qc_flags_below_thresholds():
    params = dict(register.DEFAULTS)
    good = {"ncc_before": 0.4, "ncc_after": 0.9, "mask_dice_after": 0.98, "jacobian_min": 0.3}
    assert register.qc_flags(good, params) == []
    bad = {"ncc_before": 0.5, "ncc_after": 0.3, "mask_dice_after": 0.7, "jacobian_min": -0.1}
    reasons = register.qc_flags(bad, params)
    assert len(reasons) == 4
    assert any("NCC" in r for r in reasons) and any("folds" in r for r in reasons)


def test_bad_inputs(tmp_path, pair):
    with pytest.raises(StudyError, match="missing") as err:
        register.propagate_label(
            pair["previous"] / "label.nii.gz", tmp_path, pair["followup"], tmp_path / "p.nii.gz"
        )
    assert err.value.study_id == "s2"
    with pytest.raises(StudyError, match="T1c"):
        register.register_followup(tmp_path / "nothing", pair["previous"], tmp_path / "r", {})
    with pytest.raises(ValueError, match="unknown"):
        register.register_followup(pair["followup"], pair["previous"], tmp_path, {"cc_radus": 2})
    with pytest.raises(ValueError, match="coarse to fine"):
        register.register_followup(
            pair["followup"], pair["previous"], tmp_path, {"levels_mm": (2.0, 4.0, 8.0)}
        )
    with pytest.raises(ValueError, match="per level"):
        register.register_followup(
            pair["followup"], pair["previous"], tmp_path, {"reg_iterations": (10, 5)}
        )


def test_shard_manifest_qc_columns_flag_failures(tmp_path, pair):
    """The register shard manifest carries each pair's QC, failures flagged with reasons."""
    from metsflow.core.io import write_json
    from metsflow.imaging.register import QC_COLUMNS, qc_columns

    good = qc_columns(pair["reg_dir"] / "qc.json")
    assert set(good) == set(QC_COLUMNS)
    assert good["qc_flag"] is False and good["qc_reasons"] == ""
    assert good["ncc_after"] == pair["qc"]["ncc_after"]
    bad = {**pair["qc"], "ncc_after": 0.1, "mask_dice_after": 0.5}
    bad["flag_reasons"] = register.qc_flags(bad, register.DEFAULTS)
    bad["flag"] = bool(bad["flag_reasons"])
    write_json(tmp_path / "qc.json", bad)
    flagged = qc_columns(tmp_path / "qc.json")
    assert flagged["qc_flag"] is True
    assert "NCC" in flagged["qc_reasons"] and "brain-mask Dice" in flagged["qc_reasons"]
    missing = qc_columns(tmp_path / "absent" / "qc.json")
    assert missing["qc_flag"] is True and "QC unavailable" in missing["qc_reasons"]
