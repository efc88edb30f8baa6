"""DICOM in: `metsflow cohort import-dicom` on small MR series written with pydicom."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from _dicom_series import SLICES, decode, write_series

from metsflow.cli import main
from metsflow.cohort.dicom import (
    REPORT_NAME,
    SHEET_NAME,
    Series,
    classify,
    dicom_source,
    import_dicom,
    load_rules,
)
from metsflow.cohort.sheet import read_sheet


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    gd = {"ContrastBolusAgent": "Gadobutrol"}
    flair_tags = {
        "ScanningSequence": ["SE", "IR"],
        "EchoTime": 120,
        "RepetitionTime": 9000,
        "InversionTime": 2500,
    }
    # P1, first visit: T1 pre and post told apart by the contrast agent tag, FLAIR by tags only
    write_series(root / "a/1", description="T1 MPRAGE", series_number=2, series_time="101000")
    write_series(root / "a/2", description="T1 MPRAGE", series_number=5, extra=gd)
    write_series(root / "a/3", description="AX T2 TSE", series_number=3)
    write_series(root / "a/4", description="AX 2D SEQ", series_number=4, extra=flair_tags)
    # P1, second visit: a T1c, two T2 (duplicate), a localizer, an unknown and a conflicting one
    day2 = {"study_date": "20200602"}
    write_series(root / "b/1", description="T1 POST GD", series_number=7, **day2)
    write_series(root / "b/2", description="T2 TSE", series_number=8, **day2)
    write_series(root / "b/3", description="T2 TSE repeat", series_number=9, **day2)
    write_series(root / "b/4", description="3-plane localizer", series_number=1, **day2)
    write_series(root / "b/5", description="MYSTERY SEQ", series_number=10, **day2)
    write_series(
        root / "b/6",
        description="T1 SE",
        series_number=11,
        extra={"ScanningSequence": "SE", "EchoTime": 100, "RepetitionTime": 4000},
        **day2,
    )
    # P2: no T1c at all, and a stray non-DICOM file
    write_series(root / "c/1", patient_id="P2", description="AX FLAIR", series_number=2)
    (root / "c" / "notes.txt").write_text("not dicom")
    return root


@pytest.fixture(scope="module")
def imported(dicom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("nifti")
    frame, report, problems = import_dicom(dicom_root, out)
    return out, frame, report.set_index("series_description", drop=False), problems


def test_import_writes_the_dated_layout_and_a_valid_sheet(imported):
    out, frame, _, _ = imported
    cohort = read_sheet(out / SHEET_NAME)
    assert [s.study_id for s in cohort] == ["P1_2020-01-02", "P1_2020-06-02"]
    first, second = cohort.studies
    assert first.timepoint == "2020-01-02"
    assert first.t1.name == "P1_2020-01-02_101000_PRE.nii.gz"
    assert first.t1c.name == "P1_2020-01-02_101500_POST.nii.gz"
    assert first.t2 is not None and first.flair is not None
    # the duplicate T2s of the second visit: neither used
    assert second.t1c is not None and second.t2 is None


def test_conversion_is_dcm2niix_of_the_right_series(imported, dicom_root):
    out, frame, _, _ = imported
    t1c = out / "P1" / "2020-01-02" / "P1_2020-01-02_101500_POST.nii.gz"
    data = np.asarray(nib.load(t1c).dataobj)
    assert data.shape == (10, 12, SLICES)  # columns x rows x slices
    k, r, c = decode(data)
    # every DICOM pixel is in the NIfTI once
    assert len(set(zip(k.ravel(), r.ravel(), c.ravel(), strict=True))) == data.size
    source = dicom_source(t1c)
    assert len(source["files"]) == SLICES
    # the post-contrast series (folder a/2), recorded for the DICOM SEG export
    assert sorted(source["files"]) == sorted(str(p) for p in (dicom_root / "a" / "2").iterdir())


def test_report_lists_every_series_that_was_not_used(imported):
    _, _, report, problems = imported
    status = report["status"].to_dict()
    assert status["AX 2D SEQ"] == "converted" and report.loc["AX 2D SEQ", "class"] == "flair"
    assert status["T2 TSE"] == status["T2 TSE repeat"] == "duplicate"
    assert "none used" in report.loc["T2 TSE", "detail"]
    assert status["3-plane localizer"] == "skipped"
    assert status["MYSTERY SEQ"] == "unclassified"
    assert status["T1 SE"] == "ambiguous" and "t1, t2" in report.loc["T1 SE", "detail"]
    bad = report[report.series_description == ""]
    assert bad.detail.str.contains("notes.txt: not a readable DICOM file").any()
    # P2 has no T1c: in the report as converted FLAIR, out of the sheet with a reason
    assert status["AX FLAIR"] == "converted"
    assert any("P2_2020-01-02 skipped: no T1c" in p for p in problems)


def test_report_file_and_cli(dicom_root, tmp_path, capsys):
    out = tmp_path / "nifti"
    assert main(["cohort", "import-dicom", str(dicom_root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 studies of 1 patients" in printed
    assert "2 duplicate" in printed and "1 unclassified" in printed
    report = pd.read_csv(out / REPORT_NAME, sep="\t", dtype=str, keep_default_na=False)
    assert len(report) == 12  # 11 series and one bad file


def test_site_rules_file_is_checked(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("classes:\n  t1c:\n    when:\n      - SeriesDescription: '(['\n  dwi: {}\n")
    with pytest.raises(ValueError) as error:
        load_rules(rules)
    assert "bad regular expression" in str(error.value) and "dwi" in str(error.value)


def test_classify_rules():
    rules = load_rules()

    def cls(**header):
        return classify(Series("1", {"Modality": "MR", **header}), rules)[1]

    assert cls(SeriesDescription="t1_mprage_sag_p2_iso_post") == "t1c"
    assert cls(SeriesDescription="Ax T1 +C") == "t1c"
    assert cls(SeriesDescription="AX T1 SE") == "t1"
    assert cls(SeriesDescription="Sag T2 FLAIR") == "flair"
    assert cls(SeriesDescription="AX T2* GRE") is None
    assert classify(Series("1", {"Modality": "CT"}), rules)[0] == "skipped"
