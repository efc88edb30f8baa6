"""Tests of the longitudinal phantom cohort (metsflow.cohort.phantom), on coarse 4 mm grids."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from metsflow.cohort import phantom
from metsflow.core import io, labels
from metsflow.core.runtime import set_threads

set_threads(1)

# Coarse grids keep the whole file fast; the geometry is the same as the 2 mm demo.
FAST = dict(native_spacing=(3.0, 3.0, 4.0), model_spacing=4.0)
COHORT = dict(n_patients=2, n_timepoints=2, labelled_patients=1, seed=0, **FAST)
DROP = {"P002_T1": ["t2"]}
SHEET_COLUMNS = [
    "patient_id", "study_id", "timepoint", "t1", "t1c", "t2", "flair", "label", "label_convention",
]  # fmt: skip


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    result = phantom.make_demo_cohort(out, drop_sequences=DROP, **COHORT)
    sheet = pd.read_csv(result["sheet"], sep="\t", dtype=str, keep_default_na=False)
    manifest = io.read_json(result["manifest"])
    return out, result, sheet, manifest


@pytest.fixture(scope="module")
def cohort_brats(tmp_path_factory):
    """Same seed and parameters, BraTS label convention, patients rendered in 2 processes."""
    out = tmp_path_factory.mktemp("phantom_brats")
    phantom.make_demo_cohort(
        out, drop_sequences=DROP, label_convention="brats", workers=2, **COHORT
    )
    return out


def _studies(manifest):
    return [study for patient in manifest["patients"] for study in patient["studies"]]


def test_same_seed_and_workers_give_identical_arrays_brats_only_changes_seg(cohort, cohort_brats):
    out, _, _, _ = cohort
    files = sorted(p.relative_to(out) for p in out.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(cohort_brats) for p in cohort_brats.rglob("*.nii.gz"))
    assert len(files) > 10
    for rel in files:
        first, second = nib.load(str(out / rel)), nib.load(str(cohort_brats / rel))
        np.testing.assert_array_equal(first.affine, second.affine)
        a, b = np.asanyarray(first.dataobj), np.asanyarray(second.dataobj)
        if rel.name.endswith("_seg.nii.gz"):
            # Explicit conversion: BraTS ET (3) exactly where internal enhancing (1), etc.
            assert np.array_equal(b == 3, a == labels.ENHANCING)
            assert np.array_equal(b == 1, a == labels.NECROSIS)
            assert np.array_equal(b == 2, a == labels.EDEMA)
            assert np.array_equal(labels.to_internal(b, "brats"), a)
        else:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), rel


def test_other_seed_differs_and_skull_free_images_are_zero_outside_brain(tmp_path):
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        phantom.make_demo_cohort(
            out, n_patients=1, n_timepoints=1, labelled_patients=1, skull=False, seed=seed, **FAST
        )
        outs.append(out)
    study = Path("P001/P001_T0")
    t1c = [_data(out / study / "P001_T0_t1c.nii.gz") for out in outs]
    assert t1c[0].shape != t1c[1].shape or not np.array_equal(t1c[0], t1c[1])
    brain = _data(outs[0] / study / "P001_T0_brainmask.nii.gz").astype(bool)
    for seq in ("t1", "t1c"):
        image = _data(outs[0] / study / f"P001_T0_{seq}.nii.gz")
        assert np.all(image[~brain] == 0), seq
        assert np.median(image[brain]) > 0


def test_files_shapes_affines_and_dtypes(cohort):
    out, result, sheet, manifest = cohort
    assert result["study_ids"] == ["P001_T0", "P001_T1", "P002_T0", "P002_T1"]
    oblique = []
    for study in _studies(manifest):
        sid = study["study_id"]
        folder = out / sid.split("_")[0] / sid
        t1c = nib.load(str(folder / f"{sid}_t1c.nii.gz"))
        assert t1c.get_data_dtype() == np.int16
        spacing = np.asarray(t1c.header.get_zooms())
        assert np.allclose(spacing, FAST["native_spacing"], rtol=0.1)
        t1 = nib.load(str(folder / f"{sid}_t1.nii.gz"))
        seg = nib.load(str(folder / f"{sid}_seg.nii.gz"))
        assert seg.get_data_dtype() == np.uint8
        for same_grid in (t1, seg, nib.load(str(folder / f"{sid}_brainmask.nii.gz"))):
            assert same_grid.shape == t1c.shape
            np.testing.assert_allclose(same_grid.affine, t1c.affine, atol=1e-4)
        flair = nib.load(str(folder / f"{sid}_flair.nii.gz"))
        assert flair.get_data_dtype() == np.int16
        # T2/FLAIR are separate acquisitions: own grid, thicker slices.
        assert not np.allclose(flair.affine, t1c.affine, atol=1e-3)
        assert flair.header.get_zooms()[2] > spacing[2]
        direction = t1c.affine[:3, :3] / spacing
        oblique.append(np.abs(np.abs(direction) - np.eye(3)).max() > 1e-3)
        # The head (not just air) is in the field of view, with a noise background.
        data = _data(folder / f"{sid}_t1c.nii.gz")
        assert 0 < np.mean(data > np.percentile(data, 99) / 4) < 0.6
    assert all(oblique)
    assert not (out / "P002" / "P002_T1" / "P002_T1_t2.nii.gz").exists()


def test_label_values_and_lesions_inside_brain(cohort):
    out, _, _, manifest = cohort
    seen = set()
    for study in _studies(manifest):
        files = study["files"]
        seg = _data(out / files["seg"])
        brain = _data(out / files["brainmask"]).astype(bool)
        values = set(np.unique(seg).tolist())
        assert values <= {0, 1, 2, 3}
        seen |= values
        assert not np.any(seg[~brain]), study["study_id"]
        assert 0.1 < brain.mean() < 0.6
        for lesion in study["lesions"]:
            if lesion["status"] == "vanished":
                assert lesion["volume_mm3"] == 0 and lesion["centre_mm"] is None
            else:
                assert lesion["volume_mm3"] > 0, (study["study_id"], lesion)
    assert {1, 2} <= seen


def test_tissue_and_lesion_contrasts():
    anat = phantom._anatomy(4.0)
    lesions = phantom._plan_lesions(0, 1, 1, 4)[0]
    rng = np.random.default_rng(0)
    phantom._place_lesions(rng, anat, lesions)
    images, label, _ = phantom._render_lesions(anat, phantom._base_images(4.0, True), lesions, 0)
    healthy = label == 0
    wm, gm, csf = ((m > 0.8) & healthy for m in (anat.wm, anat.gm, anat.csf))
    assert wm.sum() > 100 and gm.sum() > 100 and csf.sum() > 20

    def mean(seq, mask):
        return float(images[seq][mask].mean())

    assert mean("t1", wm) > mean("t1", gm) > mean("t1", csf)
    assert mean("t2", csf) > mean("t2", gm) > mean("t2", wm)
    assert mean("flair", csf) < mean("flair", wm)
    rim = label == labels.ENHANCING
    edema = label == labels.EDEMA
    assert rim.any() and edema.any()
    assert mean("t1c", rim) > 1.3 * mean("t1", rim)
    assert mean("t1c", rim) > mean("t1c", wm)
    assert mean("flair", edema) > mean("flair", wm)
    assert mean("t2", edema) > mean("t2", wm)


def test_native_rim_enhances_and_skull_shell_present(cohort):
    out, _, _, manifest = cohort
    ratios = []
    for study in _studies(manifest):
        files = study["files"]
        seg = _data(out / files["seg"])
        brain = _data(out / files["brainmask"]).astype(bool)
        t1 = _data(out / files["t1"]).astype(float)
        t1c = _data(out / files["t1c"]).astype(float)
        # Scanner scaling differs per series: compare to each image's brain median.
        t1, t1c = t1 / np.median(t1[brain]), t1c / np.median(t1c[brain])
        rim = seg == labels.ENHANCING
        if rim.sum() >= 3:
            ratios.append(t1c[rim].mean() / t1[rim].mean())
        # Not skull-stripped: bright scalp fat outside the brain on T1, dark bone between.
        head = t1 > 0.3
        shell = head & ~brain
        assert shell.sum() > 0.2 * brain.sum()
        assert np.percentile(t1[shell], 95) > 1.3
        assert np.mean(t1[shell] < 0.3) == 0  # by construction of `head`; bone is below it
        assert np.mean((t1 < 0.15) & ~brain) > 0.2  # air and bone
    assert ratios and min(ratios) > 1.3


def test_longitudinal_events(cohort):
    _, _, _, manifest = cohort
    statuses = {les["status"] for study in _studies(manifest) for les in study["lesions"]}
    assert {"baseline", "new", "grown", "shrunk", "stable", "vanished"} <= statuses
    for patient in manifest["patients"]:
        previous = None
        for study in patient["studies"]:
            present = {les["lesion_id"]: les for les in study["lesions"]}
            for lesion in study["lesions"]:
                if lesion["status"] == "new":
                    assert previous is not None and lesion["lesion_id"] not in previous
                if lesion["status"] in ("grown", "shrunk", "stable", "vanished"):
                    assert lesion["lesion_id"] in previous
            previous = {k for k, v in present.items() if v["status"] != "vanished"}
    # With the default seed and sizes every event occurs (checked on the plan: no rendering).
    plan = phantom._plan_lesions(0, 8, 3, 4)
    events = {
        phantom.lesion_status(les.radii_mm[t - 1], les.radii_mm[t])
        for lesions in plan
        for les in lesions
        for t in (1, 2)
    }
    assert {"new", "grown", "shrunk", "stable", "vanished"} <= events
    # Every patient has a small (< 8 mm diameter) metastasis at some time point.
    for lesions in plan:
        assert any(0 < r < phantom.SMALL_RADIUS_MM[1] for les in lesions for r in les.radii_mm)


def test_true_displacement_matches_manifest_and_lesions(cohort):
    out, _, _, manifest = cohort
    by_id = {s["study_id"]: s for s in _studies(manifest)}
    assert "true_displacement" not in by_id["P001_T0"]["files"]
    with pytest.raises(ValueError, match="baseline"):
        phantom.map_to_previous(manifest, "P001_T0", np.zeros((1, 3)))
    for sid in ("P001_T1", "P002_T1"):
        img = nib.load(str(out / by_id[sid]["files"]["true_displacement"]))
        field = np.asarray(img.dataobj)
        assert field.ndim == 4 and field.shape[3] == 3
        norms = np.linalg.norm(field, axis=-1)
        assert 0.1 < norms.mean() < 25
        idx = np.array([[0, 0, 0], np.array(field.shape[:3]) // 2, np.array(field.shape[:3]) - 1])
        points = nib.affines.apply_affine(img.affine, idx)
        expected = phantom.map_to_previous(manifest, sid, points) - points
        np.testing.assert_allclose(field[tuple(idx.T)], expected, atol=1e-3)
        # Lesion centroids of the follow-up land near their baseline centroids once mapped.
        previous = {les["lesion_id"]: les for les in by_id[sid.replace("T1", "T0")]["lesions"]}
        for lesion in by_id[sid]["lesions"]:
            before = previous.get(lesion["lesion_id"])
            if lesion["status"] != "stable" or before is None:
                continue
            mapped = phantom.map_to_previous(manifest, sid, np.array([lesion["centre_mm"]]))[0]
            assert np.linalg.norm(mapped - before["centre_mm"]) < 6.0


def test_sheet_and_oracle(cohort):
    out, result, sheet, _ = cohort
    assert list(sheet.columns) == SHEET_COLUMNS
    assert sheet["study_id"].tolist() == result["study_ids"]
    assert sheet["timepoint"].tolist() == ["0", "1", "0", "1"]
    assert set(sheet["label_convention"]) == {"internal"}
    labelled = sheet["patient_id"] == "P001"
    assert (sheet.loc[labelled, "label"] != "").all()
    assert (sheet.loc[~labelled, "label"] == "").all()
    assert result["unlabelled_study_ids"] == ["P002_T0", "P002_T1"]
    row = sheet.set_index("study_id").loc["P002_T1"]
    assert row["t2"] == "" and row["flair"] != ""
    for _, row in sheet.iterrows():
        for col in ("t1", "t1c", "t2", "flair", "label"):
            if row[col]:
                assert (out / row[col]).is_file(), row[col]
    oracle = pd.read_csv(result["oracle"], sep="\t", dtype=str)
    assert list(oracle.columns) == ["study_id", "label", "label_convention"]
    assert oracle["study_id"].tolist() == result["study_ids"]
    assert all((out / path).is_file() for path in oracle["label"])


def test_bad_parameters_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown study"):
        phantom.make_demo_cohort(tmp_path, n_patients=1, drop_sequences={"P009_T0": ["t2"]})
    with pytest.raises(ValueError, match="unknown sequences"):
        phantom.make_demo_cohort(tmp_path, n_patients=1, drop_sequences={"P001_T0": ["dwi"]})
    with pytest.raises(ValueError, match="labelled_patients"):
        phantom.make_demo_cohort(tmp_path, n_patients=2, labelled_patients=-1)
    with pytest.raises(ValueError, match="convention"):
        phantom.make_demo_cohort(tmp_path, n_patients=1, label_convention="nnunet")
    assert not any(tmp_path.iterdir())


def test_brats_layout(tmp_path):
    result = phantom.write_brats_layout(tmp_path, n_cases=1, spacing=3.0)
    pattern = re.compile(r"^(BraTS-MET-\d{5}-\d{3})/\1-(t1n|t1c|t2w|t2f|seg)\.nii\.gz$")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 5 and all(pattern.match(f) for f in files), files
    case = result["case_ids"][0]
    assert case == "BraTS-MET-00001-000"
    images = [nib.load(str(tmp_path / case / f"{case}-{s}.nii.gz")) for s in ("t1n", "t1c", "seg")]
    assert images[0].shape == images[2].shape == (80, 80, 52)
    np.testing.assert_allclose(images[0].affine, images[2].affine)
    assert nib.aff2axcodes(images[0].affine) == ("L", "P", "S")
    seg = np.asanyarray(images[2].dataobj)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3} and (seg == 3).any()  # 3 = ET
    t1c = np.asanyarray(images[1].dataobj).astype(float)
    assert t1c[seg == 3].mean() > 1.2 * t1c[t1c > 0].mean()


def test_longitudinal_layout(tmp_path):
    result = phantom.write_longitudinal_layout(
        tmp_path, n_patients=1, n_timepoints=2, native_spacing=(4.0, 4.0, 5.0)
    )
    pattern = re.compile(
        r"^(YG\d{4})/(\d{4}-\d{2}-\d{2})/\1_\2_(\d{6})_(PRE|POST|T2|FLAIR)\.nii\.gz$"
    )
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 8
    matches = [pattern.match(f) for f in files]
    assert all(matches), files
    dates = result["patients"]["YG0001"]
    assert len(dates) == 2 and dates[0] < dates[1]
    for date in dates:
        session = [m for m in matches if m.group(2) == date]
        assert sorted(m.group(4) for m in session) == ["FLAIR", "POST", "PRE", "T2"]
        times = {m.group(4): m.group(3) for m in session}
        assert times["PRE"] < times["POST"]  # contrast is given last
