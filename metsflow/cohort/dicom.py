"""DICOM in: classify and convert a PACS export into the dated NIfTI layout and a study sheet.

``import_dicom(DICOM_ROOT, NIFTI_ROOT)`` (``metsflow cohort import-dicom``):

1. reads every file's header under ``DICOM_ROOT`` with pydicom (no pixels) and groups the
   files by SeriesInstanceUID; files that are not DICOM are reported;
2. classifies each series into t1/t1c/t2/flair with the rules of a YAML file a site can edit
   (default ``metsflow/schemas/dicom_series.yaml``: SeriesDescription, ContrastBolusAgent,
   ScanningSequence, EchoTime...): a series is used only when exactly one class matches;
3. groups series by patient (PatientID) and study date (StudyDate); two series of one class on
   one date are duplicates and none of them is used (a site resolves it, by tightening the
   rules or removing a series from the export);
4. converts each used series with dcm2niix (the PyPI ``dcm2niix`` package's binary; no DICOM
   decoding of our own) into ``NIFTI_ROOT/<patient>/<YYYY-MM-DD>/<patient>_<YYYY-MM-DD>_<HHMMSS>
   _{PRE,POST,T2,FLAIR}.nii.gz``, the dated layout of ``metsflow.cohort.scan``, with dcm2niix's JSON
   sidecar; the sidecar also records the source series (``MetsflowDicomSource``: study and
   series UIDs and the source files), which is how the DICOM SEG export finds the T1c series
   it must reference, without any new sheet column;
5. writes ``NIFTI_ROOT/studies.tsv`` (through ``metsflow.cohort.scan``, so it passes ``read_sheet``)
   and ``NIFTI_ROOT/dicom_import_report.tsv``: one row per series with its class and what
   happened to it (converted, unclassified, ambiguous, duplicate, skipped, failed), and one
   row per problem file.

Nothing is guessed: a date without a single usable contrast-enhanced T1 is not in the sheet,
and the report says why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from pydicom.multival import MultiValue

from metsflow.core import ids, io
from metsflow.core.config import SCHEMA_DIR

log = logging.getLogger(__name__)

DEFAULT_RULES = SCHEMA_DIR / "dicom_series.yaml"
RULES_SCHEMA = SCHEMA_DIR / "dicom_series.schema.yaml"
SOURCE_KEY = "MetsflowDicomSource"  # in the dcm2niix JSON sidecar of each converted series
REPORT_NAME = "dicom_import_report.tsv"
SHEET_NAME = "studies.tsv"
REPORT_COLUMNS = [
    "patient_id",
    "study_date",
    "series_uid",
    "series_number",
    "series_description",
    "n_files",
    "class",
    "status",
    "detail",
    "output",
]
# Header elements read for the rules and the grouping (pixels are never read here).
_HEADER_TAGS = (
    "PatientID",
    "StudyDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesTime",
    "AcquisitionTime",
    "Modality",
)


@dataclass
class Series:
    uid: str
    header: dict[str, object]  # keyword -> value of the first file
    files: list[Path] = field(default_factory=list)

    def get(self, keyword: str) -> str:
        value = self.header.get(keyword)
        if value is None:
            return ""
        if isinstance(value, list | tuple | MultiValue):
            return "\\".join(str(v) for v in value)
        return str(value).strip()


# ---- rules -----------------------------------------------------------------------------------


def load_rules(path: str | os.PathLike | None = None) -> dict:
    """The classification rules (default: the shipped file), checked against their schema."""
    import jsonschema

    path = Path(path) if path else DEFAULT_RULES
    try:
        rules = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"DICOM rules {path}: not valid YAML ({exc})") from exc
    schema = yaml.safe_load(RULES_SCHEMA.read_text())
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(rules), key=lambda e: e.json_path
    )
    problems = [f"{e.json_path}: {e.message}" for e in errors]
    for section in [rules.get("skip", [])] + [
        part for c in (rules.get("classes") or {}).values() for part in c.values()
    ]:
        for conditions in section if isinstance(section, list) else []:
            for keyword, condition in (conditions or {}).items():
                if isinstance(condition, str):
                    try:
                        re.compile(condition)
                    except re.error as exc:
                        problems.append(f"{keyword}: bad regular expression {condition!r}: {exc}")
    if problems:
        raise ValueError(f"DICOM rules {path}: " + "; ".join(problems))
    return rules


def _condition_holds(series: Series, keyword: str, condition) -> bool:
    value = series.get(keyword)
    if not value:
        return False
    if isinstance(condition, str):
        return re.search(condition, value, re.IGNORECASE) is not None
    try:
        number = float(value.split("\\")[0])
    except ValueError:
        return False
    return condition.get("min", -float("inf")) <= number <= condition.get("max", float("inf"))


def _matches(series: Series, condition_sets: list[dict]) -> bool:
    return any(
        all(_condition_holds(series, k, c) for k, c in conditions.items())
        for conditions in condition_sets
    )


def classify(series: Series, rules: dict) -> tuple[str, str | None, str]:
    """(status, class, detail): status is 'classified', 'skipped', 'unclassified' or
    'ambiguous'; class is set only when exactly one class matched."""
    if series.get("Modality").upper() != "MR":
        return "skipped", None, f"modality {series.get('Modality') or 'missing'}, not MR"
    if _matches(series, rules.get("skip") or []):
        return "skipped", None, "matches a skip rule"
    matched = [
        name
        for name, rule in rules["classes"].items()
        if _matches(series, rule["when"]) and not _matches(series, rule.get("unless") or [])
    ]
    if len(matched) == 1:
        return "classified", matched[0], ""
    if not matched:
        return "unclassified", None, "matches no class"
    return "ambiguous", None, f"matches {', '.join(matched)}"


# ---- reading ---------------------------------------------------------------------------------


def read_series(root: Path) -> tuple[list[Series], list[dict]]:
    """Series under ``root`` (files grouped by PatientID and SeriesInstanceUID: two patients'
    files sharing a UID, an anonymiser's slip, stay two series that ``import_dicom`` refuses,
    never one 4D image under the first patient) and report rows of bad files."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[tuple[str, str], Series] = {}
    problems = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(folder) / name
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError) as exc:
                problems.append(_file_problem(path, root, f"not a readable DICOM file ({exc})"))
                continue
            uid = str(ds.get("SeriesInstanceUID", "")).strip()
            if not uid:
                problems.append(_file_problem(path, root, "no SeriesInstanceUID"))
                continue
            key = (str(ds.get("PatientID", "")).strip(), uid)
            if key not in series:
                header = {
                    element.keyword: element.value
                    for element in ds
                    if element.keyword and element.VR not in ("SQ", "OB", "OW", "UN")
                }
                series[key] = Series(uid, header)
            series[key].files.append(path)
    return list(series.values()), problems


def _file_problem(path: Path, root: Path, detail: str) -> dict:
    return {"status": "failed", "detail": f"{path.relative_to(root)}: {detail}", "n_files": 1}


# ---- conversion ------------------------------------------------------------------------------


def dcm2niix_binary() -> str:
    """The dcm2niix executable: the one next to this Python (the PyPI wheel), else on PATH."""
    import sys

    here = Path(sys.executable).parent / "dcm2niix"
    found = str(here) if here.exists() else shutil.which("dcm2niix")
    if not found:
        raise FileNotFoundError("dcm2niix not found: pip install dcm2niix")
    return found


def convert_series(series: Series, target: Path, scratch: Path, binary: str) -> None:
    """Convert one series with dcm2niix to ``target`` (.nii.gz) and its JSON sidecar.

    The series' files are linked into a folder of their own, so dcm2niix sees this series only;
    an output of more than one image (echoes, phase, a tilted gantry) is refused rather than
    picked from.
    """
    source = scratch / "in"
    out = scratch / "out"
    for folder in (source, out):
        io.remove_path(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for k, path in enumerate(series.files):
        os.symlink(os.path.abspath(path), source / f"{k:06d}.dcm")
    result = subprocess.run(
        [binary, "-z", "y", "-b", "y", "-ba", "y", "-f", "series", "-o", str(out), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    images = sorted(out.glob("*.nii.gz"))
    if result.returncode != 0 or len(images) != 1:
        tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        raise RuntimeError(
            f"dcm2niix wrote {len(images)} images (exit {result.returncode}): {' | '.join(tail)}"
        )
    sidecar = images[0].with_name(images[0].name.removesuffix(".nii.gz") + ".json")
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    meta[SOURCE_KEY] = {
        "StudyInstanceUID": series.get("StudyInstanceUID"),
        "SeriesInstanceUID": series.uid,
        "files": [os.path.abspath(p) for p in series.files],
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(sidecar_path(target), meta)
    # same file system (scratch is inside the output folder): an atomic rename
    os.replace(images[0], target)


def sidecar_path(nifti: str | os.PathLike) -> Path:
    """The JSON sidecar of a NIfTI file (``x.nii.gz`` -> ``x.json``)."""
    nifti = Path(nifti)
    return nifti.with_name(re.sub(r"\.nii(\.gz)?$", "", nifti.name) + ".json")


def dicom_source(nifti: str | os.PathLike) -> dict | None:
    """The source series recorded by ``import_dicom`` for a converted image, or None."""
    sidecar = sidecar_path(nifti)
    if not sidecar.is_file():
        return None
    return json.loads(sidecar.read_text()).get(SOURCE_KEY)


def _iso_date(value: str) -> str | None:
    digits = re.sub(r"\D", "", value)
    if len(digits) != 8:
        return None
    return f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"


def _time_token(series: Series) -> str:
    raw = series.get("SeriesTime") or series.get("AcquisitionTime")
    digits = re.sub(r"\D", "", raw.split(".")[0])[:6]
    return digits.ljust(6, "0") if digits else "000000"


# ---- import ----------------------------------------------------------------------------------


def import_dicom(
    dicom_root: str | os.PathLike,
    out_root: str | os.PathLike,
    rules_path: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Convert ``dicom_root`` into ``out_root``; returns (sheet rows, report, scan problems)."""
    from metsflow.cohort.scan import _LONGITUDINAL_SEQUENCE, scan, write_sheet

    dicom_root = Path(dicom_root).absolute()
    if not dicom_root.is_dir():
        raise ValueError(f"DICOM folder {dicom_root} does not exist or is not a folder")
    out_root = Path(out_root).absolute()
    out_root.mkdir(parents=True, exist_ok=True)
    rules = load_rules(rules_path)
    binary = dcm2niix_binary()
    token = {column: name for name, column in _LONGITUDINAL_SEQUENCE.items()}

    all_series, report = read_series(dicom_root)
    # Output folders are named after PatientIDs: sanitised, never a name of this folder's own
    # files (a PatientID "studies.tsv" aborted the import), and two PatientIDs that would share
    # a folder are both refused; so is a SeriesInstanceUID found under several PatientIDs.
    folders, id_problems = ids.derived_ids(
        (s.get("PatientID") for s in all_series), reserved=(SHEET_NAME, REPORT_NAME)
    )
    patients_of_uid: dict[str, set[str]] = defaultdict(set)
    for series in all_series:
        patients_of_uid[series.uid].add(series.get("PatientID"))
    by_study: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for series in sorted(all_series, key=lambda s: (s.get("PatientID"), s.get("StudyDate"), s.uid)):
        row = {
            "patient_id": series.get("PatientID"),
            "study_date": _iso_date(series.get("StudyDate")) or series.get("StudyDate"),
            "series_uid": series.uid,
            "series_number": series.get("SeriesNumber"),
            "series_description": series.get("SeriesDescription"),
            "n_files": len(series.files),
        }
        status, name, detail = classify(series, rules)
        row.update({"class": name or "", "status": status, "detail": detail})
        report.append(row)
        if status != "classified":
            continue
        shared = sorted(patients_of_uid[series.uid] - {row["patient_id"]})
        if shared:
            row.update(
                status="failed",
                detail=f"SeriesInstanceUID also used by PatientID {', '.join(map(repr, shared))}: "
                "not converted (files of two patients would be merged)",
            )
            continue
        if row["patient_id"] in id_problems:
            row.update(status="failed", detail=f"PatientID {id_problems[row['patient_id']]}")
            continue
        row["folder"] = folders[row["patient_id"]]
        if _iso_date(series.get("StudyDate")) is None:
            row.update(status="failed", detail="no valid StudyDate")
            continue
        by_study[(row.pop("folder"), row["study_date"])][name].append({"row": row, "s": series})

    with tempfile.TemporaryDirectory(prefix=".import-", dir=out_root) as scratch:
        for (patient, date), classes in sorted(by_study.items()):
            for name, found in sorted(classes.items()):
                if len(found) > 1:
                    numbers = ", ".join(f["row"]["series_number"] or "?" for f in found)
                    for f in found:
                        f["row"].update(
                            status="duplicate",
                            detail=f"{len(found)} {name} series on {date} (series {numbers}): "
                            "none used",
                        )
                    continue
                row, series = found[0]["row"], found[0]["s"]
                stem = f"{patient}_{date}_{_time_token(series)}_{token[name]}"
                target = out_root / patient / date / f"{stem}.nii.gz"
                try:
                    convert_series(series, target, Path(scratch), binary)
                except (RuntimeError, OSError) as exc:
                    row.update(status="failed", detail=str(exc))
                    continue
                row.update(status="converted", output=str(target.relative_to(out_root)))

    report_table = pd.DataFrame(report, columns=REPORT_COLUMNS).fillna("")
    io.write_table(out_root / REPORT_NAME, report_table)
    # scan() logs each problem (a date without a usable T1c, ...); the caller shows them too
    frame, problems = scan(out_root, layout="longitudinal")
    write_sheet(frame, out_root / SHEET_NAME)
    return frame, report_table, problems
