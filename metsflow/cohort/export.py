"""Exports of the final labels: a BIDS derivative dataset and DICOM SEG objects.

BIDS derivatives (``export_bids``): per study
``sub-<p>/ses-<s>/anat/sub-<p>_ses-<s>_space-orig_dseg.nii.gz`` (uint8, internal labels, on the
native T1c grid: the final labels already are) with a JSON sidecar (``SpatialReference``: the
T1c it is aligned to, which ``space-orig`` requires; ``Manual``: a human-confirmed label), and
``..._space-orig_lesions.tsv``, one row per tracked enhancing lesion (``lesion_id`` as in
``metsflow.evaluation.longitudinal``, ``label``, ``volume_mm3``, ``status``, ``n_components``). The dataset
has one ``dseg.tsv`` (index, name, abbreviation, color; it applies to every ``_dseg`` image by
BIDS inheritance), ``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``
with the metsflow version and the model round) and a ``.bidsignore`` for the lesion tables,
which BIDS has no suffix for. The folder passes the BIDS validator (tests/test_export.py).

DICOM SEG (``write_dicom_seg``): for a study converted from DICOM (``metsflow.cohort.dicom`` recorded
its T1c source series), a highdicom ``Segmentation`` (BINARY) that references the source T1c
instances, one segment per label present, coded with SNOMED CT: category Morphologically
Abnormal Structure (49755003), types Metastasis (128462008) for enhancing tumour, Edema
(79654002), Necrosis (6574001), anatomic region Brain (12738006). The label map is sampled at
each source pixel's centre through the DICOM geometry (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing; LPS) and the NIfTI affine (RAS), so it does not depend on
how the converter ordered or flipped the axes; a pixel centre that is not a voxel centre of the
label grid (a label on another grid) is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

import metsflow
from metsflow.cohort.bids import dseg_path
from metsflow.core import io
from metsflow.core.labels import EDEMA, ENHANCING, INTERNAL_NAMES, NECROSIS

log = logging.getLogger(__name__)

# dseg.tsv rows (BIDS look-up table); colours as in the review colour tables (ITK-SNAP/Slicer)
DSEG_TABLE = pd.DataFrame(
    [
        (ENHANCING, "enhancing tumour", "ET", "#ff0000"),
        (EDEMA, "edema", "ED", "#00ff00"),
        (NECROSIS, "necrosis", "NCR", "#0000ff"),
    ],
    columns=["index", "name", "abbreviation", "color"],
)
_README = """metsflow segmentations of brain metastases (BIDS derivative dataset)

Final labels of an active-learning campaign (model of round {round}): one label map per session,
sub-<p>/ses-<s>/anat/sub-<p>_ses-<s>_space-orig_dseg.nii.gz, on the voxel grid of the
session's contrast-enhanced T1 (SpatialReference in the JSON sidecar; Manual: true for a
human-confirmed label). Labels (dseg.tsv): 1 enhancing tumour, 2 edema, 3 necrosis.
sub-<p>_ses-<s>_space-orig_lesions.tsv: one row per enhancing lesion, tracked over the
subject's sessions (lesion_id), volume in mm^3 on the preprocessed grid, status baseline,
tracked, new or resolved (listed in .bidsignore: BIDS has no suffix for lesion tables).
"""
LESION_COLUMNS = ["lesion_id", "label", "volume_mm3", "status", "n_components"]
# Position-of-voxel tolerance when a DICOM pixel centre is looked up on the label grid (voxels).
GRID_TOLERANCE_VOXELS = 1e-3


def lesions_path(subject: str, session: str) -> str:
    return dseg_path(subject, session).replace("_dseg.nii.gz", "_lesions.tsv")


def dataset_description(model_round: int | None, source: str | None = None) -> dict:
    generated = {
        "Name": "metsflow",
        "Version": metsflow.__version__,
        "Description": "brain metastasis segmentation with active learning"
        + (f"; final model of round {model_round}" if model_round is not None else ""),
    }
    description = {
        "Name": "metsflow segmentations",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
    }
    if source:
        description["SourceDatasets"] = [{"URL": Path(source).absolute().as_uri()}]
    return description


def export_bids(
    studies: pd.DataFrame,
    lesions: pd.DataFrame,
    out_root: str | os.PathLike,
    model_round: int | None,
    source: str | None = None,
) -> pd.DataFrame:
    """Write the derivative dataset; returns one row per study (study_id, status, path, problem).

    ``studies``: study_id, subject, session, label (path, internal convention, native T1c
    grid), t1c (path), manual (bool); rows without a label are skipped. ``lesions``: lesion rows
    (study_id plus ``LESION_COLUMNS``). A study whose label cannot be read or is not on its
    T1c grid is ``failed`` with the problem; the others are written.
    """
    out_root = Path(out_root)
    io.write_json(out_root / "dataset_description.json", dataset_description(model_round, source))
    io.write_table(out_root / "dseg.tsv", DSEG_TABLE)
    io.write_text(out_root / ".bidsignore", "*_lesions.tsv\n")
    io.write_text(out_root / "README", _README.format(round=model_round))
    rows = []
    for study in studies.itertuples(index=False):
        row = {"study_id": study.study_id, "status": "ok", "path": "", "problem": ""}
        if not study.label:
            rows.append({**row, "status": "no_label"})
            continue
        relative = dseg_path(study.subject, study.session)
        try:
            _write_dseg(study, out_root / relative)
        except (ValueError, OSError, io.StudyError) as exc:
            log.warning("study %s: %s", study.study_id, exc)
            rows.append({**row, "status": "failed", "problem": str(exc)})
            continue
        table = lesions[lesions.study_id == study.study_id].reindex(columns=LESION_COLUMNS)
        io.write_table(out_root / lesions_path(study.subject, study.session), table)
        rows.append({**row, "path": relative})
    return pd.DataFrame(rows, columns=["study_id", "status", "path", "problem"])


def _write_dseg(study, target: Path) -> None:
    label = io.load_nifti(study.label, study.study_id, "label")
    t1c = nib.load(str(study.t1c))
    if label.shape[:3] != t1c.shape[:3] or not np.allclose(label.affine, t1c.affine, atol=1e-3):
        raise ValueError(f"label {study.label} is not on the T1c grid of {study.t1c}")
    data = np.asarray(label.dataobj)
    values = set(np.unique(data).astype(int).tolist()) - {0, *INTERNAL_NAMES}
    if values:
        raise ValueError(f"label {study.label} has values {sorted(values)} outside 0-3")
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")  # the validator warns on unset units
    io.save_nifti(target, data, t1c.affine, dtype=np.uint8, header=header)
    sidecar = {
        "SpatialReference": str(Path(study.t1c).absolute()),
        "Manual": bool(study.manual),
        "Description": "final label: "
        + ("human-confirmed" if study.manual else "segmented by the final model"),
    }
    io.write_json(str(target).replace(".nii.gz", ".json"), sidecar)


# ---- DICOM SEG -------------------------------------------------------------------------------


def _segment_descriptions(labels: Sequence[int], manual: bool, model_round: int | None):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    types = {ENHANCING: codes.SCT.Metastasis, EDEMA: codes.SCT.Edema, NECROSIS: codes.SCT.Necrosis}
    names = {ENHANCING: "enhancing tumour", EDEMA: "edema", NECROSIS: "necrosis"}
    algorithm = None
    if not manual:
        algorithm = hd.AlgorithmIdentificationSequence(
            name="metsflow",
            family=codes.cid7162.ArtificialIntelligence,
            version=f"{metsflow.__version__} round {model_round}",
        )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names[value],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=types[value],
            algorithm_type="MANUAL" if manual else "AUTOMATIC",
            algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Brain],
        )
        for number, value in enumerate(labels, start=1)
    ]


def read_source_series(files: Sequence[str | os.PathLike]) -> list:
    """The source instances, sorted along the slice normal (DICOM SEG frame order)."""
    import pydicom

    datasets = [pydicom.dcmread(f) for f in files]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(datasets, key=lambda d: float(np.dot(normal, d.ImagePositionPatient)))


def frame_geometry(datasets: Sequence, affine: np.ndarray) -> np.ndarray:
    """Per source frame, its first pixel centre and column/row steps on a NIfTI grid, in voxel
    coordinates: (n_frames, 3, 3) = [origin, column step, row step].

    DICOM pixel (column c, row r) is at IPP + c * PixelSpacing[1] * X + r * PixelSpacing[0] * Y
    (X, Y the row and column direction cosines of ImageOrientationPatient, LPS); RAS flips the
    first two axes. The map is affine in (c, r), so three vectors per frame describe it.
    """
    to_voxel = np.linalg.inv(affine)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    out = []
    for ds in datasets:
        x, y = np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3))
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        origin = np.asarray(ds.ImagePositionPatient, float) * lps_to_ras
        out.append(
            [
                to_voxel[:3, :3] @ origin + to_voxel[:3, 3],
                to_voxel[:3, :3] @ (column_spacing * x * lps_to_ras),
                to_voxel[:3, :3] @ (row_spacing * y * lps_to_ras),
            ]
        )
    return np.asarray(out)


def _frame_indices(datasets, affine, shape, study_id: str) -> list[np.ndarray]:
    """Integer voxel indices (rows, columns, 3) of each frame's pixels; a pixel centre off the
    grid's voxel centres, or outside the grid, is an error. Why integer steps and corners:
    checking all 11.5 M pixel positions of a 176 x 256 x 256 series in float was 3 of the
    4.2 CPU seconds of a SEG export; an affine map is on the grid everywhere if its origin
    and steps are integer vectors, and inside it if its four corners are."""
    geometry = frame_geometry(datasets, affine)
    rounded = np.rint(geometry)
    off_grid = float(np.abs(geometry - rounded).max())
    steps = rounded.astype(np.int64)
    outside = False
    for ds, (origin, dc, dr) in zip(datasets, steps, strict=True):
        last_c, last_r = int(ds.Columns) - 1, int(ds.Rows) - 1
        corners = origin + np.array([[0, 0], [last_c, 0], [0, last_r], [last_c, last_r]]) @ [dc, dr]
        outside |= bool(((corners < 0) | (corners >= np.asarray(shape[:3]))).any())
    if off_grid > GRID_TOLERANCE_VOXELS or outside:
        raise ValueError(
            f"study {study_id}: the label grid is not the source T1c series' grid "
            f"(pixel centres {off_grid:.3g} voxels off the grid"
            + (", some outside it)" if outside else ")")
        )
    indices = []
    for ds, (origin, dc, dr) in zip(datasets, steps, strict=True):
        r, c = np.mgrid[: int(ds.Rows), : int(ds.Columns)]
        indices.append(origin + c[..., None] * dc + r[..., None] * dr)
    return indices


def label_frames(label: nib.Nifti1Image, datasets: Sequence, study_id: str = "?") -> np.ndarray:
    """The label map sampled at the source pixels: (n_frames, rows, columns), uint8."""
    data = np.asarray(label.dataobj)
    return np.stack(
        [
            data[i[..., 0], i[..., 1], i[..., 2]]
            for i in _frame_indices(datasets, label.affine, label.shape, study_id)
        ]
    ).astype(np.uint8)


def frames_to_grid(
    frames: np.ndarray, datasets: Sequence, reference: nib.Nifti1Image, study_id: str = "?"
) -> np.ndarray:
    """Inverse of ``label_frames``: frame pixels written back onto the reference NIfTI grid."""
    out = np.zeros(reference.shape[:3], dtype=np.uint8)
    indices = _frame_indices(datasets, reference.affine, reference.shape, study_id)
    for frame, i in zip(frames, indices, strict=True):
        out[i[..., 0], i[..., 1], i[..., 2]] = frame
    return out


def write_dicom_seg(
    label_path: str | os.PathLike,
    source_files: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    study_id: str,
    manual: bool,
    model_round: int | None,
) -> list[int]:
    """Write one DICOM SEG of a study's internal label map; returns the labels it holds."""
    import highdicom as hd

    datasets = read_source_series(source_files)
    label = io.load_nifti(label_path, study_id, "label")
    frames = label_frames(label, datasets, study_id)
    present = [v for v in sorted(INTERNAL_NAMES) if (frames == v).any()]
    # BINARY segments, one per label present; an empty label still gets an (empty) object
    # with the enhancing segment, so every exported study has a SEG to open. Empty frames are
    # omitted (highdicom's default): metastases fill few slices, and writing every frame of
    # every segment was most of the time.
    labels = present or [ENHANCING]
    masks = np.stack([frames == v for v in labels], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=masks,
        segmentation_type="BINARY",
        segment_descriptions=_segment_descriptions(labels, manual, model_round),
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="metsflow",
        manufacturer_model_name="metsflow",
        software_versions=metsflow.__version__,
        device_serial_number="0",
        series_description="metsflow segmentation",
    )
    with io.atomic_path(out_path) as tmp:
        seg.save_as(tmp)
    return present


def read_dicom_seg(
    seg_path: str | os.PathLike, source_files: Sequence[str | os.PathLike], reference_nifti
) -> np.ndarray:
    """A DICOM SEG read back with highdicom onto the NIfTI grid of ``reference_nifti``
    (internal label values, from the segments' coded property types)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    seg = hd.seg.segread(str(seg_path))
    datasets = read_source_series(source_files)
    value_of = {
        codes.SCT.Metastasis.value: ENHANCING,
        codes.SCT.Edema.value: EDEMA,
        codes.SCT.Necrosis.value: NECROSIS,
    }
    numbers = seg.get_segment_numbers()
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in datasets], segment_numbers=numbers
    )
    frames = np.zeros(masks.shape[:3], dtype=np.uint8)
    for k, number in enumerate(numbers):
        code = seg.get_segment_description(number).segmented_property_type.value
        frames[masks[..., k] > 0] = value_of[code]
    reference = nib.load(str(reference_nifti))
    return frames_to_grid(frames, datasets, reference)
