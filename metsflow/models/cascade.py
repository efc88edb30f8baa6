"""Stage 2 of the detection cascade: score each stage-1 candidate lesion, drop the unlikely ones.

Stage 1 (the segmentation network) is tuned for sensitivity and so proposes false positives
(vessels, choroid plexus, dural enhancement). Stage 2 looks at one candidate at a time: a
candidate is a 26-connected component of the stage-1 whole lesion (enhancing + necrosis); its
input is a fixed-size crop (``crop_size`` voxels) centred on the component's centroid with the
stage-1 input channels, the candidate's mask and the stage-1 foreground probability. A small
MONAI ``Classifier`` returns one logit: is this a real lesion?

Training candidates come from stage-1 predictions on the training studies (thresholded low, at
``proposal_threshold``, to collect hard negatives) plus every reference lesion (so positives
exist even where stage 1 misses); a candidate is positive when it overlaps a reference lesion.
The operating point is chosen on validation studies from the FROC of the stage-1 candidates'
stage-2 scores (lesion sensitivity = reference lesions hit by a kept candidate / all reference
lesions, against false positives per validation patient; ``metsflow.evaluation.metrics.froc``) by one of
two clinical rules (``operating_rule``):

- ``max_fp_per_patient`` (default, 1.0): the highest sensitivity with at most that many false
  positives per patient -- what a reader tolerates. On the phantom benchmark the old
  sensitivity-only rule dropped stage 2's FP/patient to 0 while losing two real lesions;
- ``target_sensitivity``: the highest threshold whose sensitivity is still at least
  ``target_sensitivity`` (or stage 1's own sensitivity, if that is lower).

With ``keep_diameter_mm`` set, a candidate at least that wide (equivalent-sphere diameter) is
kept whatever its score: ``size_aware_scores`` raises its score to 1.0 right after scoring, both
on the validation candidates the operating point is chosen on and at inference
(``filter_prediction``), so the chosen threshold and the FROC count such candidates as always kept.

With ``stage1_weight`` w set, a candidate's score is (1 - w) x stage 2's probability + w x stage
1's peak probability in it (``candidate_scores``, before the size rule), on validation and at
inference alike: a lesion stage 1 is sure of is not dropped on stage 2's word alone.

With ``proposal_sensitivity`` set, a kept candidate without any argmax lesion voxel is added back
as enhancing: its whole proposal component, or with ``recovered_peak_fraction`` set only the part
around its peak (``peak_connected_region``), so a small lesion stage 1 scored low is not added
as a bloated blob that misses the IoU match. Inference only: training and the operating point
do not read it.

With ``split_proposals`` (and ``proposal_sensitivity``) set, a proposal component is split at
stage 1's argmax lesions (``split_at_lesions``): each argmax lesion is its own candidate, in
training, on validation and at inference, so a kept lesion never carries the argmax specks its
low-threshold proposal merged with, and the validation FROC counts the lesions of the final mask.

With ``select_every`` k, each classifier is scored on the validation candidates every k
iterations (and at its last) and keeps its weights of the best ``selection_score`` (the
validation FROC's mean sensitivity at fractions of ``max_fp_per_patient``) instead of the last
iteration's. With ``ensemble`` n, n classifiers are trained alike from seeds seed .. seed + n - 1
and a candidate's stage-2 probability is their mean (``SeedEnsemble``): one checkpoint, one
network to every caller.

Threshold, rule, the validation FROC, the figures before/after filtering and the validation
lesions the chosen point loses (study, lesion, equivalent diameter) are stored in the stage-2
checkpoint, which loads with ``torch.load(weights_only=True)`` like every metsflow checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch import nn

from metsflow.core import labels as lab
from metsflow.core.config import section_problems
from metsflow.core.io import atomic_path, plain
from metsflow.core.sequences import REFERENCE
from metsflow.core.settings import Stage2Settings
from metsflow.evaluation import metrics
from metsflow.models.networks import check_channels

log = logging.getLogger(__name__)

STAGE2_FORMAT = "metsflow-stage2"
STAGE2_FORMAT_VERSION = 1

# The knobs and their defaults are owned by metsflow.core.settings.Stage2Settings.
DEFAULTS: dict[str, Any] = Stage2Settings().as_dict()


@dataclass
class Candidate:
    """One candidate lesion of one study."""

    study_id: str
    index: int  # component label in the study's candidate map (1..n)
    centroid: tuple[int, int, int]
    voxels: int
    max_prob: float
    is_lesion: bool | None = None  # overlaps a reference lesion (None: no reference)
    score: float = math.nan


def resolve_params(params: Stage2Settings | dict | None) -> Stage2Settings:
    """The typed stage-2 settings of ``params`` (a dict: ``None`` = the default, except for the
    keys whose ``None`` means something: ``Stage2Settings.nullable``, so a checkpoint trained on
    argmax proposals keeps them whatever the default is now), checked as the config schema
    checks them (for callers that do not come through the config)."""
    if not isinstance(params, Stage2Settings):
        keep_none = Stage2Settings.nullable()
        values = {k: v for k, v in (params or {}).items() if v is not None or k in keep_none}
        params = Stage2Settings.from_dict(values, "stage-2 keys")
    crop = [int(v) for v in np.broadcast_to(params.crop_size, 3)]
    params = dataclasses.replace(params, crop_size=crop)
    problems = section_problems(params, "stage-2") + params.problems("stage-2")
    if problems:
        raise ValueError("; ".join(problems))
    return params


# --------------------------------------------------------------------------------------------
# candidates and crops
# --------------------------------------------------------------------------------------------
def find_candidates(
    lesion: np.ndarray, fg_prob: np.ndarray, study_id: str, reference: np.ndarray | None = None
) -> tuple[np.ndarray, list[Candidate]]:
    """Components of the boolean ``lesion`` map -> ``(component map, candidates)``.

    ``reference`` (boolean whole lesion), when given, marks each candidate ``is_lesion``."""
    components, _ = lab.lesion_components(lesion)
    return components, candidates_of(components, fg_prob, study_id, reference)


def candidates_of(
    components: np.ndarray, fg_prob: np.ndarray, study_id: str, reference: np.ndarray | None = None
) -> list[Candidate]:
    """The candidates of a component map (ids 1..n, 0 background; ``proposal_components``):
    centroid, size and peak ``fg_prob`` of each; ``reference`` as in ``find_candidates``."""
    count = int(components.max()) if components.size else 0
    if not count:
        return []
    index = np.arange(1, count + 1)
    centroids = ndimage.center_of_mass(np.ones_like(components), components, index)
    sizes = ndimage.sum_labels(np.ones_like(components), components, index)
    maxima = ndimage.maximum(fg_prob, components, index)
    hits = (
        ndimage.maximum(np.asarray(reference, dtype=np.uint8), components, index)
        if reference is not None
        else [None] * count
    )
    return [
        Candidate(
            study_id=study_id,
            index=int(i),
            centroid=tuple(int(round(c)) for c in centroid),
            voxels=int(size),
            max_prob=float(peak),
            is_lesion=None if hit is None else bool(hit),
        )
        for i, centroid, size, peak, hit in zip(index, centroids, sizes, maxima, hits, strict=True)
    ]


def crop_at(volume: np.ndarray, centre: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``size`` crop of a channels-first ``volume`` centred at ``centre``, zero outside."""
    out = np.zeros((volume.shape[0], *size), dtype=np.float32)
    src, dst = [], []
    for c, s, n in zip(centre, size, volume.shape[1:], strict=True):
        start = int(c) - s // 2
        lo, hi = max(0, start), min(n, start + s)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


def candidate_crops(
    image: np.ndarray,
    fg_prob: np.ndarray,
    components: np.ndarray,
    candidates: Sequence[Candidate],
    crop_size: Sequence[int],
) -> np.ndarray:
    """Stage-2 inputs ``(N, C + 2, *crop_size)``: image channels, candidate mask, fg prob."""
    crops = np.zeros((len(candidates), image.shape[0] + 2, *crop_size), dtype=np.float32)
    for n, cand in enumerate(candidates):
        crops[n, : image.shape[0]] = crop_at(image, cand.centroid, crop_size)
        # Crop first, then compare: cost per candidate is the crop, not the volume.
        crops[n, -2] = crop_at(components[None], cand.centroid, crop_size)[0] == cand.index
        crops[n, -1] = crop_at(fg_prob[None], cand.centroid, crop_size)[0]
    return crops


# --------------------------------------------------------------------------------------------
# network and checkpoint
# --------------------------------------------------------------------------------------------
def network_spec(channels: Sequence[str], params: Stage2Settings | dict) -> dict:
    params = resolve_params(params)
    filters = [int(f) for f in params.filters]
    return {
        "in_shape": [len(check_channels(channels)) + 2, *params.crop_size],
        "classes": 1,
        "channels": filters,
        "strides": [2] * len(filters),
        "num_res_units": 1,
    }


def build_classifier(spec: dict) -> nn.Module:
    from monai.networks.nets import Classifier

    return Classifier(**spec)


class SeedEnsemble(nn.Module):
    """Stage 2 as ``ensemble`` crop classifiers trained from consecutive seeds: the logit of
    their mean probability, so ``score_crops`` and every caller read one classifier."""

    # Mean probabilities of exactly 0 or 1 (saturated members) keep a finite logit.
    EPS = 1e-7

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probability = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(probability, eps=self.EPS)


def build_stage2(spec: dict, members: int = 1) -> nn.Module:
    """The stage-2 network of a checkpoint: one classifier of ``spec``, or a ``SeedEnsemble``
    of ``members`` of them."""
    if int(members) == 1:
        return build_classifier(spec)
    return SeedEnsemble([build_classifier(spec) for _ in range(int(members))])


def save_stage2(path: str | os.PathLike, network: nn.Module, meta: dict) -> None:
    payload = {
        "format": STAGE2_FORMAT,
        "format_version": STAGE2_FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "meta": plain(meta),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# What a checkpoint from before a stage-2 key existed did, pinned whatever the default is now:
LEGACY_PARAMS: dict[str, Any] = {
    "keep_diameter_mm": None,  # no candidate was kept by size
    "recovered_peak_fraction": None,  # a recovered lesion is its whole proposal
    "split_proposals": False,  # trained on whole proposals
    "stage1_weight": 0.0,  # threshold chosen on stage 2's scores alone
    "select_every": None,  # the last iteration's weights
    "ensemble": 1,  # one classifier
}


def load_stage2(
    path: str | os.PathLike, expect_channels: Sequence[str] | None = None
) -> tuple[nn.Module, dict]:
    """Load a stage-2 checkpoint safely; refuse one for other channels or another format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stage-2 checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a stage-2 checkpoint (unreadable: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != STAGE2_FORMAT:
        raise ValueError(f"{path} is not a stage-2 checkpoint (no {STAGE2_FORMAT!r} tag)")
    if payload.get("format_version") != STAGE2_FORMAT_VERSION:
        raise ValueError(f"{path}: stage-2 format version {payload.get('format_version')}")
    meta = payload["meta"]
    for key, value in LEGACY_PARAMS.items():
        meta["params"].setdefault(key, value)
    if expect_channels is not None and list(meta["channels"]) != list(expect_channels):
        raise ValueError(
            f"stage-2 checkpoint {path} reads channels {meta['channels']}, but the stage-1 "
            f"model reads {list(expect_channels)}"
        )
    network = build_stage2(meta["network"], meta["params"]["ensemble"])
    network.load_state_dict(payload["state_dict"])
    return network.eval(), meta


# --------------------------------------------------------------------------------------------
# scoring, operating point, filtering
# --------------------------------------------------------------------------------------------
def score_crops(network: nn.Module, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Lesion probability of each crop."""
    if not len(crops):
        return np.zeros(0, dtype=np.float32)
    network.eval()
    device = next(network.parameters()).device
    scores = []
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            batch = torch.from_numpy(crops[start : start + batch_size]).to(device)
            scores.append(torch.sigmoid(network(batch).float()).flatten().cpu().numpy())
    return np.concatenate(scores)


def candidate_scores(
    stage2: np.ndarray,
    peaks: Sequence[float] | None,
    voxels: Sequence[int] | None,
    spacing: Sequence[float] | None,
    params: Stage2Settings | dict,
) -> np.ndarray:
    """The scores the operating point reads, of candidates stage 2 scored ``stage2``: mixed with
    stage 1's ``peaks`` (each candidate's peak foreground probability) by ``stage1_weight``,
    then ``size_aware_scores``. The one owner of a candidate's score: ``train_stage2`` reads
    it on validation and ``filter_prediction`` at inference."""
    settings = resolve_params(params)
    weight = float(settings.stage1_weight)
    scores = np.asarray(stage2, dtype=float)
    if weight and len(scores):
        if peaks is None:
            raise ValueError("stage1_weight needs the candidates' stage-1 peak probabilities")
        scores = (1.0 - weight) * scores + weight * np.asarray(peaks, dtype=float)
    return size_aware_scores(scores, voxels, spacing, settings)


def size_aware_scores(
    scores: np.ndarray,
    voxels: Sequence[int] | None,
    spacing: Sequence[float] | None,
    params: Stage2Settings | dict,
) -> np.ndarray:
    """``scores`` of candidates of ``voxels`` voxels on a grid of ``spacing`` mm, those at least
    ``keep_diameter_mm`` wide (equivalent-sphere diameter, rounded as the size bins round it so
    a lesion in the ">= 10 mm" bin counts as 10 mm) raised to 1.0, the highest score: every
    threshold keeps them. The one owner of the rule: ``filter_prediction`` applies it at
    inference and ``train_stage2`` before choosing the operating point, so the validation FROC
    counts these candidates as always kept (false positives included) and the threshold chosen
    is the one inference applies. Unchanged with ``keep_diameter_mm`` None."""
    keep = resolve_params(params).keep_diameter_mm
    if keep is None or not len(scores):
        return scores
    if voxels is None or spacing is None:
        raise ValueError("keep_diameter_mm needs the candidates' sizes and the grid's spacing")
    diameters = np.round(metrics.voxel_diameter_mm(voxels, spacing), metrics.DIAMETER_DECIMALS)
    return np.where(diameters >= float(keep), 1.0, np.asarray(scores, dtype=float))


def choose_threshold(
    scores: np.ndarray,
    hits: Sequence[Sequence],
    n_reference: int,
    *,
    n_patients: int = 1,
    rule: str = Stage2Settings.operating_rule,
    max_fp_per_patient: float = Stage2Settings.max_fp_per_patient,
    target_sensitivity: float = Stage2Settings.target_sensitivity,
) -> dict:
    """Stage-2 threshold on validation candidates by ``rule`` (module docstring).

    ``hits[i]``: ids of the reference lesions candidate ``i`` overlaps (empty: false positive);
    a reference lesion is detected when any kept candidate (score >= threshold) hits it.
    Returns the threshold, the rule and its parameters, whether the rule could be met, the
    validation FROC (``froc``: records, highest threshold first) and sensitivity / FDR / false
    positives per patient before (every candidate kept) and after."""
    scores = np.asarray(scores, dtype=float)
    n_patients = max(int(n_patients), 1)
    curve = metrics.froc(scores, hits, n_reference, n_patients)
    point = metrics.choose_operating_point(
        curve, rule, max_fp_per_patient=max_fp_per_patient, target_sensitivity=target_sensitivity
    )

    def figures(threshold: float) -> tuple[float, float, float]:
        keep = scores >= threshold
        found = {r for k, h in zip(keep, hits, strict=True) if k for r in h}
        kept = int(keep.sum())
        false = sum(1 for k, h in zip(keep, hits, strict=True) if k and not h)
        sensitivity = len(found) / n_reference if n_reference else math.nan
        return sensitivity, (false / kept if kept else 0.0), false / n_patients

    base_sens, base_fdr, base_fp = figures(-math.inf)
    sens, fdr, fp = figures(point["threshold"])
    return {
        "threshold": point["threshold"],
        "operating_rule": rule,
        "max_fp_per_patient": float(max_fp_per_patient),
        "target_sensitivity": float(target_sensitivity),
        "rule_met": point["rule_met"],
        "sensitivity_before": base_sens,
        "fdr_before": base_fdr,
        "fp_per_patient_before": base_fp,
        "sensitivity_after": sens,
        "fdr_after": fdr,
        "fp_per_patient_after": fp,
        "n_candidates": len(scores),
        "n_reference_lesions": int(n_reference),
        "n_patients": n_patients,
        "froc": curve.to_dict("records"),
    }


def lost_lesions(
    scores: np.ndarray, hits: Sequence[Sequence], threshold: float, diameters: dict
) -> list[dict]:
    """Reference lesions a stage-1 candidate found but no candidate kept at ``threshold`` keeps.

    ``hits`` ids are ``(study_id, lesion_id)``; ``diameters`` maps them to the equivalent
    diameter (mm). Rows ``{study_id, lesion_id, diameter_mm, size_bin, best_score}``, by
    study and lesion (size bins: ``metrics.DEFAULT_SIZE_BINS_MM``)."""
    best: dict = {}
    for score, hit in zip(np.asarray(scores, dtype=float).tolist(), hits, strict=True):
        for ref in hit:
            best[ref] = max(best.get(ref, -math.inf), score)
    labels = metrics.size_bin_labels(metrics.DEFAULT_SIZE_BINS_MM)
    rows = []
    for (study_id, lesion), score in sorted(best.items()):
        if score >= threshold:
            continue
        diameter = float(diameters.get((study_id, lesion), math.nan))
        size_bin = (
            labels[int(metrics.size_bin_index(diameter, metrics.DEFAULT_SIZE_BINS_MM))]
            if math.isfinite(diameter)
            else ""
        )
        rows.append(
            {
                "study_id": study_id,
                "lesion_id": int(lesion),
                "diameter_mm": diameter,
                "size_bin": size_bin,
                "best_score": float(score),
            }
        )
    return rows


# Lowest proposal threshold ``proposal_threshold`` may choose: near 0 the foreground
# probability's components merge into one brain-sized proposal.
PROPOSAL_FLOOR = 0.05
# Highest: above 0.5 the proposals would miss lesions the argmax itself finds.
PROPOSAL_CEILING = 0.5


def lesion_peak_probabilities(fg_prob: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Highest foreground probability inside each reference lesion (``labels.lesion_components``):
    the lesion is hit by a proposal at threshold t (a component of ``fg_prob >= t``) exactly
    when this >= t."""
    ref_cc, n_ref = lab.lesion_components(reference)
    if not n_ref:
        return np.zeros(0)
    return np.asarray(ndimage.maximum(fg_prob, ref_cc, np.arange(1, n_ref + 1)), dtype=float)


def proposal_threshold(peaks: Sequence[float], sensitivity: float) -> dict:
    """The highest stage-1 probability threshold whose proposals hit at least ``sensitivity``
    of the reference lesions whose peak probabilities (``lesion_peak_probabilities``, pooled
    over the validation studies) are ``peaks``, within [``PROPOSAL_FLOOR``,
    ``PROPOSAL_CEILING``]. Returns ``{threshold, proposal_sensitivity, n_reference}``: the
    proposal sensitivity is the ceiling stage 2 works under."""
    peaks = np.sort(np.asarray(peaks, dtype=float))[::-1]
    if not len(peaks):
        return {"threshold": PROPOSAL_CEILING, "proposal_sensitivity": math.nan, "n_reference": 0}
    needed = max(1, math.ceil(float(sensitivity) * len(peaks) - 1e-9))
    threshold = float(np.clip(peaks[needed - 1], PROPOSAL_FLOOR, PROPOSAL_CEILING))
    return {
        "threshold": threshold,
        "proposal_sensitivity": float(np.mean(peaks >= threshold)),
        "n_reference": len(peaks),
    }


def split_at_lesions(proposal: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """The candidate map of ``split_proposals``: each component of the boolean ``lesion``
    (stage 1's argmax whole lesion) is a candidate of its own (ids 1..n, cc3d order), then each
    component of ``proposal | lesion`` that holds no ``lesion`` voxel (ids n+1.., in order); the
    rest of a proposal around an argmax lesion belongs to no candidate. So every lesion of the
    final mask is exactly one scored candidate, kept or dropped alone."""
    lesion = np.asarray(lesion, dtype=bool)
    pieces, n_pieces = lab.lesion_components(lesion)
    wide, n_wide = lab.lesion_components(np.asarray(proposal, dtype=bool) | lesion)
    free = np.setdiff1d(np.arange(1, n_wide + 1), np.unique(wide[lesion]))
    lookup = np.zeros(n_wide + 1, dtype=np.int64)
    lookup[free] = np.arange(n_pieces + 1, n_pieces + 1 + len(free))
    out = pieces.astype(np.int64)
    rest = lookup[wide]
    out[rest > 0] = rest[rest > 0]
    return out


def low_threshold_components(
    fg_prob: np.ndarray, params: Stage2Settings | dict, pred: np.ndarray | None = None
) -> np.ndarray:
    """Candidate map of the proposals at ``proposal_threshold`` (``fg_prob`` at or above it):
    their components, or with ``split_proposals`` ``split_at_lesions`` at stage 1's argmax
    lesions (``pred``, its internal labels, needed then)."""
    settings = resolve_params(params)
    proposal = np.asarray(fg_prob) >= float(settings.proposal_threshold)
    if not settings.split_proposals:
        return lab.lesion_components(proposal)[0]
    if pred is None:
        raise ValueError("split_proposals needs stage 1's prediction to split the proposals at")
    return split_at_lesions(proposal, lab.whole_lesion(pred))


def proposal_components(pred: np.ndarray, fg_prob: np.ndarray, meta: dict) -> np.ndarray:
    """The candidate map (ids 1..n) ``filter_prediction`` scores with the stage-2 checkpoint
    ``meta``: the components of stage 1's whole lesion, or with ``proposal_sensitivity`` set
    (high-sensitivity stage 1) ``low_threshold_components``. The one owner of the numbering
    that ``scored_candidate_hits`` and the review suggestions (``postprocess``) read."""
    settings = resolve_params(meta["params"])
    if settings.proposal_sensitivity is None:
        return lab.lesion_components(lab.whole_lesion(pred))[0]
    return low_threshold_components(fg_prob, settings, pred)


def peak_connected_region(region: np.ndarray, fg_prob: np.ndarray, fraction: float) -> np.ndarray:
    """The part of a recovered lesion's proposal component ``region`` (boolean) that
    ``filter_prediction`` adds as enhancing with ``recovered_peak_fraction`` = ``fraction``:
    the voxels of ``region`` whose ``fg_prob`` is at least ``fraction`` x the region's peak
    (and so at least the proposal threshold, as every voxel of ``region`` is), and of those only
    the connected piece (``labels.lesion_components``) that holds the peak voxel, so the
    lesion never splits into specks. ``fraction`` 1 leaves the peak voxel(s) connected to it;
    an empty ``region`` gives an empty mask."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return region.copy()
    prob = np.where(region, np.asarray(fg_prob, dtype=np.float32), -np.inf)
    peak = np.unravel_index(int(np.argmax(prob)), prob.shape)
    core = prob >= np.float32(float(fraction)) * prob[peak]
    pieces, _ = lab.lesion_components(core)
    return pieces == pieces[peak]


def filter_prediction(
    pred: np.ndarray,
    image: np.ndarray,
    fg_prob: np.ndarray,
    network: nn.Module,
    meta: dict,
    study_id: str = "",
    *,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, list[Candidate]]:
    """Remove stage-1 lesions whose stage-2 score is below ``meta["threshold"]``.

    A removed lesion's enhancing/necrosis voxels become background, and so does the edema whose
    nearest lesion voxel belongs to it (edema of a kept neighbour stays). With
    ``proposal_sensitivity`` set (high-sensitivity stage 1), the candidates are the components
    of ``fg_prob >= proposal_threshold`` rather than of the argmax, and a kept candidate without
    any argmax lesion voxel (a lesion stage 1 scored below 0.5) is added as enhancing: its whole
    component, or with ``recovered_peak_fraction`` set its ``peak_connected_region``. With
    ``keep_diameter_mm`` set, ``spacing`` (mm, the grid's) is needed and a candidate that wide
    scores 1.0 (``size_aware_scores``); with ``stage1_weight`` set, stage 1's peak is mixed in
    (``candidate_scores``). Returns the filtered internal labels and the scored candidates
    (their scores as the threshold saw them)."""
    settings = resolve_params(meta["params"])
    components = proposal_components(pred, fg_prob, meta)
    candidates = candidates_of(components, fg_prob, study_id)
    if not candidates:
        return np.asarray(pred, dtype=np.uint8).copy(), candidates
    crops = candidate_crops(image, fg_prob, components, candidates, settings.crop_size)
    scores = candidate_scores(
        score_crops(network, crops),
        [c.max_prob for c in candidates],
        [c.voxels for c in candidates],
        spacing,
        settings,
    )
    for cand, score in zip(candidates, scores, strict=True):
        cand.score = float(score)
    out = keep_candidates(pred, fg_prob, components, candidates, float(meta["threshold"]), meta)
    return out, candidates


def keep_candidates(
    pred: np.ndarray,
    fg_prob: np.ndarray,
    components: np.ndarray,
    candidates: Sequence[Candidate],
    threshold: float,
    meta: dict,
) -> np.ndarray:
    """The filtered labels of ``filter_prediction`` once its ``candidates`` (of the candidate
    map ``components``) are scored: those below ``threshold`` removed, a kept one without any
    argmax lesion voxel added (high-sensitivity stage 1). Apart so that a sweep of thresholds
    (the benchmark's FROC on the final masks) scores the candidates once."""
    settings = resolve_params(meta["params"])
    dropped = [c.index for c in candidates if c.score < threshold]
    out = remove_components(pred, components, dropped)
    if settings.proposal_sensitivity is None:
        return out
    kept = [c.index for c in candidates if c.score >= threshold]
    recovered = np.setdiff1d(kept, np.unique(components[lab.whole_lesion(pred)]))
    fraction = settings.recovered_peak_fraction
    if fraction is None:
        out[np.isin(components, recovered)] = lab.ENHANCING
        return out
    boxes = ndimage.find_objects(components)
    for index in recovered:
        box = boxes[int(index) - 1]
        region = peak_connected_region(components[box] == index, fg_prob[box], fraction)
        out[box][region] = lab.ENHANCING
    return out


def scored_candidate_hits(
    pred: np.ndarray,
    fg_prob: np.ndarray,
    meta: dict,
    candidates: Sequence[Candidate],
    reference: np.ndarray,
    study_id: str,
    spacing: Sequence[float],
) -> tuple[np.ndarray, list[list[tuple[str, int]]], dict[tuple[str, int], float]]:
    """The ``candidates`` ``filter_prediction(pred, _, fg_prob, _, meta, study_id)`` scored on one
    labelled study, against its ``reference`` (whole lesion): ``(scores, hits, diameters)``.
    ``hits[i]``: the reference lesions candidate i touches, as ``(study_id, lesion)`` (unique
    across studies, numbered as the validation FROC numbers them; empty: a false positive);
    ``diameters``: every reference lesion of the study -> its equivalent diameter (mm, on a grid
    of ``spacing``). Pooled over studies, ``metrics.froc(scores, hits, len(diameters),
    n_patients)`` is the cascade's FROC as ``train_stage2`` reads it on validation (a lesion is
    detected at threshold t when a candidate scoring >= t touches it), and ``lost_lesions``
    what a threshold gives up."""
    # Numbered as filter_prediction numbered its candidates: the same function.
    components = proposal_components(pred, fg_prob, meta)
    ref_cc, n_ref = lab.lesion_components(np.asarray(reference, dtype=bool))
    hit_of = component_hits(components, ref_cc)
    scores = np.array([c.score for c in candidates], dtype=float)
    hits = [[(study_id, r) for r in hit_of.get(c.index, [])] for c in candidates]
    diameters = {
        (study_id, lesion): diameter
        for lesion, diameter in enumerate(lesion_diameters_mm(ref_cc, n_ref, spacing), 1)
    }
    return scores, hits, diameters


# A suggestion map is uint8 (review editor, NiiVue drawing layer): at most 255 per study, the
# highest-scoring kept when stage 1 proposes more.
MAX_SUGGESTIONS = 255


def dropped_candidates(
    components: np.ndarray, candidates: Sequence[Candidate], threshold: float
) -> tuple[np.ndarray, list[dict]]:
    """The candidates stage 2 dropped (score < ``threshold``), as review suggestions.

    Returns a uint8 map (ids 1..n, highest stage-2 score first) and one row per id:
    ``{id, stage1_score (max fg prob), stage2_score (the score the threshold read:
    ``candidate_scores``), voxels}``. What stage 2 discarded is what
    a reviewer most often has to add back by hand, so it is offered, not thrown away."""
    dropped = sorted(
        (c for c in candidates if c.score < float(threshold)),
        key=lambda c: (-c.score, c.index),
    )[:MAX_SUGGESTIONS]
    lookup = np.zeros(int(components.max()) + 1 if components.size else 1, dtype=np.uint8)
    rows = []
    for new_id, cand in enumerate(dropped, start=1):
        lookup[cand.index] = new_id
        rows.append(
            {
                "id": new_id,
                "stage1_score": round(float(cand.max_prob), 4),
                "stage2_score": round(float(cand.score), 4),
                "voxels": int(cand.voxels),
            }
        )
    return lookup[components], rows


def remove_components(
    pred: np.ndarray, components: np.ndarray, dropped: Sequence[int]
) -> np.ndarray:
    """``pred`` without the lesion components ``dropped`` and the edema nearest to them."""
    out = np.asarray(pred, dtype=np.uint8).copy()
    if not len(dropped):
        return out
    out[np.isin(components, dropped)] = lab.BACKGROUND
    edema = out == lab.EDEMA
    if edema.any():
        # Owner of each voxel = the component of its nearest lesion voxel.
        _, nearest = ndimage.distance_transform_edt(components == 0, return_indices=True)
        owner = components[tuple(nearest)]
        out[edema & np.isin(owner, dropped)] = lab.BACKGROUND
    return out


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@dataclass
class StudyCandidates:
    """Stage-2 inputs of one study: crops, per-candidate reference hits, reference count."""

    crops: np.ndarray
    labels: np.ndarray  # 1.0 lesion, 0.0 false positive
    hits: list[list[int]]
    n_reference: int
    sources: list[str]  # "stage1" or "reference"
    study_id: str = ""
    patient_id: str = ""  # FP per patient on validation ("" -> the study is its own patient)
    ref_diameters_mm: list[float] | None = None  # equivalent diameter of reference lesion i+1
    voxels: list[int] | None = None  # size of each candidate (size_aware_scores)
    spacing: tuple[float, ...] | None = None  # mm, the grid's (None: not given)
    peaks: list[float] | None = None  # stage-1 peak probability of each candidate (stage1_weight)


def lesion_diameters_mm(
    components: np.ndarray, count: int, spacing: Sequence[float]
) -> list[float]:
    """Equivalent-sphere diameter (mm) of components 1..``count`` of ``components`` on a grid of
    ``spacing`` mm: the reference lesions' sizes of the validation FROC and the test FROC."""
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1 : count + 1]
    return metrics.voxel_diameter_mm(sizes, spacing).tolist()


def component_hits(components: np.ndarray, ref_components: np.ndarray) -> dict[int, list[int]]:
    """Candidate component -> the reference lesions (components of ``ref_components``) it
    overlaps, sorted; candidates that overlap none are absent (false positives)."""
    both = (components > 0) & (ref_components > 0)
    pairs = np.unique(np.stack([components[both], ref_components[both]]), axis=1)
    hit_of: dict[int, list[int]] = {}
    for comp, ref in pairs.T:
        hit_of.setdefault(int(comp), []).append(int(ref))
    return {comp: sorted(refs) for comp, refs in hit_of.items()}


def study_candidates(
    study_id: str,
    image: np.ndarray,
    fg_prob: np.ndarray,
    reference: np.ndarray,
    params: Stage2Settings | dict,
    add_reference: bool,
    patient_id: str = "",
    spacing: Sequence[float] | None = None,
    pred: np.ndarray | None = None,
) -> StudyCandidates:
    """Candidates of one study: stage-1 components at ``proposal_threshold``
    (``low_threshold_components``; ``pred``, stage 1's internal labels, needed with
    ``split_proposals``) + the reference lesions themselves with ``add_reference``, for
    training. ``patient_id`` and ``spacing`` (mm) feed the validation FROC, the list of
    lesions the operating point loses and ``keep_diameter_mm`` (``size_aware_scores``)."""
    params = resolve_params(params)
    reference = np.asarray(reference, dtype=bool)
    ref_cc, n_ref = lab.lesion_components(reference)
    components = low_threshold_components(fg_prob, params, pred)
    cands = candidates_of(components, fg_prob, study_id, reference)
    if len(cands) > int(params.max_candidates):
        # A badly trained stage 1 can propose thousands of specks: keep the most confident.
        cands = sorted(cands, key=lambda c: -c.max_prob)[: int(params.max_candidates)]
    crops = candidate_crops(image, fg_prob, components, cands, params.crop_size)
    hit_of = component_hits(components, ref_cc)
    hits = [hit_of.get(c.index, []) for c in cands]
    sources = ["stage1"] * len(cands)
    voxels = [c.voxels for c in cands]
    peaks = [c.max_prob for c in cands]
    if add_reference and n_ref:
        ref_comp, ref_cands = find_candidates(reference, fg_prob, study_id, reference)
        crops = np.concatenate(
            [crops, candidate_crops(image, fg_prob, ref_comp, ref_cands, params.crop_size)]
        )
        hits += [[c.index] for c in ref_cands]
        sources += ["reference"] * len(ref_cands)
        voxels += [c.voxels for c in ref_cands]
        peaks += [c.max_prob for c in ref_cands]
    labels = np.array([1.0 if h else 0.0 for h in hits], dtype=np.float32)
    diameters = None
    if spacing is not None:
        diameters = lesion_diameters_mm(ref_cc, n_ref, spacing)
        spacing = tuple(float(s) for s in spacing)
    return StudyCandidates(
        crops, labels, hits, int(n_ref), sources, study_id, patient_id, diameters, voxels, spacing,
        peaks,
    )  # fmt: skip


def _stage1_outputs(
    networks: Sequence[nn.Module],
    meta: dict,
    items: Sequence[dict],
    infer_params: dict,
    device: torch.device,
):
    """Per labelled study item: ``(item, stage-1 input, foreground probability, whole-lesion
    reference, stage-1 labels)``, one study at a time (a 1 mm study's input and probabilities
    are ~100 MB)."""
    from metsflow.models.infer import foreground_probability, stage1_probabilities
    from metsflow.models.networks import load_study_input

    for item in items:
        inp, probs, pred = stage1_probabilities(networks, meta, item, infer_params, device)
        reference = lab.whole_lesion(load_study_input(item, [REFERENCE], with_label=True)["label"])
        yield item, inp, foreground_probability(probs, inp["brain"]), reference, pred


def mine_candidates(
    networks: Sequence[nn.Module],
    meta: dict,
    items: Sequence[dict],
    infer_params: dict,
    device: torch.device,
    params: Stage2Settings | dict,
    add_reference: bool,
    patient_of: dict[str, str] | None = None,
) -> list[StudyCandidates]:
    """``study_candidates`` of each labelled study item (``metsflow.models.train.build_items``)
    from the stage-1 ensemble ``networks`` (``infer.load_ensemble``; ``infer_params``: the
    inference settings' params): its foreground probability, its whole-lesion reference.
    ``patient_of`` (study -> patient) and the grid's spacing feed the validation FROC (false
    positives per patient) and the sizes of the lesions a threshold loses."""
    patient_of = patient_of or {}
    return [
        study_candidates(
            item["study_id"],
            inp["image"],
            fg_prob,
            reference,
            params,
            add_reference,
            patient_id=patient_of.get(item["study_id"], ""),
            spacing=nib.affines.voxel_sizes(inp["affine"]),
            pred=pred,
        )
        for item, inp, fg_prob, reference, pred in _stage1_outputs(
            networks, meta, items, infer_params, device
        )
    ]


def mine_proposal_threshold(
    networks: Sequence[nn.Module],
    meta: dict,
    items: Sequence[dict],
    infer_params: dict,
    device: torch.device,
    sensitivity: float,
) -> dict:
    """High-sensitivity stage 1 (``proposal_sensitivity``): ``proposal_threshold`` over the
    reference lesions of the labelled study items (the validation studies), from the stage-1
    ensemble as ``mine_candidates`` runs it. A pass of its own: keeping every validation
    study's input and probabilities for one pass would hold ~100 MB per 1 mm study."""
    peaks = [
        lesion_peak_probabilities(fg_prob, reference)
        for _, _, fg_prob, reference, _ in _stage1_outputs(
            networks, meta, items, infer_params, device
        )
    ]
    return proposal_threshold(np.concatenate(peaks or [np.zeros(0)]), float(sensitivity))


# Checkpoint selection (``select_every``): the false-positive rates, as fractions of
# ``max_fp_per_patient``, at which the validation FROC's sensitivities are averaged (as the
# LUNA16 CPM averages its seven): one rate alone moves by a lesion or two between evaluations
# on 16 validation patients, the mean is steadier and also rewards the operating points below.
SELECTION_FP_FRACTIONS = (0.25, 0.5, 1.0)


def selection_score(curve, params: Stage2Settings | dict) -> float:
    """The checkpoint-selection figure of a validation ``metrics.froc`` curve: its mean
    sensitivity at ``SELECTION_FP_FRACTIONS`` x ``max_fp_per_patient``."""
    rate = float(resolve_params(params).max_fp_per_patient)
    return float(
        np.mean(metrics.sensitivity_at_fp(curve, [f * rate for f in SELECTION_FP_FRACTIONS]))
    )


@dataclass
class _ValidationCandidates:
    """The validation studies' stage-1 candidates as the operating point reads them (reference
    lesions are not candidates at inference time): per study its crops, stage-1 peaks, sizes
    and spacing; the reference lesions each candidate hits, made unique across studies."""

    studies: list[tuple[np.ndarray, list | None, list | None, Any]]
    hits: list[list]
    n_reference: int
    n_patients: int
    diameters: dict

    @classmethod
    def of(cls, val: Sequence[StudyCandidates]) -> _ValidationCandidates:
        studies, hits, n_ref, patients, diameters = [], [], 0, set(), {}
        for number, study in enumerate(val):
            stage1 = [i for i, s in enumerate(study.sources) if s == "stage1"]
            voxels = None if study.voxels is None else [study.voxels[i] for i in stage1]
            peaks = None if study.peaks is None else [study.peaks[i] for i in stage1]
            studies.append((study.crops[stage1], peaks, voxels, study.spacing))
            key = study.study_id or f"study_{number}"
            hits += [[(key, r) for r in study.hits[i]] for i in stage1]
            n_ref += study.n_reference
            patients.add(study.patient_id or key)
            for lesion, diameter in enumerate(study.ref_diameters_mm or [], start=1):
                diameters[(key, lesion)] = diameter
        return cls(studies, hits, n_ref, max(len(patients), 1), diameters)

    def scores(self, network: nn.Module, params: Stage2Settings | dict) -> np.ndarray:
        """Each candidate's score as ``filter_prediction`` scores it at inference
        (``candidate_scores``: stage-1 weight and keep-large included)."""
        scored = [
            candidate_scores(score_crops(network, crops), peaks, voxels, spacing, params)
            for crops, peaks, voxels, spacing in self.studies
        ]
        return np.concatenate(scored) if scored else np.zeros(0)

    def froc(self, network: nn.Module, params: Stage2Settings | dict):
        return metrics.froc(
            self.scores(network, params), self.hits, self.n_reference, self.n_patients
        )


class NoCandidatesError(ValueError):
    """The training candidates are all lesions or all false positives: nothing to learn."""


def _train_member(
    crops: np.ndarray,
    labels: np.ndarray,
    spec: dict,
    params: Stage2Settings,
    seed: int,
    validation: _ValidationCandidates,
    device: torch.device,
) -> dict:
    """One stage-2 classifier trained from ``seed`` on ``device``; with ``select_every``, the
    weights of its best validation FROC score. Returns ``{network, seed, final_loss,
    selected_iteration, selection}``."""
    from metsflow.core.runtime import seed_everything

    seed_everything(seed)
    network = build_classifier(spec).to(device).train()
    optimizer = torch.optim.Adam(
        network.parameters(),
        lr=float(params.learning_rate),
        weight_decay=float(params.weight_decay),
    )
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    half = int(params.batch_size) // 2
    every = params.select_every if validation.n_reference else None
    best, selection = (-math.inf, int(params.iterations), None), []
    start, losses = time.perf_counter(), []
    for iteration in range(1, int(params.iterations) + 1):
        index = np.concatenate([rng.choice(positives, half), rng.choice(negatives, half)])
        batch = crops[index].copy()
        for axis in range(2, 5):
            flip = rng.random(len(batch)) < 0.5
            batch[flip] = np.flip(batch[flip], axis=axis)
        logits = network(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).flatten()
        loss = loss_fn(logits, torch.from_numpy(labels[index]).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        last = iteration == int(params.iterations)
        if iteration % 50 == 0 or last:
            log.info(
                "stage 2 (seed %d) iteration %d/%d loss %.4f (%.0f s)",
                seed,
                iteration,
                params.iterations,
                float(np.mean(losses[-50:])),
                time.perf_counter() - start,
            )
        if every and (iteration % int(every) == 0 or last):
            value = selection_score(validation.froc(network, params), params)
            network.train()  # score_crops left it in eval mode
            selection.append({"iteration": iteration, "score": value})
            log.info(
                "stage 2 (seed %d) iteration %d: validation FROC score %.4f", seed, iteration, value
            )
            if value >= best[0]:  # ties: the later, longer-trained weights
                state = {k: v.detach().clone() for k, v in network.state_dict().items()}
                best = (value, iteration, state)
    if best[2] is not None:
        network.load_state_dict(best[2])
        log.info(
            "stage 2 (seed %d): the weights of iteration %d (validation FROC score %.4f)",
            seed,
            best[1],
            best[0],
        )
    return {
        "network": network.eval(),
        "seed": seed,
        "final_loss": float(np.mean(losses[-50:])),
        "selected_iteration": best[1],
        "selection": selection,
    }


def train_stage2(
    train: Sequence[StudyCandidates],
    val: Sequence[StudyCandidates],
    channels: Sequence[str],
    params: Stage2Settings | dict,
    out_path: str | os.PathLike,
    stage1_checkpoint: str | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Train the candidate classifier on ``device``, choose its threshold on ``val``, write the
    checkpoint (CPU tensors: it loads anywhere).

    Balanced mini-batches (half lesion, half false-positive candidates when both exist), random
    mirroring, Adam; ``ensemble`` classifiers from seeds ``seed``, ``seed`` + 1, ... (the first
    is the one a single classifier of ``seed`` would be), their mean probability the score.
    Deterministic for a seed on CPU. Returns the checkpoint's meta (``members``: each
    classifier's seed, final loss, chosen iteration and its ``select_every`` record)."""

    params = resolve_params(params)
    crops = np.concatenate([s.crops for s in train]) if train else np.zeros((0,))
    labels = np.concatenate([s.labels for s in train]) if train else np.zeros(0)
    if not len(labels) or labels.min() == labels.max():
        raise NoCandidatesError(
            f"stage 2 needs lesion and false-positive candidates to learn from; got "
            f"{int(labels.sum())} lesion and {int((1 - labels).sum())} false-positive candidates"
        )
    spec = network_spec(channels, params)
    validation = _ValidationCandidates.of(val)
    members = [
        _train_member(
            crops, labels, spec, params, int(params.seed) + k, validation, torch.device(device)
        )
        for k in range(int(params.ensemble))
    ]
    network = (
        members[0].pop("network")
        if len(members) == 1
        else SeedEnsemble([m.pop("network") for m in members])
    )

    # Operating point on validation stage-1 candidates only (reference lesions are not
    # candidates at inference time).
    scores = validation.scores(network, params)
    val_hits, n_ref = validation.hits, validation.n_reference
    operating = choose_threshold(
        scores,
        val_hits,
        n_ref,
        n_patients=validation.n_patients,
        rule=params.operating_rule,
        max_fp_per_patient=float(params.max_fp_per_patient),
        target_sensitivity=float(params.target_sensitivity),
    )
    operating["lost_lesions"] = lost_lesions(
        scores, val_hits, operating["threshold"], validation.diameters
    )
    operating["members"] = members
    if not n_ref:
        log.warning("stage 2: no validation lesions; threshold 0 keeps every candidate")
    elif not operating["rule_met"]:
        log.warning(
            "stage 2: the %s rule cannot be met on validation; using threshold %.3f "
            "(sensitivity %.3f, %.2f FP/patient)",
            params.operating_rule,
            operating["threshold"],
            operating["sensitivity_after"],
            operating["fp_per_patient_after"],
        )
    meta = {
        "network": spec,
        "channels": list(channels),
        "params": params.as_dict(),
        "stage1_checkpoint": stage1_checkpoint,
        "final_loss": float(np.mean([m["final_loss"] for m in members])),
        **operating,
    }
    save_stage2(out_path, network, meta)
    log.info(
        "stage 2 threshold %.3f (%s): validation lesion sensitivity %.3f -> %.3f, FP/patient "
        "%.2f -> %.2f, FDR %.3f -> %.3f, %d lesion(s) lost",
        operating["threshold"],
        operating["operating_rule"],
        operating["sensitivity_before"],
        operating["sensitivity_after"],
        operating["fp_per_patient_before"],
        operating["fp_per_patient_after"],
        operating["fdr_before"],
        operating["fdr_after"],
        len(operating["lost_lesions"]),
    )
    return plain(meta)
