"""Correction burden: how much people had to change the model's pre-segmentation, per round.

The active-learning loop exists to make annotation faster; the figure that shows it is the edit
between what the model proposed (the review package's ``presegmentation.nii.gz``, exported by
the round on the native T1c grid) and the label that was confirmed in the label store. It is
measured the same way whichever way the label arrived (web editor, ``metsflow al import`` of
files, or the simulated annotator): the pipeline compares the two files once the round's batch
is confirmed (rule ``correction_burden``) and writes ``rounds/round_<r>/correction_burden.tsv``.

Per study (``BURDEN_COLUMNS``):

- ``voxels_changed``: voxels whose label differs (any of 0 background, 1 enhancing, 2 edema,
  3 necrosis); ``changed_ml`` is the same in millilitres (voxel volume of the native grid).
- ``changed_<label>``: voxels that entered or left that label (``(pre == L) != (confirmed ==
  L)``). A voxel relabelled from edema to enhancing counts in both, so the three columns can
  add up to more than ``voxels_changed``.
- ``lesion_volume_delta_ml``: confirmed minus pre-segmented lesion volume (signed).
- Lesions are the 26-connected components of the tumour core (enhancing + necrosis,
  ``labels.INTERNAL_GROUPS["whole_lesion"]``), the lesions of the evaluation's lesion-wise F1;
  edema is left out because it merges neighbouring metastases into one component. They are
  matched one-to-one with ``metsflow.evaluation.metrics.match_lesions`` (Hungarian, IoU > 0.25), the
  pre-segmentation as the prediction. ``lesions_added``: confirmed lesions with no match (the
  model missed them); ``lesions_removed``: pre-segmented lesions with no match (false
  positives deleted); ``lesions_resized``: matched pairs whose volume changed by more than
  ``RESIZE_THRESHOLD`` of the pre-segmented volume. A lesion redrawn so much that its IoU falls
  to 0.25 or below counts as one removed and one added. ``lesion_edits`` is the sum of the three.
- ``via`` / ``reviewer`` / ``review_seconds`` come from the label store's history:
  ``via`` (web, files, simulated) and the confirming reviewer of the confirmed version, and the
  sum of the optional ``review_seconds`` (open -> save time, recorded by web saves) over the
  study's versions up to the confirmed one; NaN (shown as "n/a") when no version has it.

Per round (``summarise_rounds``): the number of studies, and the median with the interquartile
range (25th-75th percentile) of each burden figure and of the review time.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from metsflow.active_learning.labelstore import AFFINE_TOLERANCE_MM
from metsflow.core import io, labels
from metsflow.core.layout import (
    BURDEN_NAME,  # noqa: F401 (the table's name, owned by the layout)
    PRESEGMENTATION_NAME,
)

# metsflow.evaluation.metrics (scipy.stats, cc3d) is imported where it is used: the metrics import adds
# 0.4 s to every process that imports this module.

# A matched lesion is "resized" when its volume changed by more than 20% of the pre-segmented
# volume. A one-voxel shell around a ball of diameter d voxels changes its volume by about 6/d,
# so at 1 mm a boundary redrawn all round counts for every lesion up to ~30 mm, while a local
# touch-up of a few voxels on a 10 mm lesion (~520 voxels) does not.
RESIZE_THRESHOLD = 0.2
LESION_VALUES = labels.INTERNAL_GROUPS["whole_lesion"]
# Review packages of labels confirmed before the history recorded ``via`` were imported either
# by the simulated annotator (these reviewer names) or from files with `metsflow al import`.
SIMULATED_REVIEWERS = frozenset({"sim-trainee", "sim-neuroradiologist"})

_PER_LABEL = [f"changed_{name}" for name in labels.INTERNAL_NAMES.values()]
BURDEN_COLUMNS = [
    "round",
    "study_id",
    "via",
    "reviewer",
    "confirmed_version",
    "review_seconds",
    "voxels_changed",
    *_PER_LABEL,
    "changed_ml",
    "lesion_volume_delta_ml",
    "lesions_pre",
    "lesions_confirmed",
    "lesions_added",
    "lesions_removed",
    "lesions_resized",
    "lesion_edits",
    "problem",
]
# Figures summarised per round (median and interquartile range).
_COUNTS = [
    "round",
    "confirmed_version",
    "voxels_changed",
    *_PER_LABEL,
    "lesions_pre",
    "lesions_confirmed",
    "lesions_added",
    "lesions_removed",
    "lesions_resized",
    "lesion_edits",
]
SUMMARY_METRICS = (
    "voxels_changed",
    "changed_ml",
    "lesions_added",
    "lesions_removed",
    "lesions_resized",
    "lesion_edits",
    "review_seconds",
)
SUMMARY_COLUMNS = ["round", "n_studies", "n_timed"] + [
    f"{metric}_{stat}" for metric in SUMMARY_METRICS for stat in ("median", "q1", "q3")
]
_VERSION_FILE = re.compile(r"^v(\d+)_")


def label_burden(
    presegmentation: np.ndarray,
    confirmed: np.ndarray,
    voxel_mm3: float,
    iou_threshold: float | None = None,
    resize_threshold: float = RESIZE_THRESHOLD,
) -> dict:
    """The edit from ``presegmentation`` to ``confirmed`` (internal label maps, same grid).

    ``iou_threshold``: lesion matching threshold, default ``metrics.DEFAULT_IOU_THRESHOLD``.
    """
    from metsflow.evaluation.metrics import DEFAULT_IOU_THRESHOLD, match_lesions

    pre = np.asarray(presegmentation)
    final = np.asarray(confirmed)
    if pre.shape != final.shape:
        raise ValueError(f"pre-segmentation shape {pre.shape} != confirmed label {final.shape}")
    result = {"voxels_changed": int(np.count_nonzero(pre != final))}
    for value, name in labels.INTERNAL_NAMES.items():
        result[f"changed_{name}"] = int(np.count_nonzero((pre == value) != (final == value)))
    result["changed_ml"] = result["voxels_changed"] * voxel_mm3 / 1000.0

    pre_core, final_core = _in_values(pre, LESION_VALUES), _in_values(final, LESION_VALUES)
    result["lesion_volume_delta_ml"] = (
        (int(final_core.sum()) - int(pre_core.sum())) * voxel_mm3 / 1000.0
    )
    iou = DEFAULT_IOU_THRESHOLD if iou_threshold is None else iou_threshold
    match = match_lesions(pre_core, final_core, iou)
    resized = sum(
        1
        for ref, pred, _, _ in match.pairs
        if abs(int(match.ref_sizes[ref]) - int(match.pred_sizes[pred]))
        > resize_threshold * int(match.pred_sizes[pred])
    )
    result.update(
        lesions_pre=match.n_pred,
        lesions_confirmed=match.n_ref,
        lesions_added=match.n_ref - len(match.pairs),
        lesions_removed=match.n_pred - len(match.pairs),
        lesions_resized=resized,
    )
    result["lesion_edits"] = (
        result["lesions_added"] + result["lesions_removed"] + result["lesions_resized"]
    )
    return result


def file_burden(
    presegmentation: str | os.PathLike,
    confirmed: str | os.PathLike,
    study_id: str = "?",
    **kwargs,
) -> dict:
    """``label_burden`` of two NIfTI files on the same grid; raises ``io.StudyError`` naming the
    study and file when one is unreadable or the grids differ."""
    pre = io.load_nifti(presegmentation, study_id, "pre-segmentation")
    final = io.load_nifti(confirmed, study_id, "confirmed label")
    if tuple(pre.shape) != tuple(final.shape):
        raise io.StudyError(
            study_id,
            f"label shape {tuple(final.shape)} is not the pre-segmentation's {tuple(pre.shape)}",
            confirmed,
        )
    difference = float(np.abs(np.asarray(pre.affine) - np.asarray(final.affine)).max())
    if difference > AFFINE_TOLERANCE_MM:
        raise io.StudyError(
            study_id,
            f"label affine differs from the pre-segmentation's by {difference:.4g} mm",
            confirmed,
        )
    voxel_mm3 = float(np.prod(pre.header.get_zooms()[:3]))
    pre_values, final_values = _label_values(pre), _label_values(final)
    # Every figure is a count over labelled voxels or their components, so the box around
    # the labels of both gives the same result: a 1 mm 240x240x155 save's edit summary went
    # from 0.77 to ~0.2 s (most of a web save's CPU time), see bench_review_load --clinical.
    box = _labelled_box(pre_values, final_values)
    # Copied out contiguous (in the files' Fortran order): every comparison below walked the
    # strided box several times more slowly (1 mm, box of 155^3: per-label counts 36 -> 5 ms).
    return label_burden(
        np.array(pre_values[box], order="K"),
        np.array(final_values[box], order="K"),
        voxel_mm3,
        **kwargs,
    )


def _labelled_box(*arrays: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every non-zero voxel of ``arrays`` (one voxel if none)."""
    # Projections, never a full-size "labelled" mask: each array is reduced once along its
    # last axis (contiguous slices in a NIfTI's Fortran order) and once over the others, the
    # other extents come from the small projection (1 mm pair: 45 -> ~3 ms).
    ndim = np.ndim(arrays[0])
    last = functools.reduce(np.logical_or, [_nonzero_along(a, ndim - 1) for a in arrays])
    across = functools.reduce(
        np.logical_or, [_nonzero_along(a, tuple(range(ndim - 1))) for a in arrays]
    )
    box = []
    for axis in range(ndim):
        if axis == ndim - 1:
            hit = np.flatnonzero(across)
        else:
            hit = np.flatnonzero(last.any(axis=tuple(a for a in range(ndim - 1) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 1))
    return tuple(box)


def _nonzero_along(data: np.ndarray, axis) -> np.ndarray:
    """Whether any voxel along ``axis`` is non-zero (max and min: ``any`` converts every voxel
    to bool first, twice as slow)."""
    data = np.asarray(data)
    hit = data.max(axis=axis) != 0
    if data.dtype.kind not in "ub":  # negative values are labelled too
        hit |= data.min(axis=axis) != 0
    return hit


def _in_values(data: np.ndarray, values) -> np.ndarray:
    """``np.isin(data, values)`` for a few label values, as one comparison each (np.isin took
    15 ms on a 1 mm label box, these 1 ms; ``np.logical_or.reduce`` of the list stacks it
    first: 17 ms)."""
    return functools.reduce(np.logical_or, [data == value for value in values])


def _label_values(image) -> np.ndarray:
    """Integer label values; float-stored labels are rounded (as the label store does)."""
    data = np.asanyarray(image.dataobj)
    return np.rint(data).astype(np.int16) if data.dtype.kind == "f" else data


def _version_of(label_file: str | os.PathLike) -> int | None:
    match = _VERSION_FILE.match(Path(label_file).name)
    return int(match.group(1)) if match else None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def review_provenance(history: Iterable[dict], label_file: str | os.PathLike) -> dict:
    """``via``, ``reviewer``, ``confirmed_version`` and ``review_seconds`` of a confirmed label
    from the study's history records (``LabelStore.history``).

    ``review_seconds`` sums the optional field over the versions up to the confirmed one (the
    trainee's and the neuroradiologist's time); NaN when none recorded it (files, simulated).
    """
    version = _version_of(label_file)
    records = [r for r in history if version is None or int(r.get("version", 0)) <= version]
    confirmed = next(
        (
            r
            for r in reversed(records)
            if Path(str(r.get("file", ""))).name == Path(label_file).name
        ),
        {},
    )
    reviewer = str(confirmed.get("reviewer") or "")
    via = confirmed.get("via") or (
        ("simulated" if reviewer in SIMULATED_REVIEWERS else "files") if confirmed else ""
    )
    seconds = [r["review_seconds"] for r in records if _is_number(r.get("review_seconds"))]
    return {
        "via": via,
        "reviewer": reviewer,
        "confirmed_version": version,
        "review_seconds": float(sum(seconds)) if seconds else math.nan,
    }


def round_burden(
    round_index: int,
    annotations: pd.DataFrame,
    review_dir: str | os.PathLike,
    store,
    **kwargs,
) -> pd.DataFrame:
    """Per-study burden of a round's confirmed batch (``BURDEN_COLUMNS``).

    ``annotations``: the round's ``annotations.tsv`` (``study_id``, ``label``: the confirmed
    file that training used); ``review_dir``: the round's review package, whose
    ``<study>/presegmentation.nii.gz`` is what the reviewers started from; ``store``: the
    ``LabelStore`` (for provenance). A study that cannot be compared (a missing or unreadable
    file) gets its ``problem`` and empty figures; the other studies go on.
    """

    rows = []
    for study_id, label in zip(annotations["study_id"], annotations["label"], strict=True):
        study_id = str(study_id)
        row = dict.fromkeys(BURDEN_COLUMNS)
        row.update(round=int(round_index), study_id=study_id, problem="")
        row.update(review_provenance(store.history(study_id), label))
        try:
            row.update(
                file_burden(
                    Path(review_dir) / study_id / PRESEGMENTATION_NAME, label, study_id, **kwargs
                )
            )
        except io.StudyError as exc:
            row["problem"] = str(exc)
        rows.append(row)
    # Counts stay integers in the TSV; a study with a problem leaves them empty.
    return pd.DataFrame(rows, columns=BURDEN_COLUMNS).astype(dict.fromkeys(_COUNTS, "Int64"))


def summarise_rounds(per_study: pd.DataFrame, rounds: Iterable[int] = ()) -> pd.DataFrame:
    """Per round: studies compared, studies with a review time, and the median and quartiles
    (``<metric>_median``, ``_q1``, ``_q3``) of ``SUMMARY_METRICS`` (``SUMMARY_COLUMNS``).

    Studies with a ``problem`` are left out of the figures. ``rounds`` adds rows for rounds
    that have no study (an empty batch after the stop criterion): ``n_studies`` 0, NaN figures.
    """
    rows = []
    for round_index in sorted({*map(int, per_study["round"].dropna()), *map(int, rounds)}):
        part = per_study[per_study["round"] == round_index]
        ok = part[part["problem"].fillna("").astype(str) == ""]
        row = {"round": round_index, "n_studies": len(ok)}
        row["n_timed"] = int(pd.to_numeric(ok["review_seconds"], errors="coerce").notna().sum())
        for metric in SUMMARY_METRICS:
            values = pd.to_numeric(ok[metric], errors="coerce").dropna().to_numpy(dtype=float)
            quartiles = np.percentile(values, [50, 25, 75]) if values.size else [math.nan] * 3
            for stat, value in zip(("median", "q1", "q3"), quartiles, strict=True):
                row[f"{metric}_{stat}"] = float(value)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return frame.astype({"round": int, "n_studies": int, "n_timed": int})


def read_burden_tables(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate per-round ``correction_burden.tsv`` files that exist (empty frame if none)."""
    frames = []
    for path in paths:
        if Path(path).exists():
            frame = pd.read_csv(path, sep="\t", dtype={"study_id": str, "problem": str})
            frames.append(frame)
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=BURDEN_COLUMNS)
    return pd.concat(frames, ignore_index=True)
