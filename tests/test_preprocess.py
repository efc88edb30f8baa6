"""Per-study preprocessing on small synthetic studies (4 mm oblique grids, threads=1)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest
from _synthetic_images import LESIONS, FakeStudy, noisy, oblique_affine, phantom, rigid_map, sample
from _synthetic_images import save as save_image
from scipy import ndimage

from metsflow.cohort.phantom import make_demo_cohort
from metsflow.core.io import StudyError, read_json
from metsflow.core.labels import ENHANCING, NECROSIS, to_internal
from metsflow.imaging import brainmask, grid, preprocess

# Native T1c: 4 mm, oblique, voxel axes in P-L-S order (so RAS reorientation is exercised).
AXES_PLS = np.array([[0, -1, 0], [-1, 0, 0], [0, 0, 1]])
SHAPE = (56, 50, 48)
AFFINE = oblique_affine(4.0, (8, -6, 10), SHAPE, axes=AXES_PLS)
# T2 on its own grid, moved rigidly (5 deg about z, 5 mm shift) with respect to the T1c.
T2_SHAPE = (50, 46, 40)
T2_AFFINE = oblique_affine((4.0, 4.0, 5.0), (0, 3, -4), T2_SHAPE)
T2_MOTION = rigid_map((0, 0, 5), (4, -3, 2))
# Small test images: atlas registration at 4 mm keeps each study at a few seconds.
FAST = {"atlas_resolution_mm": 4.0, "atlas_iterations": (100, 50)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def _truth() -> dict[str, np.ndarray]:
    ph = phantom()
    return {
        "brain": sample(ph["brain"].astype(float), ph["affine"], AFFINE, SHAPE, order=0) > 0.5,
        "label": sample(ph["label"].astype(float), ph["affine"], AFFINE, SHAPE, order=0).astype(
            np.uint8
        ),
        "t1c": sample(ph["t1c"], ph["affine"], AFFINE, SHAPE),
        "t2": sample(ph["t2"], ph["affine"], T2_AFFINE, T2_SHAPE, world_map=T2_MOTION),
    }


def _run(study, out_dir: Path, params: dict) -> tuple[dict, list[str]]:
    """Preprocess with Python's temp dir redirected, to catch files ANTs leaves in /tmp."""
    sys_tmp = out_dir.parent / f"{out_dir.name}_systmp"
    sys_tmp.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(sys_tmp))
        geometry = preprocess.preprocess_study(study, out_dir, {**FAST, **params}, threads=1)
    return geometry, sorted(p.name for p in sys_tmp.iterdir())


@pytest.fixture(scope="module")
def truth():
    return _truth()


@pytest.fixture(scope="module")
def unstripped(tmp_path_factory, truth):
    """Head with skull and noisy air, moved T2, BraTS label; target spacing = native spacing."""
    root = tmp_path_factory.mktemp("unstripped")
    study = FakeStudy(
        "p1",
        "s1",
        t1c=save_image(root / "t1c.nii.gz", noisy(truth["t1c"], 0.02, 1), AFFINE),
        t2=save_image(root / "t2.nii.gz", noisy(truth["t2"], 0.02, 2), T2_AFFINE),
        label=save_image(root / "seg.nii.gz", truth["label"], AFFINE, np.uint8),
        label_convention="brats",
    )
    geometry, left_in_tmp = _run(study, root / "prep", {"spacing": [4, 4, 4]})
    return {"dir": root / "prep", "geometry": geometry, "left_in_tmp": left_in_tmp}


@pytest.fixture(scope="module")
def stripped(tmp_path_factory, truth):
    """Skull-stripped (exact zeros outside the brain), T1 present, resampled to 3 mm."""
    root = tmp_path_factory.mktemp("stripped")
    t1c = np.where(truth["brain"], truth["t1c"] + 0.05, 0.0)
    study = FakeStudy(
        "p1",
        "s2",
        t1c=save_image(root / "t1c.nii.gz", t1c, AFFINE),
        t1=save_image(root / "t1.nii.gz", t1c**0.5, AFFINE),
        label=save_image(root / "seg.nii.gz", to_internal(truth["label"], "brats"), AFFINE),
        label_convention="internal",
    )
    geometry, left_in_tmp = _run(study, root / "prep", {"spacing": [3, 3, 3], "coregister": "none"})
    return {"dir": root / "prep", "geometry": geometry, "left_in_tmp": left_in_tmp}


def _load(prep_dir: Path, name: str) -> nib.Nifti1Image:
    return nib.load(str(prep_dir / f"{name}.nii.gz"))


# ------------------------------------------------------------------------------------------
def test_outputs_share_one_grid_and_dtypes(unstripped):
    prep = unstripped["dir"]
    geometry = read_json(prep / "geometry.json")
    final = np.asarray(geometry["final"]["affine"])
    for name, dtype in [("t1c", np.float32), ("t2", np.float32), ("brain_mask", np.uint8)]:
        img = _load(prep, name)
        assert img.shape == tuple(geometry["final"]["shape"])
        np.testing.assert_allclose(img.affine, final, atol=1e-4)
        assert img.get_data_dtype() == dtype
    assert _load(prep, "label").get_data_dtype() == np.uint8
    assert not (prep / "t1.nii.gz").exists() and not (prep / "flair.nii.gz").exists()
    assert geometry["sequences_present"] == ["t1c", "t2"]
    assert geometry["sequences_missing"] == ["t1", "flair"]
    assert (prep / "transforms" / "t2_to_t1c.mat").exists()
    assert set(geometry["seconds"]) >= {"load", "coregister", "brain_mask", "write"}
    assert geometry["native"]["orientation"] == "".join(nib.aff2axcodes(AFFINE))
    # No ANTs leftovers: neither in the (redirected) system temp dir nor in the output folder.
    assert unstripped["left_in_tmp"] == []
    assert not [p for p in prep.iterdir() if p.name.startswith(".")]


def test_zscore_inside_mask_and_zero_outside(unstripped):
    prep = unstripped["dir"]
    mask = _load(prep, "brain_mask").get_fdata() > 0
    for name in ("t1c", "t2"):
        data = _load(prep, name).get_fdata()
        inside = data[mask]
        assert abs(inside.mean()) < 0.05
        assert 0.9 < inside.std() < 1.1
        assert np.all(data[~mask] == 0)
        assert np.abs(data).max() <= 5.0 + 1e-5  # zscore_clip


def test_unstripped_atlas_mask_matches_truth(unstripped, truth):
    geometry = unstripped["geometry"]
    assert geometry["skull_stripped"] is False
    assert geometry["mask_method"] == "atlas"
    mask = _load(unstripped["dir"], "brain_mask").get_fdata().astype(np.uint8)
    native_mask = grid.to_native(mask, unstripped["dir"]).get_fdata() > 0
    assert dice(native_mask, truth["brain"]) > 0.85


def test_rigid_coregistration_recovers_t2_motion(unstripped):
    """The stored transform maps a T1c point to where the same anatomy is in the T2."""
    mat = unstripped["dir"] / "transforms" / "t2_to_t1c.mat"
    tx = ants.read_transform(str(mat))
    lps = np.array([1.0, 1.0, -1.0]) * -1  # RAS <-> LPS flips x and y
    points = np.array([[30.0, -20, 30], [-30, 10, 10], [0, -50, 20], [0, 40, 0]])
    errors = []
    for p in points:
        in_t2 = np.asarray(tx.apply_to_point(tuple(p * lps))) * lps
        errors.append(np.linalg.norm(T2_MOTION(in_t2[None])[0] - p))
    assert max(errors) < 2.0  # mm, at 4 mm voxels
    motion = unstripped["geometry"]["coregistration"]["t2"]
    assert abs(motion["rotation_deg"] - 5.0) < 1.0


def test_label_converted_from_brats_and_round_trip_is_exact(unstripped, truth):
    """Target spacing == native spacing: the label comes back voxel-for-voxel (oblique, PLS)."""
    label = _load(unstripped["dir"], "label").get_fdata().astype(np.uint8)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    back = grid.to_native(label, unstripped["dir"])
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-6)
    expected = to_internal(truth["label"], "brats")
    assert back.shape == SHAPE
    np.testing.assert_array_equal(np.asarray(back.dataobj), expected)
    for value in (1, 2, 3):
        assert dice(back.get_fdata() == value, expected == value) == 1.0
    assert unstripped["geometry"]["label"]["convention"] == "brats"
    assert unstripped["geometry"]["label"]["native_voxels_cropped"] == 0


def test_skull_stripped_detected_and_nonzero_mask_kept(stripped, truth):
    geometry = stripped["geometry"]
    assert geometry["skull_stripped"] is True
    assert geometry["mask_method"] == "nonzero"
    assert geometry["sequences_present"] == ["t1c", "t1"]
    assert geometry["coregistration"] == {}
    assert not (stripped["dir"] / "transforms").exists()
    mask = _load(stripped["dir"], "brain_mask").get_fdata().astype(np.uint8)
    assert dice(grid.to_native(mask, stripped["dir"]).get_fdata() > 0, truth["brain"]) > 0.95
    assert stripped["left_in_tmp"] == []


def test_round_trip_near_exact_when_resampled(stripped, truth):
    label = _load(stripped["dir"], "label").get_fdata().astype(np.uint8)
    assert _load(stripped["dir"], "label").header.get_zooms() == pytest.approx((3, 3, 3))
    back = np.asarray(grid.to_native(label, stripped["dir"]).dataobj)
    expected = to_internal(truth["label"], "brats")
    assert dice(back > 0, expected > 0) > 0.9
    assert dice(back == 2, expected == 2) > 0.85


def test_known_world_point_lands_where_expected(stripped):
    """Lesion centres (world mm) index into the preprocessed label at the lesion core."""
    img = _load(stripped["dir"], "label")
    label = np.asarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    for centre, radius in LESIONS:
        index = np.rint(inv[:3, :3] @ np.asarray(centre) + inv[:3, 3]).astype(int)
        assert label[tuple(index)] == NECROSIS  # BraTS NETC core -> internal necrosis
        # Centroid of the enhancing+necrotic core, in world mm, is the sphere centre.
        core = np.argwhere(np.isin(label, (ENHANCING, NECROSIS)))
        world = core @ img.affine[:3, :3].T + img.affine[:3, 3]
        near = world[np.linalg.norm(world - centre, axis=1) < radius + 1]
        assert np.linalg.norm(near.mean(axis=0) - centre) < 1.5


def test_target_grid_convention():
    """Voxel-centre convention, same outer corner and extent as the native grid."""
    native = oblique_affine(1.0, (5, 10, -3), (10, 12, 9), axes=AXES_PLS)
    same, same_shape = preprocess.target_grid(native, (10, 12, 9), [1, 1, 1])
    np.testing.assert_allclose(same, native, atol=1e-9)
    assert same_shape == (10, 12, 9)
    ras = nib.as_closest_canonical(nib.Nifti1Image(np.zeros((10, 12, 9)), native))
    affine, shape = preprocess.target_grid(ras.affine, ras.shape, [2.0, 2.0, 3.0])
    assert shape == (6, 5, 3)  # round(12/2), round(10/2), round(9/3)
    corner = np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(affine @ corner, ras.affine @ corner, atol=1e-9)
    # Target voxel (0,0,0) centre sits half a *target* voxel inside the corner:
    # native index (j + 0.5) * s'/s - 0.5.
    expected = ras.affine @ np.array([0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(affine @ np.array([0, 0, 0, 1.0]), expected, atol=1e-9)


def test_label_round_trip_exact_at_1mm(tmp_path, monkeypatch):
    """1 mm oblique PLS native grid preprocessed at 1 mm: the label comes back exactly."""
    # Not "1" beforehand (tests/conftest.py gives each xdist worker one thread), so the check
    # below sees the job set it.
    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
    shape = (64, 72, 60)
    affine = oblique_affine(1.0, (8, -6, 10), shape, axes=AXES_PLS)
    ph = phantom()
    label = sample(ph["label"].astype(float), ph["affine"], affine, shape, order=0)
    brain = sample(ph["brain"].astype(float), ph["affine"], affine, shape, order=0) > 0.5
    study = FakeStudy(
        "p1",
        "s1mm",
        t1c=save_image(
            tmp_path / "t1c.nii.gz",
            noisy(sample(ph["t1c"], ph["affine"], affine, shape), 0.02, 5),
            affine,
        ),
        label=save_image(
            tmp_path / "seg.nii.gz", to_internal(label.astype(np.uint8), "brats"), affine, np.uint8
        ),
    )
    save_image(tmp_path / "s1mm_mask.nii.gz", brain, affine, np.uint8)
    params = {
        "spacing": [1.0, 1.0, 1.0],
        "coregister": "none",
        "brain_mask": str(tmp_path / "{study_id}_mask.nii.gz"),
    }
    preprocess.preprocess_study(study, tmp_path / "prep", params, threads=1)
    # The job's thread count reaches ITK (read by ANTs filters from the environment).
    assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"
    prepared = _load(tmp_path / "prep", "label")
    assert prepared.header.get_zooms() == pytest.approx((1.0, 1.0, 1.0))
    back = grid.to_native(np.asarray(prepared.dataobj), tmp_path / "prep")
    expected = to_internal(label.astype(np.uint8), "brats")
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(back.dataobj), expected)
    for value in np.unique(expected[expected > 0]):
        assert dice(np.asarray(back.dataobj) == value, expected == value) == 1.0


@pytest.fixture(scope="module")
def skull_phantom(tmp_path_factory):
    """metsflow.cohort.phantom head with skull, scalp and noisy air, plus its true brain mask."""
    root = tmp_path_factory.mktemp("skull_phantom")
    make_demo_cohort(
        root,
        n_patients=1,
        n_timepoints=1,
        native_spacing=(2.0, 2.0, 2.0),
        labelled_patients=0,
        max_lesions=1,
        separate_grids=False,
    )
    folder = root / "P001" / "P001_T0"
    t1c = nib.load(str(folder / "P001_T0_t1c.nii.gz"))
    truth = np.asarray(nib.load(str(folder / "P001_T0_brainmask.nii.gz")).dataobj) > 0
    return t1c, truth


def test_atlas_mask_on_head_with_skull_matches_truth(skull_phantom, tmp_path):
    """The skull-stripped template must not be stretched onto the scalp (was 2x the brain)."""
    t1c, truth = skull_phantom
    data = np.asarray(t1c.dataobj)
    voxel_ml = float(np.prod(t1c.header.get_zooms()[:3])) / 1000.0
    assert brainmask.detect_skull_stripped(data, voxel_ml, preprocess.DEFAULTS)[0] is False
    image = brainmask.nifti_to_ants(t1c)
    mask, info = brainmask.atlas_brain_mask(
        image, image, dict(preprocess.DEFAULTS), str(tmp_path / "atlas_")
    )
    truth_ml = truth.sum() * voxel_ml
    assert dice(mask, truth) > 0.9
    assert 0.9 < mask.sum() / truth.sum() < 1.1
    # The rough skull strip that starts the affine holds the brain (and a rim of dura at the
    # 3 mm working resolution), not the head (>= 1.7x the brain with the scalp).
    assert 0.6 * truth_ml < info["rough_brain_ml"] < 1.3 * truth_ml


def test_rough_brain_mask_excludes_scalp(skull_phantom):
    t1c, truth = skull_phantom
    image = brainmask.nifti_to_ants(t1c)
    rough = brainmask.rough_brain_mask(image, float(preprocess.DEFAULTS["rough_erosion_mm"]))
    outside = rough & ~brainmask.dilate_mm_ball(truth, np.full(3, 2.0), 4.0)
    assert outside.sum() < 0.01 * truth.sum()
    assert (rough & truth).sum() > 0.8 * truth.sum()


def test_dilate_mm_ball_matches_full_distance_map():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 36, 30), dtype=bool)
    mask[10:20, 12:18, 8:22] = rng.random((10, 6, 14)) > 0.5
    spacing = np.array([1.0, 1.5, 3.0])
    expected = ndimage.distance_transform_edt(~mask, sampling=spacing) <= 4.0
    np.testing.assert_array_equal(brainmask.dilate_mm_ball(mask, spacing, 4.0), expected)
    assert not brainmask.dilate_mm_ball(np.zeros_like(mask), spacing, 4.0).any()


def test_user_mask_hook(tmp_path, truth):
    t1c = save_image(tmp_path / "t1c.nii.gz", noisy(truth["t1c"], 0.02, 3), AFFINE)
    save_image(tmp_path / "s3_mask.nii.gz", truth["brain"], AFFINE, np.uint8)
    study = FakeStudy("p1", "s3", t1c=t1c)
    params = {"spacing": [4, 4, 4], "brain_mask": str(tmp_path / "{study_id}_mask.nii.gz")}
    geometry = preprocess.preprocess_study(study, tmp_path / "prep", params)
    assert geometry["mask_method"] == "user"
    mask = _load(tmp_path / "prep", "brain_mask").get_fdata().astype(np.uint8)
    assert dice(grid.to_native(mask, tmp_path / "prep").get_fdata() > 0, truth["brain"]) == 1
    assert geometry["label"] == {"present": False}


# ------------------------------------------------------------------------------------------
@pytest.fixture
def small_t1c(tmp_path, truth):
    return save_image(tmp_path / "t1c.nii.gz", noisy(truth["t1c"], 0.02, 4), AFFINE)


def test_bad_label_values_raise_study_error(tmp_path, small_t1c, truth):
    bad = truth["label"].copy()
    bad[10, 10, 10] = 7
    label = save_image(tmp_path / "seg.nii.gz", bad, AFFINE, np.uint8)
    study = FakeStudy("p1", "bad1", t1c=small_t1c, label=label, label_convention="brats")
    with pytest.raises(StudyError) as err:
        preprocess.preprocess_study(study, tmp_path / "prep", FAST)
    assert err.value.study_id == "bad1" and "7" in err.value.problem
    assert err.value.path == str(label)


def test_label_grid_mismatch_raises_study_error(tmp_path, small_t1c, truth):
    shifted = AFFINE.copy()
    shifted[:3, 3] += 2.0
    label = save_image(tmp_path / "seg.nii.gz", truth["label"], shifted, np.uint8)
    study = FakeStudy("p1", "bad2", t1c=small_t1c, label=label, label_convention="brats")
    with pytest.raises(StudyError, match="label grid"):
        preprocess.preprocess_study(study, tmp_path / "prep", FAST)


def test_non_3d_input_raises_study_error(tmp_path, truth):
    four_d = np.stack([truth["t1c"], truth["t1c"]], axis=-1)
    t1c = save_image(tmp_path / "t1c.nii.gz", four_d, AFFINE)
    with pytest.raises(StudyError, match="3D") as err:
        preprocess.preprocess_study(FakeStudy("p1", "bad3", t1c=t1c), tmp_path / "prep", FAST)
    assert err.value.study_id == "bad3"


def test_missing_t1c_and_bad_params(tmp_path):
    with pytest.raises(StudyError, match="T1c"):
        preprocess.preprocess_study(FakeStudy("p1", "bad4", t1c=None), tmp_path, FAST)
    with pytest.raises(ValueError, match="unknown"):
        preprocess.preprocess_study(FakeStudy("p1", "x", t1c=None), tmp_path, {"spacng": [1]})
    with pytest.raises(ValueError, match="one entry per level"):
        preprocess.preprocess_study(
            FakeStudy("p1", "x", t1c=None), tmp_path, {"atlas_iterations": (100, 50, 20)}
        )
