"""Per-study preprocessing: co-registration, resampling, brain mask, z-score, crop.

One study (T1c required; T1, T2, FLAIR and a label optional) becomes a folder of images on one
common grid, the input of every later step (training, inference, longitudinal registration).

Grid convention (the only one used in metsflow)
-----------------------------------------------
* A voxel index ``i`` maps to world (RAS mm) by the NIfTI affine at the voxel *centre*
  (nibabel / MONAI convention; ITK's physical point is the same point).
* The native T1c is reoriented to the closest RAS axis order (``nib.as_closest_canonical``:
  a permutation/flip only, so obliquity is kept and no voxel is interpolated).
* The target grid has the RAS T1c's axis directions and the ``spacing`` setting. It keeps the
  outer corner of the native voxel (0,0,0) - the point ``A_ras @ (-0.5,-0.5,-0.5)`` - and
  covers the native physical extent: along axis ``k``, ``n'_k = round(n_k s_k / s'_k)``
  voxels, so native index ``i`` and target index ``j`` of the same world point satisfy
  ``(j + 0.5) s'_k = (i + 0.5) s_k``. With ``s' = s`` the target grid *is* the RAS native grid.
  ``target_grid`` implements this; geometry.json records every affine involved.
* Outputs are cropped to the brain-mask bounding box + ``crop_margin_mm``; the final affine is
  the target affine shifted by the crop start, so world positions do not move.

Steps: load (``metsflow.core.io.load_nifti``), reorient to RAS, rigidly co-register T1/T2/FLAIR to
the T1c with ANTs (Mattes MI; same-session scans start from identity, i.e. scanner
coordinates), brain mask on the target grid (``metsflow.imaging.brainmask``) and its crop box,
resample every sequence in one interpolation (rigid + grid change) with 3rd-order B-spline
onto the cropped grid only, masks and labels with genericLabel, z-score each sequence inside
the mask (zero outside, clipped), convert the label to the internal convention and write
everything atomically.

ANTs writes its transforms under a per-job temporary folder (inside ``workdir`` or
``out_dir``) that is always removed: left to itself it fills /tmp with GBs at cohort scale.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ants
import nibabel as nib
import numpy as np

from metsflow.core.io import (
    MAX_IMAGE_MB,
    StudyError,
    atomic_path,
    load_nifti,
    remove_path,
    save_nifti,
    write_json,
)
from metsflow.core.labels import check_convention, to_internal
from metsflow.core.layout import (
    BRAIN_MASK,
    GEOMETRY,
    LABEL,
    coregistration_transform,
    sequence_image,
)
from metsflow.core.runtime import set_threads
from metsflow.core.sequences import MOVING_SEQUENCES, SEQUENCES
from metsflow.core.settings import PreprocessSettings
from metsflow.imaging import brainmask
from metsflow.imaging.grid import crop_box

MASK_METHODS = ("auto", "atlas", "nonzero")

# The knobs and their defaults are owned by metsflow.core.settings.PreprocessSettings.
DEFAULTS: dict[str, Any] = PreprocessSettings().as_dict()

# Affines of a label/mask and of the T1c must agree to this tolerance (mm); converters write
# float32 affines, so exact equality would reject valid pairs.
GRID_ATOL_MM = 1e-3


# --------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------
def target_grid(
    affine: np.ndarray, shape: tuple[int, ...], spacing: list[float] | np.ndarray
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Target grid (affine, shape) for a native grid, following the module's grid convention."""
    affine = np.asarray(affine, dtype=float)
    spacing = np.asarray(spacing, dtype=float)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    directions = affine[:3, :3] / zooms
    extent = np.asarray(shape[:3], dtype=float) * zooms
    new_shape = np.maximum(1, np.round(extent / spacing)).astype(int)
    corner = affine[:3, :3] @ np.full(3, -0.5) + affine[:3, 3]
    new_affine = np.eye(4)
    new_affine[:3, :3] = directions * spacing
    new_affine[:3, 3] = corner + new_affine[:3, :3] @ np.full(3, 0.5)
    return new_affine, (int(new_shape[0]), int(new_shape[1]), int(new_shape[2]))


def _empty_ants_grid(affine: np.ndarray, shape: tuple[int, int, int]) -> ants.ANTsImage:
    return brainmask.nifti_to_ants(nib.Nifti1Image(np.zeros(shape, dtype=np.float32), affine))


def _to_ants(img: nib.Nifti1Image, study_id: str, name: str, path: str) -> ants.ANTsImage:
    """ANTs copy of an input image. A sheared affine never gets here: load_nifti refused it
    (metsflow.core.io.MAX_SHEAR_DEG, the shear ANTs converts), as `cohort check --deep` does."""
    try:
        return brainmask.nifti_to_ants(img)
    except ValueError as exc:
        raise StudyError(study_id, f"{name.upper()} affine cannot be used: {exc}", path) from exc


def _same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=GRID_ATOL_MM)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def _settings(params: PreprocessSettings | Mapping[str, Any] | None) -> PreprocessSettings:
    """``params`` (a settings object, or a dict of overrides of the defaults) checked, with
    the spacing as floats."""
    params = PreprocessSettings.from_dict(params, "preprocessing parameters")
    spacing = params.spacing
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    settings = dataclasses.replace(params, spacing=[float(s) for s in spacing])
    method = settings.brain_mask
    if method not in MASK_METHODS and "{study_id}" not in str(method):
        raise ValueError(
            f"brain_mask must be one of {MASK_METHODS} or a path template with '{{study_id}}', "
            f"got {method!r}"
        )
    for stage in ("atlas", "coreg"):
        keys = [f"{stage}_iterations", f"{stage}_shrink_factors", f"{stage}_smoothing_sigmas"]
        if len({len(getattr(settings, k)) for k in keys}) != 1:
            raise ValueError(f"{', '.join(keys)} need one entry per level")
    if settings.coregister not in ("rigid", "none"):
        raise ValueError(f"coregister must be 'rigid' or 'none', got {settings.coregister!r}")
    return settings


def _load_inputs(
    study, max_image_mb: float = MAX_IMAGE_MB
) -> tuple[dict[str, nib.Nifti1Image], dict[str, str]]:
    """Load the present sequences (checked), native orientation."""
    if getattr(study, "t1c", None) is None:
        raise StudyError(study.study_id, "T1c is required but missing from the sheet")
    images, paths = {}, {}
    for name in SEQUENCES:
        path = getattr(study, name, None)
        if path is None:
            continue
        images[name] = load_nifti(
            path, study.study_id, name.upper(), require_signal=True, max_image_mb=max_image_mb
        )
        paths[name] = str(path)
    return images, paths


def _rigid_coregister(
    fixed: ants.ANTsImage, moving: ants.ANTsImage, settings: PreprocessSettings, outprefix: str
) -> str:
    """Rigid ANTs registration of ``moving`` to ``fixed``; returns the .mat path.

    ``fixed`` is the T1c already at the working resolution (``_working_resolution``), made
    once per study for all moving sequences: smoothing the full-resolution T1c is a large part
    of each co-registration's cost.

    Sequences of one session share scanner coordinates, so the search starts from identity:
    a centre-of-mass start would be pulled off by differences in field of view and contrast.
    """
    moving = _working_resolution(moving, float(settings.coreg_resolution_mm))
    with brainmask.ants_random_seed(settings.random_seed):
        reg = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform="Rigid",
            initial_transform=["Identity"],
            outprefix=outprefix,
            aff_metric="mattes",
            aff_iterations=tuple(settings.coreg_iterations),
            aff_shrink_factors=tuple(settings.coreg_shrink_factors),
            aff_smoothing_sigmas=tuple(settings.coreg_smoothing_sigmas),
        )
    return reg["fwdtransforms"][0]


def _working_resolution(image: ants.ANTsImage, resolution: float) -> ants.ANTsImage:
    """Smooth (sigma half the new spacing, against aliasing) and resample to isotropic
    ``resolution`` mm; images already that coarse are returned as they are."""
    if min(image.spacing) >= resolution:
        return image
    smoothed = ants.smooth_image(image, sigma=resolution / 2.0, sigma_in_physical_coordinates=True)
    return ants.resample_image(smoothed, (resolution,) * 3, use_voxels=False, interp_type=0)


def _motion_summary(mat_path: str, centre_lps: np.ndarray) -> dict[str, float]:
    """Rotation angle (deg) and displacement of the T1c centre (mm) of a rigid transform."""
    tx = ants.read_transform(mat_path)
    rotation = np.asarray(tx.parameters[:9], dtype=float).reshape(3, 3)
    cos_angle = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    moved = np.asarray(tx.apply_to_point(tuple(centre_lps)), dtype=float)
    return {
        "rotation_deg": round(math.degrees(math.acos(cos_angle)), 3),
        "translation_mm": round(float(np.linalg.norm(moved - centre_lps)), 3),
    }


def _resample(
    moving: ants.ANTsImage,
    target: ants.ANTsImage,
    interpolator: str,
    transform: str | None = None,
) -> np.ndarray:
    """One interpolation from native space (optionally through a rigid) onto the target grid."""
    if transform is None:
        out = ants.resample_image_to_target(moving, target, interp_type=interpolator)
    else:
        out = ants.apply_transforms(
            fixed=target, moving=moving, transformlist=[transform], interpolator=interpolator
        )
    return out.numpy()


def _zscore(
    data: np.ndarray, mask: np.ndarray, clip: float | None, study_id: str, name: str
) -> tuple[np.ndarray, dict[str, float]]:
    values = data[mask].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    if not std > 1e-6 * max(1.0, abs(mean)):
        raise StudyError(study_id, f"{name.upper()} is constant inside the brain mask")
    out = (data.astype(np.float64) - mean) / std
    if clip is not None:
        out = np.clip(out, -float(clip), float(clip))
    out[~mask] = 0.0
    return out.astype(np.float32), {"mean": mean, "std": std}


def _brain_mask(
    study,
    method: str,
    t1c_native: nib.Nifti1Image,
    t1c_ants: ants.ANTsImage,
    target: ants.ANTsImage,
    settings: PreprocessSettings,
    tmp: Path,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Brain mask on the target grid and a record of how it was made."""
    data = np.asarray(t1c_native.dataobj)
    voxel_ml = float(np.prod(t1c_native.header.get_zooms()[:3])) / 1000.0
    stripped, detection = brainmask.detect_skull_stripped(data, voxel_ml, settings)
    info: dict[str, Any] = {"skull_stripped": stripped, "skull_strip_detection": detection}
    if method == "auto":
        method = "nonzero" if stripped else "atlas"
    info["mask_method"] = method
    if method == "atlas":
        mask, atlas_info = brainmask.atlas_brain_mask(
            t1c_ants, target, settings, outprefix=str(tmp / "atlas_")
        )
        info.update(atlas_info)
        return mask, info
    if method == "nonzero":
        native_mask = brainmask.nonzero_mask(data)
    else:  # user mask path template
        native_mask, path = brainmask.user_mask(method, study.study_id, t1c_native, load_nifti)
        info["mask_method"] = "user"
        info["mask_path"] = str(path)
    # Resample from the RAS-reordered mask, as the images are: genericLabel breaks ties by
    # storage order, so a left-right flipped file would otherwise get a slightly other mask.
    mask_img = nib.as_closest_canonical(
        nib.Nifti1Image(native_mask.astype(np.float32), t1c_native.affine)
    )
    mask = _resample(brainmask.nifti_to_ants(mask_img), target, "genericLabel") > 0.5
    return mask, info


def _load_label(
    study, t1c_native: nib.Nifti1Image, max_image_mb: float = MAX_IMAGE_MB
) -> tuple[nib.Nifti1Image, str]:
    """Load the label, check it lies on the T1c grid, convert to the internal convention."""
    convention = getattr(study, "label_convention", "internal") or "internal"
    try:
        check_convention(convention)
    except ValueError as exc:
        raise StudyError(study.study_id, str(exc), study.label) from exc
    img = load_nifti(study.label, study.study_id, "label", max_image_mb=max_image_mb)
    if not _same_grid(img, t1c_native):
        raise StudyError(
            study.study_id,
            f"label grid (shape {img.shape}) does not match the T1c grid (shape "
            f"{t1c_native.shape}); shapes or affines differ by more than {GRID_ATOL_MM} mm",
            study.label,
        )
    try:
        internal = to_internal(np.asarray(img.dataobj), convention)
    except ValueError as exc:
        raise StudyError(study.study_id, f"invalid label: {exc}", study.label) from exc
    return nib.Nifti1Image(internal, t1c_native.affine), convention


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def preprocess_study(
    study,
    out_dir: str | Path,
    params: PreprocessSettings | Mapping[str, Any] | None = None,
    threads: int = 1,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Preprocess one study into ``out_dir`` (see module docstring); returns geometry.json's dict."""
    set_threads(threads)
    settings = _settings(params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_id = study.study_id
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = round(now - clock, 3)
        clock = now

    native, paths = _load_inputs(study, settings.max_image_mb)
    label_img = convention = None
    if getattr(study, "label", None) is not None:
        label_img, convention = _load_label(study, native["t1c"], settings.max_image_mb)
        paths["label"] = str(study.label)
    t1c_native = native["t1c"]
    ras = {name: nib.as_closest_canonical(img) for name, img in native.items()}
    ants_images = {name: _to_ants(img, study_id, name, paths[name]) for name, img in ras.items()}
    spacing = np.asarray(settings.spacing, dtype=float)
    grid_affine, grid_shape = target_grid(ras["t1c"].affine, ras["t1c"].shape, spacing)
    target = _empty_ants_grid(grid_affine, grid_shape)
    lap("load")

    tmp = Path(tempfile.mkdtemp(prefix=f".ants-{study_id}-", dir=workdir or out_dir))
    try:
        transforms: dict[str, str] = {}
        coregistration: dict[str, dict[str, Any]] = {}
        moving = [name for name in MOVING_SEQUENCES if name in ants_images]
        if settings.coregister == "rigid" and moving:
            centre = _ants_centre(ants_images["t1c"])
            fixed = _working_resolution(ants_images["t1c"], float(settings.coreg_resolution_mm))
            for name in moving:
                transforms[name] = _rigid_coregister(
                    fixed, ants_images[name], settings, str(tmp / f"{name}_")
                )
                coregistration[name] = {
                    "transform": coregistration_transform(name),
                    **_motion_summary(transforms[name], centre),
                }
        lap("coregister")

        # Brain mask first: the crop box it defines is the only part of the target grid the
        # sequences are interpolated onto (a brain box is ~40% of a head field of view, and
        # cubic B-spline resampling is the costliest per-voxel step at 1 mm).
        mask, mask_info = _brain_mask(
            study,
            settings.brain_mask,
            t1c_native,
            ants_images["t1c"],
            target,
            settings,
            tmp,
        )
        if not mask.any():
            raise StudyError(
                study_id, f"brain mask ({mask_info['mask_method']}) is empty", paths["t1c"]
            )
        start, stop = crop_box(mask, spacing, settings.crop_margin_mm)
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        final_affine = grid_affine.copy()
        final_affine[:3, 3] = grid_affine[:3, :3] @ np.asarray(start, float) + grid_affine[:3, 3]
        final_shape = [b - a for a, b in zip(start, stop, strict=True)]
        mask = mask[box]
        lap("brain_mask")

        cropped = _empty_ants_grid(final_affine, tuple(final_shape))
        resampled = {
            name: _resample(img, cropped, "bSpline", transforms.get(name))
            for name, img in ants_images.items()
        }
        label = None
        if label_img is not None:
            label_ants = brainmask.nifti_to_ants(nib.as_closest_canonical(label_img))
            label = np.rint(_resample(label_ants, cropped, "genericLabel")).astype(np.uint8)
        lap("resample")

        normalised, zstats = {}, {}
        for name, data in resampled.items():
            normalised[name], zstats[name] = _zscore(
                data, mask, settings.zscore_clip, study_id, name
            )
        lap("normalise")

        for name in SEQUENCES:
            path = out_dir / sequence_image(name)
            if name in normalised:
                save_nifti(path, normalised[name], final_affine, dtype=np.float32)
            else:  # a stale output of an earlier run with that sequence
                remove_path(path)
        save_nifti(out_dir / BRAIN_MASK, mask, final_affine, dtype=np.uint8)
        label_info: dict[str, Any] = {"present": label is not None}
        if label is not None:
            save_nifti(out_dir / LABEL, label, final_affine, dtype=np.uint8)
            foreground = label > 0
            label_info.update(
                convention=convention,
                voxels=int(foreground.sum()),
                voxels_outside_mask=int((foreground & ~mask).sum()),
                native_voxels_cropped=_native_voxels_outside(
                    label_img, final_affine, tuple(final_shape)
                ),
            )
        else:
            remove_path(out_dir / LABEL)
        for name, src in transforms.items():
            with atomic_path(out_dir / coregistration_transform(name)) as dst:
                shutil.copyfile(src, dst)
        lap("write")
    finally:
        remove_path(tmp, ignore_errors=True)

    geometry = {
        "study_id": study_id,
        "patient_id": getattr(study, "patient_id", None),
        "inputs": paths,
        "grid_convention": (
            "voxel centres (nibabel/MONAI); target grid = RAS-reoriented T1c directions at "
            "'spacing', keeping the outer corner of native voxel (0,0,0) and the native extent"
        ),
        "native": {
            "affine": t1c_native.affine.tolist(),
            "shape": list(t1c_native.shape),
            "orientation": "".join(nib.aff2axcodes(t1c_native.affine)),
        },
        "ras": {"affine": ras["t1c"].affine.tolist(), "shape": list(ras["t1c"].shape)},
        "target": {"affine": grid_affine.tolist(), "shape": list(grid_shape)},
        "crop": {"start": start, "stop": stop},
        "final": {"affine": final_affine.tolist(), "shape": final_shape},
        "spacing": settings.spacing,
        "sequences_present": [s for s in SEQUENCES if s in native],
        "sequences_missing": [s for s in SEQUENCES if s not in native],
        "coregistration": coregistration,
        "brain_volume_ml": round(float(mask.sum() * np.prod(spacing)) / 1000.0, 1),
        **mask_info,
        "zscore": zstats,
        "label": label_info,
        "seconds": seconds,
        "params": settings.as_dict(),
    }
    write_json(out_dir / GEOMETRY, geometry)
    return geometry


def _native_voxels_outside(
    label_img: nib.Nifti1Image, affine: np.ndarray, shape: tuple[int, int, int]
) -> int:
    """Foreground voxels of the native label whose centre falls outside the cropped grid."""
    index = np.argwhere(np.asarray(label_img.dataobj) > 0).astype(float)
    if not len(index):
        return 0
    world = index @ label_img.affine[:3, :3].T + label_img.affine[:3, 3]
    inv = np.linalg.inv(affine)
    target = np.rint(world @ inv[:3, :3].T + inv[:3, 3])
    inside = np.all((target >= 0) & (target < np.asarray(shape)), axis=1)
    return int((~inside).sum())


def _ants_centre(image: ants.ANTsImage) -> np.ndarray:
    """Physical (LPS) centre of an ANTs image's voxel grid."""
    index = (np.asarray(image.shape, dtype=float) - 1.0) / 2.0
    direction = np.asarray(image.direction, dtype=float)
    return np.asarray(image.origin) + direction @ (np.asarray(image.spacing) * index)
