"""Build a study sheet from a dataset folder in a known layout.

Layouts:
    brats         BraTS-METS: ``BraTS-MET-XXXXX-YYY/BraTS-MET-XXXXX-YYY-{t1n,t1c,t2w,t2f,seg}.nii.gz``
                  (patient XXXXX, time point YYY). Labels use the BraTS convention.
    bids          A BIDS dataset (``dataset_description.json`` at the top), read with pybids:
                  see ``metsflow.cohort.bids``.
    longitudinal  Per patient and date (Yale-like):
                  ``<patient>/<YYYY-MM-DD>/<patient>_<YYYY-MM-DD>_<time>_{PRE,POST,T2,FLAIR}.nii.gz``
                  (PRE = T1, POST = T1c); no labels.

Nothing in the folder is silently ignored (except JSON sidecars of the images and, at the top
of the dated layout, TSV/CSV sheets and reports): a file or folder that does not fit the layout, a
study without a T1c (the sheet requires one) and a sequence acquired twice on
one day are each reported, as a returned problem and a logged warning. Hidden entries
(names starting with '.') are skipped. Rows are sorted by patient then time point, so the
written sheet passes ``metsflow.cohort.sheet.read_sheet``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from pathlib import Path

import pandas as pd

from metsflow.cohort.readers import ScanReport, check_root, sheet_frame
from metsflow.cohort.sheet import PATH_COLUMNS, SHEET_COLUMNS
from metsflow.core import ids, io

log = logging.getLogger(__name__)

LAYOUTS = ("brats", "longitudinal", "bids")

_BRATS_STUDY = re.compile(r"^(?P<patient>BraTS-MET-\d+)-(?P<timepoint>\d+)$")
_BRATS_SUFFIX = {"t1n": "t1", "t1c": "t1c", "t2w": "t2", "t2f": "flair", "seg": "label"}
_LONGITUDINAL_SEQUENCE = {"PRE": "t1", "POST": "t1c", "T2": "t2", "FLAIR": "flair"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NIFTI = r"\.nii(?:\.gz)?"


def _entries(folder: Path) -> list[Path]:
    """Visible entries of ``folder`` in name order (stable output across file systems)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _has_t1c(files: dict[str, Path], study_id: str, folder: Path, report: ScanReport) -> bool:
    if "t1c" not in files:
        report.add(folder, f"study {study_id} skipped: no T1c image (the sheet requires one)")
        return False
    return True


def _scan_brats(root: Path) -> tuple[pd.DataFrame, list[str]]:
    report = ScanReport(root)
    rows = []
    for folder in _entries(root):
        match = _BRATS_STUDY.match(folder.name)
        if not folder.is_dir() or match is None:
            report.add(folder, "does not fit the BraTS-METS layout (BraTS-MET-XXXXX-YYY/)")
            continue
        study_id = folder.name
        file_pattern = re.compile(
            rf"^{re.escape(study_id)}-(?P<suffix>{'|'.join(_BRATS_SUFFIX)}){_NIFTI}$"
        )
        files: dict[str, Path] = {}
        for path in _entries(folder):
            found = file_pattern.match(path.name)
            if not path.is_file() or found is None:
                report.add(
                    path,
                    f"unexpected entry (expected {study_id}-{{t1n,t1c,t2w,t2f,seg}}.nii.gz)",
                )
                continue
            column = _BRATS_SUFFIX[found["suffix"]]
            if column in files:
                report.add(path, f"second {found['suffix']} file; using {files[column].name}")
                continue
            files[column] = path
        if not _has_t1c(files, study_id, folder, report):
            continue
        rows.append(
            {
                "patient_id": match["patient"],
                "study_id": study_id,
                # Integer time point: "000" and "0" order the same; the study id keeps the text.
                "timepoint": str(int(match["timepoint"])),
                **{column: str(path) for column, path in files.items()},
                "label_convention": "brats",
                "_sort": int(match["timepoint"]),
            }
        )
    return sheet_frame(rows), report.problems


# Top-level files of a dated layout that are not reported: the study sheet and import report
# that `metsflow cohort import-dicom` writes next to the images.
_SIDE_FILE_SUFFIXES = (".tsv", ".csv")


def _is_sidecar(path: Path, names: set[str]) -> bool:
    """A JSON sidecar (dcm2niix/BIDS) of a NIfTI in the same folder: not an unexpected entry."""
    stem = path.name.removesuffix(".json")
    return path.name.endswith(".json") and bool({stem + ".nii.gz", stem + ".nii"} & names)


def _time_key(text: str) -> str:
    """Sortable form of a time token: HHMM or HHMMSS, separators ignored."""
    return re.sub(r"\D", "", text).ljust(6, "0")


def _scan_longitudinal(root: Path) -> tuple[pd.DataFrame, list[str]]:
    report = ScanReport(root)
    rows = []
    for patient_dir in _entries(root):
        patient = patient_dir.name
        if not patient_dir.is_dir():
            if patient_dir.suffix in _SIDE_FILE_SUFFIXES:
                continue  # a sheet or report kept with the data (metsflow.cohort.dicom writes both)
            report.add(patient_dir, "unexpected file (expected <patient>/<YYYY-MM-DD>/ folders)")
            continue
        reasons = ids.id_problems(patient, "patient id")
        if reasons:
            report.add(patient_dir, f"patient skipped: the folder name is not usable: {reasons[0]}")
            continue
        for date_dir in _entries(patient_dir):
            date = date_dir.name
            if not date_dir.is_dir() or not _DATE.match(date):
                report.add(date_dir, "unexpected entry (expected a YYYY-MM-DD folder)")
                continue
            try:
                dt.date.fromisoformat(date)
            except ValueError:
                report.add(date_dir, "folder name is not a real date")
                continue
            study_id = f"{patient}_{date}"
            file_pattern = re.compile(
                rf"^{re.escape(study_id)}_(?P<time>\d{{2}}[-.:]?\d{{2}}(?:[-.:]?\d{{2}})?)_"
                rf"(?P<sequence>{'|'.join(_LONGITUDINAL_SEQUENCE)}){_NIFTI}$",
                re.IGNORECASE,
            )
            candidates: dict[str, list[tuple[str, Path]]] = {}
            images = {p.name for p in _entries(date_dir)}
            for path in _entries(date_dir):
                if _is_sidecar(path, images):
                    continue
                found = file_pattern.match(path.name)
                if not path.is_file() or found is None:
                    report.add(
                        path,
                        f"unexpected entry (expected {study_id}_<time>_"
                        "{PRE,POST,T2,FLAIR}.nii.gz)",
                    )
                    continue
                column = _LONGITUDINAL_SEQUENCE[found["sequence"].upper()]
                candidates.setdefault(column, []).append((_time_key(found["time"]), path))
            files: dict[str, Path] = {}
            for column, acquisitions in candidates.items():
                acquisitions.sort()
                files[column] = acquisitions[-1][1]
                if len(acquisitions) > 1:
                    ignored = ", ".join(path.name for _, path in acquisitions[:-1])
                    report.add(
                        date_dir,
                        f"{len(acquisitions)} {column} acquisitions on {date}: using the latest, "
                        f"{files[column].name}; ignoring {ignored}",
                    )
            if not _has_t1c(files, study_id, date_dir, report):
                continue
            rows.append(
                {
                    "patient_id": patient,
                    "study_id": study_id,
                    "timepoint": date,
                    **{column: str(path) for column, path in files.items()},
                    "label_convention": "internal",
                    "_sort": date,
                }
            )
    return sheet_frame(rows), report.problems


def scan_brats(root: str | os.PathLike) -> pd.DataFrame:
    """Sheet rows for a BraTS-METS folder (absolute paths); problems are logged."""
    frame, _ = _scan_brats(check_root(root))
    return frame


def scan_longitudinal(root: str | os.PathLike) -> pd.DataFrame:
    """Sheet rows for a per-patient/per-date folder (absolute paths); problems are logged."""
    frame, _ = _scan_longitudinal(check_root(root))
    return frame


def detect_layout(root: str | os.PathLike) -> str:
    """'brats' or 'longitudinal' from the folder's top two levels; ValueError otherwise."""
    root = check_root(root)
    entries = _entries(root)
    if (root / "dataset_description.json").is_file():
        return "bids"
    folders = [p for p in entries if p.is_dir()]
    found = []
    if any(_BRATS_STUDY.match(p.name) for p in folders):
        found.append("brats")
    others = [p for p in folders if not _BRATS_STUDY.match(p.name)]
    if any(_DATE.match(child.name) and child.is_dir() for p in others for child in p.iterdir()):
        found.append("longitudinal")
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{root} mixes the brats and longitudinal layouts; pass layout=")
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:10])
    more = f" and {len(entries) - 10} more" if len(entries) > 10 else ""
    raise ValueError(
        f"{root} matches no known layout: expected BraTS-MET-XXXXX-YYY/ study folders (brats) "
        f"or <patient>/<YYYY-MM-DD>/ folders (longitudinal); found: {shown or 'nothing'}{more}"
    )


def scan(
    root: str | os.PathLike, layout: str = "auto", labels: str | os.PathLike | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Scan ``root`` in ``layout`` ('auto', 'brats', 'longitudinal', 'bids'): (sheet rows,
    problems). ``labels``: a BIDS derivatives folder with the label maps (bids layout only)."""
    root = check_root(root)
    if layout == "auto":
        layout = detect_layout(root)
    if labels is not None and layout != "bids":
        raise ValueError(f"labels= is for the bids layout (a derivatives folder), not {layout!r}")
    if layout == "bids":
        from metsflow.cohort.bids import scan_bids

        return scan_bids(root, labels=labels)
    if layout == "brats":
        return _scan_brats(root)
    if layout == "longitudinal":
        return _scan_longitudinal(root)
    raise ValueError(f"unknown layout {layout!r}; use 'auto' or one of {LAYOUTS}")


def write_sheet(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write sheet rows as a TSV at ``path`` (atomic), ready for ``read_sheet``.

    Paths inside the sheet's folder are written relative to it, so the sheet moves with the
    data; paths elsewhere stay absolute, because a ``../../..`` path breaks as soon as the
    sheet alone is copied. Relative paths in ``frame`` are taken from the current folder.
    """
    path = Path(path)
    unknown = [c for c in frame.columns if c not in SHEET_COLUMNS]
    if unknown:
        raise ValueError(f"cannot write columns {unknown} to a study sheet ({path})")
    out = frame.reindex(columns=list(SHEET_COLUMNS)).fillna("").astype(str)
    sheet_dir = os.path.abspath(path.parent)
    for column in PATH_COLUMNS:
        out[column] = [_sheet_path(value, sheet_dir) for value in out[column]]
    io.write_table(path, out)
    return path


def _sheet_path(value: str, sheet_dir: str) -> str:
    if not value:
        return ""
    full = os.path.normpath(os.path.abspath(value))
    if full.startswith(sheet_dir.rstrip(os.sep) + os.sep):
        return os.path.relpath(full, sheet_dir)
    return full
