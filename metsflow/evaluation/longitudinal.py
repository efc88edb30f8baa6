"""Longitudinal lesion tracking and volumetric response of enhancing disease per patient.

A patient's time points are segmented on their own preprocessed grids; follow-up ``t`` was
registered to time point ``t - 1`` (``metsflow.imaging.register``), so the previous time point's
*lesion-id map* (every tracked lesion painted with its id) is warped into the follow-up grid with
the same transforms that propagate labels (nearest-label interpolation keeps the ids).

Tracking (``track_patient``): each lesion (``metsflow.core.labels.lesion_components``) of the
follow-up's enhancing mask takes the id of the warped previous lesion it overlaps most (at least
``min_overlap_voxels``; the warped lesions are first grown by ``margin_voxels``, a tolerance for
registration error and partial volume that matters for lesions of a few voxels); a component
overlapping none is a *new* lesion with a fresh id. Several
components taking one id (a lesion that split) add up to that lesion's volume; a previous lesion
that no component overlaps is *resolved* (volume 0). A resolved lesion that reappears later is
new again, because only lesions present at ``t - 1`` are warped forward.

Response (``classify_response``) is a volumetric analogue of RANO-BM (Lin et al., Lancet Oncol
2015), which uses the sum of longest diameters: partial response is a >= 30% decrease from
baseline, progression a >= 20% increase from the nadir or a new lesion. For a sphere a 30%
smaller diameter is a 65.7% smaller volume (1 - 0.7^3) and a 20% larger diameter a 72.8% larger
volume (1.2^3 - 1), hence the defaults ``partial_response_decrease=0.657`` and
``progression_increase=0.728`` on the total enhancing volume. Complete response is no enhancing
disease left (total volume <= ``complete_response_max_mm3``) and no new lesion. New lesions count
towards progression only from ``new_lesion_min_mm3`` (default 65 mm^3, a 5 mm sphere: RANO-BM
calls smaller new lesions equivocal). RANO-BM's clinical parts (steroids, clinical status,
non-target lesions) are out of scope: these are imaging-only, research categories.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from metsflow.core.labels import ENHANCING, lesion_components

log = logging.getLogger(__name__)

COMPLETE_RESPONSE = "complete_response"
PARTIAL_RESPONSE = "partial_response"
STABLE = "stable"
PROGRESSION = "progression"
NO_DISEASE = "no_disease"  # no enhancing disease at baseline nor since: nothing to respond
BASELINE = "baseline"
RESPONSE_CATEGORIES = (COMPLETE_RESPONSE, PARTIAL_RESPONSE, STABLE, PROGRESSION, NO_DISEASE)

# propagate_label stores uint8, so a lesion-id map holds at most 255 lesions per time point.
MAX_TRACKED_LESIONS = 255


@dataclass(frozen=True)
class ResponseThresholds:
    """Volumetric response thresholds (fractions of total enhancing volume; see module doc)."""

    partial_response_decrease: float = 0.657
    progression_increase: float = 0.728
    complete_response_max_mm3: float = 0.0
    new_lesion_min_mm3: float = 65.0
    min_overlap_voxels: int = 1
    match_margin_mm: float = 2.0

    @classmethod
    def from_config(cls, settings: dict | None) -> ResponseThresholds:
        settings = dict(settings or {})
        known = {k: settings[k] for k in cls.__dataclass_fields__ if k in settings}
        thresholds = cls(**known)
        if not 0 < thresholds.partial_response_decrease <= 1:
            raise ValueError("partial_response_decrease must be in (0, 1]")
        if thresholds.progression_increase <= 0:
            raise ValueError("progression_increase must be > 0")
        if thresholds.min_overlap_voxels < 1:
            raise ValueError("min_overlap_voxels must be >= 1")
        if thresholds.match_margin_mm < 0:
            raise ValueError("match_margin_mm must be >= 0")
        return thresholds

    def margin_voxels(self, spacings: Sequence[float]) -> int:
        """``match_margin_mm`` in voxels of the finest of ``spacings`` (mm), rounded up: at
        least the margin, so a 2 mm margin on a 4 mm grid is one voxel."""
        return math.ceil(self.match_margin_mm / min(spacings) - 1e-6)


@dataclass
class TimePoint:
    """One segmented time point: ``enhancing`` is a boolean mask on the study's own grid."""

    study_id: str
    order: int
    enhancing: np.ndarray
    voxel_volume_mm3: float

    @classmethod
    def from_labels(
        cls, study_id: str, order: int, labels: np.ndarray, zooms: Sequence[float]
    ) -> TimePoint:
        """A time point from an internal-convention label map with voxel size ``zooms`` (mm)."""
        return cls(study_id, int(order), np.asarray(labels) == ENHANCING, math.prod(zooms))


def registered_chains(
    ordered_studies: Sequence[str], reference_of: Mapping[str, str]
) -> list[list[str]]:
    """A patient's studies (in time order) split into chains where a study is not registered to
    the one before it (``reference_of``: study -> the study it was registered to)."""
    chains: list[list[str]] = []
    for study_id in ordered_studies:
        if chains and reference_of.get(study_id) == chains[-1][-1]:
            chains[-1].append(study_id)
        else:
            chains.append([study_id])
    return chains


def first_registered_series(
    ordered_studies: Sequence[str], available: Mapping[str, object], reference_of: Mapping[str, str]
) -> list[str]:
    """The first chain of a patient's studies (in time order) that have a segmentation
    (``available``), each registered to the one before; the series stops, with a log line
    saying why, at the first later study that breaks the chain."""
    chain: list[str] = []
    for study_id in ordered_studies:
        if study_id not in available:
            if chain:
                log.warning("%s has no segmentation: series stops before it", study_id)
                break
            continue
        if chain and reference_of.get(study_id) != chain[-1]:
            log.warning(
                "%s is not registered to %s (reference: %s): series stops before it",
                study_id,
                chain[-1],
                reference_of.get(study_id) or "none",
            )
            break
        chain.append(study_id)
    return chain


# warp(previous lesion-id map, previous time point, current time point) -> ids on current grid
Warp = Callable[[np.ndarray, TimePoint, TimePoint], np.ndarray]


def identity_warp(ids: np.ndarray, previous: TimePoint, current: TimePoint) -> np.ndarray:
    """For time points already on one grid (tests, pre-aligned data)."""
    if ids.shape != current.enhancing.shape:
        raise ValueError(
            f"study {current.study_id}: grid {current.enhancing.shape} differs from "
            f"{previous.study_id}'s {ids.shape}; an identity warp needs one grid"
        )
    return ids


def _match_components(
    components: np.ndarray, n_components: int, warped_ids: np.ndarray, min_overlap: int
) -> dict[int, int | None]:
    """Component label -> previous lesion id of largest overlap (None: no overlap)."""
    matched: dict[int, int | None] = {c: None for c in range(1, n_components + 1)}
    both = (components > 0) & (warped_ids > 0)
    if not both.any():
        return matched
    pairs, counts = np.unique(
        np.stack([components[both], warped_ids[both]]), axis=1, return_counts=True
    )
    best: dict[int, tuple[int, int]] = {}
    for (component, lesion), count in zip(pairs.T.tolist(), counts.tolist(), strict=True):
        # ties go to the lower lesion id (np.unique sorts), so the result is deterministic
        if count >= min_overlap and count > best.get(component, (0, 0))[1]:
            best[component] = (lesion, count)
    for component, (lesion, _) in best.items():
        matched[component] = lesion
    return matched


def match_previous(
    current: np.ndarray, previous: np.ndarray, min_overlap_voxels: int = 1, margin_voxels: int = 0
) -> tuple[np.ndarray, dict[int, int | None], np.ndarray, list[int]]:
    """Match the lesions of ``current`` to those of ``previous`` (boolean masks on one grid, the
    previous one already warped here) by ``track_patient``'s rule: each current component takes
    the previous component it overlaps most after the previous ones are grown by
    ``margin_voxels``. Returns (current components, component -> previous component or None,
    previous components, previous components no current one matched: *gone*)."""
    components, n = lesion_components(np.asarray(current, dtype=np.uint8))
    before, n_before = lesion_components(np.asarray(previous, dtype=np.uint8))
    grown = before
    if margin_voxels > 0 and n_before:
        dilated = ndimage.grey_dilation(before, size=(2 * margin_voxels + 1,) * 3)
        grown = np.where(before > 0, before, dilated)
    matched = _match_components(components, n, grown, min_overlap_voxels)
    kept = {lesion for lesion in matched.values() if lesion is not None}
    gone = [lesion for lesion in range(1, n_before + 1) if lesion not in kept]
    return components, matched, before, gone


def track_patient(
    patient_id: str,
    timepoints: Sequence[TimePoint],
    warp: Warp = identity_warp,
    min_overlap_voxels: int = 1,
    margin_voxels: int = 0,
) -> pd.DataFrame:
    """Per-lesion volumes over a patient's time points (sorted by ``order``).

    Returns one row per (time point, lesion) with columns patient_id, study_id, order,
    lesion_id (``<patient>-L<k>``), volume_mm3, status (baseline | tracked | new | resolved),
    n_components and previous_volume_mm3. A time point without lesions and without
    previously tracked lesions contributes no rows (its total is 0 in ``response_table``).
    """
    timepoints = sorted(timepoints, key=lambda t: t.order)
    rows: list[dict] = []
    next_id = 1
    previous: TimePoint | None = None
    previous_ids: np.ndarray | None = None
    previous_volumes: dict[int, float] = {}
    for index, point in enumerate(timepoints):
        mask = np.asarray(point.enhancing) > 0
        components, n = lesion_components(mask)
        if previous is None or previous_ids is None:
            matched = {c: None for c in range(1, n + 1)}
        else:
            warped = np.asarray(warp(previous_ids, previous, point))
            if warped.shape != mask.shape:
                raise ValueError(
                    f"patient {patient_id}: warped lesions of {previous.study_id} have shape "
                    f"{warped.shape}, study {point.study_id} has {mask.shape}"
                )
            if margin_voxels > 0:
                # Grow each warped lesion into the background only, never over another lesion.
                grown = ndimage.grey_dilation(warped, size=(2 * margin_voxels + 1,) * 3)
                warped = np.where(warped > 0, warped, grown)
            matched = _match_components(components, n, warped, min_overlap_voxels)
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        ids = np.zeros(mask.shape, dtype=np.int32)
        volumes: dict[int, float] = {}
        n_parts: dict[int, int] = {}
        new_ids: set[int] = set()
        for component in range(1, n + 1):
            lesion = matched[component]
            if lesion is None:
                lesion = next_id
                next_id += 1
                new_ids.add(lesion)
            ids[components == component] = lesion
            volumes[lesion] = volumes.get(lesion, 0.0) + sizes[component] * point.voxel_volume_mm3
            n_parts[lesion] = n_parts.get(lesion, 0) + 1
        for lesion in sorted(set(volumes) | set(previous_volumes)):
            if index == 0:
                status = BASELINE
            elif lesion in new_ids:
                status = "new"
            elif lesion not in volumes:
                status = "resolved"
            else:
                status = "tracked"
            rows.append(
                {
                    "patient_id": patient_id,
                    "study_id": point.study_id,
                    "order": point.order,
                    "lesion_id": f"{patient_id}-L{lesion}",
                    "volume_mm3": float(volumes.get(lesion, 0.0)),
                    "status": status,
                    "n_components": n_parts.get(lesion, 0),
                    "previous_volume_mm3": previous_volumes.get(lesion, math.nan)
                    if index
                    else math.nan,
                }
            )
        # Resolved lesions are not carried forward: only lesions present now are warped on.
        previous, previous_volumes = point, volumes
        previous_ids = _as_id_map(ids, patient_id, point.study_id)
    return pd.DataFrame(rows, columns=TRACK_COLUMNS)


TRACK_COLUMNS = [
    "patient_id",
    "study_id",
    "order",
    "lesion_id",
    "volume_mm3",
    "status",
    "n_components",
    "previous_volume_mm3",
]
TIMEPOINT_COLUMNS = ["patient_id", "study_id", "order"]

# load(study id) -> (internal label map, affine, voxel size in mm) on the grid it is tracked on
Loader = Callable[[str], tuple[np.ndarray, np.ndarray, Sequence[float]]]
# warp_for(study id -> affine, for one series' studies) -> the Warp between its time points
WarpFactory = Callable[[dict[str, np.ndarray]], Warp]


def track_chains(
    series: Iterable[tuple[str, str, Sequence[str]]],
    load: Loader,
    order: Mapping[str, int],
    warp_for: WarpFactory,
    thresholds: ResponseThresholds,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Enhancing lesions tracked along each series ``(patient id, name, studies)``: the studies
    in time order, each registered to the one before (``registered_chains`` /
    ``first_registered_series``); a series' lesion ids are ``<name>-L<k>``, its rows carry the
    patient id. ``order``: study -> its time-point order; ``thresholds``: matching overlap and
    margin (in voxels of the series' finest spacing).

    Returns ``(lesions, time points)``: the ``track_patient`` rows of every series
    (``TRACK_COLUMNS``) and every tracked study (``TIMEPOINT_COLUMNS``, for
    ``response_table``). One series' images are held at a time."""
    frames, tracked_points = [], []
    for patient_id, name, studies in series:
        points, affines, spacings = [], {}, []
        for study_id in studies:
            labels, affine, zooms = load(study_id)
            zooms = [float(z) for z in zooms]
            affines[study_id] = affine
            spacings += zooms
            points.append(TimePoint.from_labels(study_id, order[study_id], labels, zooms))
        tracked = track_patient(
            name,
            points,
            warp_for(affines),
            thresholds.min_overlap_voxels,
            thresholds.margin_voxels(spacings),
        )
        frames.append(tracked.assign(patient_id=patient_id))
        tracked_points += [
            {"patient_id": patient_id, "study_id": p.study_id, "order": p.order} for p in points
        ]
    frames = [f for f in frames if not f.empty]
    lesions = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRACK_COLUMNS)
    )
    return lesions, pd.DataFrame(tracked_points, columns=TIMEPOINT_COLUMNS)


def _as_id_map(ids: np.ndarray, patient_id: str, study_id: str) -> np.ndarray:
    """The id map to warp forward, as uint8 (what label propagation writes)."""
    if ids.max(initial=0) > MAX_TRACKED_LESIONS:
        # Ids grow with every new lesion; renumbering would lose identity, so refuse clearly.
        raise ValueError(
            f"patient {patient_id}, study {study_id}: lesion id {int(ids.max())} exceeds "
            f"{MAX_TRACKED_LESIONS}, too many distinct lesions for a uint8 lesion-id map"
        )
    return ids.astype(np.uint8)


def classify_response(
    volume: float,
    baseline: float,
    nadir: float,
    new_lesion_volumes: Sequence[float],
    thresholds: ResponseThresholds,
) -> str:
    """Volumetric response of one follow-up (see module doc); volumes in mm^3.

    ``nadir`` is the smallest total volume before this follow-up (baseline included).
    Progression is checked first: it overrides any decrease.
    """
    significant_new = [v for v in new_lesion_volumes if v >= thresholds.new_lesion_min_mm3]
    if significant_new:
        return PROGRESSION
    if nadir > 0 and volume >= nadir * (1 + thresholds.progression_increase):
        return PROGRESSION
    if nadir <= 0 < volume and not new_lesion_volumes:
        # Disease came back in tracked lesions after the nadir was 0: regrowth is progression.
        return PROGRESSION
    if volume <= thresholds.complete_response_max_mm3 and not new_lesion_volumes:
        return COMPLETE_RESPONSE if baseline > thresholds.complete_response_max_mm3 else NO_DISEASE
    if baseline > 0 and volume <= baseline * (1 - thresholds.partial_response_decrease):
        return PARTIAL_RESPONSE
    return STABLE


def response_table(
    lesions: pd.DataFrame,
    timepoints: pd.DataFrame,
    thresholds: ResponseThresholds,
) -> pd.DataFrame:
    """Total enhancing volume and response category per time point.

    ``lesions``: ``track_patient`` rows (any patients); ``timepoints``: every tracked time point
    (patient_id, study_id, order), so time points without lesions get a total of 0. Columns:
    patient_id, study_id, order, total_volume_mm3, n_lesions, n_new_lesions,
    new_lesion_volume_mm3, baseline_volume_mm3, nadir_volume_mm3, change_from_baseline,
    change_from_nadir (fractions; NaN when the reference volume is 0) and response
    ("baseline" for the first time point).
    """
    present = lesions[lesions["volume_mm3"] > 0]
    totals = present.groupby("study_id")["volume_mm3"].sum()
    counts = present.groupby("study_id")["lesion_id"].nunique()
    new = lesions[lesions["status"] == "new"]
    rows = []
    for patient_id, points in timepoints.groupby("patient_id", sort=True):
        baseline = nadir = math.nan
        for point in points.sort_values("order").itertuples(index=False):
            volume = float(totals.get(point.study_id, 0.0))
            new_volumes = new.loc[new["study_id"] == point.study_id, "volume_mm3"].tolist()
            if math.isnan(baseline):
                baseline = nadir = volume
                response = BASELINE
                new_volumes = []
            else:
                response = classify_response(volume, baseline, nadir, new_volumes, thresholds)
            rows.append(
                {
                    "patient_id": patient_id,
                    "study_id": point.study_id,
                    "order": int(point.order),
                    "total_volume_mm3": volume,
                    "n_lesions": int(counts.get(point.study_id, 0)),
                    "n_new_lesions": len(new_volumes),
                    "new_lesion_volume_mm3": float(sum(new_volumes)),
                    "baseline_volume_mm3": baseline,
                    "nadir_volume_mm3": nadir,
                    "change_from_baseline": _change(volume, baseline),
                    "change_from_nadir": _change(volume, nadir),
                    "response": response,
                }
            )
            nadir = min(nadir, volume)
    return pd.DataFrame(rows)


def _change(volume: float, reference: float) -> float:
    return (volume - reference) / reference if reference > 0 else math.nan
