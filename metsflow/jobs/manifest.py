"""Shard manifests, per-study completion stamps, and the per-study failure policy."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from metsflow import __version__
from metsflow.core.io import (
    LabelStoreWriteError,
    StudyError,
    read_json,
    remove_path,
    write_json,
    write_table,
)

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["study_id", "patient_id", "status", "problem", "seconds"]
# Per-study stages add the file a failure was found in (empty when not one file's fault).
FILE_COLUMN = "file"
STAMP_NAME = ".done.json"


def fingerprint(inputs: Iterable[str | os.PathLike | None], params: Any) -> str:
    """Hash of the inputs' identity (path, size, mtime) and the parameters.

    A per-study output folder is reused only when this matches, so a killed job resumes without
    redoing finished studies, and a changed input or parameter is recomputed.
    """
    entries = []
    for path in inputs:
        if path is None:
            entries.append(None)
            continue
        stat = os.stat(path)
        entries.append([str(path), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps([entries, params, __version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_done(out_dir: Path, stamp: str) -> bool:
    marker = Path(out_dir) / STAMP_NAME
    if not marker.exists():
        return False
    try:
        return read_json(marker).get("fingerprint") == stamp
    except (OSError, ValueError):
        return False


def mark_done(out_dir: Path, stamp: str, summary: dict | None = None) -> None:
    write_json(Path(out_dir) / STAMP_NAME, {"fingerprint": stamp, "summary": summary or {}})


def run_study(
    study_id: str,
    patient_id: str,
    out_dir: Path,
    stamp: str | Callable[[], str],
    work: Callable[[], dict | None],
) -> dict:
    """Run ``work`` for one study unless its stamp is current; never raise for a study's fault.

    Everything about the study runs under its failure policy, the "already done?" check (and
    ``stamp`` when it is a callable computing the fingerprint) included: a study folder with
    mode 000 used to kill the whole shard from that check (issue #25). On failure the study's
    partial output folder is removed so no later rule can read half of it, and the problem is
    returned for the manifest. A stale folder that cannot be removed (permissions, another
    user's files, NFS ``.nfs*`` files of a process still holding them, a folder inside the
    label store) fails this study with the folder and the error; the shard's other studies go on.
    """
    import time

    out_dir = Path(out_dir)
    start = time.perf_counter()
    try:
        stamp = _current_stamp(study_id, stamp)
        if _done(study_id, out_dir, stamp):
            return _row(study_id, patient_id, "ok", "", 0.0)
        remove_stale(study_id, out_dir)
        summary = work() or {}
        seconds = time.perf_counter() - start
        mark_done(out_dir, stamp, {**summary, "seconds": seconds})
    except StudyError as exc:
        _discard(out_dir)
        log.error("%s", exc)
        row = _row(study_id, patient_id, "failed", str(exc), time.perf_counter() - start)
        return {**row, FILE_COLUMN: exc.path or ""}
    except Exception as exc:  # an unexpected fault quarantines this study, not the shard
        _discard(out_dir)
        log.error("study %s: internal error\n%s", study_id, traceback.format_exc())
        problem = f"study {study_id}: internal error {type(exc).__name__}: {exc}"
        return _row(study_id, patient_id, "failed", problem, time.perf_counter() - start)
    return _row(study_id, patient_id, "ok", "", seconds)


def _current_stamp(study_id: str, stamp: str | Callable[[], str]) -> str:
    if not callable(stamp):
        return stamp
    try:
        return stamp()
    except OSError as exc:
        raise StudyError(
            study_id, f"an input cannot be read: {exc.strerror or exc}", exc.filename
        ) from exc


def _done(study_id: str, out_dir: Path, stamp: str) -> bool:
    try:
        return is_done(out_dir, stamp)
    except OSError as exc:  # e.g. a study folder with mode 000: is_done cannot look inside
        raise StudyError(
            study_id,
            f"output folder cannot be read: {exc.strerror or exc}; fix its permissions (or "
            "remove it) and rerun",
            out_dir,
        ) from exc


def _discard(out_dir: Path) -> None:
    """Remove a failed study's partial folder; never raise (the failure is already reported)."""
    try:
        remove_path(out_dir, ignore_errors=True)
    except LabelStoreWriteError as exc:
        log.error("%s", exc)


def remove_stale(study_id: str, out_dir: Path) -> None:
    """Remove a study's stale or partial output folder of an earlier attempt; a folder that
    cannot be removed is this study's ``StudyError`` (folder, OS error), not the shard's; so is
    one inside the label store (``metsflow.core.io.remove_path`` refuses it)."""
    try:
        remove_path(out_dir)
    except LabelStoreWriteError as exc:
        raise StudyError(study_id, str(exc), out_dir) from exc
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out_dir) else ""
        raise StudyError(
            study_id,
            f"stale output folder cannot be removed: {exc.strerror or exc}{where}; remove it "
            "(or fix its permissions) and rerun",
            out_dir,
        ) from exc


def _row(study_id, patient_id, status, problem, seconds) -> dict:
    return {
        FILE_COLUMN: "",
        "study_id": study_id,
        "patient_id": patient_id,
        "status": status,
        "problem": problem,
        "seconds": round(float(seconds), 3),
    }


def write_manifest(path: str | os.PathLike, rows: list[dict], extra_columns=()) -> None:
    columns = MANIFEST_COLUMNS + [c for c in extra_columns if c not in MANIFEST_COLUMNS]
    write_table(path, pd.DataFrame(rows, columns=columns))


def read_manifests(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    frames = [
        pd.read_csv(p, sep="\t", dtype={"study_id": str, "patient_id": str}, keep_default_na=False)
        for p in paths
    ]
    if not frames:
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def ok_rows(manifests: pd.DataFrame) -> pd.DataFrame:
    """The rows of the studies that went through (status ok): what a later stage may read."""
    return manifests[manifests.status == "ok"]


def ok_studies(manifests: pd.DataFrame) -> set[str]:
    """The ids of ``ok_rows``."""
    return set(ok_rows(manifests).study_id)


def registration_references(manifests: pd.DataFrame) -> dict[str, str]:
    """Registered study -> the study it was registered to (``reference_study``), for the
    studies whose registration went through (``ok_rows``)."""
    registered = ok_rows(manifests)
    return dict(zip(registered.study_id, registered.reference_study.astype(str), strict=True))


def gather_manifests(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> None:
    """Concatenate shard manifests into one table (same columns; ``read_manifests`` reads it)."""
    paths = list(paths)
    table = read_manifests(paths)
    write_table(out, table)
    counts = table.status.value_counts().to_dict() if len(table) else {}
    log.info("%s: %d studies from %d shards %s", out, len(table), len(paths), counts)
