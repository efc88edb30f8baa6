import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from metsflow.cohort.scan import detect_layout, scan, scan_brats, scan_longitudinal, write_sheet
from metsflow.cohort.sheet import read_sheet


def tiny_nifti(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.int16), np.eye(4)), path)


@pytest.fixture
def brats_root(tmp_path):
    root = tmp_path / "brats"
    studies = {
        "BraTS-MET-00002-000": ["t1n", "t1c", "t2w", "t2f", "seg"],
        "BraTS-MET-00001-001": ["t1n", "t1c", "t2w", "t2f"],  # a follow-up without a label
        "BraTS-MET-00001-000": ["t1n", "t1c", "t2w", "t2f", "seg"],
        "BraTS-MET-00003-000": ["t1n", "t2w"],  # no T1c: skipped
    }
    for study, suffixes in studies.items():
        for suffix in suffixes:
            tiny_nifti(root / study / f"{study}-{suffix}.nii.gz")
    (root / "BraTS-MET-00002-000" / "notes.txt").write_text("x")
    (root / "README.md").write_text("x")
    (root / ".DS_Store").write_text("x")  # hidden: skipped silently
    return root


@pytest.fixture
def longitudinal_root(tmp_path):
    root = tmp_path / "yale"
    files = [
        "YG_A/2019-03-01/YG_A_2019-03-01_101500_PRE.nii.gz",
        "YG_A/2019-03-01/YG_A_2019-03-01_102000_POST.nii.gz",
        "YG_A/2019-03-01/YG_A_2019-03-01_103000_POST.nii.gz",  # later repeat: this one wins
        "YG_A/2019-03-01/YG_A_2019-03-01_101000_FLAIR.nii.gz",
        "YG_A/2018-11-20/YG_A_2018-11-20_0900_POST.nii.gz",
        "YG_A/2018-11-20/YG_A_2018-11-20_0905_T2.nii.gz",
        "YG_A/2018-11-20/YG_A_2018-11-20_0905_DWI.nii.gz",  # unknown sequence
        "YG_B/2020-01-02/YG_B_2020-01-02_080000_PRE.nii.gz",  # no POST: skipped
        "YG_B/2020-05-06/YG_B_2020-05-06_080000_POST.nii.gz",
        "YG_B/2020-05-06/YG_A_2020-05-06_080000_PRE.nii.gz",  # another patient's name
    ]
    for name in files:
        tiny_nifti(root / name)
    (root / "YG_B" / "scratch").mkdir()
    return root


def test_scan_brats(brats_root, caplog):
    with caplog.at_level(logging.WARNING, logger="metsflow.cohort.scan"):
        frame = scan_brats(brats_root)
    assert frame.study_id.tolist() == [
        "BraTS-MET-00001-000",
        "BraTS-MET-00001-001",
        "BraTS-MET-00002-000",
    ]
    assert frame.patient_id.tolist() == ["BraTS-MET-00001"] * 2 + ["BraTS-MET-00002"]
    assert frame.timepoint.tolist() == ["0", "1", "0"]
    assert set(frame.label_convention) == {"brats"}
    first = frame.iloc[0]
    assert first.t1.endswith("BraTS-MET-00001-000-t1n.nii.gz")
    assert first.t2.endswith("-t2w.nii.gz") and first.flair.endswith("-t2f.nii.gz")
    assert first.label.endswith("-seg.nii.gz")
    assert frame.iloc[1].label == ""
    assert Path(first.t1c).is_absolute()
    logged = caplog.text
    assert "notes.txt: unexpected entry" in logged
    assert "README.md: does not fit the BraTS-METS layout" in logged
    assert "BraTS-MET-00003-000 skipped: no T1c" in logged
    assert ".DS_Store" not in logged


def test_scan_longitudinal(longitudinal_root):
    frame, problems = scan(longitudinal_root, layout="longitudinal")
    assert frame.study_id.tolist() == ["YG_A_2018-11-20", "YG_A_2019-03-01", "YG_B_2020-05-06"]
    assert frame.timepoint.tolist() == ["2018-11-20", "2019-03-01", "2020-05-06"]
    later = frame.set_index("study_id").loc["YG_A_2019-03-01"]
    assert later.t1c.endswith("_103000_POST.nii.gz")
    assert later.t1.endswith("_PRE.nii.gz") and later.flair.endswith("_FLAIR.nii.gz")
    assert later.t2 == "" and later.label == ""
    text = "\n".join(problems)
    assert "2 t1c acquisitions on 2019-03-01: using the latest" in text
    assert "YG_A_2019-03-01_102000_POST.nii.gz" in text
    assert "YG_A_2018-11-20_0905_DWI.nii.gz: unexpected entry" in text
    assert "YG_A_2020-05-06_080000_PRE.nii.gz: unexpected entry" in text
    assert "YG_B/scratch: unexpected entry" in text
    assert "YG_B_2020-01-02 skipped: no T1c" in text
    assert scan_longitudinal(longitudinal_root).equals(frame)


def test_auto_detection(brats_root, longitudinal_root, tmp_path):
    assert detect_layout(brats_root) == "brats"
    assert detect_layout(longitudinal_root) == "longitudinal"
    frame, problems = scan(brats_root)
    assert len(frame) == 3 and problems
    unknown = tmp_path / "other"
    (unknown / "subjects").mkdir(parents=True)
    (unknown / "list.csv").write_text("x")
    with pytest.raises(ValueError, match=r"matches no known layout.*found: list.csv, subjects/"):
        scan(unknown)
    with pytest.raises(ValueError, match="does not exist"):
        scan(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown layout"):
        scan(brats_root, layout="nnunet")


@pytest.mark.parametrize("inside", [True, False])
def test_written_sheet_reads_back(brats_root, longitudinal_root, tmp_path, inside):
    for root in (brats_root, longitudinal_root):
        frame, _ = scan(root)
        sheet = (root if inside else tmp_path / "sheets" / root.name) / "studies.tsv"
        write_sheet(frame, sheet)
        written = sheet.read_text()
        # Inside the data folder the sheet stores relative paths, so it moves with the data.
        assert (str(root) in written) is not inside
        cohort = read_sheet(sheet, data_roots=[root])
        assert [s.study_id for s in cohort.studies] == frame.study_id.tolist()
        assert [str(s.t1c) for s in cohort.studies] == frame.t1c.tolist()
        assert {s.label_convention for s in cohort.studies} == set(frame.label_convention)


def test_write_sheet_refuses_unknown_columns(brats_root, tmp_path):
    frame = scan_brats(brats_root)
    frame["site"] = "x"
    with pytest.raises(ValueError, match="site"):
        write_sheet(frame, tmp_path / "s.tsv")
