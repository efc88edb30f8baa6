"""Review packages: hand a selected batch to human reviewers and bring their labels back.

``export_batch`` writes a folder that ITK-SNAP, 3D Slicer and a MONAI Label server open as is::

    <out_dir>/manifest.csv                     one row per study (see MANIFEST_COLUMNS)
    <out_dir>/<study_id>/image_t1c.nii.gz      copy of the native T1c (+ image_<seq>.nii.gz)
    <out_dir>/<study_id>/view_<seq>.nii.gz     of a floating-point image: the web editor's int16
                                               copy of it (``write_view_image``)
    <out_dir>/<study_id>/presegmentation.nii.gz model labels on the native T1c grid (read-only)
    <out_dir>/<study_id>/labels.txt            ITK-SNAP label description file
    <out_dir>/<study_id>/metsflow.ctbl         3D Slicer colour table
    <out_dir>/<study_id>/assists.json (+ suggestions, fg_prob_u8, previous_*.nii.gz)
                                               review assists (metsflow.active_learning.assists)
    <out_dir>/monailabel/<study_id>.nii.gz     MONAI Label LocalDatastore: images ...
    <out_dir>/monailabel/labels/original/<study_id>.nii.gz   ... pre-segmentations
    <out_dir>/monailabel/labels/final/         ... where MONAI Label saves corrected labels
    <out_dir>/monailabel/datastore_v2.json     LocalDatastore index (name, objects{id: ...})

The reviewer saves the corrected label as ``<study_id>/segmentation.nii.gz`` (ITK-SNAP:
Segmentation > Save As) or submits it in MONAI Label (lands in ``labels/final``).
``presegmentation.nii.gz`` is read-only so an in-place "Save" fails loudly instead of silently
turning the model output into an unlabelled correction.

``import_batch`` moves corrected labels into the ``LabelStore`` (the only place human work is
kept) and updates the manifest status. Exporting never writes the label store (it reads it only
for a follow-up's previous label, an assist).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from metsflow.active_learning.assists import write_assists
from metsflow.active_learning.burden import file_burden
from metsflow.active_learning.labelstore import (
    AFFINE_TOLERANCE_MM,
    ALLOWED_VALUES,
    STAGES,
    LabelImportError,
    LabelStore,
)
from metsflow.core import io, labels
from metsflow.core.io import guard_not_in_store
from metsflow.core.layout import PRED, PRED_NATIVE, PRESEGMENTATION_NAME
from metsflow.core.layout import REVIEW_MANIFEST_NAME as MANIFEST_NAME

IMAGE_NAME = "image_{sequence}.nii.gz"
# What the web editor downloads instead of a floating-point image_<seq> (write_view_image).
VIEW_IMAGE_NAME = "view_{sequence}.nii.gz"
SEGMENTATION_NAME = "segmentation.nii.gz"
ITKSNAP_LABELS_NAME = "labels.txt"
SLICER_COLORTABLE_NAME = "metsflow.ctbl"
MONAILABEL_DIR = "monailabel"
MONAILABEL_CONFIG = "datastore_v2.json"
MONAILABEL_EXT = ".nii.gz"

MANIFEST_COLUMNS = [
    "study_id",
    "patient_id",
    "round",
    "model",
    "status",  # pending | refined | confirmed (from the label store)
    "refined_by",
    "confirmed_by",
    "image",  # paths relative to the package folder, so it can be copied to a workstation
    "other_images",  # ";"-separated
    "presegmentation",
    "presegmentation_sha256",
    "segmentation",  # where the reviewer saves the correction
    "itksnap_labels",
    "slicer_colortable",
    "monailabel_image",
    "monailabel_presegmentation",
    "monailabel_final",
    "command",  # ITK-SNAP command line, run from the package folder
    "exported_at",
    "updated_at",
]

# (value, display name, RGB) -- one palette for ITK-SNAP and Slicer so both look the same.
LABEL_COLOURS = (
    (labels.ENHANCING, (230, 40, 40)),
    (labels.EDEMA, (250, 210, 60)),
    (labels.NECROSIS, (60, 110, 255)),
)

Provider = Mapping[str, object] | Callable[[str], object]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provide(provider: Provider | None, study_id: str):
    """Look ``study_id`` up in a mapping or call a function with it (None if absent)."""
    if provider is None:
        return None
    if callable(provider):
        return provider(study_id)
    return provider.get(study_id)


# ---------------------------------------------------------------------- viewer files


def itksnap_label_description() -> str:
    """ITK-SNAP label description file (``IDX -R- -G- -B- -A-- VIS MSH "LABEL"`` lines)."""
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File (metsflow internal labels)",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
        f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8.2f} {0:2d} {0:2d}    "Clear Label"',
    ]
    for value, (red, green, blue) in LABEL_COLOURS:
        name = labels.INTERNAL_NAMES[value]
        lines.append(f'{value:5d} {red:5d} {green:4d} {blue:4d} {1:8.2f} {1:2d} {1:2d}    "{name}"')
    return "\n".join(lines) + "\n"


def slicer_color_table() -> str:
    """3D Slicer discrete colour table (``.ctbl``: ``index name R G B A``, 0-255)."""
    lines = [
        "# Color table file metsflow.ctbl",
        f"# {len(LABEL_COLOURS) + 1} values",
        "0 Background 0 0 0 0",
    ]
    for value, (red, green, blue) in LABEL_COLOURS:
        # Slicer splits on whitespace: names must not contain spaces.
        name = labels.INTERNAL_NAMES[value].replace(" ", "_")
        lines.append(f"{value} {name} {red} {green} {blue} 255")
    return "\n".join(lines) + "\n"


def itksnap_command(study_id: str, other_images: Iterable[str] = ()) -> str:
    """Shell command opening one study of the package in ITK-SNAP, run from the package root."""
    folder = shlex.quote(study_id)
    command = (
        f"cd {folder} && itksnap -g {IMAGE_NAME.format(sequence='t1c')} "
        f"-s {PRESEGMENTATION_NAME} -l {ITKSNAP_LABELS_NAME}"
    )
    others = [shlex.quote(name) for name in other_images]
    if others:
        command += " -o " + " ".join(others)
    return command


# ---------------------------------------------------------------------- manifest


def read_manifest(review_dir: str | os.PathLike) -> pd.DataFrame:
    """The package manifest (all columns as strings), or an empty frame if none yet."""
    path = Path(review_dir) / MANIFEST_NAME
    if not path.exists():
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    return frame


def _write_manifest(review_dir: Path, frame: pd.DataFrame) -> None:
    guard_not_in_store(review_dir / MANIFEST_NAME)
    ordered = frame[MANIFEST_COLUMNS + [c for c in frame.columns if c not in MANIFEST_COLUMNS]]
    with io.atomic_path(review_dir / MANIFEST_NAME) as tmp:
        ordered.to_csv(tmp, index=False)
    _readable(review_dir / MANIFEST_NAME)


# ---------------------------------------------------------------------- export


def _image_paths(images_for: Provider, study_id: str) -> dict[str, Path]:
    provided = provide(images_for, study_id)
    if provided is None:
        raise io.StudyError(study_id, "no images given for the review package")
    if isinstance(provided, str | os.PathLike):
        provided = {"t1c": provided}
    images = {str(seq): Path(path) for seq, path in dict(provided).items() if path is not None}
    if "t1c" not in images:
        raise io.StudyError(study_id, f"review package needs a 't1c' image, got {sorted(images)}")
    for sequence in images:
        if not sequence.replace("_", "").isalnum():
            raise io.StudyError(study_id, f"sequence name {sequence!r} is not a plain word")
    return images


def _checked_presegmentation(study_id: str, path: Path, reference: nib.Nifti1Image) -> np.ndarray:
    preseg = io.load_nifti(path, study_id, "pre-segmentation")
    if tuple(preseg.shape) != tuple(reference.shape):
        raise io.StudyError(
            study_id,
            f"pre-segmentation shape {tuple(preseg.shape)} is not the native T1c shape "
            f"{tuple(reference.shape)} (pass {PRED_NATIVE}, not {PRED})",
            path,
        )
    difference = np.abs(preseg.affine - reference.affine).max()
    if difference > AFFINE_TOLERANCE_MM:
        raise io.StudyError(
            study_id,
            f"pre-segmentation affine differs from the native T1c by {difference:.4g} mm",
            path,
        )
    data = np.asanyarray(preseg.dataobj)
    values = {float(v) for v in np.unique(data)}
    if not values <= {float(v) for v in ALLOWED_VALUES}:
        raise io.StudyError(
            study_id, f"pre-segmentation has non-internal label values {sorted(values)}", path
        )
    return data.astype(np.uint8)


def _readable(path: Path, writable: bool = True) -> None:
    """Open the file to the reviewers' group: atomic writes create owner-only (0600) files,
    but a review package is read by other people. The pre-segmentation is made read-only."""
    mode = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH | (stat.S_IWUSR if writable else 0)
    os.chmod(path, mode)


def _copy_image(source: Path, destination: Path) -> None:
    """Copy a NIfTI byte for byte; an uncompressed ``.nii`` is re-saved gzipped so the
    ``.nii.gz`` name tells viewers the truth."""
    with io.atomic_path(destination) as tmp:
        if source.name.endswith(".nii.gz"):
            shutil.copyfile(source, tmp)
        else:
            nib.save(nib.load(str(source)), tmp)
    _readable(destination)


def write_view_image(source: Path, destination: Path) -> bool:
    """The web editor's copy of a floating-point image: int16 scaled to the image's range
    (NIfTI ``scl_slope``/``scl_inter``, which NiiVue applies; 65,535 grey levels, ample for
    display), half the bytes of float32 to download and inflate in the browser. At 1 mm (240 x
    240 x 155) in Chromium with software WebGL the editor's first render took 3.31-3.54 s with a
    float32 T1c and 2.65-3.39 s (median 2.83, 5 runs) with this copy
    (tests/test_review_assists_browser.py, idle 2-core machine). The byte-for-byte ``image_<seq>`` copy stays what ITK-SNAP, Slicer and the
    label store read. Costs the export ~0.7 CPU-s per 1 mm float image (decode, scale, gzip).
    Returns False (nothing written) for an integer image: the editor reads it as it is."""
    image = nib.load(str(source))
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return False
    view = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
    view.set_data_dtype(np.int16)  # nibabel chooses the slope and intercept that fit the range
    with io.atomic_path(destination) as tmp:
        nib.save(view, tmp)
    _readable(destination)
    return True


def _export_study(
    out_dir: Path, study_id: str, images: dict[str, Path], preseg_path: Path, assists=None
) -> tuple[list[str], str]:
    """Write one study's folder; returns (other image names, presegmentation sha256).

    Built in a hidden staging folder and renamed into place, so an interrupted export never
    leaves a half-written study folder that a re-run would mistake for a finished one.
    """
    t1c = io.load_nifti(images["t1c"], study_id, "T1c")
    preseg = _checked_presegmentation(study_id, preseg_path, t1c)
    staging = out_dir / f".staging-{study_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        other_names = []
        for sequence, source in sorted(images.items()):
            name = IMAGE_NAME.format(sequence=sequence)
            _copy_image(source, staging / name)
            write_view_image(staging / name, staging / VIEW_IMAGE_NAME.format(sequence=sequence))
            if sequence != "t1c":
                other_names.append(name)
        io.save_nifti(staging / PRESEGMENTATION_NAME, preseg, t1c.affine, dtype=np.uint8)
        _readable(staging / PRESEGMENTATION_NAME, writable=False)
        io.write_text(staging / ITKSNAP_LABELS_NAME, itksnap_label_description())
        io.write_text(staging / SLICER_COLORTABLE_NAME, slicer_color_table())
        _readable(staging / ITKSNAP_LABELS_NAME)
        _readable(staging / SLICER_COLORTABLE_NAME)
        if assists is not None:
            write_assists(staging, study_id, t1c, assists)
            for path in staging.iterdir():
                if path.name != PRESEGMENTATION_NAME:  # stays read-only
                    _readable(path)
        sha = io.file_sha256(staging / PRESEGMENTATION_NAME)
        os.rename(staging, out_dir / study_id)
    except BaseException:
        io.remove_path(staging, ignore_errors=True)
        raise
    return other_names, sha


def _export_monailabel(out_dir: Path, study_id: str) -> None:
    """Add one study to the MONAI Label LocalDatastore (image + original label), if absent."""
    store = out_dir / MONAILABEL_DIR
    image = store / f"{study_id}{MONAILABEL_EXT}"
    original = store / "labels" / "original" / f"{study_id}{MONAILABEL_EXT}"
    (store / "labels" / "final").mkdir(parents=True, exist_ok=True)
    if not image.exists():
        _copy_image(out_dir / study_id / IMAGE_NAME.format(sequence="t1c"), image)
    if not original.exists():
        _copy_image(out_dir / study_id / PRESEGMENTATION_NAME, original)


def _update_monailabel_index(out_dir: Path, entries: dict[str, dict], round_index: int) -> None:
    """Merge new studies into ``datastore_v2.json`` (MONAI Label's LocalDatastoreModel).

    Existing objects are kept as they are: MONAI Label adds its own ``final`` label entries
    there when a reviewer submits, and those must survive a re-export.
    """
    path = out_dir / MONAILABEL_DIR / MONAILABEL_CONFIG
    index = (
        io.read_json(path)
        if path.exists()
        else {
            "name": f"metsflow-round-{round_index}",
            "description": "metsflow active-learning review batch (internal labels: "
            "1 enhancing, 2 edema, 3 necrosis)",
            "images_dir": ".",
            "labels_dir": "labels",
            "objects": {},
        }
    )
    objects = index.setdefault("objects", {})
    for study_id, info in entries.items():
        if study_id in objects:
            continue
        name = f"{study_id}{MONAILABEL_EXT}"
        label_file = out_dir / MONAILABEL_DIR / "labels" / "original" / name
        timestamp = int(_dt.datetime.now(_dt.timezone.utc).timestamp())
        objects[study_id] = {
            "image": {"ext": MONAILABEL_EXT, "info": {"ts": timestamp, "name": name, **info}},
            "labels": {
                "original": {
                    "ext": MONAILABEL_EXT,
                    "info": {
                        "ts": timestamp,
                        "name": name,
                        "checksum": f"SHA256:{io.file_sha256(label_file)}",
                        **info,
                    },
                }
            },
        }
    io.write_json(path, index)
    _readable(path)


_SAFE_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _manifest_row(study_id: str, info: dict, other_names: list[str], preseg_sha: str) -> dict:
    ml = f"{MONAILABEL_DIR}/"
    now = _now()
    return {
        "study_id": study_id,
        "patient_id": info["patient_id"],
        "round": str(info["round"]),
        "model": info["model"],
        "status": "pending",
        "refined_by": "",
        "confirmed_by": "",
        "image": f"{study_id}/{IMAGE_NAME.format(sequence='t1c')}",
        "other_images": ";".join(f"{study_id}/{name}" for name in other_names),
        "presegmentation": f"{study_id}/{PRESEGMENTATION_NAME}",
        "presegmentation_sha256": preseg_sha,
        "segmentation": f"{study_id}/{SEGMENTATION_NAME}",
        "itksnap_labels": f"{study_id}/{ITKSNAP_LABELS_NAME}",
        "slicer_colortable": f"{study_id}/{SLICER_COLORTABLE_NAME}",
        "monailabel_image": f"{ml}{study_id}{MONAILABEL_EXT}",
        "monailabel_presegmentation": f"{ml}labels/original/{study_id}{MONAILABEL_EXT}",
        "monailabel_final": f"{ml}labels/final/{study_id}{MONAILABEL_EXT}",
        "command": itksnap_command(study_id, other_names),
        "exported_at": now,
        "updated_at": now,
    }


def export_batch(
    selection: pd.DataFrame | Iterable[str],
    images_for: Provider,
    presegmentation_for: Provider,
    out_dir: str | os.PathLike,
    round_index: int,
    model_id: str,
    patient_for: Provider | None = None,
    assists_for: Provider | None = None,
) -> pd.DataFrame:
    """Write (or extend) a review package for the selected studies.

    ``selection``: a ``select_batch`` frame (``study_id``, optional ``patient_id``) or study
    ids. ``images_for``: mapping/callable study -> native T1c path, or -> ``{sequence: path}``
    including ``"t1c"``. ``presegmentation_for``: study -> its native-grid prediction
    (``Layout.study_prediction``).
    ``patient_for`` overrides the selection's ``patient_id``. ``assists_for``: study ->
    ``assists.StudyAssistInputs`` (or None): the review assists written with the study.

    Never overwrites: a study already in the manifest (maybe being edited) is left as it is
    and reported as ``already_exported``; a complete study folder missing from the manifest
    (an export interrupted before the manifest was written) is listed as ``adopted``. A study with bad input is reported as
    ``failed`` with the problem and the other studies go on. Returns one row per study:
    ``study_id, patient_id, result, problem, directory``.
    """
    out_dir = Path(out_dir)
    guard_not_in_store(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(selection, pd.DataFrame):
        study_ids = [str(s) for s in selection["study_id"]]
        selected_patients = (
            dict(zip(study_ids, selection["patient_id"].astype(str), strict=True))
            if "patient_id" in selection.columns
            else {}
        )
    else:
        study_ids = [str(s) for s in selection]
        selected_patients = {}

    manifest = read_manifest(out_dir)
    listed = set(manifest["study_id"])
    new_rows, results, monailabel_entries = [], [], {}
    for study_id in study_ids:
        patient_id = provide(patient_for, study_id) if patient_for is not None else None
        patient_id = str(
            patient_id if patient_id is not None else selected_patients.get(study_id, "")
        )
        result = {"study_id": study_id, "patient_id": patient_id, "problem": ""}
        result["directory"] = str(out_dir / study_id)
        info = {"patient_id": patient_id, "round": int(round_index), "model": str(model_id)}
        folder = out_dir / study_id
        if study_id in listed:
            results.append({**result, "result": "already_exported"})
            continue
        try:
            if folder.exists():
                # Renamed into place by an export that died before writing the manifest:
                # the folder is complete (it appears only whole), so list it, untouched.
                other_names = sorted(
                    p.name
                    for p in folder.glob(IMAGE_NAME.format(sequence="*"))
                    if p.name != IMAGE_NAME.format(sequence="t1c")
                )
                preseg_sha = io.file_sha256(folder / PRESEGMENTATION_NAME)
                outcome = "adopted"
            else:
                if not _SAFE_FOLDER.match(study_id):
                    raise io.StudyError(study_id, "study id is not usable as a folder name")
                images = _image_paths(images_for, study_id)
                preseg = provide(presegmentation_for, study_id)
                if preseg is None:
                    raise io.StudyError(study_id, "no pre-segmentation given")
                other_names, preseg_sha = _export_study(
                    out_dir, study_id, images, Path(preseg), provide(assists_for, study_id)
                )
                outcome = "exported"
            _export_monailabel(out_dir, study_id)
        except (io.StudyError, OSError) as exc:
            problem = exc.problem if isinstance(exc, io.StudyError) else str(exc)
            results.append({**result, "result": "failed", "problem": problem})
            continue
        monailabel_entries[study_id] = info
        new_rows.append(_manifest_row(study_id, info, other_names, preseg_sha))
        results.append({**result, "result": outcome})

    if monailabel_entries:
        _update_monailabel_index(out_dir, monailabel_entries, round_index)
    if new_rows or not (out_dir / MANIFEST_NAME).exists():
        frames = [f for f in (manifest, pd.DataFrame(new_rows, dtype=str)) if len(f)]
        merged = pd.concat(frames, ignore_index=True) if frames else manifest
        _write_manifest(out_dir, merged.reindex(columns=MANIFEST_COLUMNS, fill_value=""))
    return pd.DataFrame(
        results, columns=["study_id", "patient_id", "result", "problem", "directory"]
    )


# ---------------------------------------------------------------------- import

# The edit of the pre-segmentation (burden.label_burden) shown per imported study.
IMPORT_BURDEN = ["changed_voxels", "lesions_added", "lesions_removed", "lesions_resized"]
IMPORT_COLUMNS = ["study_id", "result", "version", "label_file", *IMPORT_BURDEN, "problem"]


def _corrected_label(review_dir: Path, row: pd.Series) -> tuple[Path | None, str]:
    """The reviewer's corrected label file for a manifest row, or (None, why not)."""
    study_id = row["study_id"]
    candidates = [review_dir / study_id / SEGMENTATION_NAME]
    if row.get("monailabel_final"):
        candidates.append(review_dir / row["monailabel_final"])
    candidates.append(review_dir / MONAILABEL_DIR / "labels" / "final" / f"{study_id}.nii")
    found = list(dict.fromkeys(p for p in candidates if p.exists()))
    if not found:
        preseg = review_dir / study_id / PRESEGMENTATION_NAME
        expected = row.get("presegmentation_sha256", "")
        if expected and preseg.exists() and io.file_sha256(preseg) != expected:
            return None, (
                f"{PRESEGMENTATION_NAME} was modified in place; save the corrected label as "
                f"{study_id}/{SEGMENTATION_NAME}"
            )
        return None, "no corrected label yet"
    if len(found) > 1:
        # Reviewer files: the memory guard and header checks apply before any voxel is read.
        try:
            arrays = [
                np.asanyarray(io.load_nifti(p, study_id, "corrected label").dataobj) for p in found
            ]
        except io.StudyError as exc:
            raise LabelImportError(study_id, exc.problem, exc.path) from exc
        if any(a.shape != arrays[0].shape or not np.array_equal(a, arrays[0]) for a in arrays):
            names = ", ".join(str(p.relative_to(review_dir)) for p in found)
            raise LabelImportError(study_id, f"two different corrected labels: {names}")
    return found[0], ""


def edit_summary(label_path: Path, preseg_path: Path, study_id: str) -> tuple[dict | None, str]:
    """The reviewer's edit of the pre-segmentation (``burden.file_burden``) and its one-line
    description for the label's history note, the same whichever way the label arrives (file
    import or the web editor). None when the files cannot be compared: the label store's own
    checks report those problems."""
    try:
        burden = file_burden(preseg_path, label_path, study_id)
    except (io.StudyError, ValueError):
        return None, "pre-segmentation not comparable"
    return burden, (
        f"{burden['voxels_changed']} voxels changed, lesions +{burden['lesions_added']} "
        f"-{burden['lesions_removed']} resized {burden['lesions_resized']} vs pre-segmentation"
    )


def _reviewers(store: LabelStore, study_id: str) -> dict[str, str]:
    latest = {}
    for record in store.history(study_id):
        latest[record.get("stage")] = record.get("reviewer", "")
    return latest


def import_batch(
    review_dir: str | os.PathLike,
    store: LabelStore,
    stage: str,
    reviewer: str,
    reference_for: Provider | None = None,
) -> pd.DataFrame:
    """Import corrected labels of a review package into ``store`` as ``stage`` by ``reviewer``.

    Per study the corrected label is ``<study>/segmentation.nii.gz`` or MONAI Label's
    ``monailabel/labels/final/<study>.nii.gz`` (both present and different: rejected as
    ambiguous). ``reference_for`` gives the native T1c to check the grid against (mapping or
    callable); by default the package's own ``image_t1c.nii.gz`` copy is used.

    Result per study: ``imported`` (with ``version``), ``unchanged`` (this exact file was
    already imported at this stage), ``already_confirmed`` (the store refuses new versions;
    overriding is a deliberate single-study action), ``rejected`` (with the problem; other
    studies go on) or ``missing``. The manifest's status/refined_by/confirmed_by columns are
    then refreshed from the store and the manifest rewritten atomically.
    """
    review_dir = Path(review_dir)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise ValueError("a reviewer name is required")
    if not (review_dir / MANIFEST_NAME).exists():
        raise FileNotFoundError(f"{review_dir / MANIFEST_NAME} not found: not a review package")
    manifest = read_manifest(review_dir)

    results = []
    for _, row in manifest.iterrows():
        study_id = row["study_id"]
        result = dict.fromkeys(IMPORT_COLUMNS, None)
        result.update(study_id=study_id, problem="")
        try:
            if store.status(study_id) == "confirmed":
                results.append({**result, "result": "already_confirmed"})
                continue
            label_path, why = _corrected_label(review_dir, row)
            if label_path is None:
                results.append({**result, "result": "missing", "problem": why})
                continue
            result["label_file"] = str(label_path)
            submitted = io.file_sha256(label_path)
            earlier = [
                r
                for r in store.history(study_id)
                if r.get("stage") == stage and r.get("submitted_sha256") == submitted
            ]
            if earlier:
                results.append({**result, "result": "unchanged", "version": earlier[-1]["version"]})
                continue
            reference = provide(reference_for, study_id) if reference_for is not None else None
            if reference is None:
                reference = review_dir / study_id / IMAGE_NAME.format(sequence="t1c")
            burden, edit = edit_summary(
                label_path, review_dir / study_id / PRESEGMENTATION_NAME, study_id
            )
            version = store.import_label(
                study_id,
                label_path,
                stage=stage,
                reviewer=reviewer,
                reference_image=reference,
                source=f"{row['model']}/round_{row['round']}",
                note=f"review package {review_dir.name}; {edit}",
                provenance={"via": "files"},
            )
        except (LabelImportError, io.StudyError) as exc:
            results.append({**result, "result": "rejected", "problem": exc.problem})
            continue
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            results.append({**result, "result": "rejected", "problem": str(exc)})
            continue
        except Exception as exc:  # any other fault rejects this study, not the batch
            problem = f"internal error {type(exc).__name__}: {exc}"
            results.append({**result, "result": "rejected", "problem": problem})
            continue
        if burden is not None:
            lesions = {k: burden[k] for k in IMPORT_BURDEN[1:]}
            result.update(changed_voxels=burden["voxels_changed"], **lesions)
        results.append({**result, "result": "imported", "version": version})

    refresh_manifest_status(review_dir, store, manifest)
    return pd.DataFrame(results, columns=IMPORT_COLUMNS)


def refresh_manifest_status(
    review_dir: str | os.PathLike, store: LabelStore, manifest: pd.DataFrame | None = None
) -> None:
    """Rewrite the package manifest's status/refined_by/confirmed_by from the store (also after
    the simulated annotator, so the package says what ``metsflow al status`` says)."""
    review_dir = Path(review_dir)
    if manifest is None:
        manifest = read_manifest(review_dir)
    updated = manifest.copy()
    for index, row in updated.iterrows():
        status = store.status(row["study_id"])
        status = "pending" if status == "none" else status
        reviewers = _reviewers(store, row["study_id"])
        new = {
            "status": status,
            "refined_by": reviewers.get("refined", ""),
            "confirmed_by": reviewers.get("confirmed", ""),
        }
        if any(row[k] != v for k, v in new.items()):
            for key, value in new.items():
                updated.at[index, key] = value
            updated.at[index, "updated_at"] = _now()
    _write_manifest(review_dir, updated)
