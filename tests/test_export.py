"""Exports: BIDS derivatives (checked by the BIDS validator) and DICOM SEG (read back with
highdicom and compared voxel for voxel with the native label)."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from _dicom_series import COLUMNS, ROWS, SLICES, decode, write_series

from metsflow.cohort.dicom import dicom_source, import_dicom
from metsflow.cohort.export import (
    DSEG_TABLE,
    export_bids,
    lesions_path,
    read_dicom_seg,
    read_source_series,
    write_dicom_seg,
)
from metsflow.core.layout import Layout
from metsflow.evaluation.longitudinal import ResponseThresholds, TimePoint, track_patient

VALIDATOR = Path(sys.executable).parent / "bids-validator-deno"


def frame_label() -> np.ndarray:
    """A label map in DICOM frame space (slice, row, column): values 1, 2, 3 in blocks."""
    frames = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    frames[1:4, 2:8, 1:6] = 2  # edema
    frames[1:4, 3:6, 2:5] = 1  # enhancing
    frames[2, 4, 3] = 3  # necrosis
    frames[4, 10, 8] = 1  # a second lesion, on the last slice near a corner
    return frames


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A T1c series imported with dcm2niix and its native label built from the pixel codes."""
    root = tmp_path_factory.mktemp("pacs")
    write_series(root / "t1c", description="T1 MPRAGE POST")
    out = tmp_path_factory.mktemp("nifti")
    frame, _, _ = import_dicom(root, out)
    t1c = Path(frame.t1c[0])
    img = nib.load(t1c)
    k, r, c = decode(np.asarray(img.dataobj))
    native = frame_label()[k, r, c]  # where each NIfTI voxel came from, independent of export
    label = out / "label.nii.gz"
    nib.save(nib.Nifti1Image(native, img.affine), label)
    return t1c, label, native


def test_dicom_seg_round_trip_voxel_for_voxel(converted, tmp_path):
    import highdicom as hd

    t1c, label, native = converted
    files = dicom_source(t1c)["files"]
    seg_path = tmp_path / "seg.dcm"
    present = write_dicom_seg(label, files, seg_path, "P1_2020-01-02", manual=False, model_round=2)
    assert present == [1, 2, 3]

    seg = hd.seg.segread(str(seg_path))
    sources = read_source_series(files)
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == {d.SOPInstanceUID for d in sources}
    types = [seg.get_segment_description(n).segmented_property_type.value for n in (1, 2, 3)]
    assert types == ["128462008", "79654002", "6574001"]  # SCT metastasis, edema, necrosis
    # in DICOM frame space: the source pixels' labels (instances in slice order = written order)
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in sources], segment_numbers=[1, 2, 3]
    )
    frames = (masks * np.array([1, 2, 3])).max(axis=-1)
    assert np.array_equal(frames, frame_label())
    # on the NIfTI grid: voxel for voxel
    back = read_dicom_seg(seg_path, files, t1c)
    assert back.shape == native.shape
    assert int((back != native).sum()) == 0
    assert int((native > 0).sum()) > 50


def test_dicom_seg_refuses_a_label_on_another_grid(converted, tmp_path):
    t1c, label, native = converted
    img = nib.load(label)
    shifted = tmp_path / "shifted.nii.gz"
    affine = img.affine.copy()
    affine[:3, 3] += 0.4
    nib.save(nib.Nifti1Image(native, affine), shifted)
    with pytest.raises(ValueError, match="not the source T1c series' grid"):
        write_dicom_seg(shifted, dicom_source(t1c)["files"], tmp_path / "x.dcm", "S", True, None)


def _label(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


@pytest.fixture
def bids_export(tmp_path):
    grid = np.zeros((16, 16, 8), dtype=np.uint8)
    first, second = grid.copy(), grid.copy()
    first[2:5, 2:5, 2:4] = 1
    first[10:12, 10:12, 4:6] = 1
    first[1:7, 1:7, 1:5][first[1:7, 1:7, 1:5] == 0] = 2
    second[2:4, 2:4, 2:3] = 1  # the first lesion shrinks, the second resolves
    second[12:15, 2:4, 5:7] = 3
    paths = {}
    for name, data in (("P-1_a", first), ("P-1_b", second)):
        paths[name] = (_label(tmp_path / f"{name}_t1c.nii.gz", data * 0 + 7),)
        paths[name] += (_label(tmp_path / f"{name}_label.nii.gz", data),)
    studies = pd.DataFrame(
        [
            ("P-1_a", "P1", "a", str(paths["P-1_a"][1]), str(paths["P-1_a"][0]), True),
            ("P-1_b", "P1", "b", str(paths["P-1_b"][1]), str(paths["P-1_b"][0]), False),
            ("P-2_a", "P2", "a", "", "", False),
        ],
        columns=["study_id", "subject", "session", "label", "t1c", "manual"],
    )
    points = [
        TimePoint(s, k, nib.load(paths[s][1]).get_fdata() == 1, 2.0)
        for k, s in enumerate(("P-1_a", "P-1_b"))
    ]
    lesions = track_patient("P-1", points).assign(label="enhancing")
    out = tmp_path / "bids"
    result = export_bids(studies, lesions, out, model_round=3)
    return out, result


def test_bids_export_layout(bids_export):
    out, result = bids_export
    assert result.status.tolist() == ["ok", "ok", "no_label"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert "round 3" in description["GeneratedBy"][0]["Description"]
    dseg = out / "sub-P1/ses-a/anat/sub-P1_ses-a_space-orig_dseg.nii.gz"
    assert nib.load(dseg).get_data_dtype() == np.uint8
    assert json.loads(dseg.with_name(dseg.name.replace(".nii.gz", ".json")).read_text())["Manual"]
    lut = pd.read_csv(out / "dseg.tsv", sep="\t")
    assert lut.columns.tolist() == ["index", "name", "abbreviation", "color"]
    assert lut["index"].tolist() == DSEG_TABLE["index"].tolist()
    table = pd.read_csv(out / lesions_path("P1", "b"), sep="\t")
    assert table.lesion_id.tolist() == ["P-1-L1", "P-1-L2"]
    assert table.status.tolist() == ["tracked", "resolved"]
    assert table.volume_mm3.tolist() == [8.0, 0.0]  # 2 x 2 x 1 voxels of 2 mm^3


def test_bids_export_passes_the_bids_validator(bids_export):
    # Not skipped when missing: ./test.sh installs it (the dev extra); a skip would hide that.
    assert VALIDATOR.exists(), "bids-validator-deno is not installed: pip install -e '.[dev]'"
    out, _ = bids_export
    result = subprocess.run(
        [str(VALIDATOR), "--format", "json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(result.stdout)
    issues = report["issues"]["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    assert errors == [], errors
    assert result.returncode == 0
    warnings = {i["code"] for i in issues if i["severity"] == "warning"}
    assert "NIFTI_UNIT" not in warnings and "README_FILE_MISSING" not in warnings


def _table(path: Path, rows: list[dict]) -> str:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return str(path)


def test_export_jobs_track_lesions_and_write_seg_for_dicom_studies(converted, tmp_path):
    """The job bodies: DICOM SEG only where the T1c came from DICOM; tracked lesion ids over a
    patient's registration chain, a new series (prefixed ids) where the chain breaks."""
    from metsflow.evaluation.longitudinal import identity_warp
    from metsflow.jobs.export import (
        FinalExport,
        final_studies,
        run_export_dicom_seg,
        track_final_labels,
    )

    t1c, label, _ = converted
    grid = np.zeros((12, 12, 6), dtype=np.uint8)
    lesion = grid.copy()
    lesion[3:6, 3:6, 2:4] = 1
    records, plan, finals, registered = [], [], [], []
    layout = Layout(tmp_path)
    prep = Path(layout.stage_root("preprocessed"))
    for k, study in enumerate(["P3_a", "P3_b", "P3_c"]):
        image = _label(tmp_path / f"{study}_t1c.nii.gz", grid)
        (prep / study).mkdir(parents=True)
        _label(prep / study / "t1c.nii.gz", grid)
        records.append(
            dict(
                patient_id="P3",
                study_id=study,
                timepoint=str(k),
                order=k,
                t1=None,
                t1c=str(image),
                label=None,
                label_convention="internal",
            )
        )
        plan.append(dict(study_id=study, patient_id="P3", order=k, role="pool"))
        source = "human_confirmed" if k == 0 else "model"
        finals.append(
            dict(
                study_id=study,
                patient_id="P3",
                source=source,
                label=str(_label(tmp_path / f"{study}_label.nii.gz", lesion)),
                model="m.pt",
                round="" if k == 0 else "1",
            )
        )
    # P3_b registered to P3_a; P3_c to P3_a (not to P3_b): the chain breaks before P3_c
    registered = [
        dict(study_id="P3_b", status="ok", reference_study="P3_a"),
        dict(study_id="P3_c", status="ok", reference_study="P3_a"),
    ]
    records.append(
        dict(
            patient_id="P1",
            study_id="P1_2020-01-02",
            timepoint="2020-01-02",
            order=0,
            t1=None,
            t1c=str(t1c),
            label=None,
            label_convention="internal",
        )
    )
    plan.append(dict(study_id="P1_2020-01-02", patient_id="P1", order=0, role="pool"))
    finals.append(
        dict(
            study_id="P1_2020-01-02",
            patient_id="P1",
            source="model",
            label=str(label),
            model="m.pt",
            round="1",
        )
    )
    plan_path = _table(tmp_path / "plan.tsv", plan)
    labels_path = _table(tmp_path / "labels.tsv", finals)

    studies = final_studies(labels_path, records, plan_path)
    assert studies.set_index("study_id").loc["P3_a", ["subject", "session", "manual"]].tolist() == [
        "P3",
        "a",
        True,
    ]
    lesions = track_final_labels(
        studies[studies.patient_id == "P3"],
        [_table(tmp_path / "registered.tsv", registered)],
        layout,
        ResponseThresholds(),
        warp_factory=lambda *args: identity_warp,
    )
    assert lesions.lesion_id.tolist() == ["P3-L1", "P3-L1", "P3_c-L1"]
    assert lesions.status.tolist() == ["baseline", "tracked", "baseline"]
    assert lesions.volume_mm3.tolist() == [36.0] * 3  # 3 x 3 x 2 voxels of 2 mm^3

    out = Path(layout.dicom_seg_dir)
    manifest = run_export_dicom_seg(
        layout, FinalExport(labels_path, plan_path, records, 1, layout.dicom_seg_manifest)
    )
    status = dict(zip(manifest.study_id, manifest.status, strict=True))
    assert status == {
        "P3_a": "not_dicom",
        "P3_b": "not_dicom",
        "P3_c": "not_dicom",
        "P1_2020-01-02": "ok",
    }
    assert (out / "P1_2020-01-02.dcm").is_file()


def test_run_export_bids_tracks_through_the_registration(tmp_path):
    """The whole BIDS job on a small results tree with a real (identity) ANTs registration."""
    from _synthetic_images import identity_registration

    from metsflow.core.io import save_nifti
    from metsflow.jobs.export import FinalExport, run_export_bids

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    layout = Layout(tmp_path)
    prep, reg = Path(layout.stage_root("preprocessed")), Path(layout.stage_root("registered"))
    lesion = np.zeros((12, 12, 12), np.uint8)
    lesion[3:7, 3:7, 3:7] = 1
    shrunk = np.zeros_like(lesion)
    shrunk[4:6, 4:6, 4:6] = 1
    records, finals = [], []
    for k, (study, label) in enumerate((("P-1_a", lesion), ("P-1_b", shrunk))):
        save_nifti(prep / study / "t1c.nii.gz", np.ones(lesion.shape, np.float32), affine)
        t1c = tmp_path / "raw" / f"{study}_t1c.nii.gz"
        save_nifti(t1c, np.ones(lesion.shape, np.float32), affine)
        save_nifti(tmp_path / "raw" / f"{study}_label.nii.gz", label, affine, dtype=np.uint8)
        records.append(
            dict(
                patient_id="P-1",
                study_id=study,
                timepoint=str(k),
                order=k,
                t1=None,
                t1c=str(t1c),
                label=None,
                label_convention="internal",
            )
        )
        finals.append(
            dict(
                study_id=study,
                patient_id="P-1",
                source="human_confirmed" if k else "model",
                label=str(tmp_path / "raw" / f"{study}_label.nii.gz"),
                model="m.pt",
                round="" if k else "2",
            )
        )
    identity_registration(reg / "P-1_b", nib.load(str(prep / "P-1_b" / "t1c.nii.gz")))
    plan = _table(
        tmp_path / "plan.tsv",
        [
            dict(study_id=r["study_id"], patient_id="P-1", order=r["order"], role="pool")
            for r in records
        ],
    )
    registered = _table(
        tmp_path / "reg.tsv",
        [
            dict(study_id="P-1_a", status="baseline", reference_study=""),
            dict(study_id="P-1_b", status="ok", reference_study="P-1_a"),
        ],
    )
    out = tmp_path / "bids"
    manifest = run_export_bids(
        layout,
        ResponseThresholds(),
        FinalExport(
            final_labels=_table(tmp_path / "labels.tsv", finals),
            plan=plan,
            studies=records,
            model_round=2,
            manifest=str(tmp_path / "bids_export.tsv"),
            registration_manifests=[registered],
            out_root=str(out),
        ),
    )
    assert manifest.status.tolist() == ["ok", "ok"]
    table = pd.read_csv(out / lesions_path("P1", "b"), sep="\t")
    assert table[["lesion_id", "status", "volume_mm3"]].values.tolist() == [
        ["P-1-L1", "tracked", 8 * 8.0]
    ]
    sidecar = out / "sub-P1/ses-b/anat/sub-P1_ses-b_space-orig_dseg.json"
    assert json.loads(sidecar.read_text())["Manual"] is True
    result = subprocess.run(
        [str(VALIDATOR), "--format", "json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:]
