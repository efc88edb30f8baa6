"""Every kind of broken input a cohort of 11,892 studies will contain, one test case each.

A broken study must fail with a ``StudyError`` that names the study, the file and the problem
(that text is what lands in results/qc/quarantine.tsv); inputs that are unusual but valid
(flipped storage order, sequences with different fields of view) must preprocess correctly.
The images are tiny (3 mm, ~24^3) and skull-stripped so each case runs in well under a second.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from metsflow import cli
from metsflow.cohort.sheet import Study
from metsflow.core.io import StudyError, load_nifti
from metsflow.core.layout import Layout
from metsflow.imaging.preprocess import preprocess_study
from metsflow.jobs import register as register_job
from metsflow.jobs.manifest import write_manifest

SHAPE = (24, 28, 22)
SPACING = 3.0
AFFINE = np.diag([SPACING, SPACING, SPACING, 1.0])
AFFINE[:3, 3] = -np.array(SHAPE) * SPACING / 2
FAST = {"spacing": [4.0, 4.0, 4.0], "brain_mask": "nonzero", "coregister": "none"}


def _brain(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A skull-stripped ellipsoid 'brain' with texture, and a one-lesion internal label."""
    grid = np.indices(SHAPE).astype(float)
    centre = (np.array(SHAPE) - 1) / 2
    radius = np.array(SHAPE) * 0.4
    inside = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0)
    brain = inside <= 1
    rng = np.random.default_rng(seed)
    image = np.where(brain, 100 + 30 * np.sin(grid[0] / 3) + rng.normal(0, 5, SHAPE), 0)
    label = np.zeros(SHAPE, np.uint8)
    lesion = (((grid - (centre + 3)[:, None, None, None]) ** 2).sum(0)) <= 4
    label[lesion & brain] = 1
    return image.astype(np.float32), label


def _save(path: Path, data, affine=AFFINE, dtype=np.float32) -> Path:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    nib.save(img, path)
    return path


@pytest.fixture
def study_files(tmp_path):
    """A valid study: T1c, T2 and label on one grid."""
    image, label = _brain()
    return {
        "t1c": _save(tmp_path / "t1c.nii.gz", image),
        "t2": _save(tmp_path / "t2.nii.gz", image.max() - image * 0.5),
        "label": _save(tmp_path / "seg.nii.gz", label, dtype=np.uint8),
    }


def _study(files: dict, study_id: str = "S1") -> Study:
    return Study(
        patient_id="P1",
        study_id=study_id,
        timepoint="0",
        order=0,
        t1=files.get("t1"),
        t1c=files.get("t1c"),
        t2=files.get("t2"),
        label=files.get("label"),
    )


# Each case breaks one file of a valid study; (file broken, expected words of the problem).
def _truncated(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _not_nifti(path: Path) -> None:
    path.write_bytes(gzip.compress(b"patient_id,study_id\nthis is a CSV export, not an image\n"))


def _replace_data(transform):
    def breaker(path: Path) -> None:
        img = nib.load(path)
        data, affine = transform(np.asarray(img.dataobj, dtype=np.float32), img.affine.copy())
        _save(path, data, affine)

    return breaker


def _nan(data, affine):
    data[5, 5, 5] = np.nan
    return data, affine


def _inf(data, affine):
    data[5, 5, 5] = np.inf
    return data, affine


def _scaled_spacing(factor):
    def transform(data, affine):
        affine[:3, :3] *= factor
        return data, affine

    return transform


def _zero_spacing(path: Path) -> None:
    """A zero slice thickness in the sform (nibabel refuses to write it through an affine)."""
    img = nib.load(path)
    affine = img.affine.copy()
    affine[:3, 2] = 0.0
    header = img.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(affine, code=1)
    header["pixdim"][3] = 0.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header), path)


def _no_orientation(path: Path) -> None:
    """An ANALYZE-style header: nibabel guesses a diagonal affine, left-right is unknown."""
    img = nib.load(path)
    header = img.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(None, code=0)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header), path)


def _sheared(data, affine):
    affine[0, 1] = 0.3 * SPACING  # ~17 degrees of shear between the first two axes
    return data, affine


def _shifted(data, affine):
    affine[:3, 3] += 2.0 * SPACING
    return data, affine


def _bad_label_value(data, affine):
    data[data == 1] = 9  # 9 is no class of the internal convention
    return data, affine


BROKEN = {
    "truncated .nii.gz": ("t1c", _truncated, "truncated"),
    "not a NIfTI file": ("t1c", _not_nifti, "not a readable NIfTI"),
    "4D image": ("t1c", _replace_data(lambda d, a: (np.stack([d, d], -1), a)), "must be 3D"),
    "2D image": ("t1c", _replace_data(lambda d, a: (d[:, :, 10], a)), "must be 3D"),
    "NaN voxels": ("t1c", _replace_data(_nan), "NaN or infinite"),
    "inf voxels": ("t2", _replace_data(_inf), "NaN or infinite"),
    "all-zero image": ("t2", _replace_data(lambda d, a: (np.zeros_like(d), a)), "no signal"),
    "absurd spacing (60 mm)": ("t1c", _replace_data(_scaled_spacing(20.0)), "spacing"),
    "absurd spacing (0.03 mm)": ("t1c", _replace_data(_scaled_spacing(0.01)), "spacing"),
    "zero spacing": ("t1c", _zero_spacing, "spacing"),
    "sheared affine": (("t1c", "t2", "label"), _replace_data(_sheared), "affine is sheared"),
    "header without orientation": ("t1c", _no_orientation, "no orientation"),
    "label values outside the convention": ("label", _replace_data(_bad_label_value), "9"),
    "label on a different grid": ("label", _replace_data(_shifted), "label grid"),
    "missing file": ("t2", lambda path: path.unlink(), "missing"),
    "directory instead of a file": ("t1c", lambda p: (p.unlink(), p.mkdir()), "not a regular"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_input_names_study_file_and_problem(case, study_files, tmp_path):
    which, breaker, words = BROKEN[case]
    if isinstance(which, tuple):  # the whole study is broken the same way; T1c is read first
        for name in which:
            breaker(study_files[name])
        which = which[0]
    else:
        breaker(study_files[which])
    out = tmp_path / "prep"
    with pytest.raises(StudyError) as err:
        preprocess_study(_study(study_files), out, FAST)
    assert err.value.study_id == "S1"
    assert err.value.path == str(study_files[which]), case
    assert words in err.value.problem, err.value.problem
    assert str(study_files[which]) in str(err.value) and "S1" in str(err.value)


def test_unreadable_file_is_refused_with_a_permission_problem(tmp_path):
    """chmod 000 does not stop root (CAP_DAC_OVERRIDE), so as root the load runs in a child
    without that capability: the kernel then refuses the read exactly as for a normal user."""
    image, _ = _brain()
    path = _save(tmp_path / "t1c.nii.gz", image)
    os.chmod(path, 0o000)
    if os.geteuid() != 0:
        with pytest.raises(StudyError, match="permissions"):
            load_nifti(path, "S9", "T1C")
        return
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux setpriv: cannot drop CAP_DAC_OVERRIDE")
    code = (
        "import sys\nfrom metsflow.core.io import load_nifti, StudyError\n"
        f"try:\n    load_nifti({str(path)!r}, 'S9', 'T1C')\n"
        "except StudyError as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run(
        [setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    if "setpriv" in proc.stderr:  # e.g. a container without CAP_SETPCAP
        pytest.skip(f"cannot drop capabilities here: {proc.stderr.strip()}")
    assert proc.returncode == 3, proc.stderr
    assert "not readable (permissions)" in proc.stdout and str(path) in proc.stdout


# ---------------------------------------------------------------- unusual but valid inputs


def _flip_storage(path: Path, axis: int = 0) -> None:
    """Store the same image left-right reversed: data flipped, affine compensating."""
    img = nib.load(path)
    flip = np.eye(4)
    flip[axis, axis] = -1
    flip[axis, 3] = img.shape[axis] - 1
    _save(path, np.flip(np.asarray(img.dataobj), axis), img.affine @ flip, img.get_data_dtype())


def test_left_right_flipped_storage_gives_the_same_preprocessed_study(study_files, tmp_path):
    """A flipped affine is a storage order, not an error: world positions decide."""
    reference = preprocess_study(_study(study_files), tmp_path / "ref", FAST)
    for name in ("t1c", "t2", "label"):
        _flip_storage(study_files[name])
    assert nib.aff2axcodes(nib.load(study_files["t1c"]).affine)[0] == "L"
    flipped = preprocess_study(_study(study_files), tmp_path / "flip", FAST)
    assert flipped["native"]["orientation"] == "LAS"
    assert flipped["final"] == reference["final"]
    for name in ("t1c.nii.gz", "t2.nii.gz", "label.nii.gz", "brain_mask.nii.gz"):
        a = nib.load(tmp_path / "ref" / name).get_fdata()
        b = nib.load(tmp_path / "flip" / name).get_fdata()
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)


def test_t2_flipped_against_t1c_still_lands_on_the_anatomy(study_files, tmp_path):
    reference = preprocess_study(_study(study_files), tmp_path / "ref", FAST)
    _flip_storage(study_files["t2"])
    preprocess_study(_study(study_files), tmp_path / "flip", FAST)
    a = nib.load(tmp_path / "ref/t2.nii.gz").get_fdata()
    b = nib.load(tmp_path / "flip/t2.nii.gz").get_fdata()
    assert reference["final"]["shape"] == list(b.shape)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_sequences_with_different_fields_of_view_share_the_t1c_grid(study_files, tmp_path):
    """A T2 covering only the upper half of the head (and on its own grid) is resampled onto
    the T1c grid; the part it does not cover is zero-filled, not an error."""
    img = nib.load(study_files["t2"])
    half = SHAPE[2] // 2
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([0, 0, half])
    _save(study_files["t2"], np.asarray(img.dataobj)[:, :, half:], affine)
    geometry = preprocess_study(_study(study_files), tmp_path / "prep", FAST)
    t1c = nib.load(tmp_path / "prep/t1c.nii.gz")
    t2 = nib.load(tmp_path / "prep/t2.nii.gz")
    assert t2.shape == t1c.shape == tuple(geometry["final"]["shape"])
    np.testing.assert_allclose(t2.affine, t1c.affine)
    assert geometry["sequences_present"] == ["t1c", "t2"]


# ---------------------------------------------------------------- sheet-level problems


def test_cohort_check_reports_every_sheet_problem_at_once(tmp_path, capsys):
    """Duplicate study ids, a path escaping the data roots and a bad timepoint, in one run."""
    image, _ = _brain()
    for study in ("A0", "A1", "B0"):
        (tmp_path / study).mkdir()
        _save(tmp_path / study / "t1c.nii.gz", image)
    rows = [
        ("PA", "A0", "0", "A0/t1c.nii.gz"),
        ("PA", "A0", "1", "A1/t1c.nii.gz"),  # duplicate study id
        ("PB", "B0", "zero", "B0/t1c.nii.gz"),  # not a timepoint
        ("PC", "C0", "0", "../../etc/passwd"),  # outside the sheet's folder
    ]
    sheet = tmp_path / "studies.tsv"
    pd.DataFrame(rows, columns=["patient_id", "study_id", "timepoint", "t1c"]).to_csv(
        sheet, sep="\t", index=False
    )
    assert cli.main(["cohort", "check", str(sheet)]) == 1
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "duplicate study id" in err and "row 3" in err
    assert "'zero'" in err and "row 4" in err
    assert "outside the data roots" in err and "row 5" in err


def test_cohort_check_lists_file_problems_of_all_studies(tmp_path, capsys):
    image, label = _brain()
    for study in ("A0", "A1", "B0"):
        (tmp_path / study).mkdir()
    _save(tmp_path / "A0/t1c.nii.gz", image)
    _save(tmp_path / "A0/seg.nii.gz", label, AFFINE @ np.diag([1, 1, 2, 1]), np.uint8)
    (tmp_path / "A1/t1c.nii.gz").write_bytes(b"not an image")
    _save(tmp_path / "B0/t1c.nii.gz", np.stack([image, image], -1))
    rows = [
        ("PA", "A0", "0", "A0/t1c.nii.gz", "A0/seg.nii.gz", ""),
        ("PA", "A1", "1", "A1/t1c.nii.gz", "", "A1/missing_t2.nii.gz"),
        ("PB", "B0", "0", "B0/t1c.nii.gz", "", ""),
    ]
    sheet = tmp_path / "studies.tsv"
    pd.DataFrame(
        rows, columns=["patient_id", "study_id", "timepoint", "t1c", "label", "t2"]
    ).to_csv(sheet, sep="\t", index=False)
    out = tmp_path / "problems.tsv"
    assert cli.main(["cohort", "check", "--deep", str(sheet), "--out", str(out)]) == 1
    problems = pd.read_csv(out, sep="\t")
    by_study = problems.groupby("study_id").problem.apply(" | ".join).to_dict()
    assert set(by_study) == {"A0", "A1", "B0"}
    assert "label" in by_study["A0"] and "T1c grid" in by_study["A0"]
    assert "not a readable NIfTI" in by_study["A1"] and "missing" in by_study["A1"]
    assert "must be 3D" in by_study["B0"]
    assert "3 of 3 studies have problems" in capsys.readouterr().err


# ---------------------------------------------------------------- longitudinal policy


def test_single_time_point_and_failed_previous_study(tmp_path, monkeypatch):
    """A patient with one time point is a baseline (nothing to register); a follow-up whose
    previous study failed is registered to the nearest earlier study that succeeded."""
    calls = []

    def fake_register(followup_dir, previous_dir, out_dir, settings, threads=1):
        calls.append((Path(followup_dir).name, Path(previous_dir).name))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return {"ok": True}

    monkeypatch.setattr(register_job, "register_followup", fake_register)
    layout = Layout(tmp_path)
    prep = Path(layout.stage_root("preprocessed"))
    statuses = {"Q0": "ok", "R0": "ok", "R1": "failed", "R2": "ok"}
    for study_id, status in statuses.items():
        if status == "ok":
            (prep / study_id).mkdir(parents=True)
            (prep / study_id / ".done.json").write_text("{}")
    plan = [
        {"study_id": "Q0", "patient_id": "Q", "order": 0},
        {"study_id": "R0", "patient_id": "R", "order": 0},
        {"study_id": "R1", "patient_id": "R", "order": 1},
        {"study_id": "R2", "patient_id": "R", "order": 2},
    ]
    manifest = tmp_path / "prep.tsv"
    write_manifest(
        manifest,
        [
            {"study_id": s, "patient_id": s[0], "status": st, "problem": "", "seconds": 0}
            for s, st in statuses.items()
        ],
    )
    rows = register_job.run_register_shard(
        layout, {}, plan, str(manifest), str(tmp_path / "reg.tsv")
    )
    by_id = {row["study_id"]: row for row in rows}
    assert by_id["Q0"]["status"] == "baseline" and by_id["R0"]["status"] == "baseline"
    assert by_id["R1"]["status"] == "skipped" and "preprocessing failed" in by_id["R1"]["problem"]
    assert by_id["R2"]["status"] == "ok" and by_id["R2"]["reference_study"] == "R0"
    assert calls == [("R2", "R0")]
