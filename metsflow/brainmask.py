"""Brain masks for preprocessing: skull-stripped detection, atlas mask, user-mask hook.

Three ways to obtain a brain mask, all offline:

* **skull-stripped input** (e.g. BraTS): everything outside the brain is one exact background
  value.  ``detect_skull_stripped`` recognises it and ``nonzero_mask`` keeps that support.
* **atlas**: the nilearn ICBM152 2009 template (skull-stripped T1) is registered affinely to the
  T1c at reduced resolution and its brain mask is warped onto the target grid (genericLabel).
  Affine atlas masks are a few mm off at the cortex, where metastases often sit, so the mask is
  dilated a little (``atlas_mask_dilate_mm``) rather than risk cutting lesions off.
* **user mask**: a path template with ``{study_id}``, e.g. masks from HD-BET run elsewhere.

A learned mask model can plug in later as one more method returning a boolean array on the
target grid; ``preprocess`` only calls the functions here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ants
import nibabel as nib
import numpy as np
from scipy import ndimage

from metsflow.io import StudyError

# Defaults for the mask parameters; ``preprocess.DEFAULTS`` includes these keys.
MASK_DEFAULTS: dict[str, Any] = {
    # Skull-stripped if at least this fraction of voxels is the exact background value ...
    "stripped_min_background_fraction": 0.25,
    # ... and the remaining support is no bigger than a brain. A head scanned with a
    # zero-filled background (some scanners/converters do this) has >= 3 L of support.
    "stripped_max_volume_ml": 2600.0,
    # Atlas registration: isotropic working resolution (mm) and ANTs affine schedule.
    "atlas_resolution_mm": 2.0,
    "atlas_transform": "Affine",
    "atlas_iterations": (200, 100, 50),
    "atlas_shrink_factors": (4, 2, 1),
    "atlas_smoothing_sigmas": (2, 1, 0),
    "atlas_mask_dilate_mm": 2.0,
    "random_seed": 1,
}


def detect_skull_stripped(
    data: np.ndarray, voxel_volume_ml: float, params: dict[str, Any]
) -> tuple[bool, dict[str, float]]:
    """Decide whether ``data`` (native T1c) is already skull-stripped.

    Skull-stripped volumes hold one exact background value (0 in BraTS, sometimes the minimum)
    in a large fraction of voxels, and the rest is brain-sized. Unstripped scans have noise in
    the air, so exact repeats of the minimum are rare; a zero-filled unstripped head is caught
    by the volume limit. Returns the decision and the numbers behind it (for geometry.json).
    """
    background_value = float(data.min())
    background = data == background_value
    background_fraction = float(background.mean())
    support_ml = float((~background).sum() * voxel_volume_ml)
    stripped = bool(
        background_fraction >= params["stripped_min_background_fraction"]
        and 0.0 < support_ml <= params["stripped_max_volume_ml"]
    )
    return stripped, {
        "background_value": background_value,
        "background_fraction": round(background_fraction, 4),
        "support_ml": round(support_ml, 1),
    }


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Support of a skull-stripped image: not the background value, holes filled.

    Holes are filled because necrotic cores or resection cavities can contain exact
    background values inside the brain; only the largest component is kept so specks of
    residual background noise do not widen the crop box.
    """
    mask = data != data.min()
    if not mask.any():
        return mask
    components, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = components == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def user_mask_path(template: str, study_id: str) -> Path:
    """Resolve a user mask path template such as ``masks/{study_id}_brain.nii.gz``."""
    return Path(template.format(study_id=study_id))


@functools.lru_cache(maxsize=4)
def _mni_atlas(resolution_mm: float) -> tuple[ants.ANTsImage, ants.ANTsImage]:
    """MNI152 2009 template at ``resolution_mm`` and the 1 mm brain mask, cached per process.

    The template is only used to drive the affine, so a coarse copy is enough; the mask
    stays at 1 mm so warping it onto a finer target grid keeps a smooth boundary.
    """
    from nilearn import datasets  # heavy import, only needed for atlas masks

    template = datasets.load_mni152_template(resolution=max(1, round(resolution_mm)))
    mask = datasets.load_mni152_brain_mask(resolution=1)
    return nifti_to_ants(template), nifti_to_ants(mask)


def nifti_to_ants(img: nib.Nifti1Image, dtype=np.float32) -> ants.ANTsImage:
    """Convert a nibabel image to ANTs (RAS -> LPS handled by ANTs' own converter)."""
    data = np.asarray(img.dataobj, dtype=dtype)
    clean = nib.Nifti1Image(data, img.affine)
    clean.header.set_xyzt_units("mm", "sec")  # in-memory images carry 'unknown' units
    return ants.from_nibabel_nifti(clean)


def atlas_brain_mask(
    t1c: ants.ANTsImage,
    target: ants.ANTsImage,
    params: dict[str, Any],
    outprefix: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Atlas brain mask of ``t1c`` on the grid of ``target`` (boolean array).

    ``t1c`` is first smoothed and resampled to an isotropic working resolution so the
    affine costs seconds whatever the native resolution; the template (moving) is
    registered to it and the 1 mm MNI brain mask follows with genericLabel interpolation.
    ``outprefix`` must point into a temporary folder the caller removes (ANTs writes the
    transform there).
    """
    resolution = float(params["atlas_resolution_mm"])
    template, mni_mask = _mni_atlas(resolution)
    # Gaussian pre-smoothing (sigma ~ half the new spacing, in mm) avoids aliasing when a
    # sub-mm T1c is subsampled to the working resolution.
    smoothed = ants.smooth_image(t1c, sigma=resolution / 2.0, sigma_in_physical_coordinates=True)
    fixed = ants.resample_image(smoothed, (resolution,) * 3, use_voxels=False, interp_type=0)
    fixed = ants.iMath(fixed, "Normalize")
    moving = ants.iMath(template, "Normalize")
    with ants_random_seed(params.get("random_seed")):
        reg = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform=params["atlas_transform"],
            outprefix=outprefix,
            aff_metric="mattes",
            aff_iterations=tuple(params["atlas_iterations"]),
            aff_shrink_factors=tuple(params["atlas_shrink_factors"]),
            aff_smoothing_sigmas=tuple(params["atlas_smoothing_sigmas"]),
        )
    warped = ants.apply_transforms(
        fixed=target,
        moving=mni_mask,
        transformlist=reg["fwdtransforms"],
        interpolator="genericLabel",
    )
    mask = warped.numpy() > 0.5
    dilate_mm = float(params["atlas_mask_dilate_mm"])
    if dilate_mm > 0 and mask.any():
        mask = dilate_mm_ball(mask, np.asarray(target.spacing, dtype=float), dilate_mm)
    return mask, {"atlas_resolution_mm": resolution, "atlas_dilate_mm": dilate_mm}


@contextlib.contextmanager
def ants_random_seed(seed: int | None) -> Iterator[None]:
    """Make ``ants.registration`` pass ``--random-seed`` (reproducible metric sampling).

    antspyx reads the seed from ``ants.config._random_seed`` (its public setter also forces
    'Repro' transform types); ANTs otherwise seeds from the clock, so a rerun of the same
    study would give a slightly different mask/transform.
    """
    previous = ants.config._random_seed
    ants.config._random_seed = seed
    try:
        yield
    finally:
        ants.config._random_seed = previous


def dilate_mm_ball(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Dilate by a ball of ``radius_mm`` (anisotropic spacing aware) via a distance map."""
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return distance <= radius_mm


def user_mask(
    template: str, study_id: str, reference: nib.Nifti1Image, load
) -> tuple[np.ndarray, Path]:
    """Load a user-supplied brain mask; it must lie on the native T1c grid.

    ``load`` is ``metsflow.io.load_nifti`` (passed in so this module has no I/O policy of its
    own). Returns the boolean mask in the file's native orientation and its path.
    """
    path = user_mask_path(template, study_id)
    img = load(path, study_id, "brain mask")
    if img.shape != reference.shape or not np.allclose(img.affine, reference.affine, atol=1e-3):
        raise StudyError(
            study_id,
            f"brain mask grid {img.shape} does not match the T1c grid {reference.shape} "
            "(shape or affine differ)",
            path,
        )
    mask = np.asarray(img.dataobj) > 0
    if not mask.any():
        raise StudyError(study_id, "brain mask is empty", path)
    return mask, path
