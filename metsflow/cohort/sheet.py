"""The study sheet: reading and validating it, and the ``Cohort`` the pipeline plans from.

The sheet is a TSV (CSV when the file name ends in ``.csv``), one row per MRI study, with the
columns of ``metsflow/schemas/studies.schema.yaml``. Empty cells count as missing. Relative paths
are relative to the sheet's folder.

Row numbers in every message are the row a spreadsheet user sees: the header is row 1 and the
first study is row 2 (a blank line or a quoted cell spanning lines counts as one row, as in a
spreadsheet).

Sheets are untrusted input (they are edited by hand and shared between groups), so
``read_sheet`` collects every problem it finds and raises them together in one ``SheetError``:
fixing a 12,000-row sheet one error per run is not workable.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pandas as pd
import yaml

from metsflow.core import ids, io, labels
from metsflow.core.config import SCHEMA_DIR
from metsflow.core.sequences import SHEET_ORDER

SCHEMA_PATH = SCHEMA_DIR / "studies.schema.yaml"

PATH_COLUMNS = (*SHEET_ORDER, "label")
SHEET_COLUMNS = ("patient_id", "study_id", "timepoint", *PATH_COLUMNS, "label_convention")

# A label must lie on the T1c grid: corners of the two grids may differ by at most this (mm).
GRID_TOLERANCE_MM = 1e-3

_INTEGER_TIMEPOINT = re.compile(r"[0-9]+")
# Top-level schema keywords that ``_SheetSchema`` knows how to apply column-wise (see there).
_COLUMNWISE_KEYWORDS = {
    "$schema",
    "$id",
    "title",
    "description",
    "definitions",
    "$defs",
    "type",
    "properties",
    "required",
    "additionalProperties",
}


class SheetError(ValueError):
    """Every problem found in a study sheet; ``problems`` holds one line per problem."""

    def __init__(self, path: str | os.PathLike, problems: Sequence[str]):
        self.path = str(path)
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(
            f"study sheet {self.path}: {len(self.problems)} problem(s) "
            f"(row 1 is the header, row 2 the first study):\n{listing}"
        )


@dataclass(frozen=True)
class Study:
    """One MRI study (one time point of one patient). Paths are absolute."""

    patient_id: str
    study_id: str
    timepoint: str
    order: int  # 0-based position of the study within its patient, by timepoint
    t1: Path | None
    t1c: Path
    t2: Path | None = None
    flair: Path | None = None
    label: Path | None = None
    label_convention: str = "internal"

    def __post_init__(self) -> None:
        labels.check_convention(self.label_convention)

    @property
    def images(self) -> dict[str, Path]:
        """The sequences this study has: name -> path, in ``SHEET_ORDER``."""
        found = {name: getattr(self, name) for name in SHEET_ORDER}
        return {name: path for name, path in found.items() if path is not None}

    def to_record(self) -> dict:
        """Plain types only (paths as strings): the form a Snakemake job receives in params."""
        return {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in asdict(self).items()
        }

    @classmethod
    def from_record(cls, record: dict) -> Study:
        names = {f.name for f in fields(cls)}
        values = {key: value for key, value in record.items() if key in names}
        for key in PATH_COLUMNS:
            if values.get(key):
                values[key] = Path(values[key])
            else:
                values[key] = None
        values["order"] = int(values["order"])
        return cls(**values)


class Cohort:
    """Studies in sheet order, indexed by study id and grouped by patient."""

    def __init__(self, studies: Iterable[Study], source: str | os.PathLike | None = None):
        self.studies: list[Study] = list(studies)
        self.source = None if source is None else Path(source)
        self.by_id: dict[str, Study] = {}
        for study in self.studies:
            if study.study_id in self.by_id:
                raise ValueError(f"study id {study.study_id!r} appears twice in the cohort")
            self.by_id[study.study_id] = study
        # Patients in order of first appearance; each patient's studies by time point.
        grouped: dict[str, list[Study]] = {}
        for study in self.studies:
            grouped.setdefault(study.patient_id, []).append(study)
        self.patients: dict[str, list[Study]] = {
            patient: sorted(studies, key=lambda s: s.order) for patient, studies in grouped.items()
        }
        self._previous: dict[str, Study | None] = {}
        for studies in self.patients.values():
            for before, study in zip([None, *studies[:-1]], studies, strict=True):
                self._previous[study.study_id] = before

    def __len__(self) -> int:
        return len(self.studies)

    def __iter__(self) -> Iterator[Study]:
        return iter(self.studies)

    def __contains__(self, study_id: object) -> bool:
        return study_id in self.by_id

    def __repr__(self) -> str:
        return f"Cohort({len(self.studies)} studies, {len(self.patients)} patients)"

    def previous(self, study_id: str) -> Study | None:
        """The same patient's preceding time point in this cohort; None for a first study.

        In a ``subset`` this is the preceding study *present in the subset*.
        """
        try:
            return self._previous[study_id]
        except KeyError:
            raise KeyError(f"study id {study_id!r} is not in the cohort") from None

    def followups(self) -> list[Study]:
        """Studies that have a previous time point in this cohort, in sheet order."""
        return [s for s in self.studies if self._previous[s.study_id] is not None]

    def subset(self, study_ids: Iterable[str]) -> Cohort:
        """A cohort of the given studies (kept in sheet order, ``order`` values unchanged).

        Unknown ids are an error: a typo must not silently select nothing.
        """
        wanted = set(study_ids)
        unknown = sorted(wanted - set(self.by_id))
        if unknown:
            raise KeyError(f"study ids not in the cohort: {', '.join(unknown)}")
        return Cohort([s for s in self.studies if s.study_id in wanted], source=self.source)

    def to_frame(self, include_order: bool = False) -> pd.DataFrame:
        """The cohort as a sheet (absolute paths, empty string for a missing file).

        Without ``include_order`` the frame has exactly the sheet columns, so it validates
        against the schema and can be written back as a sheet.
        """
        rows = []
        for study in self.studies:
            row = {
                "patient_id": study.patient_id,
                "study_id": study.study_id,
                "timepoint": study.timepoint,
            }
            if include_order:
                row["order"] = study.order
            for column in PATH_COLUMNS:
                path = getattr(study, column)
                row[column] = "" if path is None else str(path)
            row["label_convention"] = study.label_convention
            rows.append(row)
        columns = list(SHEET_COLUMNS)
        if include_order:
            columns.insert(3, "order")
        return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- schema


def _inline_refs(node, root):
    """Replace local ``$ref`` pointers by their targets (the schema has no recursion)."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            target = root
            for part in node["$ref"][2:].split("/"):
                target = target[part]
            return _inline_refs(target, root)
        return {key: _inline_refs(value, root) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(value, root) for value in node]
    return node


class _SheetSchema:
    """The row schema, applied column-wise for speed.

    Validating 11,892 rows one by one with jsonschema takes ~1.5 s. The schema is a flat
    object (per-column value rules + ``required`` + ``additionalProperties: false``), so the
    same verdict is reached by checking the header against ``properties``/``required`` once,
    finding empty required cells with pandas, and running each column's own subschema on that
    column's distinct non-empty values (~0.2 s). A top-level keyword that cannot be applied
    this way (e.g. ``dependentRequired``) is refused when the schema loads rather than
    silently ignored.
    """

    def __init__(self, schema: dict):
        jsonschema.Draft202012Validator.check_schema(schema)
        self.schema = schema
        self.properties: dict[str, dict] = _inline_refs(schema.get("properties", {}), schema)
        self.required: list[str] = list(schema.get("required", []))
        self.closed = schema.get("additionalProperties", True) is False
        unsupported = sorted(set(schema) - _COLUMNWISE_KEYWORDS)
        if unsupported:
            raise ValueError(
                f"study schema uses top-level keyword(s) {unsupported} that read_sheet does not "
                "apply; extend metsflow.cohort.sheet._SheetSchema"
            )
        self.column_validators = {
            column: jsonschema.Draft202012Validator(subschema)
            for column, subschema in self.properties.items()
        }

    def default(self, column: str):
        return self.properties.get(column, {}).get("default")

    def describe(self, column: str) -> str:
        return " ".join(str(self.properties.get(column, {}).get("description", "")).split())

    def value_problems(self, column: str, value: str) -> list[str]:
        """Why ``value`` is not valid in ``column`` (empty list when it is)."""
        validator = self.column_validators[column]
        if validator.is_valid(value):
            return []
        expected = self.describe(column)
        if expected:
            return [f"{column} {value!r} is not valid: expected {expected}"]
        return [f"{column} {value!r}: {error.message}" for error in validator.iter_errors(value)]


@cache
def load_schema(path: str = str(SCHEMA_PATH)) -> _SheetSchema:
    """The parsed study-sheet schema (cached: read once per process)."""
    with open(path) as handle:
        return _SheetSchema(yaml.safe_load(handle))


# --------------------------------------------------------------------------- reading


class _Problems:
    """Problems found in a sheet, each tied to a row (1 = header) and a study id."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int, str]] = []

    def add(self, row: int, study_id: str | None, problem: str) -> None:
        where = "header (row 1)" if row == 1 else f"row {row}"
        if row != 1:
            where += f" (study {study_id})" if study_id else " (no study id)"
        self._items.append((row, len(self._items), f"{where}: {problem}"))

    def __bool__(self) -> bool:
        return bool(self._items)

    def lines(self) -> list[str]:
        return [text for _, _, text in sorted(self._items)]


def _read_cells(path: Path) -> pd.DataFrame:
    """All cells as stripped strings ('' when empty); the first row is the header."""
    sep = "," if ".csv" in [s.lower() for s in path.suffixes] else "\t"
    try:
        frame = pd.read_csv(
            path,
            sep=sep,
            header=None,  # the header is read as data so duplicate names stay visible
            dtype=str,  # ids like 00012 and dates must stay text
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,  # keeps row numbers equal to spreadsheet rows
            encoding="utf-8-sig",  # spreadsheets often write a byte-order mark
            quoting=csv.QUOTE_MINIMAL,
        )
    except FileNotFoundError:
        raise SheetError(path, ["the sheet file does not exist"]) from None
    except pd.errors.EmptyDataError:
        raise SheetError(path, ["the sheet is empty (no header row)"]) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SheetError(
            path, [f"cannot be parsed as {'CSV' if sep == ',' else 'TSV'}: {exc}"]
        ) from None
    return frame.fillna("").apply(lambda column: column.str.strip())


def _check_header(header: list[str], schema: _SheetSchema, problems: _Problems) -> list[str]:
    """Report duplicate, unknown and missing columns; return the usable column names."""
    seen: set[str] = set()
    for name in header:
        if name in seen:
            problems.add(1, None, f"column {name!r} appears more than once")
        seen.add(name)
    known = [name for name in header if name in schema.properties]
    unknown = [name for name in header if name not in schema.properties]
    if unknown and schema.closed:
        hint = ""
        if len(header) == 1 and any(sep in header[0] for sep in ",;\t"):
            hint = " (is the delimiter right? .tsv files are tab-separated, .csv comma-separated)"
        problems.add(
            1,
            None,
            f"unknown column(s) {', '.join(map(repr, unknown))}; allowed columns are "
            f"{', '.join(schema.properties)}{hint}",
        )
    missing = [name for name in schema.required if name not in seen]
    if missing:
        problems.add(1, None, f"missing required column(s) {', '.join(map(repr, missing))}")
    return known


def _parse_timepoint(value: str) -> tuple[str, object] | None:
    """(kind, sort key) of a schema-valid timepoint; None for an impossible date."""
    if _INTEGER_TIMEPOINT.fullmatch(value):
        return "integer", int(value)
    try:
        return "date", dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _check_timepoints(
    patients: pd.Series,
    study_ids: pd.Series,
    timepoints: pd.Series,
    usable: pd.Series,
    problems: _Problems,
) -> None:
    """Per patient: one kind of timepoint, no duplicates, increasing in sheet order."""
    parsed: dict[int, tuple[str, object]] = {}
    for (row, value), ok in zip(timepoints.items(), usable, strict=True):
        if not ok:
            continue
        result = _parse_timepoint(value)
        if result is None:
            problems.add(row, study_ids[row], f"timepoint {value!r} is not a real date/time")
        else:
            parsed[row] = result
    by_patient: dict[str, list[int]] = {}
    for row in parsed:
        by_patient.setdefault(patients[row], []).append(row)
    for patient, patient_rows in by_patient.items():
        first = patient_rows[0]
        first_kind = parsed[first][0]
        mixed = [row for row in patient_rows if parsed[row][0] != first_kind]
        for row in mixed:
            kind = parsed[row][0]
            problems.add(
                row,
                study_ids[row],
                f"timepoint {timepoints[row]!r} is {'an integer order' if kind == 'integer' else 'a date'} "
                f"but patient {patient} uses {'integer orders' if first_kind == 'integer' else 'dates'} "
                f"(row {first}, study {study_ids[first]}); use one kind per patient",
            )
        # Order is checked among the rows of the patient's first kind (the others are wrong).
        patient_rows = [row for row in patient_rows if parsed[row][0] == first_kind]
        seen: dict[object, int] = {}
        latest_row = first
        for row in patient_rows:
            key = parsed[row][1]
            if key in seen:
                other = seen[key]
                problems.add(
                    row,
                    study_ids[row],
                    f"timepoint {timepoints[row]!r} duplicates row {other} (study "
                    f"{study_ids[other]}) of patient {patient}",
                )
                continue
            if seen and key < parsed[latest_row][1]:
                problems.add(
                    row,
                    study_ids[row],
                    f"timepoint {timepoints[row]!r} comes after {timepoints[latest_row]!r} "
                    f"(row {latest_row}, study {study_ids[latest_row]}) of patient {patient}; "
                    "a patient's rows must be in increasing timepoint order",
                )
            seen[key] = row
            if key > parsed[latest_row][1]:
                latest_row = row


def _check_study_ids(
    patients: pd.Series, study_ids: pd.Series, usable: pd.Series, problems: _Problems
) -> None:
    first_row: dict[str, int] = {}
    for row, study_id in study_ids[usable].items():
        if study_id not in first_row:
            first_row[study_id] = row
            continue
        other = first_row[study_id]
        if patients[other] == patients[row]:
            problems.add(row, study_id, f"duplicate study id (also on row {other})")
        else:
            problems.add(
                row,
                study_id,
                f"study id is also used on row {other} for patient {patients[other]}; "
                "study ids must be unique across patients",
            )


def _normalise_roots(roots: Iterable[str | os.PathLike]) -> list[str]:
    return [os.path.realpath(root) for root in roots]


def _path_resolver() -> Callable[[str], str]:
    """``os.path.realpath`` with the resolved folders cached: the 45,741 paths of the
    11,892-study synthetic sheet share their folders, so each path costs one ``lstat`` of its
    last component (measured on 44,808 existing files of ~10 components: 1.29 s with
    ``os.path.realpath``, 0.32 s with this resolver, same results)."""

    @cache
    def real(path: str) -> str:
        head, tail = os.path.split(path)
        if not tail or head == path:
            return path  # the file-system root
        folder = real(head)
        if tail == os.curdir:
            return folder
        if tail == os.pardir:
            return os.path.dirname(folder)
        joined = os.path.join(folder, tail)
        return os.path.realpath(joined) if os.path.islink(joined) else joined

    def resolve(path: str) -> str:
        # Not os.path.abspath: it removes ``..`` lexically, before the links are followed.
        path = os.fspath(path) if os.path.isabs(path) else os.path.join(os.getcwd(), path)
        return real(path.rstrip(os.sep) or os.sep)

    return resolve


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def read_sheet(
    path: str | os.PathLike,
    data_roots: Sequence[str | os.PathLike] | None = None,
    allow_outside_roots: bool = False,
) -> Cohort:
    """Read and validate a study sheet; raise ``SheetError`` listing every problem.

    ``data_roots``: folders every image/label path must stay inside once resolved (``..``,
    absolute paths and symbolic links to files or folders included: ``os.path.realpath`` of
    the path against that of the roots); ``None`` skips the check, an empty sequence means
    the sheet's own folder (the config's default). Cost: see ``_path_resolver``.
    """
    path = Path(path)
    schema = load_schema()
    cells = _read_cells(path)
    problems = _Problems()

    header = list(cells.iloc[0]) if len(cells) else []
    columns = _check_header(header, schema, problems)
    data = cells.iloc[1:].copy()
    data.columns = header
    # Keep the first occurrence of a duplicated column; drop lines left entirely empty.
    data = data.loc[:, ~data.columns.duplicated()]
    data = data[(data != "").any(axis=1)]
    data.index = data.index + 1  # cells row 0 is spreadsheet row 1
    empty = pd.Series("", index=data.index)

    def column(name: str) -> pd.Series:
        return data[name] if name in data.columns else empty

    study_ids = column("study_id")
    patients = column("patient_id")
    valid = pd.DataFrame(True, index=data.index, columns=list(schema.properties))

    for name in columns:
        present = data[name] != ""
        if name in schema.required:
            for row in data.index[~present]:
                problems.add(row, study_ids[row], f"required column {name!r} is empty")
        valid[name] = present
        for value in data.loc[present, name].unique():
            reasons = schema.value_problems(name, value)
            if reasons:
                bad = data.index[data[name] == value]
                valid.loc[bad, name] = False
                for row in bad:
                    for reason in reasons:
                        problems.add(row, study_ids[row], reason)

    # Beyond the schema's pattern: names the results layout uses itself (metsflow.core.ids).
    for name in ("patient_id", "study_id"):
        if name not in columns:
            continue
        for value in data.loc[valid[name], name].unique():
            reasons = ids.id_problems(value, name.replace("_", " "))
            if reasons:
                bad = data.index[data[name] == value]
                valid.loc[bad, name] = False
                for row in bad:
                    problems.add(row, study_ids[row], reasons[0])

    have_ids = all(name in data.columns for name in ("patient_id", "study_id"))
    id_ok = valid["patient_id"] & valid["study_id"] if have_ids else None
    if have_ids:
        _check_study_ids(patients, study_ids, id_ok, problems)
    if have_ids and "timepoint" in data.columns:
        _check_timepoints(
            patients,
            study_ids,
            data["timepoint"],
            id_ok & valid["timepoint"],
            problems,
        )

    # Resolve paths against the sheet's folder and keep them inside the data roots.
    sheet_dir = os.path.abspath(path.parent)
    roots = None
    if data_roots is not None and not allow_outside_roots:
        roots = _normalise_roots(data_roots if len(data_roots) else [sheet_dir])
        realpath = _path_resolver()
    resolved: dict[str, list[str]] = {}
    for name in PATH_COLUMNS:
        values = []
        for row, value in column(name).items():
            if not value:
                values.append("")
                continue
            full = os.path.normpath(os.path.join(sheet_dir, value))
            if roots is not None:
                # Through symbolic links: a link inside the roots may point anywhere. The
                # path checked is the one the jobs will open.
                real = realpath(full)
                if not _inside(real, roots):
                    via = "" if real == full else " (through a symbolic link)"
                    problems.add(
                        row,
                        study_ids[row],
                        f"{name} path {value!r} resolves to {real}{via}, outside the data "
                        f"roots ({', '.join(roots)})",
                    )
            values.append(full)
        resolved[name] = values

    if problems:
        raise SheetError(path, problems.lines())

    default_convention = schema.default("label_convention") or "internal"
    order_within: dict[str, int] = {}
    studies = []
    records = zip(
        patients.tolist(),
        study_ids.tolist(),
        data["timepoint"].tolist(),
        column("label_convention").tolist(),
        *(resolved[name] for name in PATH_COLUMNS),
        strict=True,
    )
    for patient, study_id, timepoint, convention, *paths in records:
        order = order_within.get(patient, 0)
        order_within[patient] = order + 1
        files = {name: Path(p) if p else None for name, p in zip(PATH_COLUMNS, paths, strict=True)}
        studies.append(
            Study(
                patient_id=patient,
                study_id=study_id,
                timepoint=timepoint,
                order=order,
                label_convention=convention or default_convention,
                **files,
            )
        )
    return Cohort(studies, source=path)


# --------------------------------------------------------------------------- file checks


def _grid_corners(shape: Sequence[int]) -> np.ndarray:
    """Homogeneous voxel coordinates of the 8 corner voxel centres of a 3D grid."""
    extent = [(0, n - 1) for n in shape[:3]]
    corners = np.array(np.meshgrid(*extent, indexing="ij")).reshape(3, -1)
    return np.vstack([corners, np.ones(corners.shape[1])])


def _same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage) -> str | None:
    """None when ``a`` and ``b`` share the voxel grid, else why not."""
    if tuple(a.shape[:3]) != tuple(b.shape[:3]):
        return f"shape {tuple(a.shape[:3])} differs from the T1c shape {tuple(b.shape[:3])}"
    corners = _grid_corners(a.shape)
    distance = np.abs(a.affine @ corners - b.affine @ corners)[:3].max()
    if not distance <= GRID_TOLERANCE_MM:
        return (
            f"grid differs from the T1c grid by up to {distance:.4g} mm at the volume corners "
            f"(tolerance {GRID_TOLERANCE_MM} mm); resample the label onto the T1c"
        )
    return None


def _header_problems(
    path: Path, what: str, max_image_mb: float
) -> tuple[nib.spatialimages.SpatialImage | None, list[str]]:
    """Open a NIfTI header only (cheap) and check it as the pipeline's loader does
    (``metsflow.core.io.header_problems``: the same rules, no voxel data read)."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for a non-NIfTI file
        return None, [f"{what} is not a readable NIfTI file: {exc}"]
    return img, io.header_problems(img, what, max_image_mb)


def check_cohort(
    cohort: Cohort, deep: bool = False, max_image_mb: float = io.MAX_IMAGE_MB
) -> pd.DataFrame:
    """Problems with the cohort's files, for all studies at once; never raises.

    Always: every listed file exists, is a regular readable file, and no file is listed
    twice (a copy-paste slip in the sheet). With ``deep``: each NIfTI header is opened
    (header only, no voxel data) and checked as the pipeline's loader checks it (3D,
    orientation, finite affine, plausible spacing that pixdim agrees with, at most
    ``max_image_mb`` of voxel data), and a label must lie on its T1c grid. Truncated voxel data is only found when the study is loaded
    (``metsflow.core.io.load_nifti``).

    Returns a DataFrame with columns study_id, file, problem (empty when all is well).
    """
    rows: list[dict[str, str]] = []

    def report(study: Study, path: Path, problem: str) -> None:
        rows.append({"study_id": study.study_id, "file": str(path), "problem": problem})

    users: dict[Path, list[tuple[str, str]]] = {}
    for study in cohort.studies:
        files = dict(study.images)
        if study.label is not None:
            files["label"] = study.label
        headers = {}
        for what, path in files.items():
            users.setdefault(path, []).append((study.study_id, what))
            try:
                status = os.stat(path)
            except FileNotFoundError:
                report(study, path, f"{what} file is missing")
                continue
            except OSError as exc:  # e.g. a parent folder without search permission
                report(study, path, f"{what} file cannot be accessed: {exc.strerror}")
                continue
            if not stat.S_ISREG(status.st_mode):
                report(study, path, f"{what} path is not a regular file")
                continue
            if not os.access(path, os.R_OK):
                report(study, path, f"{what} file is not readable (permissions)")
                continue
            if status.st_size == 0:
                report(study, path, f"{what} file is empty")
                continue
            if deep:
                img, found = _header_problems(path, what, max_image_mb)
                for problem in found:
                    report(study, path, problem)
                if img is not None and not found:
                    headers[what] = img
        if deep and "label" in headers and "t1c" in headers:
            mismatch = _same_grid(headers["label"], headers["t1c"])
            if mismatch:
                report(study, study.label, f"label {mismatch}")
    for path, used_by in users.items():
        if len(used_by) > 1:
            listing = ", ".join(f"{sid} {what}" for sid, what in used_by)
            for study_id, _ in used_by:
                rows.append(
                    {
                        "study_id": study_id,
                        "file": str(path),
                        "problem": f"same file listed for {listing}",
                    }
                )
    return pd.DataFrame(rows, columns=["study_id", "file", "problem"])


# --------------------------------------------------------------------------- synthetic


def synthetic_sheet(
    n_studies: int,
    out_path: str | os.PathLike,
    seed: int = 0,
    timepoints: tuple[int, int] = (1, 5),
    root: str | os.PathLike = "/nonexistent/cohort",
) -> Path:
    """Write a valid sheet of ``n_studies`` studies whose files do not exist.

    For planning and dry-run benchmarks at cohort scale: patients get between
    ``timepoints[0]`` and ``timepoints[1]`` dated time points (the last patient is cut to
    hit ``n_studies`` exactly); ~10% of the studies have a label, ~15% lack T2 and ~10%
    FLAIR. Paths are absolute under ``root`` (a workflow run needs it to exist: it is the
    data root, ``metsflow.cohort.preflight``).
    """
    low, high = timepoints
    if n_studies < 0 or not 1 <= low <= high:
        raise ValueError(
            f"need n_studies >= 0 and 1 <= min <= max time points, got {n_studies}, {timepoints}"
        )
    rng = np.random.default_rng(seed)
    root = os.fspath(root)
    rows = []
    patient = 0
    while len(rows) < n_studies:
        patient_id = f"SYN{patient:05d}"
        patient += 1
        count = min(int(rng.integers(low, high + 1)), n_studies - len(rows))
        date = dt.date(2010, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3650)))
        for _ in range(count):
            study_id = f"{patient_id}_{date.isoformat()}"
            folder = f"{root}/{patient_id}/{date.isoformat()}"
            rows.append(
                {
                    "patient_id": patient_id,
                    "study_id": study_id,
                    "timepoint": date.isoformat(),
                    "t1": f"{folder}/t1.nii.gz",
                    "t1c": f"{folder}/t1c.nii.gz",
                    "t2": "" if rng.random() < 0.15 else f"{folder}/t2.nii.gz",
                    "flair": "" if rng.random() < 0.10 else f"{folder}/flair.nii.gz",
                    "label": f"{folder}/label.nii.gz" if rng.random() < 0.10 else "",
                    "label_convention": "internal",
                }
            )
            date += dt.timedelta(days=int(rng.integers(30, 240)))
    out_path = Path(out_path)
    io.write_table(out_path, pd.DataFrame(rows, columns=list(SHEET_COLUMNS)))
    return out_path
