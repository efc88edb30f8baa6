"""The human label store: the only place where refined and confirmed labels live.

Layout (one folder per study)::

    <root>/LABELSTORE.json                 marker: "this folder is a metsflow label store"
    <root>/<study_id>/v001_refined.nii.gz  label files, read-only (0o444) once written
    <root>/<study_id>/v002_confirmed.nii.gz
    <root>/<study_id>/.v001.claim          version reservations (created with O_EXCL)
    <root>/<study_id>/.lock                per-study lock file (flock), held while a version is made
    <root>/<study_id>/history.jsonl        append-only provenance, one JSON object per version

Rules, because this is human work that took a neuroradiologist's time:
- A file is never replaced or deleted. A correction is a new version.
- Version creation is atomic across processes and threads: every writer (``metsflow al import``,
  the review server, the simulated annotator) takes an exclusive ``flock`` on the study's
  ``.lock`` around check-not-confirmed + optional base-version check + claim + link + history
  append. So two confirmations of one study at the same moment can never both pass the
  confirmed-label rule: the second one waits, then sees the first one's confirmed version and is
  refused. (flock works between processes and, through separate open file descriptions, between
  threads; on NFSv4 Linux maps it to a byte-range lock the server arbitrates.)
- Version numbers are still reserved by creating ``.vNNN.claim`` with ``O_CREAT | O_EXCL`` and
  the label file is put in place with ``os.link`` (which fails if the name exists), so even a
  writer that does not take the lock (an older metsflow) can never take the same version or
  overwrite another's file.
- Once a study has a confirmed label, further imports (of any stage) are refused unless the
  caller passes ``override=True`` with a reason, which is recorded in the history.
- Optimistic versioning: ``import_label(..., base_version=N)`` (N = the latest version the
  editor started from, 0 for none) raises ``StaleLabelError`` naming the versions and who saved
  them when the study's latest version is no longer N, so a concurrent edit is never lost
  silently.
- Stored labels are normalised to uint8 internal labels on the reference (native T1c) affine,
  after checking the submitted file's grid matches it; the submitted file's sha256 is kept. A
  submitted file that already is that (gzip NIfTI-1, uint8, unscaled, 3D, sform equal to the
  reference affine and qform within tolerance: what the review editor sends, and the store's
  own versions) is stored byte for byte after the same checks instead of being re-encoded.
- Callers may add provenance fields (``provenance={"via": "web", "review_seconds": 312}``) to
  the history record; they cannot replace the store's own fields. ``via`` says how the label
  arrived: ``files`` (``import_batch`` / ``metsflow al import``), ``web`` (the review server,
  with ``review_seconds`` from opening the study to saving it) or ``simulated`` (the
  simulated annotator); records written before it existed have none (files).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import getpass
import json
import os
import re
import shutil
import socket
import stat
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from metsflow.core import ids, io

STAGES = ("refined", "confirmed")
MARKER_NAME = io.LABEL_STORE_MARKER
HISTORY_NAME = "history.jsonl"
LOCK_NAME = ".lock"
STORE_FORMAT = 1
# Shape must match exactly; the affine within this tolerance (mm, and mm per voxel for the
# rotation/zoom part) -- tighter than a voxel, looser than float32 header round-off.
AFFINE_TOLERANCE_MM = 1e-3
ALLOWED_VALUES = frozenset({0, 1, 2, 3})

_LABEL_FILE = re.compile(r"^v(\d{3,})_(refined|confirmed)\.nii\.gz$")
_CLAIM_FILE = re.compile(r"^\.v(\d{3,})\.claim$")
# Study ids become folder names: no separators, no hidden/relative names.
_SAFE_STUDY_ID = ids.SAFE_ID  # the one id pattern (metsflow.core.ids); kept for old imports
# Give up claiming after this many lost races (only reachable under pathological contention).
_MAX_CLAIM_ATTEMPTS = 1000


class LabelImportError(ValueError):
    """A label was refused by the store; names the study and the problem."""

    def __init__(self, study_id: str, problem: str, path: str | os.PathLike | None = None):
        self.study_id = study_id
        self.problem = problem
        self.path = None if path is None else str(path)
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"label for study {study_id}{where} refused: {problem}")


class StaleLabelError(LabelImportError):
    """The study changed since the version the caller started from (optimistic versioning)."""

    def __init__(self, study_id: str, base_version: int, newer: list[dict]):
        self.base_version = int(base_version)
        self.latest_version = max(int(r["version"]) for r in newer)
        self.saved_by = list(dict.fromkeys(str(r.get("reviewer") or "?") for r in newer))
        saved = ", ".join(
            f"v{int(r['version']):03d} {r.get('stage', '?')} by {r.get('reviewer') or '?'}"
            for r in newer
        )
        super().__init__(
            study_id,
            f"stale edit: started from version {self.base_version}, but {saved} was saved "
            "in between; reload the latest version and redo the change",
        )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _load_reference(reference_image, study_id: str) -> nib.Nifti1Image:
    if isinstance(reference_image, nib.spatialimages.SpatialImage):
        return reference_image
    try:
        return io.load_nifti(reference_image, study_id, "reference image")
    except io.StudyError as exc:
        raise LabelImportError(study_id, exc.problem, exc.path) from exc


class LabelStore:
    """Versioned, append-only store of human labels (see module docstring for the layout)."""

    def __init__(
        self,
        root: str | os.PathLike,
        known_studies: Iterable[str] | None = None,
        create: bool = True,
    ):
        """Open (and with ``create``, initialise) the store; ``known_studies`` limits imports
        to the cohort's study ids. ``create=False`` is for read-only callers (status)."""
        self.root = Path(root)
        self.known_studies = None if known_studies is None else {str(s) for s in known_studies}
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            marker = self.root / MARKER_NAME
            if not marker.exists():
                io.write_json(
                    marker, {"format": STORE_FORMAT, "kind": "metsflow human label store"}
                )

    # ------------------------------------------------------------------ reading

    def study_dir(self, study_id: str) -> Path:
        return self.root / study_id

    def versions(self, study_id: str) -> list[dict]:
        """Label files of a study, oldest first: ``{"version", "stage", "path"}``."""
        folder = self.study_dir(study_id)
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            match = _LABEL_FILE.match(entry.name)
            if match:
                found.append(
                    {"version": int(match.group(1)), "stage": match.group(2), "path": entry}
                )
        return sorted(found, key=lambda v: v["version"])

    def latest(self, study_id: str) -> Path | None:
        """The newest label of any stage, or None."""
        versions = self.versions(study_id)
        return versions[-1]["path"] if versions else None

    def confirmed(self, study_id: str) -> Path | None:
        """The newest confirmed label, or None (what training should use)."""
        confirmed = [v for v in self.versions(study_id) if v["stage"] == "confirmed"]
        return confirmed[-1]["path"] if confirmed else None

    def status(self, study_id: str) -> str:
        """ "confirmed" if any confirmed version exists, else "refined" if any, else "none"."""
        stages = {v["stage"] for v in self.versions(study_id)}
        if "confirmed" in stages:
            return "confirmed"
        return "refined" if "refined" in stages else "none"

    def studies(self) -> list[str]:
        """Study ids with at least one stored label, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and _SAFE_STUDY_ID.match(entry.name) and self.versions(entry.name)
        )

    def all_confirmed(self) -> dict[str, Path]:
        """study_id -> newest confirmed label, for every study that has one."""
        result = {}
        for study_id in self.studies():
            path = self.confirmed(study_id)
            if path is not None:
                result[study_id] = path
        return result

    def history(self, study_id: str) -> list[dict]:
        """Provenance records of a study in the order they were written.

        A process killed mid-append can leave a torn line; it is skipped with a warning (the
        label file itself, if it was written, is still listed by ``versions``).
        """
        path = self.study_dir(study_id) / HISTORY_NAME
        if not path.exists():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}: skipping torn line {number}", stacklevel=2)
        return records

    def latest_version(self, study_id: str) -> int:
        """The newest version number of a study, 0 if it has none."""
        versions = self.versions(study_id)
        return versions[-1]["version"] if versions else 0

    def contains(self, path: str | os.PathLike) -> bool:
        root = self.root.resolve()
        target = Path(path).resolve()
        return target == root or root in target.parents

    # ------------------------------------------------------------------ writing

    def import_label(
        self,
        study_id: str,
        path: str | os.PathLike,
        stage: str,
        reviewer: str,
        reference_image,
        source: str | None = None,
        override: bool = False,
        reason: str | None = None,
        note: str | None = None,
        base_version: int | None = None,
        provenance: Mapping[str, object] | None = None,
    ) -> int:
        """Check a human label and store it as a new version; return the version number.

        ``reference_image`` is the study's native T1c (path or nibabel image): the label must
        have its shape and affine (within ``AFFINE_TOLERANCE_MM``). ``source`` records what
        pre-segmented the label (e.g. "round_2/model"). ``base_version``: the version the edit
        started from (0: none); if another version was saved since, ``StaleLabelError``.
        ``provenance``: extra fields for the history record (e.g. ``via``, ``review_seconds``,
        ``comment``). Raises ``LabelImportError``.
        """
        study_id = str(study_id)
        path = Path(path)
        self._check_request(study_id, stage, reviewer, override, reason)
        extra = dict(provenance or {})
        reference = _load_reference(reference_image, study_id)
        label, data = self._checked_label(study_id, path, reference)
        source_sha = io.file_sha256(path)

        folder = self.study_dir(study_id)
        folder.mkdir(parents=True, exist_ok=True)
        # Written once to a private temporary name, then hard-linked under the claimed
        # version name: the final name appears complete or not at all, and is never replaced.
        staging = folder / f".incoming-{uuid.uuid4().hex}.nii.gz"
        if _is_normalised(path, label, reference):
            # Re-encoding a label that already is what it would become costs a 1 mm save
            # ~30 ms of CPU (Fortran-order copy + gzip of 8.9 MB), the largest part of a web
            # save once the voxels are checked (benchmarks/bench_review_load.py --clinical).
            with io.atomic_path(staging, label_store_write=True) as tmp:
                shutil.copyfile(path, tmp)
        else:
            io.save_nifti(staging, data, reference.affine, dtype=np.uint8, label_store_write=True)
        try:
            with self._locked(study_id):
                if base_version is not None:
                    self._check_base_version(study_id, int(base_version))
                version, final = self._claim_and_link(
                    study_id, staging, stage, reviewer, override, reason
                )
                os.chmod(final, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
                record = {
                    "study_id": study_id,
                    "version": version,
                    "stage": stage,
                    "file": final.name,
                    "reviewer": reviewer.strip(),
                    "source": source,
                    "sha256": io.file_sha256(final),
                    "submitted_file": str(path.resolve()),
                    "submitted_sha256": source_sha,
                    "timestamp": _now(),
                    "override": bool(override),
                    "reason": reason,
                    "note": note,
                    "imported_by": _whoami(),
                }
                record.update({k: v for k, v in extra.items() if k not in record})
                self._append_history(study_id, record)
        finally:
            staging.unlink(missing_ok=True)
        return version

    @contextlib.contextmanager
    def _locked(self, study_id: str) -> Iterator[None]:
        """Exclusive per-study lock (blocking) around everything that makes a version."""
        folder = self.study_dir(study_id)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _check_base_version(self, study_id: str, base_version: int) -> None:
        latest = self.latest_version(study_id)
        if latest == base_version:
            return
        newer = [
            r
            for r in self.history(study_id)
            if isinstance(r.get("version"), int) and r["version"] > base_version
        ]
        if not newer:  # label files without history lines (hand-copied): name the files
            newer = [
                {"version": v["version"], "stage": v["stage"], "reviewer": "?"}
                for v in self.versions(study_id)
                if v["version"] > base_version
            ]
        if not newer:  # base_version is ahead of the store: a client bug, not a race
            raise LabelImportError(
                study_id, f"base version {base_version} does not exist (latest is {latest})"
            )
        raise StaleLabelError(study_id, base_version, newer)

    def _check_request(
        self, study_id: str, stage: str, reviewer: str, override: bool, reason: str | None
    ) -> None:
        problems = ids.id_problems(study_id)
        if problems:
            raise LabelImportError(study_id, problems[0])
        if self.known_studies is not None and study_id not in self.known_studies:
            raise LabelImportError(study_id, "unknown study (not in the cohort)")
        if stage not in STAGES:
            raise LabelImportError(study_id, f"stage must be one of {STAGES}, got {stage!r}")
        if not isinstance(reviewer, str) or not reviewer.strip():
            raise LabelImportError(study_id, "a reviewer name is required")
        if override and not (isinstance(reason, str) and reason.strip()):
            raise LabelImportError(study_id, "override=True requires a reason")
        # Checked here to refuse early (before reading the file) and again under the lock.
        self._check_not_confirmed(study_id, override)

    def _check_not_confirmed(self, study_id: str, override: bool) -> None:
        if override:
            return
        confirmed = self.confirmed(study_id)
        if confirmed is not None:
            raise LabelImportError(
                study_id,
                f"already has a confirmed label ({confirmed.name}); a new version needs "
                "override=True with a reason",
            )

    def _checked_label(
        self, study_id: str, path: Path, reference: nib.spatialimages.SpatialImage
    ) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
        """The label image as opened (header) and its voxels as uint8 internal labels, after
        checking its header, its grid (shape and affine against ``reference``) and its
        values. The file is opened once: opening it again for the voxels and once more for
        ``_is_normalised`` took 2 x ~5 ms of a 1 mm web save's CPU (nibabel's header checks)."""
        # Header and grid first, voxels last: a file that inflates to hundreds of MiB is
        # refused on its header or its grid before any of it is decompressed (issue #25).
        try:
            label = io.open_nifti(path, study_id, "label")
        except io.StudyError as exc:
            raise LabelImportError(study_id, exc.problem, exc.path) from exc
        if tuple(label.shape) != tuple(reference.shape[:3]):
            raise LabelImportError(
                study_id,
                f"grid mismatch: label shape {tuple(label.shape)} != reference (native T1c) "
                f"shape {tuple(reference.shape[:3])}",
                path,
            )
        difference = np.abs(np.asarray(label.affine) - np.asarray(reference.affine)).max()
        if difference > AFFINE_TOLERANCE_MM:
            raise LabelImportError(
                study_id,
                f"grid mismatch: label affine differs from the reference (native T1c) affine "
                f"by up to {difference:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm); was it "
                "saved on another image?",
                path,
            )
        try:
            data = io.read_voxels(label, path, study_id, "label")
        except io.StudyError as exc:
            raise LabelImportError(study_id, exc.problem, exc.path) from exc
        if data.dtype.kind in "ui" and data.min() >= 0 and data.max() <= max(ALLOWED_VALUES):
            # Integers within 0..3: every value allowed. min/max take 1 ms on a 1 mm label where
            # np.unique takes 30 ms (it sorts or hashes every voxel).
            return label, data.astype(np.uint8, copy=False)
        values = np.unique(data)
        bad = [
            v.item() for v in values if v != np.round(v) or int(np.round(v)) not in ALLOWED_VALUES
        ]
        if bad:
            shown = ", ".join(str(v) for v in bad[:10])
            raise LabelImportError(
                study_id,
                f"label values {{{shown}}} are not internal labels "
                f"(allowed {sorted(ALLOWED_VALUES)}: 0 bg, 1 enhancing, 2 edema, 3 necrosis); "
                "BraTS-convention files must be converted first",
                path,
            )
        return label, np.round(data).astype(np.uint8)

    def _next_version(self, folder: Path) -> int:
        numbers = [0]
        for entry in folder.iterdir():
            match = _LABEL_FILE.match(entry.name) or _CLAIM_FILE.match(entry.name)
            if match:
                numbers.append(int(match.group(1)))
        return max(numbers) + 1

    def _claim_and_link(
        self,
        study_id: str,
        staging: Path,
        stage: str,
        reviewer: str,
        override: bool,
        reason: str | None,
    ) -> tuple[int, Path]:
        folder = self.study_dir(study_id)
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            # Re-checked on every attempt: losing a race may mean the winner confirmed.
            self._check_not_confirmed(study_id, override)
            version = self._next_version(folder)
            claim = folder / f".v{version:03d}.claim"
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o444)
            except FileExistsError:
                continue  # another importer took this number; try the next one
            with os.fdopen(fd, "w") as handle:
                json.dump({"stage": stage, "reviewer": reviewer, "by": _whoami()}, handle)
            final = folder / f"v{version:03d}_{stage}.nii.gz"
            # The claim makes this name ours; os.link still refuses to replace a file, so even
            # a foreign file under that name (copied in by hand) is never overwritten.
            try:
                os.link(staging, final)
            except FileExistsError:
                continue
            return version, final
        raise LabelImportError(study_id, "could not reserve a version number (contention)")

    def _append_history(self, study_id: str, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        path = self.study_dir(study_id) / HISTORY_NAME
        # One write() on an O_APPEND descriptor: concurrent appenders do not interleave
        # within a line on local and cluster filesystems for lines this short.
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            # After a torn append (crash), start on a fresh line so this record stays whole.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_normalised(
    path: Path, label: nib.spatialimages.SpatialImage, reference: nib.spatialimages.SpatialImage
) -> bool:
    """Whether the (checked) label file at ``path``, opened as ``label``, already is what the
    store would write: gzip NIfTI-1, 3D uint8 without scaling, the reference affine as its
    sform (exactly) and as its qform (within ``AFFINE_TOLERANCE_MM``, the quaternion's
    round-off), both coded. Reads the header only."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"\x1f\x8b":
            return False
    # Not a proxy: ``open_nifti`` dropped a trailing 4th axis, so the file is 4D (re-encoded).
    if type(label) is not nib.Nifti1Image or not isinstance(
        label.dataobj, nib.arrayproxy.ArrayProxy
    ):
        return False
    header = label.header
    if header.get_data_dtype() != np.uint8 or len(header.get_data_shape()) != 3:
        return False
    # The proxy's scaling, as nibabel applies it when reading (NaN or 0 slope: none).
    if label.dataobj.slope != 1.0 or label.dataobj.inter != 0.0:
        return False
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if not (sform_code and qform_code):
        return False
    expected = np.asarray(reference.affine, dtype=float)
    return bool(
        np.array_equal(sform, expected) and np.abs(qform - expected).max() <= AFFINE_TOLERANCE_MM
    )


def _whoami() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def unconfirmed_studies(
    selection_path: str | os.PathLike, label_store: str | os.PathLike
) -> list[str]:
    """Studies of a batch (a selection table) without a confirmed label in the store yet, in
    batch order (every study when the store does not exist yet)."""
    import pandas as pd

    selection = pd.read_csv(selection_path, sep="\t", dtype={"study_id": str})
    store = LabelStore(label_store, create=False)
    return [s for s in selection.study_id if store.confirmed(s) is None]
