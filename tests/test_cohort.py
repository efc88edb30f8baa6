from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import snakemake.utils

from metsflow.cohort import sheet as cohort
from metsflow.cohort.sheet import SheetError, check_cohort, read_sheet, synthetic_sheet

SCHEMA = str(cohort.SCHEMA_PATH)
HEADER = ["patient_id", "study_id", "timepoint", "t1", "t1c", "t2", "flair", "label"]


def write_rows(path: Path, rows: list[list[str]], header=HEADER, sep="\t") -> Path:
    lines = [sep.join(header)] + [sep.join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def row(patient, study, timepoint, label=""):
    folder = f"{patient}/{study}"
    return [patient, study, timepoint, f"{folder}/t1.nii.gz", f"{folder}/t1c.nii.gz", "", "", label]


def valid_rows():
    return [
        row("P1", "P1_a", "2020-01-05"),
        row("P1", "P1_b", "2020-06-01T10:30", label="P1/P1_b/seg.nii.gz"),
        row("P2", "P2_a", "0"),
        row("P1", "P1_c", "2021-01-01"),  # patients may interleave
        row("P2", "P2_b", "3"),
    ]


def problems_of(path, **kwargs) -> list[str]:
    with pytest.raises(SheetError) as info:
        read_sheet(path, **kwargs)
    assert str(path) in str(info.value)
    return info.value.problems


def test_valid_sheet_reads(tmp_path):
    sheet = write_rows(tmp_path / "studies.tsv", valid_rows())
    c = read_sheet(sheet)
    assert [s.study_id for s in c.studies] == ["P1_a", "P1_b", "P2_a", "P1_c", "P2_b"]
    assert len(c) == 5
    assert list(c.patients) == ["P1", "P2"]
    assert [s.order for s in c.patients["P1"]] == [0, 1, 2]
    assert c.by_id["P1_c"].order == 2
    assert c.previous("P1_c").study_id == "P1_b"
    assert c.previous("P1_a") is None
    study = c.by_id["P1_b"]
    # Relative paths resolve against the sheet's folder.
    assert study.t1c == tmp_path / "P1" / "P1_b" / "t1c.nii.gz"
    assert study.label == tmp_path / "P1" / "P1_b" / "seg.nii.gz"
    assert study.t2 is None and study.flair is None
    assert study.label_convention == "internal"
    assert list(study.images) == ["t1", "t1c"]
    assert study.timepoint == "2020-06-01T10:30"
    with pytest.raises(KeyError, match="nope"):
        c.previous("nope")


def test_followups_are_in_sheet_order(tmp_path):
    c = read_sheet(write_rows(tmp_path / "s.tsv", valid_rows()))
    assert [s.study_id for s in c.followups()] == ["P1_b", "P1_c", "P2_b"]


def test_csv_by_extension_and_brats_convention(tmp_path):
    rows = [r + ["brats"] for r in valid_rows()[:2]]
    sheet = write_rows(
        tmp_path / "studies.csv", rows, header=HEADER + ["label_convention"], sep=","
    )
    c = read_sheet(sheet)
    assert c.by_id["P1_b"].label_convention == "brats"


def test_leading_zero_ids_stay_text(tmp_path):
    c = read_sheet(write_rows(tmp_path / "s.tsv", [row("00012", "00012", "1")]))
    assert c.studies[0].patient_id == "00012"


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        (row("P9", "bad/id", "1"), "row 7 (study bad/id): study_id 'bad/id' is not valid"),
        (row("P9", ".hidden", "1"), "row 7 (study .hidden): study_id '.hidden' is not valid"),
        (
            row("P9", "P9_a", "2020/01/01"),
            "row 7 (study P9_a): timepoint '2020/01/01' is not valid",
        ),
        (
            row("P9", "P9_a", "2020-02-30"),
            "row 7 (study P9_a): timepoint '2020-02-30' is not a real",
        ),
        (row("P9", "P9_a", "-1"), "row 7 (study P9_a): timepoint '-1' is not valid"),
        (
            row("P9", "P9_a", "1")[:4] + ["", "", "", ""],
            "row 7 (study P9_a): required column 't1c' is empty",
        ),
        (
            ["P9", "", "1", "a", "b", "", "", ""],
            "row 7 (no study id): required column 'study_id' is empty",
        ),
        (row("P1", "P1_a", "2022-01-01"), "row 7 (study P1_a): duplicate study id (also on row 2)"),
        (
            row("P9", "P2_a", "1"),
            "row 7 (study P2_a): study id is also used on row 4 for patient P2",
        ),
        (
            row("P1", "P1_x", "5"),
            "row 7 (study P1_x): timepoint '5' is an integer order but patient P1 uses dates (row 2",
        ),
        (row("P2", "P2_x", "3"), "row 7 (study P2_x): timepoint '3' duplicates row 6 (study P2_b)"),
        (
            row("P2", "P2_x", "1"),
            "row 7 (study P2_x): timepoint '1' comes after '3' (row 6, study P2_b)",
        ),
        (
            row("P1", "P1_x", "2020-06-01 10:30:00"),
            "row 7 (study P1_x): timepoint '2020-06-01 10:30:00' duplicates row 3",
        ),
    ],
)
def test_each_row_error_names_row_and_study(tmp_path, bad_row, expected):
    sheet = write_rows(tmp_path / "s.tsv", valid_rows() + [bad_row])
    problems = problems_of(sheet)
    assert any(p.startswith(expected) for p in problems), problems
    assert len(problems) == 1, problems


def test_bad_label_convention(tmp_path):
    rows = [r + ["internal"] for r in valid_rows()]
    rows[1][-1] = "BraTS"
    sheet = write_rows(tmp_path / "s.tsv", rows, header=HEADER + ["label_convention"])
    (problem,) = problems_of(sheet)
    assert problem.startswith("row 3 (study P1_b): label_convention 'BraTS' is not valid")


def test_header_errors(tmp_path):
    header = ["patient_id", "study_id", "t1", "t1c", "t1c", "scanner"]
    sheet = write_rows(tmp_path / "s.tsv", [["P1", "S1", "a", "b", "b", "x"]], header=header)
    problems = problems_of(sheet)
    text = "\n".join(problems)
    assert "header (row 1): column 't1c' appears more than once" in text
    assert "header (row 1): unknown column(s) 'scanner'" in text
    assert "header (row 1): missing required column(s) 'timepoint'" in text


def test_wrong_delimiter_gets_a_hint(tmp_path):
    sheet = write_rows(tmp_path / "s.tsv", [["P1", "S1", "1", "a", "b", "", "", ""]], sep=",")
    problems = problems_of(sheet)
    assert problems[0].startswith("header (row 1): unknown column(s)")
    assert "delimiter" in problems[0]


def test_all_errors_reported_at_once_in_row_order(tmp_path):
    rows = valid_rows()
    rows[0][1] = "bad id"  # row 2
    rows[2][4] = ""  # row 4: t1c empty
    rows.append(row("P2", "P2_b", "9"))  # row 7: duplicate id
    rows.append(row("P2", "P2_z", "1"))  # row 8: out of order
    problems = problems_of(write_rows(tmp_path / "s.tsv", rows))
    assert [p.split(":")[0] for p in problems] == [
        "row 2 (study bad id)",
        "row 4 (study P2_a)",
        "row 7 (study P2_b)",
        "row 8 (study P2_z)",
    ]


def test_blank_lines_keep_spreadsheet_row_numbers(tmp_path):
    sheet = tmp_path / "s.tsv"
    lines = [
        "\t".join(HEADER),
        "\t".join(row("P1", "P1_a", "1")),
        "",
        "\t".join(row("P1", "P1_b", "1")),
    ]
    sheet.write_text("\n".join(lines) + "\n")
    (problem,) = problems_of(sheet)
    assert problem.startswith("row 4 (study P1_b): timepoint '1' duplicates row 2")


def test_missing_and_empty_sheet(tmp_path):
    assert "does not exist" in problems_of(tmp_path / "none.tsv")[0]
    (tmp_path / "empty.tsv").write_text("")
    assert "empty" in problems_of(tmp_path / "empty.tsv")[0]


def test_path_containment(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        row("P1", "P1_a", "1"),
        ["P1", "P1_b", "2", "P1/t1.nii.gz", "../outside/t1c.nii.gz", "", "", ""],
        ["P1", "P1_c", "3", "/etc/passwd", "P1/t1c.nii.gz", "", "", ""],
    ]
    sheet = write_rows(data / "s.tsv", rows)
    # Default: no containment check (trusted sheet).
    assert len(read_sheet(sheet)) == 3
    problems = problems_of(sheet, data_roots=[])  # [] = the sheet's own folder
    assert len(problems) == 2
    assert problems[0].startswith(
        "row 3 (study P1_b): t1c path '../outside/t1c.nii.gz' resolves to"
    )
    assert "outside the data roots" in problems[0]
    assert problems[1].startswith("row 4 (study P1_c): t1 path '/etc/passwd'")
    # A root that is only a name prefix of the path does not contain it.
    assert len(problems_of(sheet, data_roots=[str(tmp_path / "dat")])) == 6
    (problem,) = problems_of(sheet, data_roots=[tmp_path, tmp_path / "elsewhere"])
    assert "'/etc/passwd'" in problem
    assert len(read_sheet(sheet, data_roots=[data], allow_outside_roots=True)) == 3


def nifti(path: Path, shape=(8, 8, 8), zooms=(1.0, 1.0, 1.0), offset=0.0, dtype=np.float32):
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = offset
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=dtype), affine), path)
    return path


def test_check_cohort_finds_missing_files_grid_mismatch_and_bad_headers(tmp_path):
    rows = [
        ["P1", "ok", "1", "ok/t1.nii.gz", "ok/t1c.nii.gz", "", "", "ok/seg.nii.gz"],
        ["P1", "shifted", "2", "sh/t1.nii.gz", "sh/t1c.nii.gz", "", "", "sh/seg.nii.gz"],
        ["P1", "gone", "3", "gone/t1.nii.gz", "gone/t1c.nii.gz", "gone/t2.nii.gz", "", ""],
        [
            "P2",
            "odd",
            "1",
            "odd/t1.nii.gz",
            "odd/t1c.nii.gz",
            "",
            "odd/flair.nii.gz",
            "odd/seg.nii.gz",
        ],
        ["P3", "copy", "1", "copy/t1c.nii.gz", "copy/t1c.nii.gz", "", "", ""],
    ]
    for study in ("ok", "sh", "odd", "copy"):
        nifti(tmp_path / study / "t1.nii.gz")
        nifti(tmp_path / study / "t1c.nii.gz")
    nifti(tmp_path / "ok" / "seg.nii.gz", offset=0.0005, dtype=np.uint8)  # within 1e-3 mm
    nifti(tmp_path / "sh" / "seg.nii.gz", offset=0.5, dtype=np.uint8)
    nifti(tmp_path / "gone" / "t1c.nii.gz")
    nifti(tmp_path / "odd" / "flair.nii.gz", shape=(8, 8, 8, 2))
    nifti(tmp_path / "odd" / "seg.nii.gz", shape=(8, 8, 9), dtype=np.uint8)
    (tmp_path / "odd" / "t1.nii.gz").write_bytes(b"not a nifti at all")
    c = read_sheet(write_rows(tmp_path / "s.tsv", rows))

    shallow = check_cohort(c)
    assert list(shallow.columns) == ["study_id", "file", "problem"]
    got = set(zip(shallow.study_id, shallow.problem, strict=True))
    assert ("gone", "t1 file is missing") in got
    assert ("gone", "t2 file is missing") in got
    assert sum(p.startswith("same file listed for copy t1, copy t1c") for p in shallow.problem) == 2
    assert not (shallow.study_id == "ok").any()
    assert not (shallow.study_id == "shifted").any()  # grids are only compared in deep mode
    missing = shallow[shallow.problem == "t1 file is missing"]
    assert missing.file.tolist() == [str(tmp_path / "gone" / "t1.nii.gz")]

    deep = check_cohort(c, deep=True)
    by_study = deep.groupby("study_id").problem.apply(list).to_dict()
    assert "ok" not in by_study
    (shift,) = by_study["shifted"]
    assert shift.startswith("label grid differs from the T1c grid by up to 0.5 mm")
    odd = "\n".join(by_study["odd"])
    assert "t1 is not a readable NIfTI file" in odd
    assert "flair must be 3D" in odd
    assert "label shape (8, 8, 9) differs from the T1c shape (8, 8, 8)" in odd


def test_check_cohort_flags_implausible_spacing(tmp_path):
    nifti(tmp_path / "a" / "t1.nii.gz")
    nifti(tmp_path / "a" / "t1c.nii.gz", zooms=(1.0, 1.0, 25.0))
    c = cohort.Cohort(
        [cohort.Study("P", "a", "1", 0, tmp_path / "a/t1.nii.gz", tmp_path / "a/t1c.nii.gz")]
    )
    (problem,) = check_cohort(c, deep=True).problem
    assert problem.startswith("t1c has implausible voxel spacing")


def test_subset_and_to_frame_round_trip(tmp_path):
    c = read_sheet(write_rows(tmp_path / "s.tsv", valid_rows()))
    sub = c.subset(["P1_a", "P1_c", "P2_b"])
    assert [s.study_id for s in sub.studies] == ["P1_a", "P1_c", "P2_b"]
    assert sub.previous("P1_c").study_id == "P1_a"  # previous *within the subset*
    assert sub.by_id["P1_c"].order == 2  # order keeps the full-cohort position
    with pytest.raises(KeyError, match="typo"):
        c.subset(["typo"])
    frame = c.to_frame()
    assert list(frame.columns) == list(cohort.SHEET_COLUMNS)
    assert "order" in c.to_frame(include_order=True)
    out = tmp_path / "copy" / "again.tsv"
    out.parent.mkdir()
    frame.to_csv(out, sep="\t", index=False)
    again = read_sheet(out)
    assert [s for s in again.studies] == c.studies


def test_synthetic_cohort_scale_sheet_reads_and_validates(tmp_path):
    sheet = synthetic_sheet(11892, tmp_path / "studies.tsv", seed=3)
    c = read_sheet(sheet, data_roots=["/nonexistent/cohort"])
    assert len(c) == 11892
    sizes = [len(s) for s in c.patients.values()]
    assert min(sizes) >= 1 and max(sizes) <= 5
    labelled = sum(s.label is not None for s in c.studies) / len(c)
    assert 0.05 < labelled < 0.15
    assert any(s.t2 is None for s in c.studies) and any(s.flair is None for s in c.studies)
    assert all(str(s.t1c).startswith("/nonexistent/cohort/") for s in c.studies)
    assert (
        synthetic_sheet(40, tmp_path / "b.tsv", seed=3).read_text()
        == synthetic_sheet(40, tmp_path / "c.tsv", seed=3).read_text()
    )
    # The same schema validates the sheet through Snakemake (each row as a record).
    for frame in (
        pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False).head(500),
        pd.read_csv(sheet, sep="\t", dtype=str).head(500),
    ):
        snakemake.utils.validate(frame, SCHEMA)


def test_snakemake_validate_rejects_what_read_sheet_rejects(tmp_path):
    bad = pd.DataFrame([dict(zip(HEADER, row("P1", "a/b", "1"), strict=True))])
    with pytest.raises(Exception, match="row 0"):
        snakemake.utils.validate(bad, SCHEMA)
    extra = pd.DataFrame([dict(zip(HEADER, row("P1", "ok", "1"), strict=True)) | {"x": "1"}])
    with pytest.raises(Exception, match="row 0"):
        snakemake.utils.validate(extra, SCHEMA)
    good = pd.DataFrame([dict(zip(HEADER, row("P1", "ok", "2020-01-01"), strict=True))])
    snakemake.utils.validate(good, SCHEMA)
    assert good.loc[0, "label_convention"] == "internal"  # default filled in


def test_columnwise_checks_agree_with_jsonschema_per_row(tmp_path):
    """read_sheet applies the schema column by column for speed; it must reach the same
    verdict as jsonschema on each whole row (empty cells dropped, as Snakemake does)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(SCHEMA).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    candidates = [
        row("P1", "P1_a", "1"),
        row("P2", "x y", "1"),
        row("P3", "P3_a", "1999-1-1"),
        row("P4", "P4_a", "2001-01-01T10"),
        row("P5", "P5_a", "2001-01-01T10:00:00"),
        row("P6", "P6_a", "007"),
        row("-P7", "P7_a", "1"),
        ["P8", "P8_a", "1", "", "", "", "", ""],
        ["P9", "P9_a", "1", "", "t1c.nii.gz", "", "", ""],
        row("P10", "a" * 129, "1"),
    ]
    rows_ok = []
    for candidate in candidates:
        record = {k: v for k, v in zip(HEADER, candidate, strict=True) if v}
        rows_ok.append(validator.is_valid(record))
    assert rows_ok == [True, False, False, False, True, True, False, False, True, False]
    problems = problems_of(write_rows(tmp_path / "s.tsv", candidates))
    flagged = {int(p.split()[1]) for p in problems}
    assert flagged == {i + 2 for i, ok in enumerate(rows_ok) if not ok}
