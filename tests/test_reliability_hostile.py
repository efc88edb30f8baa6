"""Issue 25: nothing a user types, names or links can delete a confirmed label, and every
setting is checked before work starts.

One test (or a few) per defect of the issue (1, 3, 4, 5, 6's oracle check, 7, 9, 10, 11, 13),
each failing on the code before the fix, then Hypothesis properties of the id check, the sheet
reader and the label-value check.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metsflow import cli
from metsflow.active_learning.labelstore import LabelImportError, LabelStore
from metsflow.cohort.sheet import SheetError, check_cohort, read_sheet
from metsflow.core import ids, io, labels
from metsflow.core.layout import RESERVED_NAMES, Layout
from metsflow.jobs import manifest
from metsflow.jobs.manifest import read_manifests, run_study, write_manifest

SHAPE = (8, 8, 6)
SHEET_HEADER = "patient_id\tstudy_id\ttimepoint\tt1c\n"


def _nifti(path: Path, data=None, affine=None, dtype=np.float32) -> Path:
    if data is None:
        data = np.random.default_rng(0).random(SHAPE)
    io.save_nifti(path, data, np.eye(4) if affine is None else affine, dtype=dtype)
    return path


@pytest.fixture
def store_with_confirmed(tmp_path):
    """A label store whose study S1 has a confirmed label and its history."""
    t1c = _nifti(tmp_path / "data" / "t1c.nii.gz")
    label = _nifti(tmp_path / "data" / "label.nii.gz", np.ones(SHAPE), dtype=np.uint8)
    store = LabelStore(tmp_path / "labels", create=True)
    store.import_label("S1", label, "confirmed", "dr A", t1c)
    return store, t1c


# --------------------------------------------------------------------------- defect 1


def test_stale_output_removal_never_deletes_a_confirmed_label_through_a_link(
    tmp_path, store_with_confirmed
):
    """results/preprocessed is a link into the label store: the stale folder of S1 there is the
    store's S1 (confirmed versions, history). The study fails naming the store; nothing is lost."""
    store, _ = store_with_confirmed
    results = tmp_path / "results"
    results.mkdir()
    (results / "preprocessed").symlink_to(store.root)
    out_dir = Layout(results).preprocessed_dir("S1")
    before = sorted(p.name for p in store.study_dir("S1").iterdir())

    def work():
        raise io.StudyError("S1", "never reached")

    row = run_study("S1", "P1", out_dir, "stamp", work)
    assert row["status"] == "failed" and "label store" in row["problem"]
    assert sorted(p.name for p in store.study_dir("S1").iterdir()) == before
    assert store.confirmed("S1") is not None and len(store.history("S1")) == 1


def test_the_removal_guard_refuses_the_store_its_folders_and_a_folder_holding_it(
    tmp_path, store_with_confirmed
):
    store, _ = store_with_confirmed
    link = tmp_path / "innocent"
    link.symlink_to(store.study_dir("S1"))
    for target in (store.root, store.study_dir("S1"), store.confirmed("S1"), link, tmp_path):
        with pytest.raises(io.LabelStoreWriteError):
            io.remove_path(target)
        with pytest.raises(io.LabelStoreWriteError):  # ignore_errors never silences the guard
            io.remove_path(target, ignore_errors=True)
    assert store.confirmed("S1").is_file()
    scratch = tmp_path / "scratch"
    (scratch / "a").mkdir(parents=True)
    io.remove_path(scratch)
    assert not scratch.exists()


# --------------------------------------------------------------------------- defect 3


@pytest.mark.parametrize("name", ["shards", "manifest.tsv", "SHARDS", "LABELSTORE.json"])
def test_a_study_or_patient_named_like_a_layout_folder_is_refused_by_the_sheet(tmp_path, name):
    (tmp_path / "t1c.nii.gz").write_bytes(b"")
    sheet = tmp_path / "studies.tsv"
    sheet.write_text(SHEET_HEADER + f"P1\t{name}\t0\tt1c.nii.gz\n{name}\tS2\t0\tt1c.nii.gz\n")
    with pytest.raises(SheetError) as caught:
        read_sheet(sheet)
    text = str(caught.value)
    assert f"row 2 (study {name}): study id {name!r} is a name the results layout uses" in text
    assert f"row 3 (study S2): patient id {name!r} is a name the results layout uses" in text


def test_the_label_store_uses_the_one_id_check(tmp_path):
    # (The review server no longer checks ids of its own: it serves only the catalog's studies,
    # and its user names follow review_server.policy.ACCOUNT_RULES.)
    store = LabelStore(tmp_path / "labels", create=True)
    with pytest.raises(LabelImportError, match="name the results layout uses"):
        store.import_label("shards", tmp_path / "x.nii.gz", "refined", "dr A", None)


# --------------------------------------------------------------------------- defect 4


def _dicom_import(tmp_path, series: list[dict]):
    from _dicom_series import write_series

    from metsflow.cohort.dicom import import_dicom

    root = tmp_path / "dicom"
    for k, spec in enumerate(series):
        write_series(root / f"s{k}", **spec)
    return import_dicom(root, tmp_path / "nifti")


def test_dicom_patients_sharing_a_series_uid_are_not_merged(tmp_path):
    shared = {"SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.1"}
    frame, report, _ = _dicom_import(
        tmp_path,
        [
            {"patient_id": "P1", "extra": shared},
            {"patient_id": "P2", "extra": shared},
            {"patient_id": "P3", "series_number": 4},
        ],
    )
    rows = report.set_index("patient_id")
    assert set(rows.index) == {"P1", "P2", "P3"}
    for patient, other in (("P1", "P2"), ("P2", "P1")):
        assert rows.loc[patient, "status"] == "failed"
        assert f"also used by PatientID '{other}'" in rows.loc[patient, "detail"]
    assert rows.loc["P3", "status"] == "converted"
    assert list(frame.patient_id) == ["P3"]


def test_dicom_patient_ids_that_are_file_names_or_collide_are_reported_per_patient(tmp_path):
    frame, report, _ = _dicom_import(
        tmp_path,
        [
            {"patient_id": "studies.tsv"},
            {"patient_id": "A B"},
            {"patient_id": "A_B"},
            {"patient_id": "P 7"},
        ],
    )
    rows = report.set_index("patient_id")
    assert rows.loc["studies.tsv", "status"] == "failed"
    assert "studies.tsv" in rows.loc["studies.tsv", "detail"]
    for patient in ("A B", "A_B"):
        assert rows.loc[patient, "status"] == "failed"
        assert "would share the folder 'A_B'" in rows.loc[patient, "detail"]
    assert rows.loc["P 7", "status"] == "converted"  # sanitised: folder P_7
    assert list(frame.patient_id) == ["P_7"]
    assert (tmp_path / "nifti" / "studies.tsv").is_file()


# --------------------------------------------------------------------------- defect 5


def test_an_unreadable_study_folder_fails_that_study_not_the_shard(tmp_path, monkeypatch):
    """Mode 000 on B's folder makes the "already done?" check raise PermissionError (simulated:
    the tests may run as root, whom mode 000 does not stop)."""
    real = manifest.is_done

    def is_done(out_dir, stamp):
        if Path(out_dir).name == "B":
            raise PermissionError(13, "Permission denied", str(Path(out_dir) / ".done.json"))
        return real(out_dir, stamp)

    monkeypatch.setattr(manifest, "is_done", is_done)
    rows = [
        run_study(s, "P", tmp_path / s, f"stamp-{s}", lambda s=s: (tmp_path / s).mkdir())
        for s in "ABC"
    ]
    write_manifest(tmp_path / "shard.tsv", rows, extra_columns=["file"])
    table = read_manifests([tmp_path / "shard.tsv"]).set_index("study_id")
    assert table.status.to_dict() == {"A": "ok", "B": "failed", "C": "ok"}
    assert "output folder cannot be read: Permission denied" in table.loc["B", "problem"]


def test_a_stamp_that_cannot_be_computed_fails_that_study_only(tmp_path):
    def stamp():
        return manifest.fingerprint([tmp_path / "missing" / ".done.json"], {})

    row = run_study("B", "P", tmp_path / "B", stamp, lambda: None)
    assert row["status"] == "failed" and "an input cannot be read" in row["problem"]


# --------------------------------------------------------------------------- defect 6 (oracle)


def test_oracle_labels_are_checked_by_header_at_parse_time_and_by_value_in_their_own_job(
    tmp_path,
):
    from metsflow.cohort.preflight import oracle_value_problems, read_oracle
    from metsflow.jobs.active_learning import run_check_oracle

    four = np.zeros(SHAPE)
    four[2, 2, 2] = 4
    _nifti(tmp_path / "four.nii.gz", four, dtype=np.uint8)
    _nifti(tmp_path / "good.nii.gz", np.ones(SHAPE), dtype=np.uint8)
    (tmp_path / "text.nii.gz").write_text("not an image\n")
    sheet = tmp_path / "oracle.tsv"
    sheet.write_text(
        "study_id\tlabel\nS1\tfour.nii.gz\nS2\ttext.nii.gz\nS3\tgood.nii.gz\nS4\tgood.nii.gz\n"
    )
    oracle, problems = read_oracle(sheet)
    assert set(oracle) == {"S1", "S3", "S4"}
    assert len(problems) == 1 and "S2" in problems[0] and "not a NIfTI file" in problems[0]
    found = oracle_value_problems(oracle)
    assert len(found) == 1 and "S1" in found[0] and "[4]" in found[0]
    sheet.write_text("study_id\tlabel\nS1\tfour.nii.gz\nS3\tgood.nii.gz\n")
    with pytest.raises(ValueError, match="four.nii.gz"):
        run_check_oracle(str(sheet), str(tmp_path / "checked.tsv"))
    assert not (tmp_path / "checked.tsv").exists()


def test_check_oracle_is_a_job_of_its_own_that_round_1_waits_for():
    rules = (Path(__file__).parents[1] / "rules" / "active_learning.smk").read_text()
    rule = rules.split("rule check_oracle:", 1)[1].split("\nrule ", 1)[0]
    assert "priority: 100" in rule and "input:" not in rule
    collect = rules.split("rule collect_annotations:", 1)[1].split("\nrule ", 1)[0]
    assert "LAYOUT.oracle_check" in collect


# --------------------------------------------------------------------------- defect 7


def _sheared_affine(degrees: float, spacing: float = 4.0) -> np.ndarray:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    angle = math.radians(degrees)
    affine[:3, 1] = spacing * np.array([math.sin(angle), math.cos(angle), 0.0])
    return affine


@pytest.mark.parametrize("degrees", [0.3, 26.6])
def test_deep_check_and_pipeline_refuse_the_same_shear_with_the_same_words(tmp_path, degrees):
    t1c = _nifti(tmp_path / "t1c.nii.gz", affine=_sheared_affine(degrees))
    sheet = tmp_path / "studies.tsv"
    sheet.write_text(SHEET_HEADER + "P1\tS1\t0\tt1c.nii.gz\n")
    deep = check_cohort(read_sheet(sheet), deep=True)
    assert len(deep) == 1 and "sheared" in deep.problem[0]
    with pytest.raises(io.StudyError) as caught:
        io.load_nifti(t1c, "S1", "t1c")
    assert caught.value.problem == deep.problem[0]
    assert "spacing 4.0" not in caught.value.problem


def test_the_shear_limit_is_where_ants_stops_converting():
    from metsflow.imaging.brainmask import nifti_to_ants

    for degrees, converts in ((0.25, True), (0.26, False)):
        img = nib.Nifti1Image(np.zeros(SHAPE, np.float32), _sheared_affine(degrees))
        assert (io.header_problems(img, "t1c") == []) is converts
        try:
            nifti_to_ants(img)
            converted = True
        except ValueError:
            converted = False
        assert converted is converts


def test_an_oblique_grid_is_not_a_shear():
    rotation = nib.eulerangles.euler2mat(0.4, -0.3, 0.2)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 3.0])
    assert io.shear_deg(affine) < 1e-9


# --------------------------------------------------------------------------- defect 9


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--pred", "p", "--ref", "r", "--iou-threshold", "5"],
        ["evaluate", "--pred", "p", "--ref", "r", "--iou-threshold", "-1"],
        ["evaluate", "--pred", "p", "--ref", "r", "--iou-threshold", "nan"],
        ["evaluate", "--pred", "p", "--ref", "r", "--ndsc-rate", "0"],
        ["cohort", "check", "s.tsv", "--max-image-mb", "nan"],
        ["cohort", "check", "s.tsv", "--max-image-mb", "inf"],
        ["cohort", "check", "s.tsv", "--max-image-mb", "0"],
        ["cohort", "synthetic", "-3", "--out", "x.tsv"],
        ["cost", "--gpus", "0"],
        ["cost", "--infer-fraction", "1.5"],
        ["cost", "--validation-fraction", "-0.1"],
        ["cost", "--candidates", "0"],
        ["demo-cohort", "--workers", "0"],
        ["al", "import", "--round", "-1", "--stage", "confirmed", "--reviewer", "A"],
    ],
)
def test_out_of_range_numbers_are_refused_while_parsing(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "is outside" in err or "not a finite number" in err


# --------------------------------------------------------------------------- defect 10


def _header_only_bomb(path: Path, shape=(768, 768, 768), dtype=np.int16) -> Path:
    """A .nii.gz whose header claims ``shape`` voxels (768^3 int16 = 864 MiB, the issue's
    bomb) and whose data stops after a few bytes: a loader that trusts the header reads on."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + struct.pack("<i", 0) + b"\0" * 64)
    return path


def test_the_default_memory_guard_refuses_the_known_bomb_before_reading_it(tmp_path):
    bomb = _header_only_bomb(tmp_path / "bomb.nii.gz")
    assert io.MAX_IMAGE_MB < 864 <= 1024
    with pytest.raises(io.StudyError, match="864 MiB, over the 512 MiB limit"):
        io.load_nifti(bomb, "S1", "t1c")


def test_al_override_refuses_a_label_on_its_grid_before_decompressing_it(
    tmp_path, store_with_confirmed
):
    store, t1c = store_with_confirmed
    bomb = _header_only_bomb(tmp_path / "label.nii.gz", (700, 700, 700), np.uint8)  # 327 MiB
    with pytest.raises(LabelImportError, match="grid mismatch"):
        store.import_label("S1", bomb, "confirmed", "dr B", t1c, override=True, reason="recheck")


# --------------------------------------------------------------------------- defect 11


def _bids(root: Path, anat: list[str]) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.9.0"})
    )
    for name in anat:
        _nifti(root / name, dtype=np.int16)
    return root


def test_bids_folders_with_labels_pybids_cannot_read_are_reported_not_mangled(tmp_path):
    from metsflow.cohort.bids import scan_bids

    root = _bids(
        tmp_path / "bids",
        [
            "sub-\u00fc/anat/sub-\u00fc_ce-Gd_T1w.nii.gz",
            "sub-x.y/anat/sub-x.y_ce-Gd_T1w.nii.gz",
            "sub-02/ses-a b/anat/sub-02_ses-a b_ce-Gd_T1w.nii.gz",
            "sub-02/ses-1/anat/sub-02_ses-1_ce-Gd_T1w.nii.gz",
        ],
    )
    frame, problems = scan_bids(root)
    assert list(frame.study_id) == ["sub-02_ses-1"]
    text = "\n".join(problems)
    assert "sub-\u00fc: subject skipped: '\u00fc' is not a BIDS label" in text
    assert "sub-x.y: subject skipped: 'x.y' is not a BIDS label" in text
    assert "session skipped: 'a b' is not a BIDS label" in text
    assert "no contrast-enhanced" not in text


def test_bids_bad_description_and_dseg_name_their_file(tmp_path):
    from metsflow.cohort.bids import scan_bids

    root = _bids(tmp_path / "bids", ["sub-01/anat/sub-01_ce-Gd_T1w.nii.gz"])
    (root / "dataset_description.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset_description.json: not valid JSON"):
        scan_bids(root)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t"}))
    labels_root = _bids(tmp_path / "deriv", [])
    (labels_root / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "l",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "manual"}],
            }
        )
    )
    (labels_root / "dseg.tsv").write_text("index\tname\nET\tenhancing tumour\n")
    with pytest.raises(ValueError, match=r"dseg.tsv: not a usable dseg.tsv"):
        scan_bids(root, labels=labels_root)


# --------------------------------------------------------------------------- defect 13


def test_evaluate_errors_name_the_file_not_study_question_mark(tmp_path, capsys):
    good = _nifti(tmp_path / "ref.nii.gz", np.ones(SHAPE), dtype=np.uint8)
    code = cli.main(["evaluate", "--pred", str(tmp_path / "nope.nii.gz"), "--ref", str(good)])
    err = capsys.readouterr().err
    assert code == 2 and "study ?" not in err and "nope.nii.gz" in err


def test_an_unwritable_out_names_the_chosen_file_not_its_temporary(tmp_path):
    out = tmp_path / "out.tsv"
    out.mkdir()  # an existing folder where the file should go
    with pytest.raises(OSError) as caught:
        io.write_text(out, "x")
    assert str(out) in str(caught.value) and ".out." not in str(caught.value)


def test_al_status_on_a_yaml_list_is_an_error_not_an_internal_error(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(["results", "labels"]))
    code = cli.main(["al", "status", "--configfile", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "internal error" not in err and "expected a mapping" in err


# --------------------------------------------------------------------------- properties

_ID_TEXT = st.text(alphabet=st.sampled_from("aZ09._- /\\\u00fc\t:"), max_size=12) | st.sampled_from(
    sorted(RESERVED_NAMES) + ["Shards", "x" * 129, "."]
)
_FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(_ID_TEXT)
def test_property_an_accepted_id_is_a_safe_distinct_folder_name(value):
    if not ids.id_problems(value):
        assert ids.SAFE_ID.match(value) and len(value) <= ids.MAX_ID_LENGTH
        assert value.casefold() not in {n.casefold() for n in RESERVED_NAMES}
        assert "/" not in value and not value.startswith(".")
    made = ids.sanitise_id(value)
    assert made is None or not ids.id_problems(made)


@_FAST
@given(st.lists(_ID_TEXT, max_size=8))
def test_property_derived_ids_never_merge_two_sources(sources):
    made, problems = ids.derived_ids(sources, reserved=["studies.tsv"])
    assert set(made) | set(problems) == set(sources) and not set(made) & set(problems)
    folders = [name.casefold() for name in made.values()]
    assert len(folders) == len(set(folders))
    assert all(not ids.id_problems(name) for name in made.values())


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_ID_TEXT, min_size=1, max_size=5))
def test_property_the_sheet_accepts_exactly_the_valid_distinct_ids(tmp_path_factory, study_ids):
    folder = tmp_path_factory.mktemp("sheet")
    (folder / "t1c.nii.gz").write_bytes(b"")
    clean = [s.replace("\t", " ").strip() for s in study_ids]  # cells are stripped by the reader
    rows = "".join(f"P{k}\t{s}\t0\tt1c.nii.gz\n" for k, s in enumerate(clean))
    (folder / "studies.tsv").write_text(SHEET_HEADER + rows)
    valid = all(s and not ids.id_problems(s) for s in clean) and len(set(clean)) == len(clean)
    try:
        cohort = read_sheet(folder / "studies.tsv")
    except SheetError as exc:
        assert not valid
        for row, study_id in enumerate(clean, start=2):
            if study_id and ids.id_problems(study_id):
                assert f"row {row} " in str(exc)
    else:
        assert valid and [s.study_id for s in cohort] == clean


@_FAST
@given(
    st.lists(
        st.one_of(st.integers(-2, 6), st.sampled_from([0.5, float("nan"), 3.0])),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(labels.CONVENTIONS),
)
def test_property_label_values_outside_the_convention_are_always_refused(values, convention):
    data = np.asarray(values, dtype=float)
    allowed = {0, 1, 2, 3}
    bad = [v for v in values if not (float(v).is_integer() and int(v) in allowed)]
    if bad:
        with pytest.raises(ValueError, match="not part of the"):
            labels.to_internal(data, convention)
    else:
        out = labels.to_internal(data, convention)
        assert out.dtype == np.uint8 and set(np.unique(out)) <= allowed


def test_the_id_pattern_has_one_owner():
    from metsflow.active_learning import labelstore
    from metsflow.cohort import readers
    from metsflow.cohort.sheet import load_schema

    schema = load_schema().properties["study_id"]
    assert schema["pattern"] == ids.SAFE_ID.pattern and schema["maxLength"] == ids.MAX_ID_LENGTH
    assert readers.ID_PATTERN is ids.SAFE_ID and labelstore._SAFE_STUDY_ID is ids.SAFE_ID
