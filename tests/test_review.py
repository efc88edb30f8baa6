import re
import shlex
import stat

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from metsflow.active_learning.labelstore import LabelStore
from metsflow.active_learning.review import (
    MANIFEST_COLUMNS,
    export_batch,
    import_batch,
    itksnap_label_description,
    read_manifest,
    slicer_color_table,
    write_view_image,
)
from metsflow.core import io
from metsflow.core.io import LabelStoreWriteError

AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])
SHAPE = (8, 8, 6)
STUDIES = ["S1", "S2", "S3"]


def _pred():
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[2:5, 2:5, 2:4] = 2
    data[3, 3, 2:4] = 1
    return data


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    images, presegs = {}, {}
    for study_id in STUDIES:
        folder = tmp_path / "native" / study_id
        io.save_nifti(folder / "t1c.nii.gz", rng.random(SHAPE), AFFINE, dtype=np.float32)
        io.save_nifti(folder / "flair.nii.gz", rng.random(SHAPE), AFFINE, dtype=np.float32)
        io.save_nifti(folder / "pred_native.nii.gz", _pred(), AFFINE, dtype=np.uint8)
        images[study_id] = {"t1c": folder / "t1c.nii.gz", "flair": folder / "flair.nii.gz"}
        presegs[study_id] = folder / "pred_native.nii.gz"
    selection = pd.DataFrame(
        {"study_id": STUDIES, "patient_id": ["P1", "P1", "P2"], "score": [3, 2, 1]}
    )
    return selection, images, presegs


def _export(tmp_path, inputs, **kwargs):
    selection, images, presegs = inputs
    return export_batch(selection, images, presegs, tmp_path / "review", 2, "model_r1", **kwargs)


ITKSNAP_LINE = re.compile(
    r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([01](?:\.\d+)?)\s+([01])\s+([01])\s+"([^"]*)"\s*$'
)


def test_viewer_files_parse():
    rows = [
        ITKSNAP_LINE.match(line)
        for line in itksnap_label_description().splitlines()
        if not line.startswith("#")
    ]
    assert all(rows), "every non-comment line must follow the ITK-SNAP format"
    parsed = {int(m.group(1)): m.group(8) for m in rows}
    assert parsed == {0: "Clear Label", 1: "enhancing", 2: "edema", 3: "necrosis"}
    assert all(0 <= int(m.group(i)) <= 255 for m in rows for i in (2, 3, 4))

    lines = slicer_color_table().splitlines()
    assert lines[0].startswith("# Color table file")
    entries = [line.split() for line in lines if not line.startswith("#")]
    assert [(int(e[0]), e[1]) for e in entries] == [
        (0, "Background"),
        (1, "enhancing"),
        (2, "edema"),
        (3, "necrosis"),
    ]
    assert all(len(e) == 6 and all(0 <= int(v) <= 255 for v in e[2:]) for e in entries)


def test_export_writes_package(tmp_path, inputs):
    result = _export(tmp_path, inputs)
    assert result["result"].tolist() == ["exported"] * 3
    review = tmp_path / "review"
    for study_id in STUDIES:
        folder = review / study_id
        for name in (
            "image_t1c.nii.gz",
            "image_flair.nii.gz",
            "presegmentation.nii.gz",
            "labels.txt",
            "metsflow.ctbl",
        ):
            assert (folder / name).is_file(), name
        assert (folder / "image_t1c.nii.gz").read_bytes() == (
            inputs[1][study_id]["t1c"].read_bytes()
        )
        preseg = nib.load(str(folder / "presegmentation.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(preseg.dataobj), _pred())
        assert stat.S_IMODE((folder / "presegmentation.nii.gz").stat().st_mode) & 0o222 == 0

    manifest = read_manifest(review)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["status"].tolist() == ["pending"] * 3
    assert manifest["patient_id"].tolist() == ["P1", "P1", "P2"]
    assert set(manifest["round"]) == {"2"} and set(manifest["model"]) == {"model_r1"}
    for row in manifest.itertuples():
        for column in (
            "image",
            "presegmentation",
            "itksnap_labels",
            "slicer_colortable",
            "monailabel_image",
            "monailabel_presegmentation",
        ):
            assert (review / getattr(row, column)).is_file(), column
        words = shlex.split(row.command)
        assert words[:3] == ["cd", row.study_id, "&&"]
        assert words[3:10] == [
            "itksnap",
            "-g",
            "image_t1c.nii.gz",
            "-s",
            "presegmentation.nii.gz",
            "-l",
            "labels.txt",
        ]
        assert words[10:] == ["-o", "image_flair.nii.gz"]

    # The web editor's int16 copies of the float32 images: the same grid, each voxel within
    # half a grey level of the original, half the bytes per voxel; the originals untouched.
    for study_id in STUDIES:
        for sequence in ("t1c", "flair"):
            original = nib.load(str(inputs[1][study_id][sequence]))
            view = nib.load(str(review / study_id / f"view_{sequence}.nii.gz"))
            assert view.get_data_dtype() == np.int16 and view.shape == original.shape
            np.testing.assert_allclose(view.affine, original.affine)
            slope = float(view.dataobj.slope)
            np.testing.assert_allclose(
                view.get_fdata(), original.get_fdata(), atol=slope / 2 + 1e-7
            )
            assert slope < np.ptp(original.get_fdata()) / 60_000  # the whole int16 range used

    datastore = io.read_json(review / "monailabel" / "datastore_v2.json")
    assert datastore["labels_dir"] == "labels" and set(datastore["objects"]) == set(STUDIES)
    entry = datastore["objects"]["S1"]
    assert entry["image"]["ext"] == ".nii.gz" and entry["image"]["info"]["name"] == "S1.nii.gz"
    assert entry["labels"]["original"]["ext"] == ".nii.gz"
    assert (review / "monailabel" / "labels" / "final").is_dir()


def test_export_bad_study_fails_alone_and_reexport_keeps_existing(tmp_path, inputs):
    selection, images, presegs = inputs
    io.save_nifti(presegs["S2"], np.zeros((8, 8, 5)), AFFINE, dtype=np.uint8)  # wrong grid
    result = _export(tmp_path, inputs).set_index("study_id")["result"]
    assert result.to_dict() == {"S1": "exported", "S2": "failed", "S3": "exported"}
    assert not (tmp_path / "review" / "S2").exists()
    assert not list((tmp_path / "review").glob(".staging-*"))

    # A reviewer is working on S1; a re-export (after fixing S2) must not disturb S1.
    io.save_nifti(
        tmp_path / "review" / "S1" / "segmentation.nii.gz", _pred(), AFFINE, dtype=np.uint8
    )
    io.save_nifti(presegs["S2"], _pred(), AFFINE, dtype=np.uint8)
    io.save_nifti(presegs["S1"], np.zeros(SHAPE), AFFINE, dtype=np.uint8)
    again = _export(tmp_path, inputs).set_index("study_id")["result"]
    assert again.to_dict() == {"S1": "already_exported", "S2": "exported", "S3": "already_exported"}
    kept = nib.load(str(tmp_path / "review" / "S1" / "presegmentation.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(kept.dataobj), _pred())
    assert (tmp_path / "review" / "S1" / "segmentation.nii.gz").exists()
    assert read_manifest(tmp_path / "review")["study_id"].tolist() == ["S1", "S3", "S2"]


def test_export_refuses_to_write_into_label_store(tmp_path, inputs):
    LabelStore(tmp_path / "labels")
    selection, images, presegs = inputs
    with pytest.raises(LabelStoreWriteError):
        export_batch(selection, images, presegs, tmp_path / "labels" / "review", 1, "m")


def test_import_batch_per_study_results_and_manifest(tmp_path, inputs):
    _export(tmp_path, inputs)
    review = tmp_path / "review"
    store = LabelStore(tmp_path / "labels")
    corrected = _pred()
    corrected[6, 6, 1] = 1  # the trainee adds a missed lesion
    io.save_nifti(review / "S1" / "segmentation.nii.gz", corrected, AFFINE, dtype=np.uint8)
    io.save_nifti(review / "S2" / "segmentation.nii.gz", _pred() * 2, AFFINE, dtype=np.uint8)
    references = {s: inputs[1][s]["t1c"] for s in STUDIES}

    refined = import_batch(review, store, "refined", "trainee A", references).set_index("study_id")
    assert refined.loc["S1", "result"] == "imported" and refined.loc["S1", "version"] == 1
    assert refined.loc["S1", "changed_voxels"] == 1
    assert refined.loc["S2", "result"] == "rejected" and "values" in refined.loc["S2", "problem"]
    assert refined.loc["S3", "result"] == "missing"
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(str(store.latest("S1"))).dataobj), corrected
    )
    assert store.history("S1")[0]["source"] == "model_r1/round_2"

    manifest = read_manifest(review).set_index("study_id")
    assert (
        manifest.loc["S1", "status"] == "refined"
        and manifest.loc["S1", "refined_by"] == "trainee A"
    )
    assert manifest.loc["S2", "status"] == "pending"

    # Re-running the same import adds nothing.
    again = import_batch(review, store, "refined", "trainee A", references).set_index("study_id")
    assert again.loc["S1", "result"] == "unchanged" and len(store.versions("S1")) == 1

    # S3 corrected in MONAI Label (labels/final), S1 confirmed by the neuroradiologist.
    io.save_nifti(
        review / "monailabel" / "labels" / "final" / "S3.nii.gz", _pred(), AFFINE, dtype=np.uint8
    )
    confirmed = import_batch(review, store, "confirmed", "Dr B").set_index("study_id")
    assert confirmed.loc["S1", "result"] == "imported" and confirmed.loc["S1", "version"] == 2
    assert (
        confirmed.loc["S3", "result"] == "imported" and confirmed.loc["S3", "changed_voxels"] == 0
    )
    manifest = read_manifest(review).set_index("study_id")
    assert manifest.loc["S1", ["status", "refined_by", "confirmed_by"]].tolist() == [
        "confirmed",
        "trainee A",
        "Dr B",
    ]
    final = import_batch(review, store, "confirmed", "Dr B").set_index("study_id")
    assert final.loc["S1", "result"] == "already_confirmed"
    assert len(store.versions("S1")) == 2


def test_import_flags_in_place_edit_and_ambiguous_labels(tmp_path, inputs):
    _export(tmp_path, inputs)
    review = tmp_path / "review"
    store = LabelStore(tmp_path / "labels")
    # S1: the reviewer saved over the (read-only) pre-segmentation instead of Save As.
    edited = _pred()
    edited[0, 0, 0] = 1
    io.save_nifti(review / "S1" / "presegmentation.nii.gz", edited, AFFINE, dtype=np.uint8)
    # S2: two different corrections (ITK-SNAP and MONAI Label).
    io.save_nifti(review / "S2" / "segmentation.nii.gz", edited, AFFINE, dtype=np.uint8)
    io.save_nifti(
        review / "monailabel" / "labels" / "final" / "S2.nii.gz", _pred(), AFFINE, dtype=np.uint8
    )
    result = import_batch(review, store, "refined", "trainee A").set_index("study_id")
    assert result.loc["S1", "result"] == "missing"
    assert "segmentation.nii.gz" in result.loc["S1", "problem"]
    assert (
        result.loc["S2", "result"] == "rejected" and "two different" in result.loc["S2", "problem"]
    )
    assert store.studies() == []
    with pytest.raises(ValueError, match="reviewer"):
        import_batch(review, store, "refined", "")


def test_interrupted_export_is_adopted_and_uncompressed_images_gzipped(tmp_path, inputs):
    selection, images, presegs = inputs
    plain = tmp_path / "native" / "S1" / "t1c.nii"
    nib.save(nib.load(str(images["S1"]["t1c"])), plain)
    images["S1"] = {"t1c": plain}
    _export(tmp_path, inputs)
    review = tmp_path / "review"
    exported = nib.load(str(review / "S1" / "image_t1c.nii.gz"))  # really gzipped
    np.testing.assert_array_equal(exported.get_fdata(), nib.load(str(plain)).get_fdata())

    # Simulate an export that renamed S2's folder into place and died before the manifest.
    manifest = read_manifest(review)
    manifest[manifest.study_id != "S2"].to_csv(review / "manifest.csv", index=False)
    again = _export(tmp_path, inputs).set_index("study_id")["result"]
    assert again["S2"] == "adopted"
    row = read_manifest(review).set_index("study_id").loc["S2"]
    assert row["other_images"] == "S2/image_flair.nii.gz"
    assert (
        row["presegmentation_sha256"]
        == manifest.set_index("study_id").loc["S2", "presegmentation_sha256"]
    )


def test_integer_images_get_no_view_copy(tmp_path):
    """An integer image (most clinical T1c from DICOM) is what the editor reads as it is."""
    source = tmp_path / "t1c.nii.gz"
    io.save_nifti(source, np.arange(48, dtype=np.int16).reshape(4, 4, 3), AFFINE, dtype=np.int16)
    assert not write_view_image(source, tmp_path / "view_t1c.nii.gz")
    assert not (tmp_path / "view_t1c.nii.gz").exists()
