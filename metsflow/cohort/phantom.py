"""Seeded longitudinal phantom cohort of brain-metastasis MRI built on the real MNI152 brain.

The demo pipeline, the tests of every module and the simulated annotator of the active-learning
loop need realistic-looking multi-sequence MRI with exact ground truth, without downloading
anything. This module synthesises it from the ICBM152 2009 template shipped with nilearn:

* Tissue model (``_Anatomy``): brain mask, GM and WM maps (CSF = brain - GM - WM), downsampled
  once to ``model_spacing`` and cached in-process; an optional scalp/skull shell is layered
  outside the brain by distance from its surface.
* Sequences: T1, T1c, T2 and FLAIR as partial-volume mixtures of per-tissue signals
  (``INTENSITY``), so the contrasts are the clinical ones (T1 WM>GM>CSF, T2 CSF bright, FLAIR CSF
  dark, edema bright on T2/FLAIR, enhancing rim bright on T1c only).
* Metastases (``_Lesion``): irregular spheres at the grey-white junction with an enhancing rim
  (internal label 1), a necrotic core when large (3) and edema (2) that spreads through white
  matter more than grey matter. Each lesion follows a planned trajectory across a patient's
  time points (grow, shrink, vanish, appear, stable).
* Geometry per study: the head moves rigidly between time points and the anatomy deforms by a
  known smooth displacement; every sequence is sampled on its own oblique, anisotropic scanner
  grid with a random field of view, then gets a multiplicative bias field, Rician noise and an
  arbitrary int16 scanner scaling.

Coordinate chain (all in mm, NIfTI world = RAS, voxel centres): a point ``x`` in the world frame
of sequence ``s`` of study ``t`` of a patient maps to the template (MNI) frame as
``mni = (D_1 o ... o D_t)(R_t(M_s(x))) / scale``: ``M_s`` is the small head motion between the
acquisition of ``s`` and of the T1c (identity for T1c/T1), ``R_t`` the rigid world->anatomy
transform of the study, ``D_k(a) = a + v_k(a)`` the anatomical change from time point ``k`` to
``k - 1`` (``v_k`` a sum of sinusoids) and ``scale`` the patient's head size. Everything needed
to evaluate it is in ``phantom.json``; ``map_to_previous`` evaluates the true follow-up ->
previous correspondence at arbitrary points.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import logging
import math
import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from metsflow.cohort.sheet import SHEET_COLUMNS
from metsflow.core import io, labels
from metsflow.core.sequences import SHEET_ORDER

log = logging.getLogger(__name__)

PHANTOM_VERSION = 1

# Relative signal per tissue and sequence (white matter on T1 = 1). They reproduce the usual
# clinical appearance: T1 WM > GM > CSF, fat bright, cortical bone dark; T1c adds gadolinium
# enhancement of the lesion rim and of the dura; T2 CSF and edema bright; FLAIR is T2 with the
# free-water (CSF) signal nulled, so edema is the brightest tissue.
INTENSITY: dict[str, dict[str, float]] = {
    "t1": dict(csf=0.25, gm=0.62, wm=1.00, enhancing=0.62, necrosis=0.35, edema=0.55,
               dura=0.40, bone=0.05, diploe=0.80, muscle=0.50, fat=1.30, skin=0.70),
    "t1c": dict(csf=0.25, gm=0.64, wm=1.00, enhancing=1.55, necrosis=0.38, edema=0.58,
                dura=1.10, bone=0.05, diploe=0.85, muscle=0.60, fat=1.30, skin=0.75),
    "t2": dict(csf=1.00, gm=0.62, wm=0.45, enhancing=0.62, necrosis=0.95, edema=0.88,
               dura=0.30, bone=0.04, diploe=0.55, muscle=0.35, fat=0.85, skin=0.60),
    "flair": dict(csf=0.08, gm=0.62, wm=0.48, enhancing=0.72, necrosis=0.45, edema=1.00,
                  dura=0.35, bone=0.04, diploe=0.60, muscle=0.40, fat=0.90, skin=0.60),
}  # fmt: skip

# Layers outside the brain surface (tissue, from mm, to mm): extra-axial CSF, dura, the skull's
# inner table / diploe (marrow fat) / outer table, then galea/muscle, subcutaneous fat, skin.
HEAD_LAYERS_MM = (
    ("csf", 0.0, 1.5),
    ("dura", 1.5, 2.5),
    ("bone", 2.5, 4.0),
    ("diploe", 4.0, 6.0),
    ("bone", 6.0, 7.5),
    ("muscle", 7.5, 9.0),
    ("fat", 9.0, 12.5),
    ("skin", 12.5, 14.0),
)
HEAD_THICKNESS_MM = HEAD_LAYERS_MM[-1][2]

LESION_KINDS = ("grow", "shrink", "stable", "vanish", "appear")
_KIND_PROBABILITIES = (0.25, 0.25, 0.2, 0.15, 0.15)
# Volume ratios between consecutive time points that count as a change (RANO-BM-like).
GROWN_RATIO = 1.25
SHRUNK_RATIO = 0.8
NECROSIS_MIN_RADIUS_MM = 6.0
SMALL_RADIUS_MM = (2.5, 4.0)
_RADIUS_CLASSES_MM = (SMALL_RADIUS_MM, (4.5, 7.5), (8.0, 12.0))
_RADIUS_CLASS_PROBABILITIES = (0.3, 0.4, 0.3)
_MAX_RADIUS_MM = 16.0
_MIN_RADIUS_MM = 1.5
# ``radius_law="heavy_tailed"``: Pareto radii r = r_min (1 - u)^(-1/alpha), capped. With
# r_min 0.9 mm and alpha 2, 64% of lesions are under 3 mm in diameter (P = 1 - (0.9/1.5)^2)
# and 6% over 10 mm: the small-metastasis-dominated load of screening cohorts.
RADIUS_LAWS = ("classes", "heavy_tailed")
HEAVY_TAIL_MIN_RADIUS_MM = 0.9
HEAVY_TAIL_ALPHA = 2.0
HEAVY_TAIL_MAX_RADIUS_MM = 12.0
_SHAPE_IRREGULARITY = 0.22  # bound of the relative radius perturbation of a lesion outline

# Independent random streams (seeded as [seed, stream, ...]) so that, e.g., dropping a sequence
# or changing the noise level does not change lesions or geometry.
_STREAM_PLAN, _STREAM_PATIENT, _STREAM_STUDY, _STREAM_SEQUENCE, _STREAM_NOISE = range(1, 6)
_STREAM_DATES = 6

# BraTS-METS file suffixes for the internal sequence names.
BRATS_SUFFIX = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}
# Yale-style longitudinal layout sequence names, in acquisition order (contrast given last).
YALE_SUFFIX = {"t1": "PRE", "t2": "T2", "flair": "FLAIR", "t1c": "POST"}

_ORIENTATION_FLIPS = {"RAS": (1.0, 1.0, 1.0), "LAS": (-1.0, 1.0, 1.0), "LPS": (-1.0, -1.0, 1.0)}


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation about a uniformly random axis by an angle uniform in [0, max_deg]."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0.0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


# --------------------------------------------------------------------------------------------
# Transforms of the coordinate chain
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rigid:
    """``y = rotation @ x + translation`` on (3, N) point arrays."""

    rotation: np.ndarray
    translation: np.ndarray

    @classmethod
    def identity(cls) -> _Rigid:
        return cls(np.eye(3), np.zeros(3))

    @classmethod
    def random(cls, rng, max_deg: float, max_mm: float, centre: np.ndarray) -> _Rigid:
        # Rotate about the head centre, as a head turning in the coil does.
        rot = _random_rotation(rng, max_deg)
        shift = rng.uniform(-max_mm, max_mm, size=3)
        return cls(rot, centre - rot @ centre + shift)

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.rotation @ points + self.translation[:, None]

    def inverse(self) -> _Rigid:
        rot_t = self.rotation.T
        return _Rigid(rot_t, -rot_t @ self.translation)

    def compose(self, first: _Rigid) -> _Rigid:
        """The transform applying ``first`` then ``self``."""
        return _Rigid(
            self.rotation @ first.rotation, self.rotation @ first.translation + self.translation
        )

    def matrix(self) -> np.ndarray:
        out = np.eye(4)
        out[:3, :3] = self.rotation
        out[:3, 3] = self.translation
        return out

    def to_json(self) -> dict:
        return {"rotation": self.rotation, "translation": self.translation}

    @classmethod
    def from_json(cls, obj: Mapping) -> _Rigid:
        return cls(np.asarray(obj["rotation"], float), np.asarray(obj["translation"], float))


@dataclass(frozen=True)
class _Deformation:
    """Smooth displacement ``v(a) = sum_k amplitude_k * sin(wave_k . a + phase_k)`` (mm).

    Wavelengths of 90-160 mm and a total amplitude of a few mm keep the Jacobian of ``a + v(a)``
    positive (``|grad v| <= sum |amplitude_k| |wave_k| < 1``), so the map is invertible.
    """

    waves: np.ndarray  # (K, 3) rad/mm
    amplitudes: np.ndarray  # (K, 3) mm
    phases: np.ndarray  # (K,)

    @classmethod
    def random(cls, rng, max_mm: float, n_terms: int = 4) -> _Deformation:
        directions = rng.normal(size=(n_terms, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(90.0, 160.0, size=n_terms)
        amplitudes = rng.normal(size=(n_terms, 3))
        amplitudes /= np.linalg.norm(amplitudes, axis=1, keepdims=True)
        amplitudes *= rng.uniform(0.5, 1.0, size=(n_terms, 1)) * (max_mm / n_terms)
        return cls(
            directions * (2 * np.pi / wavelengths)[:, None],
            amplitudes,
            rng.uniform(0, 2 * np.pi, size=n_terms),
        )

    def displacement(self, points: np.ndarray) -> np.ndarray:
        phase = self.waves @ points + self.phases[:, None]  # (K, N)
        return self.amplitudes.T @ np.sin(phase)

    def apply(self, points: np.ndarray) -> np.ndarray:
        return points + self.displacement(points)

    def apply_inverse(self, points: np.ndarray, iterations: int = 30) -> np.ndarray:
        # Fixed point of p = q - v(p): a contraction because |grad v| < 1.
        estimate = points.copy()
        for _ in range(iterations):
            estimate = points - self.displacement(estimate)
        return estimate

    def to_json(self) -> dict:
        return {"waves": self.waves, "amplitudes": self.amplitudes, "phases": self.phases}

    @classmethod
    def from_json(cls, obj: Mapping) -> _Deformation:
        return cls(*(np.asarray(obj[k], float) for k in ("waves", "amplitudes", "phases")))


# --------------------------------------------------------------------------------------------
# Tissue model on the model grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """Tissue fractions of the MNI152 brain on an axis-aligned grid of ``spacing`` mm."""

    spacing: float
    origin: np.ndarray  # MNI mm of voxel (0, 0, 0)
    brain: np.ndarray  # fraction of brain in the voxel
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    depth_mm: np.ndarray  # distance inside the brain to its surface (lesion placement)
    outside_mm: np.ndarray  # distance outside the brain from its surface (head shell)

    @property
    def affine(self) -> np.ndarray:
        out = np.diag([self.spacing] * 3 + [1.0])
        out[:3, 3] = self.origin
        return out

    def head_box_mm(self, skull: bool) -> tuple[np.ndarray, np.ndarray]:
        """MNI bounding box of the brain (and shell when ``skull``)."""
        inside = self.outside_mm <= (HEAD_THICKNESS_MM if skull else 0.0)
        idx = np.argwhere(inside)
        return self.origin + self.spacing * idx.min(0), self.origin + self.spacing * idx.max(0)


def _readonly(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.flags.writeable = False


@functools.lru_cache(maxsize=4)
def _anatomy(spacing: float) -> _Anatomy:
    """Downsample the nilearn MNI152 2009 maps to ``spacing`` mm once per process."""
    if not 0.5 <= spacing <= 8.0:
        raise ValueError(f"model_spacing must be within 0.5-8 mm, got {spacing}")
    from nilearn import datasets  # slow import, only needed here

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    maps = {
        "brain": mask_img.get_fdata(dtype=np.float32),
        "gm": datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32),
        "wm": datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32),
    }
    src_affine = mask_img.affine
    src_spacing = float(src_affine[0, 0])
    # Pad the template box so the head shell and the motion of the head stay on the grid.
    pad = HEAD_THICKNESS_MM + 8.0
    src_origin = src_affine[:3, 3]
    src_extent = (np.asarray(maps["brain"].shape) - 1) * src_spacing
    origin = src_origin - pad
    shape = tuple(int(n) for n in np.ceil((src_extent + 2 * pad) / spacing) + 1)
    # Anti-aliasing: Gaussian whose FWHM is the extra blur that the coarser voxel implies.
    sigma = math.sqrt(max(spacing**2 - src_spacing**2, 0.0)) / (2 * math.sqrt(2 * math.log(2)))
    out = {}
    for name, data in maps.items():
        if sigma > 0:
            data = ndi.gaussian_filter(data, sigma / src_spacing, mode="constant")
        out[name] = ndi.affine_transform(
            data,
            np.diag(np.full(3, spacing / src_spacing)),
            offset=(origin - src_origin) / src_spacing,
            output_shape=shape,
            order=1,
            mode="constant",
            cval=0.0,
            output=np.float32,
        ).clip(0.0, 1.0)
    brain, gm, wm = out["brain"], out["gm"], out["wm"] * out["brain"]
    gm = gm * brain
    # The probabilistic maps may sum above the brain fraction; scale them into it.
    total = gm + wm
    excess = np.where(total > brain, brain / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    gm, wm = gm * excess, wm * excess
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    inside = brain >= 0.5
    depth = ndi.distance_transform_edt(inside, sampling=spacing).astype(np.float32)
    # Distance to the nearest brain voxel centre minus half a voxel approximates the distance
    # from the brain surface.
    outside = ndi.distance_transform_edt(~inside, sampling=spacing).astype(np.float32)
    outside = np.where(inside, 0.0, np.maximum(outside - spacing / 2, 0.0)).astype(np.float32)
    _readonly(brain, gm, wm, csf, depth, outside)
    log.debug("phantom anatomy at %.2f mm: grid %s", spacing, shape)
    return _Anatomy(float(spacing), origin, brain, gm, wm, csf, depth, outside)


def _layer_fraction(distance: np.ndarray, start: float, stop: float, voxel: float) -> np.ndarray:
    """Fraction of a voxel (box of width ``voxel`` centred at ``distance``) inside [start, stop)."""
    low = np.maximum(distance - voxel / 2, start)
    high = np.minimum(distance + voxel / 2, stop)
    return np.clip(high - low, 0.0, None) / voxel


@functools.lru_cache(maxsize=4)
def _base_images(spacing: float, skull: bool) -> dict[str, np.ndarray]:
    """Lesion-free model-space image of every sequence (partial-volume tissue mixture)."""
    anat = _anatomy(spacing)
    images = {}
    outside = 1.0 - anat.brain
    for seq, signal in INTENSITY.items():
        image = anat.gm * signal["gm"] + anat.wm * signal["wm"] + anat.csf * signal["csf"]
        if skull:
            for index, (tissue, start, stop) in enumerate(HEAD_LAYERS_MM):
                # The first layer also takes the brain's own partial-volume remainder.
                start = -np.inf if index == 0 else start
                fraction = _layer_fraction(anat.outside_mm, start, stop, spacing)
                image = image + outside * fraction * signal[tissue]
        image = image.astype(np.float32)
        _readonly(image)
        images[seq] = image
    return images


# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------


@dataclass
class _Outline:
    """Direction-dependent radius factor ``1 + sum_j a_j sin(w_j . u + phi_j)`` (u unit vector)."""

    waves: np.ndarray  # (J, 3)
    amplitudes: np.ndarray  # (J,)
    phases: np.ndarray  # (J,)

    @classmethod
    def random(cls, rng, irregularity: float, n_terms: int = 5) -> _Outline:
        waves = rng.normal(size=(n_terms, 3))
        waves *= (rng.uniform(1.5, 3.5, size=n_terms) / np.linalg.norm(waves, axis=1))[:, None]
        amplitudes = rng.uniform(0.3, 1.0, size=n_terms)
        amplitudes *= irregularity / amplitudes.sum()
        return cls(waves, amplitudes, rng.uniform(0, 2 * np.pi, size=n_terms))

    def factor(self, directions: np.ndarray) -> np.ndarray:
        """``directions``: (..., 3) unit vectors."""
        return 1.0 + np.sin(directions @ self.waves.T + self.phases) @ self.amplitudes

    def to_json(self) -> dict:
        return {"waves": self.waves, "amplitudes": self.amplitudes, "phases": self.phases}


@dataclass
class _Lesion:
    lesion_id: int
    kind: str
    radii_mm: list[float]  # per time point; 0 = absent
    edema_ratio: float  # edema reach beyond the tumour, as a multiple of the radius
    enhancement: float  # scales the T1c enhancement of this lesion
    outline: _Outline
    edema_outline: _Outline
    centre_mni: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def envelope_mm(self, radius: float) -> float:
        """Radius of a ball that contains the tumour and its edema at ``radius``."""
        return (
            radius * (1 + _SHAPE_IRREGULARITY) * (1 + self.edema_ratio * (1 + _SHAPE_IRREGULARITY))
        )


def _trajectory(rng, kind: str, radius0: float, n_timepoints: int) -> list[float]:
    """Radius at each time point for a lesion of ``kind`` starting at ``radius0``."""
    radii = [radius0]
    # A lesion drawn below the usual floor (heavy-tailed law) may shrink to its own size only.
    floor = min(_MIN_RADIUS_MM, radius0)
    if kind == "grow":
        factor = rng.uniform(1.2, 1.45)  # volume x1.7-3 per interval
        for _ in range(1, n_timepoints):
            radii.append(min(radii[-1] * factor, _MAX_RADIUS_MM))
    elif kind == "shrink":
        factor = rng.uniform(0.6, 0.8)  # volume /2-/4.6: treatment response
        for _ in range(1, n_timepoints):
            radii.append(max(radii[-1] * factor, floor))
    elif kind == "stable":
        for _ in range(1, n_timepoints):
            radii.append(radius0 * (1 + rng.uniform(-0.03, 0.03)))
    elif kind == "vanish":
        vanish_at = int(rng.integers(1, n_timepoints))
        factor = rng.uniform(0.6, 0.85)
        for t in range(1, n_timepoints):
            radii.append(0.0 if t >= vanish_at else max(radii[-1] * factor, floor))
    elif kind == "appear":
        appear_at = int(rng.integers(1, n_timepoints))
        factor = rng.uniform(1.2, 1.45)
        radii = [0.0] * appear_at + [radius0]
        while len(radii) < n_timepoints:
            radii.append(min(radii[-1] * factor, _MAX_RADIUS_MM))
    else:  # pragma: no cover - kinds come from LESION_KINDS
        raise ValueError(kind)
    return [round(float(r), 3) for r in radii]


def lesion_status(previous_radius: float | None, radius: float) -> str | None:
    """Status of a lesion at a time point from its nominal radii (None: absent, not listed)."""
    if previous_radius is None:
        return "baseline" if radius > 0 else None
    if previous_radius <= 0:
        return "new" if radius > 0 else None
    if radius <= 0:
        return "vanished"
    ratio = (radius / previous_radius) ** 3
    if ratio >= GROWN_RATIO:
        return "grown"
    if ratio <= SHRUNK_RATIO:
        return "shrunk"
    return "stable"


def _heavy_tailed_radius(rng) -> float:
    u = float(rng.uniform(0.0, 1.0))
    radius = HEAVY_TAIL_MIN_RADIUS_MM * (1.0 - u) ** (-1.0 / HEAVY_TAIL_ALPHA)
    return min(radius, HEAVY_TAIL_MAX_RADIUS_MM)


def _draw_patient_lesions(
    rng, n_timepoints: int, max_lesions: int, radius_law: str = "classes"
) -> list[_Lesion]:
    n_lesions = int(rng.integers(1, max_lesions + 1))
    kinds = list(rng.choice(LESION_KINDS, size=n_lesions, p=_KIND_PROBABILITIES))
    if n_timepoints < 2:
        kinds = ["stable"] * n_lesions
    if all(kind == "appear" for kind in kinds):
        # A patient enters the study because a metastasis was seen at baseline.
        kinds[0] = str(rng.choice(["grow", "shrink", "stable"]))
    classes = list(
        rng.choice(len(_RADIUS_CLASSES_MM), size=n_lesions, p=_RADIUS_CLASS_PROBABILITIES)
    )
    if 0 not in classes:
        # Every patient has at least one small (< 8 mm diameter) metastasis, the hard case.
        classes[int(rng.integers(n_lesions))] = 0
    lesions = []
    for index, (kind, size_class) in enumerate(zip(kinds, classes, strict=True)):
        low, high = SMALL_RADIUS_MM if kind == "appear" else _RADIUS_CLASSES_MM[size_class]
        radius0 = float(rng.uniform(low, high))
        if radius_law == "heavy_tailed":
            # Drawn after the class draw, so the rest of the random stream is unchanged.
            radius0 = _heavy_tailed_radius(rng)
        small = radius0 < SMALL_RADIUS_MM[1]
        lesions.append(
            _Lesion(
                lesion_id=index + 1,
                kind=str(kind),
                radii_mm=_trajectory(rng, str(kind), radius0, n_timepoints),
                edema_ratio=float(rng.uniform(0.0, 0.8) if small else rng.uniform(0.6, 1.8)),
                enhancement=float(rng.uniform(0.85, 1.15)),
                outline=_Outline.random(rng, _SHAPE_IRREGULARITY),
                edema_outline=_Outline.random(rng, _SHAPE_IRREGULARITY),
            )
        )
    return lesions


def _plan_lesions(
    seed: int, n_patients: int, n_timepoints: int, max_lesions: int, radius_law: str = "classes"
):
    """A fresh copy of the cohort's lesion plan (placement fills in the centres)."""
    return copy.deepcopy(_cached_plan(seed, n_patients, n_timepoints, max_lesions, radius_law))


@functools.lru_cache(maxsize=8)
def _cached_plan(
    seed: int, n_patients: int, n_timepoints: int, max_lesions: int, radius_law: str = "classes"
):
    """Lesion trajectories of the cohort; redrawn (deterministically) until every longitudinal
    event (new, grown, shrunk, stable, vanished) occurs at least once when the cohort allows."""
    rng = _rng(seed, _STREAM_PLAN)
    required = {"new", "grown", "shrunk", "stable", "vanished"} if n_timepoints >= 2 else set()
    plan = []
    for _attempt in range(200):
        plan = [
            _draw_patient_lesions(rng, n_timepoints, max_lesions, radius_law)
            for _ in range(n_patients)
        ]
        seen = set()
        for lesions in plan:
            for lesion in lesions:
                for t in range(1, n_timepoints):
                    seen.add(lesion_status(lesion.radii_mm[t - 1], lesion.radii_mm[t]))
        if required <= seen:
            return plan
    log.warning("phantom cohort too small to show every longitudinal event (%s)", sorted(required))
    return plan


def _place_lesions(rng, anat: _Anatomy, lesions: list[_Lesion]) -> None:
    """Put lesion centres on model voxels deep enough in the brain parenchyma, apart, preferring
    the grey-white junction where haematogenous metastases lodge."""
    parenchyma = anat.gm + anat.wm
    junction = anat.gm * anat.wm + 0.02
    placed: list[tuple[np.ndarray, float]] = []
    # Largest first: they have the fewest admissible positions.
    for lesion in sorted(lesions, key=lambda les: -max(les.radii_mm)):
        reach = max(lesion.radii_mm) * (1 + _SHAPE_IRREGULARITY) + 2 * anat.spacing
        admissible = (anat.depth_mm >= reach + 2.0) & (parenchyma >= 0.7)
        candidates = np.argwhere(admissible)
        if candidates.size == 0:
            raise ValueError(
                f"lesion radius {max(lesion.radii_mm):.1f} mm does not fit in the brain "
                f"at model spacing {anat.spacing} mm"
            )
        points = anat.origin + anat.spacing * candidates
        apart = np.ones(len(points), dtype=bool)
        for centre, other_reach in placed:
            apart &= np.linalg.norm(points - centre, axis=1) >= reach + other_reach + 4.0
        if apart.any():
            candidates, points = candidates[apart], points[apart]
        else:
            log.warning("phantom lesion %d placed without separation", lesion.lesion_id)
        weights = junction[tuple(candidates.T)].astype(float)
        choice = int(rng.choice(len(points), p=weights / weights.sum()))
        lesion.centre_mni = points[choice]
        placed.append((lesion.centre_mni, reach))


def _render_lesions(
    anat: _Anatomy, base: Mapping[str, np.ndarray], lesions: Sequence[_Lesion], t: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Model-space images, internal label map and lesion-id map at time point ``t``."""
    images = {seq: image.copy() for seq, image in base.items()}
    label = np.zeros(anat.brain.shape, dtype=np.uint8)
    ids = np.zeros(anat.brain.shape, dtype=np.uint8)
    spacing = anat.spacing
    # Edema spreads along white-matter tracts and hardly into cortex; CSF stops it.
    permeability_full = np.clip(anat.wm + 0.25 * anat.gm, 0.0, 1.0)
    for lesion in lesions:
        radius = lesion.radii_mm[t]
        if radius <= 0:
            continue
        centre_index = np.rint((lesion.centre_mni - anat.origin) / spacing).astype(int)
        half = int(math.ceil(lesion.envelope_mm(radius) / spacing)) + 2
        lo = np.maximum(centre_index - half, 0)
        hi = np.minimum(centre_index + half + 1, anat.brain.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        axes = [
            anat.origin[d] + spacing * np.arange(lo[d], hi[d]) - lesion.centre_mni[d]
            for d in range(3)
        ]
        offset = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        distance = np.linalg.norm(offset, axis=-1)
        direction = offset / np.maximum(distance, 1e-6)[..., None]
        outline = radius * lesion.outline.factor(direction)
        in_brain = anat.brain[box] >= 0.5
        core = (distance <= outline) & in_brain
        if radius >= NECROSIS_MIN_RADIUS_MM:
            rim_mm = float(np.clip(0.3 * radius, 1.5, 4.0))
            necrosis = core & (distance <= outline * (1 - rim_mm / radius))
        else:
            necrosis = np.zeros_like(core)
        rim = core & ~necrosis
        permeability = permeability_full[box]
        reach = outline + lesion.edema_ratio * radius * permeability * lesion.edema_outline.factor(
            direction
        )
        edema = (distance <= reach) & (permeability > 0.15) & in_brain & ~core
        # Edema is contiguous with its tumour: drop islands beyond a sulcus or ventricle.
        components = cc3d.connected_components((edema | core).astype(np.uint8), connectivity=6)
        centre_in_box = tuple(centre_index - lo)
        edema &= components == components[centre_in_box]

        label_box, ids_box = label[box], ids[box]
        free = label_box == 0
        label_box[edema & free] = labels.EDEMA
        ids_box[edema & free] = lesion.lesion_id
        label_box[rim] = labels.ENHANCING
        label_box[necrosis] = labels.NECROSIS
        ids_box[core] = lesion.lesion_id

        # Half-voxel blur of the compartments gives partial-volume edges in the images.
        fractions = {
            name: ndi.gaussian_filter(mask.astype(np.float32), 0.5, mode="constant")
            for name, mask in (("edema", edema), ("enhancing", rim), ("necrosis", necrosis))
        }
        lesion_total = fractions["edema"] + fractions["enhancing"] + fractions["necrosis"]
        for seq, image in images.items():
            signal = INTENSITY[seq]
            enhancing = signal["enhancing"]
            if seq == "t1c":
                enhancing = INTENSITY["t1"]["enhancing"] + lesion.enhancement * (
                    enhancing - INTENSITY["t1"]["enhancing"]
                )
            image[box] = (
                image[box] * (1.0 - lesion_total)
                + fractions["edema"] * signal["edema"]
                + fractions["enhancing"] * enhancing
                + fractions["necrosis"] * signal["necrosis"]
            )
    return images, label, ids


# --------------------------------------------------------------------------------------------
# Scanner geometry and sampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def world_points(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """World mm (3, N) of the voxel indices on the outer product of ``axes``."""
        index = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
        return self.affine[:3, :3] @ index + self.affine[:3, 3:4]

    def smooth_field(self, function, step_mm: float = 4.0) -> np.ndarray:
        """``function`` (world points (3, N) -> (C, N)) at every voxel, as float32 (C, N).

        The coordinate chain and the bias field vary over > 90 mm, so they are evaluated
        exactly on a lattice of about ``step_mm`` spanning the grid corner to corner and
        interpolated linearly (exact for the affine parts); this costs a fraction of a
        per-voxel evaluation on million-voxel scanner grids.
        """
        counts = [
            min(n, max(2, int(math.ceil((n - 1) * s / step_mm)) + 1))
            for n, s in zip(self.shape, self.spacing, strict=True)
        ]
        axes = [np.linspace(0, n - 1, m) for n, m in zip(self.shape, counts, strict=True)]
        values = np.asarray(function(self.world_points(axes)), dtype=np.float32)
        import torch  # lazy: heavy import; its trilinear upsampling is ~5x scipy's zoom

        # align_corners=True maps the first/last voxel onto the first/last lattice point.
        upsampled = torch.nn.functional.interpolate(
            torch.from_numpy(values.reshape(1, -1, *counts)),
            size=self.shape,
            mode="trilinear",
            align_corners=True,
        )
        return upsampled[0].numpy().reshape(len(values), -1)


def _scanner_grid(
    rng,
    spacing: np.ndarray,
    head_centre_world: np.ndarray,
    head_half_world: np.ndarray,
    oblique_deg: float,
    fov_offset_mm: float,
) -> _Grid:
    """Oblique scanner grid around the head with a random orientation and field of view."""
    orientation = str(rng.choice(list(_ORIENTATION_FLIPS)))
    directions = _random_rotation(rng, oblique_deg) @ np.diag(_ORIENTATION_FLIPS[orientation])
    offset = rng.uniform(-fov_offset_mm, fov_offset_mm, size=3)
    # Half extent of the world-axis head box along each (rotated) grid axis, plus a margin and
    # the FOV offset so the head is never cut.
    half = np.abs(directions.T) @ head_half_world + 6.0 + np.abs(offset)
    shape = tuple(int(n) for n in np.ceil(2 * half / spacing) + 1)
    linear = directions @ np.diag(spacing)
    centre = head_centre_world + directions @ offset
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ ((np.asarray(shape) - 1) / 2)
    return _Grid(affine, shape)


def _atlas_grid(spacing: float, centre_world: np.ndarray) -> _Grid:
    """BraTS-like 240x240x155 mm LPS-oriented box (SRI24 atlas space) around the brain."""
    shape = tuple(int(round(n / spacing)) for n in (240, 240, 155))
    linear = np.diag([-spacing, -spacing, spacing])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre_world - linear @ ((np.asarray(shape) - 1) / 2)
    return _Grid(affine, shape)


def _log_bias(points: np.ndarray, centre: np.ndarray, coefficients: np.ndarray, strength: float):
    """Log of a smooth receive-coil bias: a random quadratic of scanner position (per 100 mm)."""
    x, y, z = (points - centre[:, None]) / 100.0
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    log_bias = sum(c * term for c, term in zip(coefficients, terms, strict=True))
    return np.clip(log_bias, -2 * strength, 2 * strength)


# --------------------------------------------------------------------------------------------
# Cohort generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    seed: int
    n_patients: int
    n_timepoints: int
    native_spacing: tuple[float, float, float]
    model_spacing: float
    skull: bool
    max_lesions: int = 4
    separate_grids: bool = True
    radius_law: str = "classes"
    oblique_deg: float = 10.0
    fov_offset_mm: float = 10.0
    motion_deg: float = 3.0
    motion_mm: float = 4.0
    deformation_mm: float = 3.0
    sequence_motion_deg: float = 1.5
    sequence_motion_mm: float = 1.5
    spacing_jitter: float = 0.06
    noise: tuple[float, float] = (0.02, 0.04)
    bias_strength: float = 0.15
    atlas_grid: bool = False  # BraTS style: all sequences on one axis-aligned LPS grid
    displacement_spacing_mm: float = 4.0


@dataclass
class _Study:
    """One rendered study, in memory."""

    patient_index: int
    timepoint: int
    images: dict[str, tuple[np.ndarray, np.ndarray]]  # seq -> (int16 array, affine)
    label: np.ndarray  # internal convention, on the T1c grid
    brain_mask: np.ndarray  # ground-truth brain mask on the T1c grid
    t1c_affine: np.ndarray
    displacement: tuple[np.ndarray, np.ndarray] | None  # (X, Y, Z, 3) mm, affine
    record: dict[str, Any]
    patient: dict[str, Any]  # patient-level truth: head scale and lesion plans


def _validate_common(
    n_patients: int, n_timepoints: int, native_spacing, model_spacing, seed
) -> None:
    if n_patients < 1 or n_timepoints < 1:
        raise ValueError(
            f"need at least one patient and time point, got {n_patients}x{n_timepoints}"
        )
    if len(tuple(native_spacing)) != 3 or not all(0.2 <= float(s) <= 8.0 for s in native_spacing):
        raise ValueError(
            f"native_spacing must be three values within 0.2-8 mm, got {native_spacing}"
        )
    if not 0.5 <= float(model_spacing) <= 8.0:
        raise ValueError(f"model_spacing must be within 0.5-8 mm, got {model_spacing}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _sequence_spacing(rng, cfg: _Config, seq: str) -> np.ndarray:
    nominal = np.asarray(cfg.native_spacing, dtype=float)
    jitter = rng.uniform(-cfg.spacing_jitter, cfg.spacing_jitter, size=3)
    if nominal[0] == nominal[1]:
        jitter[1] = jitter[0]  # square in-plane pixels, as acquired
    spacing = nominal * (1 + jitter)
    if seq in ("t2", "flair"):
        spacing[2] *= rng.uniform(1.2, 1.6)  # 2D T2/FLAIR usually have thicker slices
    return np.round(spacing, 4)


def _iter_studies(cfg: _Config) -> Iterator[_Study]:
    for p in range(cfg.n_patients):
        yield from _iter_patient_studies(cfg, p)


def _iter_patient_studies(cfg: _Config, p: int) -> Iterator[_Study]:
    """The time points of patient ``p``; independent of other patients (own random streams)."""
    anat = _anatomy(float(cfg.model_spacing))
    base = _base_images(float(cfg.model_spacing), bool(cfg.skull))
    lesions = _plan_lesions(
        cfg.seed, cfg.n_patients, cfg.n_timepoints, cfg.max_lesions, cfg.radius_law
    )[p]
    box_lo, box_hi = anat.head_box_mm(cfg.skull)
    patient_rng = _rng(cfg.seed, _STREAM_PATIENT, p)
    _place_lesions(patient_rng, anat, lesions)
    # Patient head size relative to the template (anatomical frame = template x scale).
    scale = patient_rng.uniform(0.94, 1.06, size=3)
    head_centre = (box_lo + box_hi) / 2 * scale
    head_half = (box_hi - box_lo) / 2 * scale + cfg.deformation_mm
    patient = {"scale": scale, "lesions": [_lesion_json(lesion) for lesion in lesions]}
    deformations: list[_Deformation] = []
    previous_rigid: _Rigid | None = None
    for t in range(cfg.n_timepoints):
        study_rng = _rng(cfg.seed, _STREAM_STUDY, p, t)
        rigid = (
            _Rigid.identity()
            if cfg.atlas_grid
            else _Rigid.random(study_rng, cfg.motion_deg, cfg.motion_mm, head_centre)
        )
        if t > 0:
            deformations.append(_Deformation.random(study_rng, cfg.deformation_mm))
        images, label_model, ids_model = _render_lesions(anat, base, lesions, t)
        study = _render_study(
            cfg, anat, p, t, lesions, images, label_model, ids_model, scale, rigid,
            previous_rigid, deformations, head_centre, head_half,
        )  # fmt: skip
        study.patient = patient
        yield study
        previous_rigid = rigid


def _world_to_model_index(
    points: np.ndarray,
    world_to_anatomy: _Rigid,
    deformations: Sequence[_Deformation],
    scale: np.ndarray,
    anat: _Anatomy,
) -> np.ndarray:
    anatomy = world_to_anatomy.apply(points)
    for deformation in reversed(deformations):  # D_t first, D_1 last
        anatomy = deformation.apply(anatomy)
    return (anatomy / scale[:, None] - anat.origin[:, None]) / anat.spacing


_LATTICE_STEP_MM = 4.0


@functools.lru_cache(maxsize=8)
def _signal_support(spacing: float, skull: bool, lattice: bool) -> np.ndarray:
    """Model voxels near signal (head or brain, plus the cubic spline's reach): native voxels
    elsewhere are air and are not interpolated. ``lattice`` widens it so that a native voxel
    whose lattice cell (``_Grid.smooth_field``) has any corner in it is a candidate."""
    anat = _anatomy(spacing)
    reach = (HEAD_THICKNESS_MM if skull else 0.0) + 2.0 * spacing
    if lattice:
        # A lattice cell diagonal, lengthened by the head scale (<= 6 %) and the deformation
        # stretch (|grad v| <= 0.25 for deformation_mm <= 3).
        reach += 1.35 * _LATTICE_STEP_MM * math.sqrt(3)
    support = (anat.outside_mm <= reach).astype(np.float32 if lattice else np.uint8)
    _readonly(support)
    return support


def _render_study(
    cfg: _Config,
    anat: _Anatomy,
    p: int,
    t: int,
    lesions: Sequence[_Lesion],
    images: Mapping[str, np.ndarray],
    label_model: np.ndarray,
    ids_model: np.ndarray,
    scale: np.ndarray,
    rigid: _Rigid,
    previous_rigid: _Rigid | None,
    deformations: Sequence[_Deformation],
    head_centre: np.ndarray,
    head_half: np.ndarray,
) -> _Study:
    # World position of the head: invert the world->anatomy rigid at the head centre.
    head_centre_world = rigid.inverse().apply(head_centre[:, None])[:, 0]
    head_half_world = np.abs(rigid.rotation.T) @ head_half
    lattice_support = _signal_support(anat.spacing, cfg.skull, True)
    signal_support = _signal_support(anat.spacing, cfg.skull, False)
    brain_model = (anat.brain >= 0.5).view(np.uint8)
    # Signal support, brain mask, lesion id and label in one byte: one nearest-neighbour
    # lookup per grid for all four.
    code_model = (signal_support << 7) | (brain_model << 6) | (ids_model << 2) | label_model
    out_images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    grids: dict[str, dict] = {}
    t1c = None  # sampling state of the reference grid, shared by T1
    for seq_index, seq in enumerate(("t1c", "t1", "t2", "flair")):
        seq_rng = _rng(cfg.seed, _STREAM_SEQUENCE, p, t, seq_index)
        own_grid = seq in ("t2", "flair") and cfg.separate_grids and not cfg.atlas_grid
        if seq == "t1" or (t1c is not None and not own_grid):
            state = t1c
        else:
            if cfg.atlas_grid:
                grid = _atlas_grid(float(cfg.native_spacing[0]), head_centre_world)
            else:
                spacing = _sequence_spacing(seq_rng, cfg, seq)
                grid = _scanner_grid(
                    seq_rng, spacing, head_centre_world, head_half_world,
                    cfg.oblique_deg, cfg.fov_offset_mm,
                )  # fmt: skip
            # The head moves a little between the T1c and a separately acquired series.
            motion = (
                _Rigid.random(
                    seq_rng, cfg.sequence_motion_deg, cfg.sequence_motion_mm, head_centre_world
                )
                if own_grid
                else _Rigid.identity()
            )
            world_to_anatomy = rigid.compose(motion)
            bias_coefficients = seq_rng.normal(0.0, cfg.bias_strength / 2, size=9)

            def fields(points, world_to_anatomy=world_to_anatomy, coefficients=bias_coefficients):
                index = _world_to_model_index(points, world_to_anatomy, deformations, scale, anat)
                log_bias = _log_bias(points, head_centre_world, coefficients, cfg.bias_strength)
                support = ndi.map_coordinates(lattice_support, index, order=0, mode="nearest")
                return np.vstack([index, log_bias[None], support[None]])

            values = grid.smooth_field(fields, _LATTICE_STEP_MM)
            candidates = np.flatnonzero(values[4] > 0)
            code = ndi.map_coordinates(code_model, values[:3, candidates], order=0)
            keep = code >= 128  # signal support bit
            inside = np.zeros(values.shape[1], dtype=bool)
            inside[candidates[keep]] = True
            code = code[keep]
            state = {
                "grid": grid,
                "motion": motion,
                "inside": inside,
                "index": values[:3, inside],
                "bias": np.exp(values[3, inside]),
                "code": code,
                "brain": ((code >> 6) & 1).astype(bool),
            }
            if seq == "t1c":
                t1c = state
        grid, inside, index = state["grid"], state["inside"], state["index"]
        grids[seq] = {
            "affine": grid.affine,
            "shape": grid.shape,
            "world_to_t1c_world": state["motion"].matrix(),
        }
        sampled = ndi.map_coordinates(
            images[seq], index, order=3, mode="constant", output=np.float32
        )
        signal = np.zeros(inside.size, dtype=np.float32)
        signal[inside] = np.maximum(sampled, 0.0) * state["bias"]
        noise_rng = _rng(cfg.seed, _STREAM_NOISE, p, t, seq_index)
        sigma = np.float32(noise_rng.uniform(*cfg.noise))
        # Rician magnitude noise: |signal + complex Gaussian|, Rayleigh in the air background.
        real = signal + sigma * noise_rng.standard_normal(signal.shape, dtype=np.float32)
        imag = sigma * noise_rng.standard_normal(signal.shape, dtype=np.float32)
        magnitude = np.hypot(real, imag)
        if not cfg.skull:
            # Skull-stripped data: zero outside the brain, as BraTS distributes it.
            keep = np.zeros(inside.size, dtype=bool)
            keep[inside] = state["brain"]
            magnitude[~keep] = 0.0
        scanner_scale = noise_rng.uniform(500.0, 1500.0)  # arbitrary per-series scanner units
        array = np.rint(magnitude * scanner_scale).clip(0, np.iinfo(np.int16).max)
        out_images[seq] = (array.astype(np.int16).reshape(grid.shape), grid.affine)

    grid, inside, index = t1c["grid"], t1c["inside"], t1c["index"]

    def on_t1c_grid(values: np.ndarray) -> np.ndarray:
        out = np.zeros(inside.size, dtype=np.uint8)
        out[inside] = values
        return out.reshape(grid.shape)

    label = on_t1c_grid(t1c["code"] & 3)  # bits: 7 support, 6 brain, 2-5 lesion id, 0-1 label
    ids = on_t1c_grid((t1c["code"] >> 2) & 15)
    brain_mask = on_t1c_grid(t1c["brain"])

    displacement = None
    if t > 0:
        # Truth for follow-up -> previous registration on a coarse copy of the T1c grid (the
        # field is smooth at > 90 mm wavelengths, so a ~4 mm sampling loses nothing).
        stride = [max(1, int(round(cfg.displacement_spacing_mm / s))) for s in grid.spacing]
        axes = [np.arange(0, n, s, dtype=float) for n, s in zip(grid.shape, stride, strict=True)]
        coarse_points = grid.world_points(axes)
        mapped = _map_points_to_previous(coarse_points, rigid, previous_rigid, deformations[-1])
        field_shape = tuple(len(a) for a in axes)
        field_array = (mapped - coarse_points).T.reshape(*field_shape, 3).astype(np.float32)
        field_affine = grid.affine.copy()
        field_affine[:3, :3] = grid.affine[:3, :3] @ np.diag(stride)
        displacement = (field_array, field_affine)

    record = {
        "timepoint": t,
        "world_to_anatomy": rigid.to_json(),
        "deformation_to_previous": deformations[-1].to_json() if t > 0 else None,
        "grids": grids,
        "lesions": _inventory(lesions, t, label, ids, grid),
    }
    return _Study(p, t, out_images, label, brain_mask, grid.affine, displacement, record, {})


def _map_points_to_previous(
    points: np.ndarray, rigid: _Rigid, previous_rigid: _Rigid, deformation: _Deformation
) -> np.ndarray:
    return previous_rigid.inverse().apply(deformation.apply(rigid.apply(points)))


def _inventory(lesions, t, label, ids, grid: _Grid) -> list[dict]:
    """Per-lesion truth at time point ``t`` measured on the native T1c label map."""
    voxel_mm3 = abs(float(np.linalg.det(grid.affine[:3, :3])))
    n = max(lesion.lesion_id for lesion in lesions) + 1
    core = np.isin(label, labels.INTERNAL_GROUPS["whole_lesion"])
    core_ids = ids[core]
    core_count = np.bincount(core_ids, minlength=n)
    edema_count = np.bincount(ids[label == labels.EDEMA], minlength=n)
    core_points = grid.affine[:3, :3] @ np.argwhere(core).T + grid.affine[:3, 3:4]
    sums = [np.bincount(core_ids, weights=core_points[d], minlength=n) for d in range(3)]
    rows = []
    for lesion in lesions:
        radius = lesion.radii_mm[t]
        status = lesion_status(lesion.radii_mm[t - 1] if t > 0 else None, radius)
        if status is None:
            continue
        count = int(core_count[lesion.lesion_id])
        centre_world = [float(s[lesion.lesion_id] / count) for s in sums] if count else None
        rows.append(
            {
                "lesion_id": lesion.lesion_id,
                "kind": lesion.kind,
                "status": status,
                "radius_mm": radius,
                "nominal_volume_mm3": round(4 / 3 * math.pi * radius**3, 2),
                "volume_mm3": round(count * voxel_mm3, 2),
                "edema_volume_mm3": round(int(edema_count[lesion.lesion_id]) * voxel_mm3, 2),
                "centre_mni_mm": lesion.centre_mni,
                "centre_mm": centre_world,
            }
        )
    return rows


def _lesion_json(lesion: _Lesion) -> dict:
    return {
        "lesion_id": lesion.lesion_id,
        "kind": lesion.kind,
        "centre_mni_mm": lesion.centre_mni,
        "radii_mm": lesion.radii_mm,
        "edema_ratio": lesion.edema_ratio,
        "enhancement": lesion.enhancement,
        "outline": lesion.outline.to_json(),
    }


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _write_demo_patient(
    cfg: _Config,
    p: int,
    *,
    out_dir: Path,
    drop: Mapping[str, Sequence[str]],
    labelled_patients: int,
    label_convention: str,
    write_brain_masks: bool,
) -> tuple[list[dict], list[dict], dict]:
    """Render and write every study of patient ``p``; return its sheet rows, oracle rows and
    manifest entry."""
    patient_id = f"P{p + 1:03d}"
    labelled = p < labelled_patients
    sheet_rows, oracle_rows, patient_json = [], [], {"patient_id": patient_id}
    for study in _iter_patient_studies(cfg, p):
        study_id = f"{patient_id}_T{study.timepoint}"
        folder = Path(patient_id) / study_id
        row = {"patient_id": patient_id, "study_id": study_id, "timepoint": study.timepoint}
        files = {}
        for seq in SHEET_ORDER:
            if seq in drop.get(study_id, ()):
                row[seq] = ""
                continue
            array, affine = study.images[seq]
            row[seq] = files[seq] = (folder / f"{study_id}_{seq}.nii.gz").as_posix()
            io.save_nifti(out_dir / row[seq], array, affine, dtype=np.int16)
        seg_path = files["seg"] = (folder / f"{study_id}_seg.nii.gz").as_posix()
        seg = labels.from_internal(study.label, label_convention)
        io.save_nifti(out_dir / seg_path, seg, study.t1c_affine, dtype=np.uint8)
        if write_brain_masks:
            files["brainmask"] = (folder / f"{study_id}_brainmask.nii.gz").as_posix()
            mask_path = out_dir / files["brainmask"]
            io.save_nifti(mask_path, study.brain_mask, study.t1c_affine, dtype=np.uint8)
        if study.displacement is not None:
            name = f"{study_id}_true_displacement.nii.gz"
            files["true_displacement"] = (folder / name).as_posix()
            io.save_nifti(out_dir / folder / name, *study.displacement, dtype=np.float32)
        row["label"] = seg_path if labelled else ""
        row["label_convention"] = label_convention
        sheet_rows.append(row)
        oracle_rows.append(
            {"study_id": study_id, "label": seg_path, "label_convention": label_convention}
        )
        patient_json.update(study.patient)
        patient_json.setdefault("studies", []).append(
            {"study_id": study_id, "files": files, "labelled": labelled, **study.record}
        )
        log.info("phantom study %s written", study_id)
    return sheet_rows, oracle_rows, patient_json


def make_demo_cohort(
    out_dir: str | os.PathLike,
    *,
    n_patients: int = 8,
    n_timepoints: int = 3,
    native_spacing: Sequence[float] = (1.0, 1.0, 3.0),
    model_spacing: float = 2.0,
    labelled_patients: int = 4,
    skull: bool = True,
    seed: int = 0,
    label_convention: str = "internal",
    drop_sequences: Mapping[str, Sequence[str]] | None = None,
    max_lesions: int = 4,
    separate_grids: bool = True,
    write_brain_masks: bool = True,
    workers: int = 1,
    radius_law: str = "classes",
) -> dict[str, Any]:
    """Write a seeded longitudinal phantom cohort and its sheets; see the module docstring.

    Layout: ``out_dir/<patient>/<study>/<study>_{t1,t1c,t2,flair,seg}.nii.gz`` (+
    ``<study>_brainmask.nii.gz``, and ``<study>_true_displacement.nii.gz`` for follow-ups),
    ``studies.tsv`` (labels only for the first ``labelled_patients``), ``oracle.tsv`` (labels of
    every study) and ``phantom.json`` (parameters, transforms, per-study lesion inventory).
    ``drop_sequences`` maps a study id to sequences not written (empty cell in the sheet).
    ``workers`` > 1 renders patients in that many spawned processes (same output, byte for
    byte); a calling script then needs the usual ``if __name__ == "__main__":`` guard.
    ``radius_law``: ``"classes"`` (small / medium / large radius classes) or
    ``"heavy_tailed"`` (Pareto radii, most lesions under 3 mm in diameter, ``RADIUS_LAWS``).
    Images are int16 in arbitrary per-series scanner units; labels/masks uint8.

    Returns ``{"sheet", "oracle", "manifest": Path, "study_ids", "labelled_study_ids",
    "unlabelled_study_ids": list[str]}``.
    """
    _validate_common(n_patients, n_timepoints, native_spacing, model_spacing, seed)
    labels.check_convention(label_convention)
    if labelled_patients < 0:
        # "The first k patients": k >= n_patients labels them all.
        raise ValueError(f"labelled_patients must be >= 0, got {labelled_patients}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if radius_law not in RADIUS_LAWS:
        raise ValueError(f"radius_law must be one of {list(RADIUS_LAWS)}, got {radius_law!r}")
    if not 1 <= max_lesions <= 15:  # lesion ids share a byte with labels (_render_study)
        raise ValueError(f"max_lesions must be within 1-15, got {max_lesions}")
    study_ids = [f"P{p + 1:03d}_T{t}" for p in range(n_patients) for t in range(n_timepoints)]
    drop = {key: list(value) for key, value in (drop_sequences or {}).items()}
    for study_id, seqs in drop.items():
        if study_id not in study_ids:
            raise ValueError(f"drop_sequences names unknown study {study_id!r}")
        unknown = sorted(set(seqs) - set(SHEET_ORDER))
        if unknown:
            raise ValueError(f"drop_sequences for {study_id} names unknown sequences {unknown}")
    cfg = _Config(
        seed=int(seed),
        n_patients=n_patients,
        n_timepoints=n_timepoints,
        native_spacing=tuple(float(s) for s in native_spacing),
        model_spacing=float(model_spacing),
        skull=bool(skull),
        max_lesions=max_lesions,
        separate_grids=separate_grids,
        radius_law=radius_law,
    )
    out_dir = Path(out_dir)
    writer = functools.partial(
        _write_demo_patient,
        cfg,
        out_dir=out_dir,
        drop=drop,
        labelled_patients=labelled_patients,
        label_convention=label_convention,
        write_brain_masks=write_brain_masks,
    )
    if workers > 1 and n_patients > 1:
        # Patients are independent (own random streams): render them in parallel processes.
        # spawn, not fork: the parent may hold torch/ITK thread pools.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, n_patients), mp_context=context) as pool:
            results = list(pool.map(writer, range(n_patients)))
    else:
        results = [writer(p) for p in range(n_patients)]
    sheet_rows = [row for rows, _, _ in results for row in rows]
    oracle_rows = [row for _, rows, _ in results for row in rows]
    patients_json = [patient for _, _, patient in results]

    sheet = out_dir / "studies.tsv"
    oracle = out_dir / "oracle.tsv"
    manifest = out_dir / "phantom.json"
    io.write_table(sheet, pd.DataFrame(sheet_rows, columns=list(SHEET_COLUMNS)))
    io.write_table(
        oracle, pd.DataFrame(oracle_rows, columns=["study_id", "label", "label_convention"])
    )
    io.write_json(
        manifest,
        {
            "generator": "metsflow.cohort.phantom",
            "version": PHANTOM_VERSION,
            "seed": cfg.seed,
            "parameters": {
                "n_patients": n_patients,
                "n_timepoints": n_timepoints,
                "native_spacing": list(cfg.native_spacing),
                "model_spacing": cfg.model_spacing,
                "labelled_patients": labelled_patients,
                "skull": cfg.skull,
                "label_convention": label_convention,
                "drop_sequences": drop,
                "max_lesions": max_lesions,
                "separate_grids": separate_grids,
                "radius_law": radius_law,
            },
            "intensity": INTENSITY,
            "head_layers_mm": HEAD_LAYERS_MM,
            "conventions": {
                "world": "NIfTI world (RAS+) mm, voxel centres",
                "chain": "mni = (D_1 o ... o D_t)(R_t(M_seq(x))) / scale; D_k(a) = a + "
                "sum_k amplitude*sin(wave . a + phase); R_t = world_to_anatomy; "
                "M_seq = grids[seq].world_to_t1c_world",
                "true_displacement": "4D float32 (X, Y, Z, 3), RAS mm, on the T1c grid "
                "subsampled to ~4 mm (affine in the file): follow-up world point x corresponds "
                "to previous-study world point x + u(x)",
                "lesion_centres": "centre_mm: centroid of the lesion's enhancing + necrotic "
                "voxels on the native T1c grid (world mm; null when not visible); "
                "centre_mni_mm: the lesion's fixed centre in the template frame",
                "lesion_status": "baseline | new | grown | shrunk | stable | vanished, from "
                f"nominal volume ratios (grown >= {GROWN_RATIO}, shrunk <= {SHRUNK_RATIO})",
            },
            "patients": patients_json,
        },
    )
    return {
        "sheet": sheet,
        "oracle": oracle,
        "manifest": manifest,
        "study_ids": study_ids,
        "labelled_study_ids": [r["study_id"] for r in sheet_rows if r["label"]],
        "unlabelled_study_ids": [r["study_id"] for r in sheet_rows if not r["label"]],
    }


def map_to_previous(
    manifest: str | os.PathLike | Mapping, study_id: str, points_mm: np.ndarray
) -> np.ndarray:
    """True correspondence of follow-up ``study_id`` T1c-world points (N, 3) in the previous
    study's T1c world frame, evaluated exactly from ``phantom.json``."""
    manifest = io.read_json(manifest) if not isinstance(manifest, Mapping) else manifest
    for patient in manifest["patients"]:
        studies = patient["studies"]
        for index, study in enumerate(studies):
            if study["study_id"] != study_id:
                continue
            if index == 0:
                raise ValueError(f"{study_id} is a baseline study: it has no previous study")
            points = np.asarray(points_mm, dtype=float).reshape(-1, 3).T
            mapped = _map_points_to_previous(
                points,
                _Rigid.from_json(study["world_to_anatomy"]),
                _Rigid.from_json(studies[index - 1]["world_to_anatomy"]),
                _Deformation.from_json(study["deformation_to_previous"]),
            )
            return mapped.T
    raise ValueError(f"study {study_id!r} is not in the phantom manifest")


def write_brats_layout(
    out_dir: str | os.PathLike,
    *,
    n_cases: int = 2,
    n_timepoints: int = 1,
    spacing: float = 2.0,
    model_spacing: float = 4.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a small BraTS-METS style folder (skull-stripped, co-registered, BraTS labels).

    ``out_dir/BraTS-MET-<case:05d>-<timepoint:03d>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` on a
    240x240x155 mm LPS atlas box at ``spacing`` mm (BraTS itself is 1 mm; 2 mm keeps it fast).
    Returns ``{"case_ids": [...], "files": {case_id: {suffix: path}}}``.
    """
    _validate_common(n_cases, n_timepoints, (spacing,) * 3, model_spacing, seed)
    cfg = _Config(
        seed=int(seed),
        n_patients=n_cases,
        n_timepoints=n_timepoints,
        native_spacing=(float(spacing),) * 3,
        model_spacing=float(model_spacing),
        skull=False,
        atlas_grid=True,
    )
    out_dir = Path(out_dir)
    result: dict[str, Any] = {"case_ids": [], "files": {}}
    for study in _iter_studies(cfg):
        case_id = f"BraTS-MET-{study.patient_index + 1:05d}-{study.timepoint:03d}"
        files = {}
        for seq, suffix in BRATS_SUFFIX.items():
            array, affine = study.images[seq]
            files[suffix] = out_dir / case_id / f"{case_id}-{suffix}.nii.gz"
            io.save_nifti(files[suffix], array, affine, dtype=np.int16)
        files["seg"] = out_dir / case_id / f"{case_id}-seg.nii.gz"
        io.save_nifti(
            files["seg"],
            labels.from_internal(study.label, "brats"),
            study.t1c_affine,
            dtype=np.uint8,
        )
        result["case_ids"].append(case_id)
        result["files"][case_id] = files
    return result


def write_longitudinal_layout(
    out_dir: str | os.PathLike,
    *,
    n_patients: int = 2,
    n_timepoints: int = 2,
    native_spacing: Sequence[float] = (2.0, 2.0, 4.0),
    model_spacing: float = 4.0,
    skull: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a Yale-style longitudinal folder without labels.

    ``out_dir/<patient>/<YYYY-MM-DD>/<patient>_<YYYY-MM-DD>_<HHMMSS>_{PRE,POST,T2,FLAIR}.nii.gz``
    with patient ids ``YG0001``...; each series has its own acquisition time within the session
    (contrast-enhanced POST last). Returns ``{"patients": {patient: [date, ...]}, "files":
    {(patient, date): {seq: path}}}``.
    """
    _validate_common(n_patients, n_timepoints, native_spacing, model_spacing, seed)
    cfg = _Config(
        seed=int(seed),
        n_patients=n_patients,
        n_timepoints=n_timepoints,
        native_spacing=tuple(float(s) for s in native_spacing),
        model_spacing=float(model_spacing),
        skull=bool(skull),
    )
    out_dir = Path(out_dir)
    result: dict[str, Any] = {"patients": {}, "files": {}}
    session: dt.datetime | None = None
    for study in _iter_studies(cfg):
        patient_id = f"YG{study.patient_index + 1:04d}"
        rng = _rng(cfg.seed, _STREAM_DATES, study.patient_index, study.timepoint)
        if study.timepoint == 0:
            day = dt.date(2014, 1, 1) + dt.timedelta(days=int(rng.integers(0, 2500)))
        else:
            day = session.date() + dt.timedelta(days=int(rng.integers(42, 120)))
        session = dt.datetime.combine(
            day, dt.time(int(rng.integers(7, 18)), int(rng.integers(0, 60)))
        )
        date = day.isoformat()
        files = {}
        acquired = session
        for seq, suffix in YALE_SUFFIX.items():
            acquired += dt.timedelta(seconds=int(rng.integers(120, 480)))
            name = f"{patient_id}_{date}_{acquired:%H%M%S}_{suffix}.nii.gz"
            files[seq] = out_dir / patient_id / date / name
            array, affine = study.images[seq]
            io.save_nifti(files[seq], array, affine, dtype=np.int16)
        result["patients"].setdefault(patient_id, []).append(date)
        result["files"][(patient_id, date)] = files
    return result


# --------------------------------------------------------------------------------------------
# Enhancing mimics (benchmarks/bench_detection.py; the demo cohort does not call this)
# --------------------------------------------------------------------------------------------
# What makes small-lesion detection hard on real T1c: enhancing vessels (branching tubes 1-3 mm
# wide, bright on T1c, flow voids on T2), the choroid plexus and dural enhancement. Without
# them a phantom's only bright T1c specks are metastases and FP control is artificially easy.
MIMIC_VESSEL_WIDTH_MM = (1.0, 3.0)


def _stamp(mask: np.ndarray, points: np.ndarray, radius_vox: float) -> None:
    """Set the voxels within ``radius_vox`` of each of ``points`` (voxel coordinates)."""
    r = int(math.ceil(radius_vox))
    grid = np.argwhere(np.ones((2 * r + 1,) * 3, bool)) - r
    ball = grid[(grid**2).sum(1) <= radius_vox**2 + 0.25]
    for point in np.round(points).astype(int):
        idx = point + ball
        inside = np.all((idx >= 0) & (idx < mask.shape), axis=1)
        mask[tuple(idx[inside].T)] = True


def enhancing_mimics(
    brain: np.ndarray, spacing: float, seed: int, n_vessels: int = 6
) -> dict[str, np.ndarray]:
    """Boolean masks of lesion mimics inside ``brain`` (a model-space or study grid of
    isotropic ``spacing`` mm): ``vessel`` (branching tubes ``MIMIC_VESSEL_WIDTH_MM`` wide, random
    walks from the brain surface inwards), ``plexus`` (two irregular blobs either side of the
    brain's centre, the lateral ventricles' choroid plexus) and ``dura`` (patches of the outer
    1-2 mm of the brain mask: dural enhancement on the grid's partial-volume rim)."""
    rng = np.random.default_rng([seed, 97])
    brain = np.asarray(brain, bool)
    depth = ndi.distance_transform_edt(brain) * spacing
    vessel = np.zeros(brain.shape, bool)
    surface = np.argwhere(brain & (depth <= 3.0))
    centre = np.argwhere(brain).mean(0)
    walks = [(surface[rng.integers(len(surface))].astype(float), None, 0)
             for _ in range(n_vessels)]  # fmt: skip
    while walks:
        start, direction, generation = walks.pop()
        if direction is None:
            direction = centre - start
        direction = direction / (np.linalg.norm(direction) + 1e-9)
        width = rng.uniform(*MIMIC_VESSEL_WIDTH_MM) * (0.7**generation)
        points, point = [], start.copy()
        for _ in range(int(rng.uniform(25, 60) / spacing)):
            direction = direction + rng.normal(0, 0.25, 3)
            direction /= np.linalg.norm(direction)
            point = point + direction
            index = tuple(np.round(point).astype(int))
            if not all(0 <= i < s for i, s in zip(index, brain.shape, strict=True)):
                break
            if not brain[index]:
                break
            points.append(point.copy())
            if generation < 2 and rng.random() < 0.04:
                walks.append((point.copy(), direction + rng.normal(0, 0.8, 3), generation + 1))
        if points:
            _stamp(vessel, np.array(points), max(width / 2 / spacing, 0.5))
    plexus = np.zeros(brain.shape, bool)
    for side in (-1, 1):
        offset = np.array([side * 14.0, -8.0, 4.0]) / spacing + rng.normal(0, 2, 3)
        blob = centre + offset + rng.normal(0, 2.0 / spacing, (12, 3))
        _stamp(plexus, blob, rng.uniform(1.5, 2.5) / spacing)
    rim = brain & (depth <= rng.uniform(1.0, 2.0))
    patches = ndi.gaussian_filter(rng.normal(size=brain.shape), 6.0 / spacing)
    dura = rim & (patches > np.quantile(patches[rim], 0.6) if rim.any() else rim)
    return {"vessel": vessel & brain, "plexus": plexus & brain, "dura": dura}


def add_enhancing_mimics(
    images: Mapping[str, np.ndarray],
    brain: np.ndarray,
    label: np.ndarray,
    spacing: float,
    seed: int,
    n_vessels: int = 6,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``images`` (z-scored, one grid) with ``enhancing_mimics`` drawn outside the lesions
    (``label`` > 0): T1c as bright as the study's enhancing rim (its median z; 3 without one),
    vessels dark on T2/FLAIR (flow voids). Returns the new images and the union of the mimics."""
    masks = enhancing_mimics(brain, spacing, seed, n_vessels)
    free = np.asarray(label) == 0
    out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in images.items()}
    rim = np.asarray(label) == labels.ENHANCING
    bright = float(np.median(out["t1c"][rim])) if rim.any() else 3.0
    union = np.zeros(brain.shape, bool)
    for name, mask in masks.items():
        mask = mask & free
        union |= mask
        # Partial volume at the tube/blob edges: a blurred mask, so thin mimics are not binary.
        soft = np.clip(ndi.gaussian_filter(mask.astype(np.float32), 0.5), 0, 1)
        soft = np.where(free, np.maximum(soft, mask), 0)
        gain = {"vessel": 1.0, "plexus": 0.9, "dura": 0.8}[name]
        out["t1c"] = out["t1c"] * (1 - soft) + soft * bright * gain
        if name == "vessel":
            for seq in ("t2", "flair"):
                if seq in out:
                    out[seq] = out[seq] * (1 - soft) + soft * -1.5
    return out, union
