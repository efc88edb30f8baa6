"""BIDS in and out: a study sheet from a BIDS dataset, BIDS-derivative names for the results.

In (``scan_bids``, ``metsflow cohort scan --layout bids ROOT [--labels DERIV_ROOT]``), read
with pybids:

- subject -> patient (``patient_id`` = ``sub-<label>``), session -> study (``study_id`` =
  ``sub-<label>_ses-<label>``; a subject without sessions is one study ``sub-<label>``);
- ``T1w`` -> t1, ``T1w`` with any ``ce-`` entity (``ce-gadolinium``, ``ce-Gd``...) -> t1c,
  ``T2w`` -> t2, ``FLAIR`` -> flair (``anat`` only). A T2w/FLAIR with a ``ce-`` entity is
  reported and not used (the models are trained on non-enhanced T2/FLAIR);
- time points: a session's time is its ``acq_time`` in ``sub-<p>_sessions.tsv``, else the
  earliest ``acq_time`` of its files in ``sub-<p>_ses-<s>_scans.tsv``. When every session of
  a subject has one and they differ, the sheet's ``timepoint`` is that date-time; otherwise
  sessions are ordered by label (natural order: ses-2 before ses-10) and numbered 0, 1, ...
  (a subject with only some sessions timed is reported);
- several files of one contrast in a session (runs, ``acq-`` variants): the latest acquisition
  is used -- the latest ``acq_time`` in scans.tsv when every candidate has one, else the
  highest ``run`` index, else the last file name -- the same "latest wins" rule as the dated
  layout of ``metsflow.cohort.scan``; every such choice is reported;
- a session without a contrast-enhanced T1w is reported and left out (the sheet requires a T1c);
- labels (``--labels``): a derivatives dataset's ``_dseg`` image of the session on the native
  grid (no ``space`` entity or ``space-orig``). Its convention comes from the derivative's
  ``dseg.tsv`` (the index named enhancing/ET: 1 internal, 3 BraTS); without one it is taken as
  internal and reported. Several candidate label images are reported and none is used.

Out: ``bids_entities`` gives a study's BIDS subject and session labels (the inverse of the
naming above; other ids are reduced to their letters and digits, and a clash is an error), and
``dseg_path`` the derivative file name of a study's label map (``metsflow.cohort.export`` writes them).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from metsflow.cohort.readers import ScanReport, check_root, sheet_frame

log = logging.getLogger(__name__)
# pybids' schema package logs which bundled schema it loads at INFO on every scan: not news.
logging.getLogger("bidsschematools").setLevel(logging.WARNING)

# BIDS suffix -> sheet column (T1w is split on the ce- entity below)
_SUFFIXES = {"T1w": "t1", "T2w": "t2", "FLAIR": "flair"}
_NIFTI_EXTENSIONS = [".nii.gz", ".nii"]
_STUDY_ID = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?$")
_NON_ALNUM = re.compile(r"[^A-Za-z0-9]")
_BIDS_LABEL = re.compile(r"^[A-Za-z0-9]+$")
# dseg.tsv rows that name the enhancing class (name or abbreviation)
_ENHANCING_NAME = re.compile(r"(?<!non)(?<!non-)(?<!non )enhanc", re.IGNORECASE)


def _natural_key(label: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def _parse_acq_time(value) -> dt.datetime | None:
    """A BIDS ``acq_time`` (``YYYY-MM-DDThh:mm:ss[.ffffff][Z]``) to the second; None if absent."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip()
    if not text or text.lower() == "n/a":
        return None
    text = text.removesuffix("Z")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.replace(tzinfo=None, microsecond=0)


def _read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def _session_times(root: Path, subject: str, sessions: list[str]) -> dict[str, dt.datetime]:
    """Session label -> acquisition time from sessions.tsv, else from the session's scans.tsv."""
    times: dict[str, dt.datetime] = {}
    sessions_tsv = root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    if sessions_tsv.is_file():
        table = _read_tsv(sessions_tsv)
        if {"session_id", "acq_time"} <= set(table.columns):
            for row in table.itertuples(index=False):
                parsed = _parse_acq_time(row.acq_time)
                if parsed is not None:
                    times[str(row.session_id).removeprefix("ses-")] = parsed
    for session in sessions:
        if session in times:
            continue
        scan_times = [t for t in _scan_times(root, subject, session).values() if t is not None]
        if scan_times:
            times[session] = min(scan_times)
    return times


def _scan_times(root: Path, subject: str, session: str | None) -> dict[str, dt.datetime | None]:
    """File path (absolute) -> acq_time from the session's scans.tsv."""
    folder = root / f"sub-{subject}"
    name = f"sub-{subject}"
    if session is not None:
        folder = folder / f"ses-{session}"
        name += f"_ses-{session}"
    scans_tsv = folder / f"{name}_scans.tsv"
    if not scans_tsv.is_file():
        return {}
    table = _read_tsv(scans_tsv)
    if not {"filename", "acq_time"} <= set(table.columns):
        return {}
    return {
        os.path.normpath(folder / row.filename): _parse_acq_time(row.acq_time)
        for row in table.itertuples(index=False)
    }


def _pick_latest(files: list, times: dict[str, dt.datetime | None]) -> tuple[object, str]:
    """The file used among several of one contrast, and the rule that chose it."""
    acquired = [times.get(os.path.normpath(f.path)) for f in files]
    if all(t is not None for t in acquired) and len(set(acquired)) == len(acquired):
        return max(zip(acquired, files, strict=True), key=lambda p: p[0])[1], "latest acq_time"
    runs = [f.entities.get("run") for f in files]
    if all(r is not None for r in runs) and len(set(map(int, runs))) == len(runs):
        return max(zip(map(int, runs), files, strict=True), key=lambda p: p[0])[1], "highest run"
    return sorted(files, key=lambda f: f.filename)[-1], "last file name"


def _column(bids_file) -> str | None:
    suffix = bids_file.entities.get("suffix")
    if suffix == "T1w":
        return "t1c" if bids_file.entities.get("ceagent") else "t1"
    return _SUFFIXES.get(suffix)


class _Labels:
    """Label images and their convention from a BIDS derivatives folder."""

    def __init__(self, root: Path, report: ScanReport):
        from bids import BIDSLayout

        self.root = root
        self.layout = BIDSLayout(root, validate=False, is_derivative=True)
        self.convention = self._convention(root / "dseg.tsv", report)

    def _convention(self, lookup: Path, report: ScanReport) -> str:
        if not lookup.is_file():
            report.add(
                lookup,
                "no dseg.tsv in the label folder: labels taken as internal "
                "(1 enhancing, 2 edema, 3 necrosis)",
            )
            return "internal"
        try:
            table = _read_tsv(lookup)
            enhancing = [
                int(row["index"])
                for _, row in table.iterrows()
                if _ENHANCING_NAME.search(str(row.get("name", "")))
                or str(row.get("abbreviation", "")).strip().upper() == "ET"
            ]
        except (ValueError, KeyError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{lookup}: not a usable dseg.tsv (columns index, name[, abbreviation] with "
                f"integer indices): {type(exc).__name__}: {exc}"
            ) from None
        if enhancing == [1]:
            return "internal"
        if enhancing == [3]:
            return "brats"
        raise ValueError(
            f"{lookup}: cannot tell the label convention (enhancing class at index "
            f"{enhancing or 'none'}; expected 1 for internal or 3 for BraTS)"
        )

    def find(self, subject: str, session: str | None, study_id: str, report: ScanReport):
        # session None: only files without a session entity (pybids' reading of None)
        query = {"subject": subject, "session": session, "suffix": "dseg"}
        query["extension"] = _NIFTI_EXTENSIONS
        # this session's own anat folder only (as _session_files: pybids cuts odd labels short)
        anat = self.root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
        found = [
            f
            for f in self.layout.get(**query)
            if f.entities.get("space") in (None, "orig") and Path(f.path).parent == anat
        ]
        if len(found) > 1:
            names = ", ".join(sorted(f.filename for f in found))
            report.add(
                self.root, f"study {study_id}: {len(found)} label images ({names}); none used"
            )
            return None
        return Path(found[0].path) if found else None


def scan_bids(
    root: str | os.PathLike, labels: str | os.PathLike | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Sheet rows (absolute paths) and the problems found, for a BIDS dataset at ``root``."""
    from bids import BIDSLayout

    root = check_root(root)
    report = ScanReport(root)
    _check_description(root / "dataset_description.json")
    usable = _label_folders(root, report)
    layout = BIDSLayout(root, validate=False)
    label_source = _Labels(check_root(labels), report) if labels else None
    rows = []
    for subject in sorted(layout.get_subjects(), key=_natural_key):
        patient_id = f"sub-{subject}"
        if subject not in usable:  # pybids' reading of a folder reported by _label_folders
            continue
        sessions = sorted(usable[subject], key=_natural_key)
        timepoints = _timepoints(root, subject, sessions, report)
        for session in sessions or [None]:
            study_id = patient_id + (f"_ses-{session}" if session is not None else "")
            files = _session_files(layout, root, subject, session, study_id, report)
            if "t1c" not in files:
                report.add(
                    root / patient_id / (f"ses-{session}" if session else ""),
                    f"study {study_id} skipped: no contrast-enhanced T1w (a T1w with a ce- "
                    "entity); the sheet requires a T1c",
                )
                continue
            row = {
                "patient_id": patient_id,
                "study_id": study_id,
                "timepoint": timepoints[session][0],
                **{column: str(path) for column, path in files.items()},
                "label_convention": "internal",
                "_sort": timepoints[session][1],
            }
            if label_source is not None:
                label = label_source.find(subject, session, study_id, report)
                if label is not None:
                    row.update(label=str(label), label_convention=label_source.convention)
            rows.append(row)
    return sheet_frame(rows), report.problems


def _check_description(path: Path) -> None:
    """A BIDS root has a dataset_description.json that is a JSON object."""
    if not path.is_file():
        raise ValueError(f"{path.parent} is not a BIDS dataset: no dataset_description.json")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(description, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(description).__name__}")


def _label_folders(root: Path, report: ScanReport) -> dict[str, list[str]]:
    """Subject label -> its session labels, from the folders themselves; every ``sub-``/``ses-``
    folder whose label is not a BIDS label (letters and digits) is reported and skipped. pybids
    drops such folders silently (``sub-ü``) or cuts their label (``sub-x.y`` became subject x,
    ``ses-a b`` session a), so it is asked only about the folders listed here."""
    found: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith("sub-") or not entry.is_dir():
            continue
        subject = entry.name.removeprefix("sub-")
        if not _BIDS_LABEL.match(subject):
            report.add(entry, f"subject skipped: {subject!r} is not a BIDS label (letters, digits)")
            continue
        sessions = []
        for folder in sorted(entry.iterdir()):
            if not folder.name.startswith("ses-") or not folder.is_dir():
                continue
            session = folder.name.removeprefix("ses-")
            if _BIDS_LABEL.match(session):
                sessions.append(session)
            else:
                report.add(
                    folder, f"session skipped: {session!r} is not a BIDS label (letters, digits)"
                )
        if sessions or not any(f.name.startswith("ses-") for f in entry.iterdir()):
            found[subject] = sessions
    return found


def _timepoints(
    root: Path, subject: str, sessions: list[str], report: ScanReport
) -> dict[str | None, tuple[str, object]]:
    """Session -> (sheet timepoint, sort key): acquisition times when usable, else label order.

    Sort keys are text (ISO date-times, or zero-padded indices) so that one column sorts the
    rows of subjects of both kinds."""
    if not sessions:
        return {None: ("0", "0")}
    times = _session_times(root, subject, sessions)
    timed = [s for s in sessions if s in times]
    if len(timed) == len(sessions) and len(set(times.values())) == len(sessions):
        return {s: (times[s].isoformat(timespec="seconds"),) * 2 for s in sessions}
    if timed:
        report.add(
            root / f"sub-{subject}",
            f"acq_time known for {len(timed)} of {len(sessions)} sessions (or repeated): "
            "sessions ordered by label instead",
        )
    return {s: (str(k), f"{k:09d}") for k, s in enumerate(sessions)}


def _session_files(
    layout, root: Path, subject: str, session: str | None, study_id: str, report: ScanReport
) -> dict[str, Path]:
    query = {
        "subject": subject,
        "datatype": "anat",
        "suffix": ["T1w", "T2w", "FLAIR"],
        "extension": _NIFTI_EXTENSIONS,
        "session": session,
    }
    candidates: dict[str, list] = {}
    # Only this session's own anat folder (pybids may file another folder's images under a
    # label it cut short).
    anat = root / f"sub-{subject}" / (f"ses-{session}" if session is not None else "") / "anat"
    for bids_file in layout.get(**query):
        if Path(bids_file.path).parent != anat:
            continue
        column = _column(bids_file)
        if column in ("t2", "flair") and bids_file.entities.get("ceagent"):
            report.add(
                Path(bids_file.path),
                f"study {study_id}: contrast-enhanced {bids_file.entities['suffix']} not used",
            )
            continue
        candidates.setdefault(column, []).append(bids_file)
    times = _scan_times(root, subject, session) if candidates else {}
    files: dict[str, Path] = {}
    for column, found in sorted(candidates.items()):
        chosen = found[0]
        if len(found) > 1:
            chosen, rule = _pick_latest(found, times)
            others = ", ".join(sorted(f.filename for f in found if f is not chosen))
            report.add(
                Path(chosen.path).parent,
                f"study {study_id}: {len(found)} {column} images: using {chosen.filename} "
                f"({rule}); ignoring {others}",
            )
        files[column] = Path(chosen.path)
    return files


# ---- out -------------------------------------------------------------------------------------


def bids_entities(patient_id: str, study_id: str) -> tuple[str, str]:
    """BIDS (subject, session) labels of a study.

    A study id made by ``scan_bids`` (``sub-<p>_ses-<s>``) maps back to its own labels; any other
    id keeps its letters and digits: patient ``P-001`` is ``sub-P001``, its study ``P-001_T2``
    is ``ses-T2`` (the study id without the patient prefix) or, when nothing is left, the whole
    study id.
    """
    match = _STUDY_ID.match(study_id)
    if match and match["ses"] and patient_id == f"sub-{match['sub']}":
        return match["sub"], match["ses"]
    subject = _NON_ALNUM.sub("", patient_id.removeprefix("sub-"))
    rest = study_id.removeprefix(patient_id) if study_id != patient_id else ""
    session = _NON_ALNUM.sub("", rest) or _NON_ALNUM.sub("", study_id)
    if not subject or not session:
        raise ValueError(f"study {study_id}: no letters or digits for a BIDS label")
    return subject, session


def entity_table(studies: Iterable[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """study_id -> (subject, session) for (patient_id, study_id) pairs; clashes are one error."""
    mapping: dict[str, tuple[str, str]] = {}
    owner: dict[tuple[str, str], str] = {}
    clashes = []
    for patient_id, study_id in studies:
        entities = bids_entities(patient_id, study_id)
        if entities in owner and owner[entities] != study_id:
            clashes.append(
                f"{owner[entities]} and {study_id} -> sub-{entities[0]}_ses-{entities[1]}"
            )
        owner.setdefault(entities, study_id)
        mapping[study_id] = entities
    if clashes:
        raise ValueError("studies map to the same BIDS subject/session: " + "; ".join(clashes))
    return mapping


def dseg_path(subject: str, session: str) -> str:
    """Relative path of a study's label map in the derivative dataset."""
    return f"sub-{subject}/ses-{session}/anat/sub-{subject}_ses-{session}_space-orig_dseg.nii.gz"
