"""BIDS in: `metsflow cohort scan --layout bids` on a BIDS dataset written here."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from metsflow.cli import main
from metsflow.cohort.bids import bids_entities, entity_table, scan_bids
from metsflow.cohort.scan import detect_layout
from metsflow.cohort.sheet import read_sheet


def tiny_nifti(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full((6, 6, 6), value, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def write_bids_dataset(root: Path) -> Path:
    """Two subjects; sub-01 has sessions with acq_time (given out of label order), two runs of
    its pre-contrast T1w and a session without a contrast-enhanced T1; sub-02 has untimed
    sessions ses-2 and ses-10 (natural order)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "test", "BIDSVersion": "1.9.0"})
    )
    anat = "sub-01/ses-{s}/anat/sub-01_ses-{s}_{e}.nii.gz"
    for s in ("pre", "post"):
        tiny_nifti(root / anat.format(s=s, e="ce-gadolinium_T1w"))
        tiny_nifti(root / anat.format(s=s, e="T2w"))
        tiny_nifti(root / anat.format(s=s, e="FLAIR"))
    tiny_nifti(root / anat.format(s="pre", e="run-1_T1w"))
    tiny_nifti(root / anat.format(s="pre", e="run-2_T1w"))
    tiny_nifti(root / anat.format(s="noce", e="T1w"))
    tiny_nifti(root / anat.format(s="noce", e="FLAIR"))
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\n"
        "ses-post\t2021-06-01T10:00:00\n"
        "ses-pre\t2021-01-15T09:30:00\n"
        "ses-noce\t2021-09-01T08:00:00\n"
    )
    for s in ("10", "2"):
        tiny_nifti(root / f"sub-02/ses-{s}/anat/sub-02_ses-{s}_ce-Gd_T1w.nii.gz")
    return root


def write_label_derivatives(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "manual labels",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "manual"}],
            }
        )
    )
    # BraTS convention, told by the lookup table: ET is index 3
    (root / "dseg.tsv").write_text(
        "index\tname\tabbreviation\n1\tnon-enhancing tumor core\tNETC\n"
        "2\tsurrounding FLAIR hyperintensity\tSNFH\n3\tenhancing tumor\tET\n"
    )
    tiny_nifti(root / "sub-01/ses-pre/anat/sub-01_ses-pre_space-orig_dseg.nii.gz", 3)
    tiny_nifti(root / "sub-02/ses-2/anat/sub-02_ses-2_dseg.nii.gz")
    tiny_nifti(root / "sub-02/ses-2/anat/sub-02_ses-2_desc-other_dseg.nii.gz")
    return root


@pytest.fixture
def bids_root(tmp_path):
    return write_bids_dataset(tmp_path / "bids")


def test_scan_bids_maps_subjects_sessions_contrasts(bids_root):
    frame, problems = scan_bids(bids_root)
    assert frame.study_id.tolist() == [
        "sub-01_ses-pre",
        "sub-01_ses-post",
        "sub-02_ses-2",
        "sub-02_ses-10",
    ]
    assert frame.patient_id.tolist() == ["sub-01", "sub-01", "sub-02", "sub-02"]
    # acq_time from sessions.tsv orders sub-01 (post before pre alphabetically, but later)
    assert frame.timepoint.tolist() == ["2021-01-15T09:30:00", "2021-06-01T10:00:00", "0", "1"]
    pre = frame.iloc[0]
    assert pre.t1c.endswith("sub-01_ses-pre_ce-gadolinium_T1w.nii.gz")
    assert pre.t1.endswith("sub-01_ses-pre_run-2_T1w.nii.gz")  # highest run
    assert pre.t2.endswith("_T2w.nii.gz") and pre.flair.endswith("_FLAIR.nii.gz")
    assert frame.iloc[2].t1 == ""
    text = "\n".join(problems)
    assert "sub-01_ses-noce skipped: no contrast-enhanced T1w" in text
    assert "2 t1 images: using sub-01_ses-pre_run-2_T1w.nii.gz (highest run)" in text


def test_scan_bids_prefers_acq_time_from_scans_tsv(bids_root):
    session = bids_root / "sub-01" / "ses-pre"
    (session / "sub-01_ses-pre_scans.tsv").write_text(
        "filename\tacq_time\n"
        "anat/sub-01_ses-pre_run-1_T1w.nii.gz\t2021-01-15T09:50:00\n"
        "anat/sub-01_ses-pre_run-2_T1w.nii.gz\t2021-01-15T09:40:00\n"
    )
    frame, problems = scan_bids(bids_root)
    assert frame.iloc[0].t1.endswith("run-1_T1w.nii.gz")
    assert any("(latest acq_time)" in p for p in problems)


def test_scan_bids_labels_from_derivatives(bids_root, tmp_path):
    deriv = write_label_derivatives(tmp_path / "labels")
    frame, problems = scan_bids(bids_root, labels=deriv)
    by_id = frame.set_index("study_id")
    assert by_id.loc["sub-01_ses-pre", "label"].endswith("sub-01_ses-pre_space-orig_dseg.nii.gz")
    assert by_id.loc["sub-01_ses-pre", "label_convention"] == "brats"
    # two candidate label images: reported, none used (never guessed)
    assert by_id.loc["sub-02_ses-2", "label"] == ""
    assert any("sub-02_ses-2: 2 label images" in p for p in problems)


def test_cli_scan_bids_writes_a_valid_sheet(bids_root, tmp_path, capsys):
    deriv = write_label_derivatives(tmp_path / "labels")
    sheet = bids_root / "studies.tsv"
    assert detect_layout(bids_root) == "bids"
    code = main(["cohort", "scan", str(bids_root), "--labels", str(deriv), "--out", str(sheet)])
    assert code == 0
    out = capsys.readouterr()
    assert "4 studies of 2 patients" in out.out
    assert "no contrast-enhanced T1w" in out.err
    cohort = read_sheet(sheet, allow_outside_roots=True)
    assert [s.study_id for s in cohort.patients["sub-01"]] == ["sub-01_ses-pre", "sub-01_ses-post"]
    assert cohort.by_id["sub-01_ses-pre"].label_convention == "brats"


def test_not_a_bids_dataset(tmp_path):
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(ValueError, match="no dataset_description.json"):
        scan_bids(tmp_path)


def test_bids_entities_round_trip_and_clashes():
    assert bids_entities("sub-01", "sub-01_ses-pre") == ("01", "pre")
    assert bids_entities("P-001", "P-001_T2") == ("P001", "T2")
    assert bids_entities("YG_A", "YG_A_2019-03-01") == ("YGA", "20190301")
    assert bids_entities("BraTS-MET-00001", "BraTS-MET-00001-000") == ("BraTSMET00001", "000")
    with pytest.raises(ValueError, match="same BIDS subject/session"):
        entity_table([("P-1", "P-1_a"), ("P1", "P1_a")])


def test_subject_without_sessions_is_one_study(tmp_path):
    root = tmp_path / "b"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    tiny_nifti(root / "sub-03/anat/sub-03_ce-gadolinium_T1w.nii.gz")
    tiny_nifti(root / "sub-03/anat/sub-03_T2w.nii.gz")
    frame, problems = scan_bids(root)
    assert frame[["patient_id", "study_id", "timepoint"]].values.tolist() == [
        ["sub-03", "sub-03", "0"]
    ]
    assert frame.t2[0].endswith("sub-03_T2w.nii.gz") and problems == []
