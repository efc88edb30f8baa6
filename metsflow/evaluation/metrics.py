"""Segmentation evaluation: voxel, surface and lesion-wise metrics per study and label group.

Which library does what
-----------------------
- Connected components: ``metsflow.core.labels.lesion_components`` (cc3d,
  **26-connectivity**: voxels touching by a face, an edge or a corner belong to the same lesion),
  as in the BraTS 2023 lesion-wise evaluation.
- Surfaces: a surface voxel is a foreground voxel with a face neighbour in the background
  (voxels on the array border count as surface): the mask minus its erosion by the 6-connected
  cross, the edge definition of MONAI's ``get_mask_edges``. Erosion and the BraTS dilation are
  computed with shifted NumPy views (same result as ``scipy.ndimage.binary_erosion`` /
  ``binary_dilation`` with ``border_value=0``, several times faster on large crops).
- Surface distances: ``scipy.spatial.cKDTree`` nearest-neighbour queries between surface voxel
  centres expressed in millimetres (index * spacing), so anisotropic spacing is exact. Lesion
  surfaces are sparse, and a tree over a few thousand surface points is far cheaper than a
  distance transform of the whole (even cropped) volume; the distances are identical to an
  exact Euclidean distance transform between the same surface voxels.
- One-to-one lesion matching: ``scipy.optimize.linear_sum_assignment`` (Hungarian).
- Statistics for the summaries: ``scipy.stats``.

Metric definitions (per study, per label group)
-----------------------------------------------
Groups are sets of internal label values (``metsflow.core.labels.INTERNAL_GROUPS``: enhancing,
edema, necrosis, whole_lesion = enhancing + necrosis). With ``convention="brats"`` the input is
converted with ``labels.to_internal`` and the BraTS regions (``labels.BRATS_GROUPS``: ET, TC, WT)
are reported as well.

- ``dice``: 2 TP / (2 TP + FP + FN) over voxels.
- ``ndsc``: normalised Dice of Raina et al. 2023 ("Tackling bias in the Dice similarity
  coefficient: introducing nDSC for white matter lesion segmentation", ISBI 2023):
  nDSC = 2 TP / (2 TP + FN + k FP), k = (1 - r) h / (r (N - h)), with h the reference positive
  voxels, N all voxels of the image and r a reference positive-class rate. It equals the Dice
  that the same TPR and FPR would give if the study's lesion load were r, so it removes the
  dependence of Dice on lesion load. nDSC equals DSC exactly when r is the study's own positive
  rate h / N (k = 1). The reference study sets r to the cohort-average positive rate: compute it
  with ``cohort_positive_rate`` and pass it as ``nsd_rate``, or evaluate without a rate (ndsc
  is NaN) and fill the column afterwards with ``add_normalised_dice``.
- ``hd95``: 95th-percentile symmetric Hausdorff distance in mm: the larger of the two directed
  95th percentiles (prediction surface -> reference surface and back), as MONAI's
  ``compute_hausdorff_distance(percentile=95)``. The official BraTS code weights surface
  elements by area (DeepMind ``surface_distance``), so values may differ by a fraction of a voxel.
- ``sensitivity`` TP / (TP + FN), ``specificity`` TN / (TN + FP), over all voxels of the image.
- ``pred_volume_mm3``, ``ref_volume_mm3``; the voxel counts ``tp_voxels``, ``fp_voxels``,
  ``fn_voxels``, ``n_voxels`` are kept so nDSC can be recomputed for any r.
- Lesion detection: lesions are 26-connected components. A predicted lesion matches a reference
  lesion when their IoU is strictly greater than ``iou_threshold`` (0.25); matching is
  one-to-one, chosen by the Hungarian algorithm to maximise the summed IoU of eligible pairs.
  ``lesion_tp`` matched pairs, ``lesion_fp`` unmatched predicted lesions, ``lesion_fn`` unmatched
  reference lesions, ``lesion_f1`` 2 TP / (2 TP + FP + FN), ``lesion_tpr`` TP / (TP + FN),
  ``lesion_fdr`` FP / (TP + FP), and ``n_ref_lesions`` / ``n_pred_lesions``. A lesion split in
  two predicted halves therefore counts one TP and one FP; two reference lesions merged into one
  prediction count (at most) one TP and one FN.
- BraTS-METS 2023 lesion-wise scores (``brats_lesion_dice``, ``brats_lesion_hd95``,
  ``brats_lesion_tp/fp/fn``), following the official evaluation code
  (github.com/rachitsaluja/BraTS-2023-Metrics, ``get_challenge_parameters("BraTS-MET")``:
  dilation factor 1, lesion volume threshold 2): the reference mask is dilated once with the
  18-connected 3x3x3 structure (``generate_binary_structure(3, 2)``); 26-connected components
  of the dilated mask define the reference lesions (nearby reference components merge). Every
  predicted component that touches a lesion's dilated region is assigned to that lesion; the
  lesion's Dice and HD95 compare the lesion with the union of those components (HD95 374 mm when
  there are none: a false-negative lesion). Reference lesions of volume <= 2 mm^3 are dropped.
  Predicted components touching no dilated reference lesion are false positives and score
  Dice 0 / HD95 374 mm. The score is the mean over kept lesions and false positives.

Size-resolved detection (small metastases are the common miss)
----------------------------------------------------------------
- A reference lesion's size is its **equivalent-sphere diameter** d = (6 V / pi)^(1/3), V its
  volume in mm^3 (voxel count x voxel volume from the spacing), so anisotropic voxels are exact.
- Size bins are half-open ``[low, high)`` intervals between ``size_bins_mm`` edges (default
  ``DEFAULT_SIZE_BINS_MM`` = 3, 10: bins "< 3 mm", "3-10 mm", ">= 10 mm"): a lesion of exactly
  3 mm is in "3-10 mm", one of exactly 10 mm in ">= 10 mm". Diameters are rounded to
  ``DIAMETER_DECIMALS`` before binning so a lesion built to sit on an edge lands on it.
- Per study and bin: ``n_ref_lesions_<bin>``, ``lesion_tp_<bin>`` and ``lesion_tpr_<bin>``
  (NaN when the study has no lesion of that size: an empty bin is not a perfect score).
- Pooled over studies: ``detection_by_size`` (per bin: reference lesions, detected, sensitivity
  with a Wilson 95% interval) and ``false_positive_rates`` (unmatched predicted lesions per
  study and per patient; a patient without any lesion still counts in the denominator).
- FROC: ``froc`` sweeps a threshold over candidate scores (highest first) and reports lesion
  sensitivity against false positives per patient; ``choose_operating_point`` picks a point by
  a clinical rule (``max_fp_per_patient`` or ``target_sensitivity``).

Empty cases (a ratio with nothing to count takes its best value; this makes TPR, FDR and F1
consistent with each other):
- reference and prediction empty: dice 1, ndsc 1, hd95 0, sensitivity 1, lesion_f1 1,
  lesion_tpr 1, lesion_fdr 0, brats_lesion_dice 1, brats_lesion_hd95 0.
- reference empty, prediction not: dice 0, ndsc 0, hd95 374, sensitivity 1 (no reference voxel
  was missed), lesion_tpr 1, lesion_fdr 1, lesion_f1 0, brats_lesion_dice 0, brats_lesion_hd95 374.
- reference not empty, prediction empty: dice 0, ndsc 0, hd95 374, sensitivity 0, lesion_tpr 0,
  lesion_fdr 0 (nothing was predicted falsely), lesion_f1 0, brats_lesion_dice 0,
  brats_lesion_hd95 374 (when the reference has a lesion above the BraTS size threshold).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage, optimize, spatial

from metsflow.core import io, labels
from metsflow.core.settings import EvaluateSettings, Stage2Settings

log = logging.getLogger(__name__)

# HD95 given to a missing surface: the BraTS maximum (diagonal of the 240x240x155 1 mm grid).
BRATS_MAX_HD95_MM = 374.0
# BraTS-METS 2023 parameters (official lesion-wise evaluation, challenge "BraTS-MET").
BRATS_METS_DILATION_ITERATIONS = 1
BRATS_METS_MIN_LESION_MM3 = 2.0
DEFAULT_IOU_THRESHOLD = EvaluateSettings.iou_threshold  # one owner: the evaluate settings
# The label group of a round's headline figures (mean Dice, nDSC, lesion F1, FROC, overlays).
HEADLINE_GROUP = "whole_lesion"
# Two grids are the same when their affines agree to this (mm / direction cosines).
AFFINE_TOLERANCE = 1e-3

# Reference-lesion size bins (equivalent-sphere diameter, mm; why these: metsflow.core.settings).
DEFAULT_SIZE_BINS_MM = EvaluateSettings.size_bins_mm
# Diameters are rounded (1 nm) before binning: floating-point noise must not move an edge lesion.
DIAMETER_DECIMALS = 6
# FROC operating-point rules (metsflow.models.cascade chooses its stage-2 threshold with one of them).
OPERATING_RULES = ("max_fp_per_patient", "target_sensitivity")
DEFAULT_MAX_FP_PER_PATIENT = Stage2Settings.max_fp_per_patient  # one owner: metsflow.core.settings

# Metrics where a smaller value is better (used by metsflow.evaluation.stats for one-sided tests).
LOWER_IS_BETTER = frozenset(
    {
        "hd95",
        "brats_lesion_hd95",
        "lesion_fdr",
        "lesion_fp",
        "lesion_fn",
        "brats_lesion_fp",
        "brats_lesion_fn",
        "fp_voxels",
        "fn_voxels",
    }
)

_SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)
_BRATS_DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)
# Crop margin (voxels) around the union of all labels: covers the BraTS dilation so cropping
# never changes which reference lesions merge.
_CROP_MARGIN = BRATS_METS_DILATION_ITERATIONS + 1


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float, empty: float) -> float:
    """numerator / denominator, or ``empty`` when there is nothing to count."""
    return float(numerator) / float(denominator) if denominator > 0 else float(empty)


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
    spacing = np.asarray(spacing, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing.tolist()}")
    return spacing


def resolve_groups(convention: str = "internal", groups: Iterable[str] | None = None) -> dict:
    """Group name -> internal label values evaluated for ``convention`` (and ``groups`` filter)."""
    labels.check_convention(convention)
    available = dict(labels.INTERNAL_GROUPS)
    if convention == "brats":
        available.update(labels.BRATS_GROUPS)
    if groups is None:
        return available
    groups = list(groups)
    known = {**labels.INTERNAL_GROUPS, **labels.BRATS_GROUPS}
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ValueError(f"unknown label groups {unknown}; known groups are {sorted(known)}")
    return {g: known[g] for g in groups}


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels; None when empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        if hits.size == 0:
            return None
        box.append(
            slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + margin + 1, mask.shape[axis]))
        )
    return tuple(box)


def _shifted_views(mask: np.ndarray, structure: np.ndarray) -> Iterator[np.ndarray]:
    """Views of ``mask`` (zero-padded by one) shifted by each offset of a 3x3x3 ``structure``.

    OR-ing / AND-ing these views is binary dilation / erosion with ``border_value=0``; for a
    single iteration it is several times faster than ``scipy.ndimage`` on large crops.
    """
    padded = np.pad(mask, 1)
    nx, ny, nz = mask.shape
    for di, dj, dk in np.argwhere(structure):
        yield padded[di : di + nx, dj : dj + ny, dk : dk + nz]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour in the background (array edge = background)."""
    interior = mask.copy()
    for view in _shifted_views(mask, _SURFACE_STRUCTURE):
        interior &= view
    return mask & ~interior


def _dilate(mask: np.ndarray, structure: np.ndarray, iterations: int) -> np.ndarray:
    """Binary dilation with a symmetric 3x3x3 ``structure`` (outside the array = background)."""
    for _ in range(iterations):
        grown = mask.copy()
        for view in _shifted_views(mask, structure):
            grown |= view
        mask = grown
    return mask


def _surface_points_mm(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Surface voxel centres of ``mask`` in mm (the mask must not be cut by the array edge)."""
    return np.argwhere(_surface(mask)) * spacing


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between two binary masks.

    Both empty: 0. Exactly one empty: ``BRATS_MAX_HD95_MM``.
    """
    spacing = _check_spacing(spacing)
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    box = _bounding_box(pred | ref, margin=1)
    if box is None:
        return 0.0
    pred, ref = pred[box], ref[box]
    if not pred.any() or not ref.any():
        return BRATS_MAX_HD95_MM
    pred_points = _surface_points_mm(pred, spacing)
    ref_points = _surface_points_mm(ref, spacing)
    pred_to_ref, _ = spatial.cKDTree(ref_points).query(pred_points, k=1)
    ref_to_pred, _ = spatial.cKDTree(pred_points).query(ref_points, k=1)
    return float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient of two binary masks (1 when both are empty)."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    tp = np.count_nonzero(pred & ref)
    return _ratio(2 * tp, np.count_nonzero(pred) + np.count_nonzero(ref), empty=1.0)


def _ndsc_from_counts(tp: float, fp: float, fn: float, n_voxels: float, rate: float) -> float:
    """Raina et al. 2023 nDSC from voxel counts (see the module docstring)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"nDSC positive-class rate r must be in (0, 1), got {rate}")
    positives = tp + fn
    if positives == 0:
        # k is 0/0 here; with no reference voxels nDSC is 1 if nothing is predicted, else 0
        # (the Shifts reference implementation sets k = 1, which gives the same values).
        return 1.0 if fp == 0 else 0.0
    negatives = n_voxels - positives
    k = (1.0 - rate) * positives / (rate * negatives) if negatives > 0 else 1.0
    return _ratio(2.0 * tp, 2.0 * tp + fn + k * fp, empty=1.0)


def normalised_dice(pred: np.ndarray, ref: np.ndarray, rate: float) -> float:
    """nDSC (Raina et al. 2023) of two binary masks for positive-class rate ``rate``.

    ``rate`` is normally the cohort-average positive rate (``cohort_positive_rate``); the
    image size N is the full array, so pass uncropped masks.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    tp = np.count_nonzero(pred & ref)
    fp = np.count_nonzero(pred) - tp
    fn = np.count_nonzero(ref) - tp
    return _ndsc_from_counts(tp, fp, fn, ref.size, rate)


def cohort_positive_rate(per_study: pd.DataFrame) -> dict[str, float]:
    """Cohort-average positive-class rate r per group: mean over studies of h / N.

    ``per_study`` is a table of ``flatten`` rows (needs ``group``, ``tp_voxels``, ``fn_voxels``,
    ``n_voxels``). r depends on the reference labels only, so the same evaluation studies give
    the same r in every round. Studies whose reference is empty for a group do count (rate 0),
    as in an average over the dataset.
    """
    needed = {"group", "tp_voxels", "fn_voxels", "n_voxels"}
    missing = needed - set(per_study.columns)
    if missing:
        raise ValueError(f"per-study table lacks columns {sorted(missing)} for the nDSC rate")
    rate = (per_study["tp_voxels"] + per_study["fn_voxels"]) / per_study["n_voxels"]
    return {str(g): float(v) for g, v in rate.groupby(per_study["group"]).mean().items()}


def add_normalised_dice(
    per_study: pd.DataFrame, rate: float | Mapping[str, float] | None = None
) -> pd.DataFrame:
    """Return a copy of ``per_study`` with ``ndsc`` (re)computed from the voxel counts.

    ``rate`` None: the cohort-average rate of each group from this table
    (``cohort_positive_rate``). A group whose cohort rate is 0 (no reference voxels anywhere)
    gets NaN except for its empty-case rows.
    """
    rates = cohort_positive_rate(per_study) if rate is None else rate
    out = per_study.copy()
    values = []
    for row in out.itertuples(index=False):
        r = rates[row.group] if isinstance(rates, Mapping) else rates
        if row.tp_voxels + row.fn_voxels == 0:
            r = 0.5  # an empty reference gives 1 or 0 whatever r is
        elif not 0.0 < r < 1.0:
            values.append(math.nan)
            continue
        values.append(
            _ndsc_from_counts(row.tp_voxels, row.fp_voxels, row.fn_voxels, row.n_voxels, r)
        )
    out["ndsc"] = values
    return out


# --------------------------------------------------------------------------------------------
# Lesion matching
# --------------------------------------------------------------------------------------------


@dataclass
class LesionMatch:
    """Components of one group and their one-to-one matching."""

    ref_cc: np.ndarray  # component labels of the reference (0 background)
    pred_cc: np.ndarray
    ref_sizes: np.ndarray  # voxels per component, index = label (index 0 unused)
    pred_sizes: np.ndarray
    pairs: list[tuple[int, int, float, int]]  # (ref label, pred label, IoU, overlap voxels)

    @property
    def n_ref(self) -> int:
        return len(self.ref_sizes) - 1

    @property
    def n_pred(self) -> int:
        return len(self.pred_sizes) - 1


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cc, n = labels.lesion_components(mask)
    # Counted over the mask's voxels only, flattened in memory order: a bincount of the whole
    # map (C-order copy, cast to intp) took 61 ms of a 1 mm edit summary, this 3.5 ms.
    flat_cc, flat_mask = _flat_pair(cc, np.asarray(mask, dtype=bool))
    inside = np.flatnonzero(flat_mask)
    sizes = np.bincount(flat_cc[inside], minlength=n + 1)[: n + 1]
    sizes[0] = flat_cc.size - inside.size
    return cc, sizes


def _flat_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` (same shape) flattened in one common order, without a copy when both
    are Fortran-ordered (NIfTI voxels, cc3d's output) or both C-ordered."""
    order = "F" if a.flags.f_contiguous and b.flags.f_contiguous else "C"
    return a.ravel(order=order), b.ravel(order=order)


def match_lesions(
    pred: np.ndarray, ref: np.ndarray, iou_threshold: float = DEFAULT_IOU_THRESHOLD
) -> LesionMatch:
    """One-to-one matching of predicted and reference lesions (binary masks) at IoU > threshold.

    The Hungarian algorithm maximises the summed IoU over pairs above the threshold, so a
    prediction overlapping two reference lesions is given to the one it fits best overall.
    """
    ref_cc, ref_sizes = _components(np.asarray(ref, dtype=bool))
    pred_cc, pred_sizes = _components(np.asarray(pred, dtype=bool))
    pairs: list[tuple[int, int, float, int]] = []
    # The overlapping voxels by flat index in memory order: boolean indexing of a Fortran-ordered
    # 3D map walked it in C order (a 1 mm edit summary: 20 -> 6 ms for the two maps).
    flat_ref, flat_pred = _flat_pair(ref_cc, pred_cc)
    both = np.flatnonzero((flat_ref > 0) & (flat_pred > 0))
    if both.size:
        stride = np.int64(len(pred_sizes))
        keys, overlap = np.unique(
            flat_ref[both].astype(np.int64) * stride + flat_pred[both], return_counts=True
        )
        ref_ids, pred_ids = keys // stride, keys % stride
        iou = overlap / (ref_sizes[ref_ids] + pred_sizes[pred_ids] - overlap)
        eligible = iou > iou_threshold
        if eligible.any():
            ref_ids, pred_ids = ref_ids[eligible], pred_ids[eligible]
            iou, overlap = iou[eligible], overlap[eligible]
            rows, row_of = np.unique(ref_ids, return_inverse=True)
            cols, col_of = np.unique(pred_ids, return_inverse=True)
            gain = np.zeros((len(rows), len(cols)))
            gain[row_of, col_of] = iou
            inter = np.zeros((len(rows), len(cols)), dtype=np.int64)
            inter[row_of, col_of] = overlap
            chosen_r, chosen_c = optimize.linear_sum_assignment(gain, maximize=True)
            for i, j in zip(chosen_r, chosen_c, strict=True):
                if gain[i, j] > iou_threshold:  # the assignment may pad with ineligible pairs
                    pairs.append((int(rows[i]), int(cols[j]), float(gain[i, j]), int(inter[i, j])))
    return LesionMatch(ref_cc, pred_cc, ref_sizes, pred_sizes, pairs)


def _detection_metrics(
    match: LesionMatch, voxel_mm3: float, size_bins_mm: Sequence[float] = DEFAULT_SIZE_BINS_MM
) -> dict[str, float]:
    tp = len(match.pairs)
    fp = match.n_pred - tp
    fn = match.n_ref - tp
    result = {
        "n_ref_lesions": float(match.n_ref),
        "n_pred_lesions": float(match.n_pred),
        "lesion_tp": float(tp),
        "lesion_fp": float(fp),
        "lesion_fn": float(fn),
        "lesion_f1": _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0),
        "lesion_tpr": _ratio(tp, tp + fn, empty=1.0),
        "lesion_fdr": _ratio(fp, tp + fp, empty=0.0),
    }
    edges = check_size_bins(size_bins_mm)
    bin_of = size_bin_index(equivalent_diameter_mm(match.ref_sizes[1:] * voxel_mm3), edges)
    detected = np.zeros(match.n_ref, dtype=bool)
    detected[[r - 1 for r, *_ in match.pairs]] = True
    for index, name in enumerate(size_bin_names(edges)):
        in_bin = bin_of == index
        n, hit = int(in_bin.sum()), int((detected & in_bin).sum())
        result[f"n_ref_lesions_{name}"] = float(n)
        result[f"lesion_tp_{name}"] = float(hit)
        # NaN, not the empty-case 1: a study without small lesions says nothing about them.
        result[f"lesion_tpr_{name}"] = hit / n if n else math.nan
    return result


# --------------------------------------------------------------------------------------------
# Size bins, FROC and operating points
# --------------------------------------------------------------------------------------------


def equivalent_diameter_mm(volume_mm3: float | np.ndarray) -> np.ndarray:
    """Diameter (mm) of the sphere of the same volume: (6 V / pi)^(1/3)."""
    return np.cbrt(6.0 * np.asarray(volume_mm3, dtype=float) / math.pi)


def voxel_diameter_mm(voxels: float | np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Equivalent diameter (mm) of components of ``voxels`` voxels on a grid of ``spacing`` mm."""
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=float)))
    return equivalent_diameter_mm(np.asarray(voxels, dtype=float) * voxel_mm3)


def check_size_bins(size_bins_mm: Sequence[float]) -> tuple[float, ...]:
    """The bin edges as floats; refuses an empty, unsorted or non-positive list."""
    edges = tuple(float(e) for e in size_bins_mm)
    if (
        not edges
        or any(not math.isfinite(e) or e <= 0 for e in edges)
        or any(b <= a for a, b in zip(edges, edges[1:], strict=False))
    ):
        raise ValueError(
            f"size bins must be strictly increasing positive diameters in mm, got {list(edges)}"
        )
    return edges


def _edge_text(edge: float) -> str:
    return f"{edge:g}"


def size_bin_names(size_bins_mm: Sequence[float]) -> list[str]:
    """Column-safe bin keys: edges (3, 10) -> ``["lt3mm", "3to10mm", "ge10mm"]``."""
    edges = [_edge_text(e).replace(".", "p") for e in check_size_bins(size_bins_mm)]
    middle = [f"{a}to{b}mm" for a, b in zip(edges, edges[1:], strict=False)]
    return [f"lt{edges[0]}mm", *middle, f"ge{edges[-1]}mm"]


def size_bin_labels(size_bins_mm: Sequence[float]) -> list[str]:
    """Display labels: edges (3, 10) -> ``["< 3 mm", "3-10 mm", ">= 10 mm"]``."""
    edges = [_edge_text(e) for e in check_size_bins(size_bins_mm)]
    middle = [f"{a}-{b} mm" for a, b in zip(edges, edges[1:], strict=False)]
    return [f"< {edges[0]} mm", *middle, f">= {edges[-1]} mm"]


def size_bin_index(diameters_mm: float | np.ndarray, size_bins_mm: Sequence[float]) -> np.ndarray:
    """Bin of each diameter: 0 below the first edge, i for ``[edge[i-1], edge[i])``."""
    edges = np.asarray(check_size_bins(size_bins_mm))
    rounded = np.round(np.asarray(diameters_mm, dtype=float), DIAMETER_DECIMALS)
    return np.digitize(rounded, edges, right=False)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (statsmodels); NaN when n is 0.

    Wilson rather than the normal approximation: bins of small lesions hold few lesions and
    sensitivities near 1, where the Wald interval collapses or leaves [0, 1]."""
    if n <= 0:
        return math.nan, math.nan
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(int(successes), int(n), alpha=1 - confidence, method="wilson")
    return float(low), float(high)


DETECTION_COLUMNS = [
    "size_bin",
    "low_mm",
    "high_mm",
    "n_ref_lesions",
    "n_detected",
    "sensitivity",
    "ci95_low",
    "ci95_high",
]


def detection_by_size(
    lesions: pd.DataFrame, size_bins_mm: Sequence[float] = DEFAULT_SIZE_BINS_MM
) -> pd.DataFrame:
    """Lesion sensitivity per size bin, pooled over studies, with Wilson 95% intervals.

    ``lesions``: reference lesions with ``diameter_mm`` (or ``volume_mm3``) and ``detected``
    (a ``lesion_table``). One row per bin (``DETECTION_COLUMNS``), then one ``all`` row."""
    edges = check_size_bins(size_bins_mm)
    if "diameter_mm" in lesions.columns:
        diameters = lesions["diameter_mm"].to_numpy(dtype=float)
    else:
        diameters = equivalent_diameter_mm(lesions["volume_mm3"].to_numpy(dtype=float))
    detected = lesions["detected"].to_numpy(dtype=bool)
    bin_of = size_bin_index(diameters, edges)
    bounds = [0.0, *edges, math.inf]
    rows = []
    for index, label in enumerate([*size_bin_labels(edges), "all"]):
        chosen = bin_of == index if label != "all" else np.ones(len(detected), dtype=bool)
        n, hit = int(chosen.sum()), int((detected & chosen).sum())
        low, high = wilson_interval(hit, n)
        rows.append(
            {
                "size_bin": label,
                "low_mm": bounds[index] if label != "all" else 0.0,
                "high_mm": bounds[index + 1] if label != "all" else math.inf,
                "n_ref_lesions": n,
                "n_detected": hit,
                "sensitivity": hit / n if n else math.nan,
                "ci95_low": low,
                "ci95_high": high,
            }
        )
    return pd.DataFrame(rows, columns=DETECTION_COLUMNS)


def false_positive_rates(false_positives: Mapping[str, float], patient_of: Mapping[str, str]):
    """False positives per study and per patient over the evaluated studies.

    ``false_positives``: study -> unmatched predicted lesions; ``patient_of``: study -> patient
    for **every** evaluated study (a study or patient without any lesion, reference or
    predicted, still counts in the denominators). Returns ``{n_studies, n_patients,
    false_positives, fp_per_study, fp_per_patient}``."""
    missing = sorted(set(false_positives) - set(patient_of))
    if missing:
        raise ValueError(f"studies without a patient id: {missing}")
    total = float(sum(false_positives.get(study, 0.0) for study in patient_of))
    n_studies, n_patients = len(patient_of), len(set(patient_of.values()))
    return {
        "n_studies": n_studies,
        "n_patients": n_patients,
        "false_positives": total,
        "fp_per_study": total / n_studies if n_studies else math.nan,
        "fp_per_patient": total / n_patients if n_patients else math.nan,
    }


FROC_COLUMNS = ["threshold", "sensitivity", "fp_per_patient", "true_positives", "false_positives"]


def froc(
    scores: Sequence[float],
    hits: Sequence[Sequence],
    n_reference: int,
    n_patients: int,
) -> pd.DataFrame:
    """Free-response ROC: lesion sensitivity vs false positives per patient.

    ``scores[i]``: candidate i's confidence; ``hits[i]``: ids of the reference lesions it
    detects (empty: a false positive; ids must be unique across studies, e.g. (study, lesion)).
    A candidate is kept when its score >= the threshold; a reference lesion is detected when a
    kept candidate hits it. One row per distinct score, highest threshold first, so both
    sensitivity and FP per patient never decrease down the table (``FROC_COLUMNS``)."""
    scores = np.asarray(scores, dtype=float)
    if len(scores) != len(hits):
        raise ValueError(f"{len(scores)} scores but {len(hits)} hit lists")
    if np.isnan(scores).any():
        raise ValueError("FROC scores contain NaN")
    if n_patients <= 0:
        raise ValueError(f"FROC needs at least one patient, got {n_patients}")
    best: dict = {}  # reference lesion -> highest score of a candidate hitting it
    for score, hit in zip(scores.tolist(), hits, strict=True):
        for ref in hit:
            best[ref] = max(best.get(ref, -math.inf), score)
    thresholds = np.unique(scores)[::-1]
    detected = np.sort(np.fromiter(best.values(), dtype=float, count=len(best)))
    false = np.sort(scores[[not h for h in hits]]) if len(scores) else scores
    tp = len(detected) - np.searchsorted(detected, thresholds, side="left")
    fp = len(false) - np.searchsorted(false, thresholds, side="left")
    return pd.DataFrame(
        {
            "threshold": thresholds,
            "sensitivity": tp / n_reference if n_reference else np.full(len(tp), math.nan),
            "fp_per_patient": fp / n_patients,
            "true_positives": tp.astype(int),
            "false_positives": fp.astype(int),
        },
        columns=FROC_COLUMNS,
    )


def within_fp(curve: pd.DataFrame, fp_per_patient: float) -> pd.Series:
    """The points of a ``froc`` curve with at most ``fp_per_patient`` false positives per
    patient (a float tolerance: 0.999... FP/patient counts as 1)."""
    return curve["fp_per_patient"] <= float(fp_per_patient) + 1e-9


def sensitivity_at_fp(curve: pd.DataFrame, fp_per_patient: Sequence[float]) -> list[float]:
    """A ``froc`` curve read at fixed false-positive rates: for each rate, the highest sensitivity
    of a threshold with at most that many false positives per patient; 0.0 where even the
    highest threshold has more (only keeping nothing stays under the rate), NaN where there is
    no reference lesion (the curve's sensitivity is NaN)."""
    if len(curve) and curve["sensitivity"].isna().all():
        return [math.nan] * len(fp_per_patient)
    out = []
    for rate in fp_per_patient:
        allowed = curve["sensitivity"][within_fp(curve, rate)]
        out.append(float(allowed.max()) if len(allowed) else 0.0)
    return out


def choose_operating_point(
    curve: pd.DataFrame,
    rule: str = "max_fp_per_patient",
    max_fp_per_patient: float = DEFAULT_MAX_FP_PER_PATIENT,
    target_sensitivity: float = 0.95,
) -> dict:
    """A FROC point by a clinical rule; returns ``{threshold, sensitivity, fp_per_patient,
    rule, rule_met}``.

    - ``max_fp_per_patient``: the highest sensitivity with at most ``max_fp_per_patient`` false
      positives per patient (ties: the highest threshold, i.e. the fewest false positives).
      When even the highest threshold has more, that point (fewest false positives) is
      returned with ``rule_met`` False.
    - ``target_sensitivity``: the highest threshold whose sensitivity is at least
      ``target_sensitivity``, or the lowest threshold's sensitivity if that is lower.
    With no candidates or no reference lesion (sensitivity NaN) there is nothing to choose
    on: threshold 0 keeps every candidate."""
    if rule not in OPERATING_RULES:
        raise ValueError(f"operating rule must be one of {list(OPERATING_RULES)}, got {rule!r}")
    if curve.empty or curve["sensitivity"].isna().all():
        return {
            "threshold": 0.0,
            "sensitivity": math.nan,
            "fp_per_patient": float(curve["fp_per_patient"].max()) if len(curve) else 0.0,
            "rule": rule,
            "rule_met": False,
        }
    curve = curve.sort_values("threshold", ascending=False, ignore_index=True)
    if rule == "max_fp_per_patient":
        allowed = curve[within_fp(curve, max_fp_per_patient)]
        met = not allowed.empty
        # idxmax returns the first maximum: the highest threshold among equal sensitivities.
        row = curve.loc[allowed["sensitivity"].idxmax()] if met else curve.iloc[0]
    else:
        goal = min(float(target_sensitivity), float(curve["sensitivity"].iloc[-1]))
        row = curve[curve["sensitivity"] >= goal - 1e-9].iloc[0]
        met = bool(row["sensitivity"] >= float(target_sensitivity) - 1e-9)
    return {
        "threshold": float(row["threshold"]),
        "sensitivity": float(row["sensitivity"]),
        "fp_per_patient": float(row["fp_per_patient"]),
        "rule": rule,
        "rule_met": bool(met),
    }


# --------------------------------------------------------------------------------------------
# BraTS-METS lesion-wise Dice / HD95
# --------------------------------------------------------------------------------------------


def brats_lesionwise(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    dilation_iterations: int = BRATS_METS_DILATION_ITERATIONS,
    min_lesion_mm3: float = BRATS_METS_MIN_LESION_MM3,
) -> dict[str, float]:
    """BraTS-METS 2023 lesion-wise Dice and HD95 of two binary masks (module docstring).

    The masks must not be cut by the array edge closer than ``dilation_iterations`` voxels
    unless the array edge is the image edge (``evaluate_pair`` crops with that margin).
    """
    spacing = _check_spacing(spacing)
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    voxel_mm3 = float(np.prod(spacing))
    pred_cc, _ = _components(pred)

    if ref.any():
        dilated = _dilate(ref, _BRATS_DILATION_STRUCTURE, dilation_iterations)
        region_cc, _ = _components(dilated)
    else:
        region_cc = np.zeros(ref.shape, dtype=np.uint32)
    # A reference lesion is the reference voxels of one dilated component.
    lesion_cc = np.where(ref, region_cc, 0)

    regions = ndimage.find_objects(region_cc)
    pred_boxes = ndimage.find_objects(pred_cc)
    touching = (region_cc > 0) & (pred_cc > 0)
    stride = np.int64(len(pred_boxes) + 1)
    keys = np.unique(region_cc[touching].astype(np.int64) * stride + pred_cc[touching])
    pred_of_region: dict[int, list[int]] = {}
    for key in keys:
        pred_of_region.setdefault(int(key // stride), []).append(int(key % stride))
    assigned = {p for ids in pred_of_region.values() for p in ids}

    dice_scores, hd_scores = [], []
    tp = fn = 0
    for label, box in enumerate(regions, start=1):
        if box is None:
            continue
        ids = pred_of_region.get(label, [])
        # The crop must hold the whole lesion and every assigned predicted component.
        box = _union_box([box, *(pred_boxes[i - 1] for i in ids)])
        lesion = lesion_cc[box] == label
        if np.count_nonzero(lesion) * voxel_mm3 <= min_lesion_mm3:
            continue  # below the challenge's size threshold: not scored either way
        if ids:
            tp += 1
            matched = np.isin(pred_cc[box], ids)
            dice_scores.append(dice(matched, lesion))
            hd_scores.append(hd95(matched, lesion, spacing))
        else:
            fn += 1
            dice_scores.append(0.0)
            hd_scores.append(BRATS_MAX_HD95_MM)
    fp = len(pred_boxes) - len(assigned)
    dice_scores += [0.0] * fp
    hd_scores += [BRATS_MAX_HD95_MM] * fp
    return {
        "brats_lesion_dice": float(np.mean(dice_scores)) if dice_scores else 1.0,
        "brats_lesion_hd95": float(np.mean(hd_scores)) if hd_scores else 0.0,
        "brats_lesion_tp": float(tp),
        "brats_lesion_fp": float(fp),
        "brats_lesion_fn": float(fn),
    }


def _union_box(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(
        slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes))
        for a in range(len(boxes[0]))
    )


# --------------------------------------------------------------------------------------------
# Per-study evaluation
# --------------------------------------------------------------------------------------------


class LabelValueError(ValueError):
    """Values outside the label convention in the prediction or the reference (``which``)."""

    def __init__(self, which: str, message: str):
        self.which = which
        super().__init__(message)


def _prepare(pred: np.ndarray, ref: np.ndarray, convention: str) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(
            f"prediction and reference must be 3D arrays of one shape, got {pred.shape} and "
            f"{ref.shape}"
        )
    # to_internal also rejects values outside the convention (e.g. a probability map).
    converted = []
    for which, data in (("prediction", pred), ("reference", ref)):
        try:
            converted.append(labels.to_internal(data, convention))
        except ValueError as exc:
            raise LabelValueError(which, f"{which} {exc}") from None
    return converted[0], converted[1]


def _group_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: np.ndarray,
    n_voxels: int,
    iou_threshold: float,
    rate: float | None,
    size_bins_mm: Sequence[float] = DEFAULT_SIZE_BINS_MM,
) -> dict[str, float]:
    """All metrics of one group; ``pred``/``ref`` are binary masks cropped with a margin."""
    tp = np.count_nonzero(pred & ref)
    n_pred = np.count_nonzero(pred)
    n_ref = np.count_nonzero(ref)
    fp, fn = n_pred - tp, n_ref - tp
    tn = n_voxels - tp - fp - fn
    voxel_mm3 = float(np.prod(spacing))
    result = {
        "dice": _ratio(2 * tp, n_pred + n_ref, empty=1.0),
        "ndsc": math.nan if rate is None else _ndsc_from_counts(tp, fp, fn, n_voxels, rate),
        "hd95": hd95(pred, ref, spacing),
        "sensitivity": _ratio(tp, tp + fn, empty=1.0),
        "specificity": _ratio(tn, tn + fp, empty=1.0),
        "pred_volume_mm3": float(n_pred * voxel_mm3),
        "ref_volume_mm3": float(n_ref * voxel_mm3),
    }
    result.update(
        _detection_metrics(match_lesions(pred, ref, iou_threshold), voxel_mm3, size_bins_mm)
    )
    result.update(brats_lesionwise(pred, ref, spacing))
    result.update(
        tp_voxels=float(tp), fp_voxels=float(fp), fn_voxels=float(fn), n_voxels=float(n_voxels)
    )
    return result


def evaluate_pair(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    convention: str = "internal",
    groups: Iterable[str] | None = None,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    nsd_rate: float | Mapping[str, float] | None = None,
    size_bins_mm: Sequence[float] = DEFAULT_SIZE_BINS_MM,
) -> dict[str, dict[str, float]]:
    """Evaluate a predicted label map against the reference on the same grid.

    ``pred`` and ``ref`` are label maps in ``convention`` (both); ``spacing`` is the voxel size
    in mm along the array axes. ``groups`` restricts the groups (default: the internal groups,
    plus ET/TC/WT for ``convention="brats"``). ``nsd_rate`` is the nDSC rate r, one float or one
    per group; None leaves ``ndsc`` NaN (fill it later with ``add_normalised_dice``).
    ``size_bins_mm``: edges of the reference-lesion size bins (module docstring).
    Returns ``{group: {metric: value}}``; see the module docstring for the definitions.
    """
    spacing = _check_spacing(spacing)
    size_bins_mm = check_size_bins(size_bins_mm)
    group_values = resolve_groups(convention, groups)
    pred, ref = _prepare(pred, ref, convention)
    n_voxels = int(ref.size)
    # Every group lives inside the union of all labels: crop once, with room for the dilation.
    box = _bounding_box((pred > 0) | (ref > 0), margin=_CROP_MARGIN)
    if box is None:
        box = tuple(slice(0, 2) for _ in range(3))  # empty study: a tiny empty crop suffices
    pred, ref = pred[box], ref[box]
    results = {}
    # ET = enhancing and TC = whole_lesion: compute each distinct value set once.
    computed: dict[tuple[tuple[int, ...], float | None], dict[str, float]] = {}
    for group, values in group_values.items():
        rate = nsd_rate.get(group) if isinstance(nsd_rate, Mapping) else nsd_rate
        key = (tuple(sorted(values)), rate)
        if key not in computed:
            computed[key] = _group_metrics(
                np.isin(pred, values),
                np.isin(ref, values),
                spacing,
                n_voxels,
                iou_threshold,
                rate,
                size_bins_mm,
            )
        results[group] = dict(computed[key])
    return results


def _load_pair(
    pred_path: str | os.PathLike, ref_path: str | os.PathLike, study_id: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred_img = io.load_nifti(pred_path, study_id, "prediction")
    ref_img = io.load_nifti(ref_path, study_id, "reference label")
    if pred_img.shape != ref_img.shape:
        raise ValueError(
            f"{pred_path} and {ref_path} are not on the same grid: shapes {pred_img.shape} and "
            f"{ref_img.shape}"
        )
    if not np.allclose(pred_img.affine, ref_img.affine, rtol=0.0, atol=AFFINE_TOLERANCE):
        raise ValueError(
            f"{pred_path} and {ref_path} are not on the same grid: affines differ by up to "
            f"{np.abs(pred_img.affine - ref_img.affine).max():.4g} (tolerance {AFFINE_TOLERANCE})"
        )
    # The affine's spacing, as the pipeline reads it (load_nifti refused a header whose pixdim
    # disagrees with it).
    spacing = io.voxel_spacing(ref_img)
    return np.asarray(pred_img.dataobj), np.asarray(ref_img.dataobj), spacing


def evaluate_files(
    pred_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    convention: str = "internal",
    study_id: str = "?",
    **kw,
) -> dict[str, dict[str, float]]:
    """``evaluate_pair`` on two NIfTI files, which must share the grid (shape, affine +-1e-3).

    Raises ``ValueError`` naming both files when the grids differ, and
    ``metsflow.core.io.StudyError`` (study, file) when a file is unreadable, has an inconsistent
    header or label values outside ``convention``. Extra keywords go to ``evaluate_pair``.
    """
    pred, ref, spacing = _load_pair(pred_path, ref_path, study_id)
    try:
        return evaluate_pair(pred, ref, spacing, convention=convention, **kw)
    except LabelValueError as exc:
        path = pred_path if exc.which == "prediction" else ref_path
        raise io.StudyError(study_id, str(exc), path) from None


# --------------------------------------------------------------------------------------------
# Per-lesion table
# --------------------------------------------------------------------------------------------

LESION_COLUMNS = [
    "study_id",
    "group",
    "lesion_id",
    "volume_mm3",
    "diameter_mm",
    "size_bin",
    "detected",
    "iou",
    "dice",
    "matched_pred_volume_mm3",
    "centroid_i",
    "centroid_j",
    "centroid_k",
]
PRED_LESION_COLUMNS = [
    "study_id",
    "group",
    "pred_lesion_id",
    "volume_mm3",
    "matched_lesion_id",
    "score",
]


def lesion_tables(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    convention: str = "internal",
    groups: Iterable[str] | None = None,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    study_id: str | None = None,
    size_bins_mm: Sequence[float] = DEFAULT_SIZE_BINS_MM,
    score_map: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(reference lesions, predicted lesions)``: one row per 26-connected component per group.

    Reference rows (``LESION_COLUMNS``): ``detected`` means matched one-to-one at IoU >
    threshold; ``dice`` is the Dice of the lesion with its matched predicted lesion (0 when
    missed); ``diameter_mm`` the equivalent-sphere diameter and ``size_bin`` its bin label;
    the centroid is in voxel indices of the full array.
    Predicted rows (``PRED_LESION_COLUMNS``): ``matched_lesion_id`` the reference lesion it
    matches (0: a false positive) and ``score`` the maximum of ``score_map`` (e.g. the
    foreground probability, on the same grid) inside it, NaN without a map: the FROC input.
    """
    spacing = _check_spacing(spacing)
    edges = check_size_bins(size_bins_mm)
    bin_labels = size_bin_labels(edges)
    group_values = resolve_groups(convention, groups)
    pred, ref = _prepare(pred, ref, convention)
    if score_map is not None and np.shape(score_map) != pred.shape:
        raise ValueError(f"score map shape {np.shape(score_map)} differs from {pred.shape}")
    voxel_mm3 = float(np.prod(spacing))
    rows, pred_rows = [], []
    for group, values in group_values.items():
        match = match_lesions(np.isin(pred, values), np.isin(ref, values), iou_threshold)
        matched = {r: (p, iou, inter) for r, p, iou, inter in match.pairs}
        if match.n_pred:
            index = np.arange(1, match.n_pred + 1)
            peaks = (
                ndimage.maximum(np.asarray(score_map, dtype=float), match.pred_cc, index)
                if score_map is not None
                else np.full(match.n_pred, math.nan)
            )
            ref_of = {p: r for r, p, _, _ in match.pairs}
            pred_rows += [
                {
                    "study_id": study_id,
                    "group": group,
                    "pred_lesion_id": int(p),
                    "volume_mm3": int(match.pred_sizes[p]) * voxel_mm3,
                    "matched_lesion_id": int(ref_of.get(int(p), 0)),
                    "score": float(peak),
                }
                for p, peak in zip(index, np.atleast_1d(peaks), strict=True)
            ]
        if match.n_ref == 0:
            continue
        centroids = ndimage.center_of_mass(
            match.ref_cc > 0,
            match.ref_cc,
            index=np.arange(1, match.n_ref + 1),
        )
        volumes = match.ref_sizes[1:] * voxel_mm3
        diameters = equivalent_diameter_mm(volumes)
        bins = size_bin_index(diameters, edges)
        for lesion in range(1, match.n_ref + 1):
            size = int(match.ref_sizes[lesion])
            p, iou, inter = matched.get(lesion, (0, 0.0, 0))
            pred_size = int(match.pred_sizes[p]) if p else 0
            rows.append(
                {
                    "study_id": study_id,
                    "group": group,
                    "lesion_id": lesion,
                    "volume_mm3": size * voxel_mm3,
                    "diameter_mm": float(diameters[lesion - 1]),
                    "size_bin": bin_labels[int(bins[lesion - 1])],
                    "detected": bool(p),
                    "iou": iou,
                    "dice": 2.0 * inter / (size + pred_size),
                    "matched_pred_volume_mm3": pred_size * voxel_mm3,
                    "centroid_i": centroids[lesion - 1][0],
                    "centroid_j": centroids[lesion - 1][1],
                    "centroid_k": centroids[lesion - 1][2],
                }
            )
    return (
        pd.DataFrame(rows, columns=LESION_COLUMNS),
        pd.DataFrame(pred_rows, columns=PRED_LESION_COLUMNS),
    )


def pooled_lesion_tables(
    preds: Mapping[str, np.ndarray],
    refs: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    scores: Mapping[str, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Whole-lesion ``lesion_tables`` of several studies (study id -> binary prediction /
    reference), pooled: ``(reference lesions, predicted lesions, unmatched predicted lesions
    per study)``, every study of ``preds`` counted (0 when it has none), as
    ``false_positive_rates`` wants them."""
    ref_rows, pred_rows = [], []
    for study_id, pred in preds.items():
        lesions, predicted = lesion_tables(
            np.asarray(pred).astype(np.uint8),
            np.asarray(refs[study_id]).astype(np.uint8),
            spacing,
            groups=["whole_lesion"],
            iou_threshold=iou_threshold,
            study_id=study_id,
            score_map=None if scores is None else scores[study_id],
        )
        ref_rows.append(lesions)
        pred_rows.append(predicted)
    lesions = pd.concat([f for f in ref_rows if not f.empty] or ref_rows, ignore_index=True)
    predicted = pd.concat([f for f in pred_rows if not f.empty] or pred_rows, ignore_index=True)
    false = (predicted.matched_lesion_id == 0).groupby(predicted.study_id).sum().to_dict()
    return lesions, predicted, {s: int(false.get(s, 0)) for s in preds}


def lesion_table(*args, **kwargs) -> pd.DataFrame:
    """The reference-lesion table of ``lesion_tables`` (same arguments)."""
    return lesion_tables(*args, **kwargs)[0]


def froc_from_tables(
    lesions: pd.DataFrame, pred_lesions: pd.DataFrame, patient_of: Mapping[str, str]
) -> pd.DataFrame:
    """FROC of the evaluated predictions: ``froc`` over the predicted lesions' scores.

    ``lesions`` / ``pred_lesions``: ``lesion_tables`` of one group over many studies;
    ``patient_of``: study -> patient of every evaluated study (the FP denominator)."""
    hits = [
        [(row.study_id, int(row.matched_lesion_id))] if row.matched_lesion_id else []
        for row in pred_lesions.itertuples()
    ]
    return froc(
        pred_lesions["score"].to_numpy(dtype=float),
        hits,
        n_reference=len(lesions),
        n_patients=len(set(patient_of.values())),
    )


def detection_summary(
    round_index: int,
    lesions: pd.DataFrame,
    pred_lesions: pd.DataFrame,
    patient_of: dict[str, str],
    size_bins,
) -> dict:
    """Size-binned sensitivity (Wilson 95% CI), FP per study / patient and the FROC of a round.

    Returns ``{"by_size": table, "froc": table, "summary": fields for summary.json}``; every
    evaluated study counts in the FP denominators, with or without lesions."""
    if lesions.empty:
        lesions = pd.DataFrame(columns=LESION_COLUMNS)
    if pred_lesions.empty:
        pred_lesions = pd.DataFrame(columns=PRED_LESION_COLUMNS)
    by_size = detection_by_size(lesions, size_bins)
    false = (pred_lesions["matched_lesion_id"] == 0).groupby(pred_lesions["study_id"]).sum()
    rates = false_positive_rates(false.to_dict(), patient_of) if patient_of else {}
    scored = pred_lesions[pred_lesions["score"].notna()]
    curve = (
        froc_from_tables(lesions, scored, patient_of)
        if patient_of and len(scored) == len(pred_lesions)
        else pd.DataFrame(columns=FROC_COLUMNS)
    )
    if patient_of and len(scored) != len(pred_lesions):
        log.warning("round %d: no foreground probabilities for some studies; no FROC", round_index)
    by_size.insert(0, "round", round_index)
    curve.insert(0, "round", round_index)
    summary = {
        # A list, smallest bin first (JSON objects are written with sorted keys).
        "sensitivity_by_size": [
            {
                "size_bin": row.size_bin,
                "n_ref_lesions": int(row.n_ref_lesions),
                "n_detected": int(row.n_detected),
                "sensitivity": None if pd.isna(row.sensitivity) else float(row.sensitivity),
                "ci95": [
                    None if pd.isna(row.ci95_low) else float(row.ci95_low),
                    None if pd.isna(row.ci95_high) else float(row.ci95_high),
                ],
            }
            for row in by_size.itertuples()
        ],
        **{k: rates[k] for k in ("n_patients", "fp_per_study", "fp_per_patient") if k in rates},
    }
    return {"by_size": by_size, "froc": curve, "summary": summary}


# --------------------------------------------------------------------------------------------
# Tables and summaries
# --------------------------------------------------------------------------------------------


def flatten(study_id: str, result: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """Rows ``{study_id, group, <metric>: value}`` of an ``evaluate_pair`` result, for TSVs."""
    return [{"study_id": study_id, "group": group, **metrics} for group, metrics in result.items()]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean (NaN values dropped; NaN when n < 2)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return math.nan, math.nan
    # scipy.stats where it is used: imported with the module it cost every job that reads
    # metrics (review export, annotations) 0.4 CPU-s.
    from scipy import stats

    half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


SUMMARY_STATS = ["n", "mean", "std", "median", "ci95_low", "ci95_high"]


def summarise(per_study: pd.DataFrame, by: Sequence[str] = ("group",)) -> pd.DataFrame:
    """Per ``by`` (default group) and metric: n, mean, std, median and 95% t-CI of the mean.

    Metrics are the numeric columns of ``per_study`` other than ``by``; NaN values are left out
    (``n`` counts the studies used). Returns long-form rows
    ``[*by, metric, n, mean, std, median, ci95_low, ci95_high]``.
    """
    by = list(by)
    metrics = [
        c
        for c in per_study.columns
        if c not in by and c != "study_id" and pd.api.types.is_numeric_dtype(per_study[c])
    ]
    rows = []
    for keys, part in per_study.groupby(by, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for metric in metrics:
            x = part[metric].to_numpy(dtype=float)
            x = x[~np.isnan(x)]
            low, high = mean_ci(x)
            rows.append(
                {
                    **dict(zip(by, keys, strict=True)),
                    "metric": metric,
                    "n": int(x.size),
                    "mean": float(x.mean()) if x.size else math.nan,
                    "std": float(x.std(ddof=1)) if x.size > 1 else math.nan,
                    "median": float(np.median(x)) if x.size else math.nan,
                    "ci95_low": low,
                    "ci95_high": high,
                }
            )
    return pd.DataFrame(rows, columns=[*by, "metric", *SUMMARY_STATS])


def summarise_round(round_index: int, per_study: pd.DataFrame, skipped: list[str]) -> dict:
    """A round's summary.json fields from its per-study table (``flatten`` rows with ``ndsc``):
    headline-group means (Dice, nDSC, lesion F1), per-group Dice, and the skipped studies."""
    summary: dict = {"round": round_index, "n_validation": 0, "skipped": skipped}
    if per_study.empty:
        summary["mean_dice"] = None
        return summary
    headline = per_study[per_study.group == HEADLINE_GROUP]
    summary["n_validation"] = int(headline.study_id.nunique())
    summary["mean_dice"] = float(headline["dice"].mean())
    summary["mean_ndsc"] = float(headline["ndsc"].mean())
    summary["mean_lesion_f1"] = float(headline["lesion_f1"].mean())
    summary["per_group_dice"] = {
        group: float(rows["dice"].mean()) for group, rows in per_study.groupby("group")
    }
    return summary


def spearman_volume_vs_dice(
    lesions_df: pd.DataFrame, group: str | None = None, value: str = "dice"
) -> dict:
    """Spearman correlation of reference lesion volume with a per-lesion metric.

    ``lesions_df`` is a ``lesion_table`` (optionally of many studies); ``group`` selects one
    group (all rows when None). Returns ``{rho, p, n, note}``; rho and p are NaN when n < 3 or
    a column is constant (a note says why).
    """
    df = lesions_df if group is None else lesions_df[lesions_df["group"] == group]
    df = df[["volume_mm3", value]].dropna()
    n = len(df)
    if n < 3:
        return {"rho": math.nan, "p": math.nan, "n": n, "note": "fewer than 3 lesions"}
    if df["volume_mm3"].nunique() < 2 or df[value].nunique() < 2:
        return {"rho": math.nan, "p": math.nan, "n": n, "note": "constant volume or metric"}
    from scipy import stats

    rho, p = stats.spearmanr(df["volume_mm3"], df[value])
    return {"rho": float(rho), "p": float(p), "n": n, "note": ""}
