"""Issue 17: the gaps found when the promises of docs/running.md "When a study fails" were attacked.

One test (or a few) per point of the issue; each failed before the fix. The workflow checks run
``snakemake -n`` (a dry run: about 2 s each, no job runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, run_snakemake

from metsflow import cli
from metsflow.active_learning.labelstore import LabelStore
from metsflow.active_learning.review import export_batch, import_batch, read_manifest
from metsflow.active_learning.status import round_status
from metsflow.cohort.sheet import SheetError, Study, check_cohort, read_sheet
from metsflow.core import config, io, labels
from metsflow.core.layout import Layout
from metsflow.core.settings import ActiveLearningSettings
from metsflow.evaluation.metrics import evaluate_files
from metsflow.jobs.active_learning import BatchAnnotation, run_collect_annotations
from metsflow.jobs.manifest import read_manifests, run_study, write_manifest

SHAPE = (12, 12, 10)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def _label():
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[3:8, 3:8, 3:7] = labels.EDEMA
    data[4:7, 4:7, 4:6] = labels.ENHANCING
    data[5, 5, 5] = labels.NECROSIS
    return data


def _image(path, data=None, affine=AFFINE, dtype=np.float32):
    if data is None:
        data = np.random.default_rng(0).random(SHAPE)
    io.save_nifti(path, data, affine, dtype=dtype)
    return path


def _pixdim_disagrees(path: Path, pixdim=(4.0, 4.0, 4.0)) -> Path:
    """A header whose sform says 1 mm and whose pixdim says 4 mm (64x the voxel volume)."""
    img = nib.load(path)
    header = img.header.copy()
    header["pixdim"][1:4] = pixdim
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header), path)
    return path


def _nan_affine(path: Path) -> Path:
    img = nib.load(path)
    header = img.header.copy()
    affine = img.affine.copy()
    affine[0, 3] = np.nan
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header), path)
    return path


# --------------------------------------------------------------------------- 1. one header reading


def test_inconsistent_header_is_refused_alike_by_loader_deep_check_and_evaluate(tmp_path):
    ref = _pixdim_disagrees(_image(tmp_path / "a" / "label.nii.gz", _label(), dtype=np.uint8))
    assert np.allclose(io.voxel_spacing(nib.load(ref)), 1.0)  # the affine: 1 mm
    assert np.allclose(nib.load(ref).header.get_zooms(), 4.0)  # pixdim: 4 mm

    with pytest.raises(io.StudyError, match=r"pixdim spacing \(4, 4, 4\) mm but .* \(1, 1, 1\) mm"):
        io.load_nifti(ref, "a", "label")

    pred = _image(tmp_path / "a" / "pred.nii.gz", _label(), dtype=np.uint8)
    with pytest.raises(io.StudyError, match="inconsistent") as err:
        evaluate_files(pred, ref, study_id="a")
    assert err.value.path == str(ref)  # before: volumes 64x too large, no complaint

    t1c = _pixdim_disagrees(_image(tmp_path / "a" / "t1c.nii.gz"))
    study = Study("P", "a", "0", 0, None, t1c, label=ref)
    problems = check_cohort(_cohort([study]), deep=True)
    assert set(problems.file) == {str(t1c), str(ref)}
    assert problems.problem.str.contains("pixdim spacing").all()


def test_nan_affine_is_refused_by_the_deep_check(tmp_path):
    t1c = _nan_affine(_image(tmp_path / "a" / "t1c.nii.gz"))
    (problem,) = check_cohort(_cohort([Study("P", "a", "0", 0, None, t1c)]), deep=True).problem
    assert "non-finite affine" in problem
    with pytest.raises(io.StudyError, match="non-finite affine"):
        io.load_nifti(t1c, "a", "T1C")


def test_evaluate_takes_the_affine_spacing_as_the_pipeline(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ref = _image(tmp_path / "ref.nii.gz", _label(), affine, np.uint8)
    result = evaluate_files(ref, ref)
    voxels = np.count_nonzero(np.isin(_label(), labels.INTERNAL_GROUPS["whole_lesion"]))
    assert result["whole_lesion"]["ref_volume_mm3"] == voxels * 8.0


def _cohort(studies):
    from metsflow.cohort.sheet import Cohort

    return Cohort(studies)


# --------------------------------------------------------------------------- 2. memory guard


def _claims_more_than_it_holds(path: Path) -> Path:
    """A 64^3 float32 header (1 MiB of voxels) whose data is cut after the header: reading any
    voxel fails, so a refusal that names the size came from the header alone."""
    _image(path, np.ones((64, 64, 64)))
    img = nib.load(path)
    raw = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    uncompressed = path.with_suffix("")  # .nii
    nib.save(raw, uncompressed)
    offset = 352  # a single-file NIfTI-1's voxels start after the 348-byte header + extension
    uncompressed.write_bytes(uncompressed.read_bytes()[: offset + 16])
    path.unlink()
    return uncompressed


def test_memory_guard_refuses_from_the_header_before_reading_voxels(tmp_path):
    big = _claims_more_than_it_holds(tmp_path / "s" / "t1c.nii.gz")
    with pytest.raises(io.StudyError, match=r"1 MiB, over the 0\.5 MiB limit"):
        io.load_nifti(big, "s", "T1C", max_image_mb=0.5)
    with pytest.raises(io.StudyError, match="truncated"):  # under the limit: it is read
        io.load_nifti(big, "s", "T1C", max_image_mb=2)

    study = Study("P", "s", "0", 0, None, big)
    (problem,) = check_cohort(_cohort([study]), deep=True, max_image_mb=0.5).problem
    assert "over the 0.5 MiB limit" in problem


def test_memory_guard_is_a_preprocessing_setting(tmp_path):
    from metsflow.imaging.preprocess import preprocess_study

    big = _claims_more_than_it_holds(tmp_path / "s" / "t1c.nii.gz")
    study = Study("P", "s", "0", 0, None, big)
    with pytest.raises(io.StudyError, match="over the 0.5 MiB limit"):
        preprocess_study(study, tmp_path / "out", {"max_image_mb": 0.5})
    assert "max_image_mb" in config.schema()["properties"]["preprocess"]["properties"]


def test_memory_guard_limit_on_the_command_line(tmp_path, capsys):
    big = _claims_more_than_it_holds(tmp_path / "s" / "t1c.nii.gz")
    sheet = _sheet(tmp_path / "studies.tsv", [("P", "s", "0", f"s/{big.name}", "")])
    assert cli.main(["cohort", "check", str(sheet), "--deep", "--max-image-mb", "0.5"]) == 1
    assert "over the 0.5 MiB limit" in capsys.readouterr().err


# --------------------------------------------------------------------------- 3. stale outputs


def test_a_study_that_cannot_be_cleaned_is_quarantined_not_its_shard(tmp_path, monkeypatch):
    """The stale folder of B cannot be removed (EACCES as for another user's files; as root
    the refusal is simulated); A and C finish and the shard manifest is written."""

    root = tmp_path / "prep"
    for study in "ABC":
        (root / study).mkdir(parents=True)
        (root / study / "t1c.nii.gz").write_text("stale")
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path) == root / "B" and not kwargs.get("ignore_errors"):
            raise PermissionError(13, "Permission denied", str(root / "B" / "t1c.nii.gz"))
        return real_rmtree(path, *args, **kwargs)

    # every removal goes through metsflow.core.io.remove_path (issue #25)
    monkeypatch.setattr(io.shutil, "rmtree", rmtree)

    def work(study):
        (root / study).mkdir()
        (root / study / "done.txt").write_text("ok")

    rows = [run_study(s, "P", root / s, f"stamp-{s}", lambda s=s: work(s)) for s in "ABC"]
    write_manifest(tmp_path / "shard.tsv", rows, extra_columns=["file"])

    table = read_manifests([tmp_path / "shard.tsv"]).set_index("study_id")
    assert table.status.to_dict() == {"A": "ok", "B": "failed", "C": "ok"}
    problem = table.loc["B", "problem"]
    assert "stale output folder cannot be removed: Permission denied" in problem
    assert str(root / "B" / "t1c.nii.gz") in problem and table.loc["B", "file"] == str(root / "B")
    assert (root / "C" / "done.txt").exists()


def test_unremovable_stale_folder_for_a_real_user(tmp_path):
    """The same with the kernel's refusal: a read-only folder, for a process without
    CAP_DAC_OVERRIDE (root in a child without it, as tests/test_bad_inputs.py does)."""
    root = tmp_path / "prep"
    (root / "B" / "sub").mkdir(parents=True)
    (root / "B" / "sub" / "t1c.nii.gz").write_text("stale")
    os.chmod(root / "B" / "sub", 0o555)
    code = (
        "import sys; from pathlib import Path; from metsflow.jobs.manifest import run_study\n"
        f"row = run_study('B', 'P', Path({str(root / 'B')!r}), 'x', lambda: {{}})\n"
        "print(row['status']); print(row['problem'])"
    )
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without util-linux setpriv: cannot drop CAP_DAC_OVERRIDE")
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    os.chmod(root / "B" / "sub", 0o755)
    if "setpriv" in proc.stderr:
        pytest.skip(f"setpriv refused here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    status, problem = proc.stdout.splitlines()[:2]
    assert status == "failed" and "cannot be removed: Permission denied" in problem


# --------------------------------------------------------------------------- 4. containment


def _sheet(path: Path, rows) -> Path:
    """rows: (patient, study, timepoint, t1c, label)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=["patient_id", "study_id", "timepoint", "t1c", "label"])
    table.to_csv(path, sep="\t", index=False)
    return path


def test_paths_are_contained_through_file_and_folder_symlinks(tmp_path, capsys):
    outside = tmp_path / "outside"
    secret = _image(outside / "private" / "t1c.nii.gz")
    data = tmp_path / "data"
    (data / "P1").mkdir(parents=True)
    os.symlink(secret, data / "P1" / "t1c.nii.gz")  # a file link
    os.symlink(outside / "private", data / "P2")  # a folder link
    _image(data / "P3" / "t1c.nii.gz")  # a real file inside: accepted
    sheet = _sheet(
        data / "studies.tsv",
        [
            ("P1", "P1_T0", "0", "P1/t1c.nii.gz", ""),
            ("P2", "P2_T0", "0", "P2/t1c.nii.gz", ""),
            ("P3", "P3_T0", "0", "P3/t1c.nii.gz", ""),
        ],
    )
    with pytest.raises(SheetError) as err:
        read_sheet(sheet, data_roots=[])
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert all("through a symbolic link" in p and str(secret) in p for p in problems)
    assert "P1_T0" in problems[0] and "P2_T0" in problems[1]
    assert cli.main(["cohort", "check", str(sheet)]) == 1
    assert "through a symbolic link" in capsys.readouterr().err
    # A link inside the roots to a file inside the roots is fine.
    os.symlink(data / "P3" / "t1c.nii.gz", data / "P3" / "alias.nii.gz")
    ok = _sheet(data / "ok.tsv", [("P3", "P3_T0", "0", "P3/alias.nii.gz", "")])
    assert len(read_sheet(ok, data_roots=[])) == 1
    assert len(read_sheet(sheet, data_roots=[data, outside])) == 3


# --------------------------------------------------------------------------- 5. review import


@pytest.fixture
def package(tmp_path):
    """A review package of S1, S2, S3 with corrected labels of S1 and S3 (S2: none saved)."""
    images, presegs = {}, {}
    for study in ("S1", "S2", "S3"):
        folder = tmp_path / "native" / study
        images[study] = {"t1c": _image(folder / "t1c.nii.gz")}
        presegs[study] = _image(folder / "pred.nii.gz", _label(), dtype=np.uint8)
    selection = pd.DataFrame({"study_id": ["S1", "S2", "S3"], "patient_id": ["P1", "P2", "P3"]})
    review = tmp_path / "results" / "rounds" / "round_1" / "review"
    export_batch(selection, images, presegs, review, 1, "model_r0")
    selection.to_csv(review.parent / "selection.tsv", sep="\t", index=False)
    for study in ("S1", "S3"):
        _image(review / study / "segmentation.nii.gz", _label(), dtype=np.uint8)
    return review, images


def test_review_import_reports_each_bad_study_and_imports_the_others(package, tmp_path):
    review, images = package
    store = LabelStore(tmp_path / "labels", known_studies={"S1", "S2"})

    def reference(study):
        if study == "S3":
            raise RuntimeError("the sheet row of S3 is broken")
        return images[study]["t1c"]

    result = import_batch(review, store, "refined", "ann", reference_for=reference)
    result = result.set_index("study_id")
    assert result.result.to_dict() == {"S1": "imported", "S2": "missing", "S3": "rejected"}
    assert "RuntimeError: the sheet row of S3 is broken" in result.loc["S3", "problem"]
    manifest = read_manifest(review).set_index("study_id")
    assert manifest.status.to_dict() == {"S1": "refined", "S2": "pending", "S3": "pending"}


def test_al_import_with_a_study_unknown_to_the_sheet(package, tmp_path, capsys):
    review, images = package
    sheet = _sheet(
        tmp_path / "native" / "studies.tsv",
        [("P1", "S1", "0", "S1/t1c.nii.gz", ""), ("P2", "S2", "0", "S2/t1c.nii.gz", "")],
    )
    args = ["al", "import", "--review-dir", str(review), "--stage", "confirmed"]
    args += ["--reviewer", "nr", "--sheet", str(sheet), "--labels", str(tmp_path / "labels")]
    assert cli.main(args) == 1  # before: KeyError traceback, nothing imported
    out = capsys.readouterr().out
    assert "unknown study (not in the cohort)" in out
    store = LabelStore(tmp_path / "labels", create=False)
    assert store.status("S1") == "confirmed" and store.status("S3") == "none"
    assert read_manifest(review).set_index("study_id").status["S1"] == "confirmed"


# --------------------------------------------------------------------------- 5 + 10. simulated


def _oracle(tmp_path, convention: str) -> Path:
    rows = []
    for study in ("S1", "S2", "S3"):
        path = tmp_path / "truth" / f"{study}.nii.gz"
        _image(path, labels.from_internal(_label(), convention), dtype=np.uint8)
        rows.append({"study_id": study, "label": path.name, "label_convention": convention})
    sheet = tmp_path / "truth" / "oracle.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet


def test_brats_oracle_is_converted_and_the_package_shows_the_store(package, tmp_path):
    review, images = package
    oracle = _oracle(tmp_path, "brats")
    studies = [
        Study(f"P{i}", s, "0", 0, None, images[s]["t1c"]).to_record()
        for i, s in enumerate(("S1", "S2", "S3"), start=1)
    ]
    table = run_collect_annotations(
        Layout(tmp_path / "results"),
        ActiveLearningSettings(annotator="simulated"),
        BatchAnnotation(
            1,
            str(review.parent / "selection.tsv"),
            str(oracle),
            str(tmp_path / "labels"),
            studies,
            "model_r0",
            str(review.parent / "annotations.tsv"),
        ),
    )  # before: ValueError "labels must be in the internal convention"
    store = LabelStore(tmp_path / "labels", create=False)
    for study in table.study_id:
        confirmed = np.asarray(nib.load(store.confirmed(study)).dataobj)
        np.testing.assert_array_equal(confirmed, _label())  # internal values, not BraTS
    # The package manifest says what `metsflow al status` says (before: still "pending").
    manifest = read_manifest(review)
    assert set(manifest.status) == {"confirmed"}
    (status,) = round_status(tmp_path / "results", store).to_dict("records")
    assert status["confirmed"] == len(manifest) == 3


# --------------------------------------------------------------------------- 6. label values


def test_label_values_are_named_as_stored_with_their_file(tmp_path):
    ref = _image(tmp_path / "ref.nii.gz", _label(), dtype=np.uint8)
    values = _label().astype(np.float32)
    values[0, 0, 0], values[0, 0, 1] = 0.5, np.float32(1.0000001)
    pred = _image(tmp_path / "pred.nii.gz", values, dtype=np.float32)
    with pytest.raises(io.StudyError) as err:
        evaluate_files(pred, ref, study_id="S1")
    message = str(err.value)
    assert err.value.path == str(pred) and "S1" in message and "prediction" in message
    assert "[0.5, 1.0000001]" in message  # before: [0, 1], no file
    with pytest.raises(io.StudyError) as err:
        evaluate_files(ref, pred, study_id="S1")
    assert err.value.path == str(pred) and "reference" in str(err.value)


def test_cli_evaluate_names_values_in_one_line(tmp_path, capsys):
    ref = _image(tmp_path / "ref.nii.gz", _label(), dtype=np.uint8)
    pred = _image(tmp_path / "pred.nii.gz", _label() * 0.5, dtype=np.float32)
    assert cli.main(["evaluate", "--pred", str(pred), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[0.5, 1.5]" in err and str(pred) in err


# --------------------------------------------------------------------------- 8. CLI


def test_cli_refused_write_is_one_line_not_a_traceback(tmp_path, capsys):
    ref = _image(tmp_path / "ref.nii.gz", _label(), dtype=np.uint8)
    store = LabelStore(tmp_path / "labels")
    target = store.root / "S1" / "metrics.json"
    args = ["evaluate", "--pred", str(ref), "--ref", str(ref), "--json", str(target)]
    assert cli.main(args) == 2  # before: LabelStoreWriteError traceback
    err = capsys.readouterr().err.strip()
    assert err.startswith("metsflow: error: refusing to write") and len(err.splitlines()) == 1
    assert not target.exists()


def test_cli_numbers_are_plain(tmp_path, capsys):
    t1c = _image(tmp_path / "P" / "t1c.nii.gz", affine=np.diag([0.05, 1.0, 1.0, 1.0]))
    sheet = _sheet(tmp_path / "studies.tsv", [("P", "S", "0", "P/t1c.nii.gz", "")])
    assert t1c.exists() and cli.main(["cohort", "check", str(sheet), "--deep"]) == 1
    err = capsys.readouterr().err
    assert "implausible voxel spacing (0.05, 1, 1) mm" in err and "np.float" not in err


def test_cli_table_without_a_needed_column_is_one_line(tmp_path, capsys):
    table = tmp_path / "a.tsv"
    table.write_text("x\ty\n1\t2\n")  # not a per_study.tsv: no study_id
    assert cli.main(["stats", "compare", str(table), str(table)]) == 2  # before: KeyError
    err = capsys.readouterr().err.strip()
    assert err == "metsflow: error: missing 'study_id' (a column or key the command needs)"


# --------------------------------------------------------------------------- 9. config keys


def _base_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _merge(base: dict, overlay: dict) -> dict:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.mark.parametrize(
    ("section", "typo", "nearest"),
    [("train", "learing_rate", "learning_rate"), ("infer", "overlapp", "overlap"),
     ("model", "filtres", "filters"), ("preprocess", "coreg_iteration", "coreg_iterations"),
     ("register", "cc_raduis", "cc_radius"), ("evaluate", "iou_treshold", "iou_threshold")],
)  # fmt: skip
def test_config_typos_are_refused_with_the_nearest_name(section, typo, nearest):
    cfg = _base_config()
    cfg[section][typo] = 1
    (problem,) = config.problems(cfg)
    assert problem == (
        f"unknown key '{section}.{typo}' in section '{section}'; did you mean '{nearest}'?"
    )


def test_nested_and_top_level_typos(tmp_path):
    cfg = _base_config()
    cfg["train"]["stage2"]["iteratons"] = 3
    cfg["sheeet"] = "x.tsv"
    assert config.problems(cfg) == [
        "unknown key 'sheeet' in the top level; did you mean 'sheet'?",
        "unknown key 'train.stage2.iteratons' in section 'train.stage2'; did you mean "
        "'iterations'?",
    ]


def test_configs_of_the_repository_tests_and_benchmarks_validate(tiny_config, tmp_path):
    cohort_yaml = yaml.safe_load((REPO / "config" / "cohort.yaml").read_text())
    assert config.problems(_base_config()) == []
    assert config.problems(_merge(_base_config(), cohort_yaml)) == []
    tiny = yaml.safe_load(tiny_config(tmp_path).read_text())
    assert config.problems(_merge(_base_config(), tiny)) == []
    # Overlays of the slow workflow tests and of benchmarks/bench_active_learning.py.
    overlays = [
        {"train": {"folds": 2, "stage2": {"enabled": True, "iterations": 10},
                   "reseg": {"enabled": True, "iterations": 12, "finetune_iterations": 6}},
         "active_learning": {"strategy": "disagreement"}},
        {"preprocess": {"spacing": [4.0] * 3, "coregister": "none", "brain_mask": "nonzero"},
         "active_learning": {"annotator": "human", "final_validation_sample": 1,
                             "dice_threshold": 0.0}},
        {"active_learning": {"rounds": 0, "per_patient_max": None}, "seed": 3},
    ]  # fmt: skip
    for overlay in overlays:
        assert config.problems(_merge(_merge(_base_config(), tiny), overlay)) == []


def test_module_knobs_are_taken_from_the_module_defaults():
    from metsflow.imaging import preprocess, register
    from metsflow.models import cascade, train

    properties = config.schema()["properties"]
    assert set(preprocess.DEFAULTS) <= set(properties["preprocess"]["properties"])
    assert set(register.DEFAULTS) <= set(properties["register"]["properties"])
    assert set(train.DEFAULTS) <= set(properties["train"]["properties"])
    stage2 = properties["train"]["properties"]["stage2"]["properties"]
    assert set(cascade.DEFAULTS) <= set(stage2)


# --------------------------------------------------------------------------- 7, 9, 10: parse time


def _dry_run(tmp_path: Path, overlay: dict, *extra: str):
    cfg = {"results": str(tmp_path / "results"), "label_store": str(tmp_path / "labels")}
    cfg.update(overlay)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_snakemake(["-n", "--configfile", str(path), *extra], timeout=120, check=False)


def _one_message(proc) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    for word in ("Traceback", "KeyError", "IndexError", 'File "'):
        assert word not in output, output
    assert output.count("metsflow: the run cannot start") == 1, output
    return output


def _study_rows(labelled: dict[str, bool]):
    return [
        (p, f"{p}_T0", "0", f"{p}/t1c.nii.gz", f"{p}/label.nii.gz" if lab else "")
        for p, lab in labelled.items()
    ]


SIMULATED_OFF = {"active_learning": {"annotator": "human"}}


@pytest.mark.parametrize(
    ("rows", "overlay", "expected"),
    [
        ([], SIMULATED_OFF, "no studies (a header only)"),
        (
            _study_rows({"P1": False, "P2": False}),
            SIMULATED_OFF,
            "no labelled study in the sheet",
        ),
        (
            _study_rows({"P1": True, "P2": True}),
            {"validation": {"patients": ["P1", "P2"]}, **SIMULATED_OFF},
            "leave a labelled patient out of validation.patients",
        ),
        (
            _study_rows({"P1": True, "P2": True}),
            SIMULATED_OFF,
            "set active_learning.rounds: 0",
        ),
    ],
    ids=["header-only", "no-labels", "all-validation", "empty-pool"],
)
def test_degenerate_sheets_fail_before_planning_with_one_message(tmp_path, rows, overlay, expected):
    sheet = _sheet(tmp_path / "data" / "studies.tsv", rows)
    output = _one_message(_dry_run(tmp_path, {"sheet": str(sheet), **overlay}))
    assert expected in output


def test_config_typo_stops_the_dry_run_with_the_nearest_name(tmp_path):
    sheet = _sheet(tmp_path / "data" / "studies.tsv", _study_rows({"P1": True, "P2": False}))
    overlay = {"sheet": str(sheet), "train": {"learing_rate": 0.1}, **SIMULATED_OFF}
    output = _one_message(_dry_run(tmp_path, overlay))
    assert "unknown key 'train.learing_rate' in section 'train'; did you mean " in output


def test_everything_the_run_reads_is_checked_at_parse_time(tmp_path):
    sheet = _sheet(
        tmp_path / "data" / "studies.tsv", _study_rows({"P1": True, "P2": False, "P3": False})
    )
    truth = tmp_path / "truth"
    truth.mkdir()
    _image(truth / "P1.nii.gz", _label(), dtype=np.uint8)
    pd.DataFrame(
        {
            "study_id": ["P1_T0", "P2_T0", "P3_T0"],
            "label": ["P1.nii.gz", "P2.nii.gz", "P1.nii.gz"],
            "label_convention": ["internal", "internal", "bratz"],
        }
    ).to_csv(truth / "oracle.tsv", sep="\t", index=False)
    store_file = tmp_path / "labels_file"
    store_file.write_text("not a folder")
    overlay = {
        "sheet": str(sheet),
        "oracle_sheet": str(truth / "oracle.tsv"),
        "label_store": str(store_file),
        "data_roots": [str(tmp_path / "data"), str(tmp_path / "gone")],
    }
    output = _one_message(_dry_run(tmp_path, overlay))
    for expected in (
        f"data_roots: {tmp_path / 'gone'} is not an existing folder",
        f"label_store {store_file}: the label store is not a folder",
        f"label file {truth / 'P2.nii.gz'} not found",
        "label_convention 'bratz' is not one of internal, brats",
        "2 pool studies have no usable ground-truth label",
    ):
        assert expected in output
    assert "5 problem(s)" in output


def test_a_valid_setup_still_plans(tmp_path):
    sheet = _sheet(tmp_path / "data" / "studies.tsv", _study_rows({"P1": True, "P2": False}))
    truth = tmp_path / "data" / "oracle.tsv"
    pd.DataFrame({"study_id": ["P2_T0"], "label": ["P1/label.nii.gz"]}).to_csv(
        truth, sep="\t", index=False
    )
    _image(tmp_path / "data" / "P1" / "label.nii.gz", _label(), dtype=np.uint8)
    proc = _dry_run(tmp_path, {"sheet": str(sheet), "oracle_sheet": str(truth)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preprocess_shard" in proc.stdout


def test_prepare_run_lists_setup_problems_together(tmp_path):
    from metsflow.cohort.preflight import RunError, prepare_run

    sheet = _sheet(tmp_path / "data" / "studies.tsv", _study_rows({"P1": True, "P2": False}))
    cfg = _merge(_base_config(), {"sheet": str(sheet), "oracle_sheet": ""})
    cfg.update(results=str(tmp_path / "run"), label_store=str(tmp_path / "run" / "labels"))
    with pytest.raises(RunError) as err:
        prepare_run(cfg)
    assert len(err.value.problems) == 2, err.value.problems
    overlap, oracle = err.value.problems
    assert "overlap: pipeline outputs and human labels must live in separate folders" in overlap
    assert "'simulated' but oracle_sheet is not set" in oracle


def test_the_workflow_contains_paths_through_symlinks_and_still_checks_the_oracle(tmp_path):
    outside = _image(tmp_path / "elsewhere" / "t1c.nii.gz")
    data = tmp_path / "data"
    (data / "P2").mkdir(parents=True)
    os.symlink(outside, data / "P2" / "t1c.nii.gz")
    sheet = _sheet(data / "studies.tsv", _study_rows({"P1": True, "P2": False}))
    oracle = data / "oracle.tsv"
    oracle.write_text("study_id\tlabel\tlabel_convention\nP2_T0\tP1/label.nii.gz\tBraTS\n")
    output = _one_message(_dry_run(tmp_path, {"sheet": str(sheet), "oracle_sheet": str(oracle)}))
    assert f"resolves to {outside} (through a symbolic link), outside the data roots" in output
    assert "label_convention 'BraTS' is not one of internal, brats" in output
