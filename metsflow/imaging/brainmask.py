"""Brain masks for preprocessing: skull-stripped detection, atlas mask, user-mask hook.

Three ways to obtain a brain mask, all offline:

* **skull-stripped input** (e.g. BraTS): everything outside the brain is one exact background
  value.  ``detect_skull_stripped`` recognises it and ``nonzero_mask`` keeps that support.
* **atlas**: the nilearn ICBM152 2009 template (skull-stripped T1) is registered affinely to the
  T1c at reduced resolution and its brain mask is warped onto the target grid (genericLabel).
  The template has no skull, so registered to a whole head it would stretch the brain onto the
  scalp (~2x the brain volume). A rough intensity/morphology skull strip of the T1c
  (``rough_brain_mask``: Otsu head/tissue thresholds, an erosion that cuts the brain off the
  scalp, the component at the head's centre, dilated back) therefore sets the start (mask
  centroids) and restricts the affine metric to the brain and a thin rim around it.
  Affine atlas masks are a few mm off at the cortex, where metastases often sit, so the mask is
  dilated a little (``atlas_mask_dilate_mm``) rather than risk cutting lesions off.
* **user mask**: a path template with ``{study_id}``, e.g. masks from HD-BET run elsewhere.

A learned mask model can plug in later as one more method returning a boolean array on the
target grid; ``preprocess`` only calls the functions here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ants
import nibabel as nib
import numpy as np
from scipy import ndimage

from metsflow.core.io import StudyError
from metsflow.core.settings import BrainMaskSettings

# Defaults for the mask parameters; ``preprocess.DEFAULTS`` includes these keys.
# The knobs and their defaults are owned by metsflow.core.settings.BrainMaskSettings.
MASK_DEFAULTS: dict[str, Any] = BrainMaskSettings().as_dict()


def mask_settings(params: BrainMaskSettings | Mapping[str, Any]) -> BrainMaskSettings:
    """The mask knobs of ``params``: a settings object (``PreprocessSettings`` is one) or a
    dict such as ``preprocess.DEFAULTS`` (its other keys ignored; a missing knob = default)."""
    if isinstance(params, BrainMaskSettings):
        return params
    return BrainMaskSettings.from_dict({k: v for k, v in params.items() if k in MASK_DEFAULTS})


def detect_skull_stripped(
    data: np.ndarray, voxel_volume_ml: float, params: BrainMaskSettings | Mapping[str, Any]
) -> tuple[bool, dict[str, float]]:
    """Decide whether ``data`` (native T1c) is already skull-stripped.

    Skull-stripped volumes hold one exact background value (0 in BraTS, sometimes the minimum)
    in a large fraction of voxels, and the rest is brain-sized. Unstripped scans have noise in
    the air, so exact repeats of the minimum are rare; a zero-filled unstripped head is caught
    by the volume limit. Returns the decision and the numbers behind it (for geometry.json).
    """
    s = mask_settings(params)
    background_value = float(data.min())
    background = data == background_value
    background_fraction = float(background.mean())
    support_ml = float((~background).sum() * voxel_volume_ml)
    stripped = bool(
        background_fraction >= s.stripped_min_background_fraction
        and 0.0 < support_ml <= s.stripped_max_volume_ml
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
    params: BrainMaskSettings | Mapping[str, Any],
    outprefix: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Atlas brain mask of ``t1c`` on the grid of ``target`` (boolean array).

    ``t1c`` is first smoothed and resampled to an isotropic working resolution so the
    affine costs seconds whatever the native resolution; the template (moving) is
    registered to it and the 1 mm MNI brain mask follows with genericLabel interpolation.
    ``outprefix`` must point into a temporary folder the caller removes (ANTs writes the
    transform there).
    """
    s = mask_settings(params)
    resolution = float(s.atlas_resolution_mm)
    template, mni_mask = _mni_atlas(resolution)
    # Gaussian pre-smoothing (sigma ~ half the new spacing, in mm) avoids aliasing when a
    # sub-mm T1c is subsampled to the working resolution.
    smoothed = ants.smooth_image(t1c, sigma=resolution / 2.0, sigma_in_physical_coordinates=True)
    fixed = ants.resample_image(smoothed, (resolution,) * 3, use_voxels=False, interp_type=0)
    fixed = ants.iMath(fixed, "Normalize")
    moving = ants.iMath(template, "Normalize")
    rough = rough_brain_mask(fixed, float(s.rough_erosion_mm))
    info: dict[str, Any] = {
        "atlas_resolution_mm": resolution,
        "rough_brain_ml": round(float(rough.sum()) * resolution**3 / 1000.0, 1),
    }
    fixed_mask = fixed.new_image_like(
        dilate_mm_ball(rough, np.full(3, resolution), float(s.atlas_metric_margin_mm)).astype(
            np.float32
        )
    )
    template_mask = ants.resample_image_to_target(mni_mask, template, interp_type="genericLabel")
    moving_mask = template_mask.new_image_like(
        dilate_mm_ball(
            template_mask.numpy() > 0.5,
            np.asarray(template_mask.spacing, dtype=float),
            float(s.atlas_metric_margin_mm),
        ).astype(np.float32)
    )
    initial = _centroid_translation(fixed.new_image_like(rough.astype(np.float32)), template_mask)
    ants.write_transform(initial, outprefix + "initial.mat")
    with ants_random_seed(s.random_seed):
        reg = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform=s.atlas_transform,
            initial_transform=[outprefix + "initial.mat"],
            outprefix=outprefix,
            mask=fixed_mask,
            moving_mask=moving_mask,
            aff_metric="mattes",
            aff_iterations=tuple(s.atlas_iterations),
            aff_shrink_factors=tuple(s.atlas_shrink_factors),
            aff_smoothing_sigmas=tuple(s.atlas_smoothing_sigmas),
        )
    warped = ants.apply_transforms(
        fixed=target,
        moving=mni_mask,
        transformlist=reg["fwdtransforms"],
        interpolator="genericLabel",
    )
    mask = warped.numpy() > 0.5
    dilate_mm = float(s.atlas_mask_dilate_mm)
    if dilate_mm > 0 and mask.any():
        mask = dilate_mm_ball(mask, np.asarray(target.spacing, dtype=float), dilate_mm)
    info["atlas_dilate_mm"] = dilate_mm
    return mask, info


def rough_brain_mask(image: ants.ANTsImage, erosion_mm: float) -> np.ndarray:
    """Rough skull strip of an isotropic T1(c): a boolean array on ``image``'s grid.

    Head = above the Otsu threshold of the whole image (air is dark); tissue = above the Otsu
    threshold of the head's values (drops CSF, bone and air, keeps brain, fat, dura, diploe).
    Eroding the tissue by ``erosion_mm`` breaks the thin bright bridges between brain and
    scalp; the largest component (the brain, the scalp is a thin shell) is grown back inside
    the tissue by the same distance and its holes (ventricles) filled. Only used to start and
    mask the atlas affine, so a few mm of error are fine; it must not contain the scalp.
    """
    data = image.numpy()
    spacing = np.asarray(image.spacing, dtype=float)
    head = ants.threshold_image(image, "Otsu", 1).numpy() > 0
    head = ndimage.binary_fill_holes(head)
    if not head.any():
        return head
    tissue_image = image.new_image_like(np.where(head, data, data[head].min()).astype(np.float32))
    tissue = (ants.threshold_image(tissue_image, "Otsu", 1).numpy() > 0) & head
    core = ndimage.distance_transform_edt(tissue, sampling=spacing) > erosion_mm
    components, count = ndimage.label(core)
    if count == 0:
        return ndimage.binary_fill_holes(tissue)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    core = components == int(np.argmax(sizes))
    # Grow back by the erosion depth (plus a voxel), staying inside the tissue.
    grown = dilate_mm_ball(core, spacing, erosion_mm + float(spacing.max())) & tissue
    return ndimage.binary_fill_holes(grown)


def _centroid_translation(fixed_mask: ants.ANTsImage, moving_mask: ants.ANTsImage):
    """Translation mapping the fixed mask's centroid to the moving mask's (physical LPS), as
    an ANTs affine transform (ANTs transforms map fixed points to moving points)."""

    def centroid(mask: ants.ANTsImage) -> np.ndarray:
        index = np.argwhere(mask.numpy() > 0.5).mean(axis=0)
        direction = np.asarray(mask.direction, dtype=float)
        return np.asarray(mask.origin) + direction @ (np.asarray(mask.spacing) * index)

    fixed_centre = centroid(fixed_mask)
    return ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        center=tuple(fixed_centre),
        translation=tuple(centroid(moving_mask) - fixed_centre),
    )


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
    """Dilate by a ball of ``radius_mm`` (anisotropic spacing aware) via a distance map.

    The distance map is computed only on the mask's bounding box grown by the radius: a brain
    fills a fraction of a head field of view, and the exact Euclidean transform of the whole
    1 mm volume costs seconds.
    """
    spacing = np.asarray(spacing, dtype=float)
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    where = np.argwhere(mask)
    reach = np.ceil(float(radius_mm) / spacing).astype(int) + 1
    start = np.maximum(where.min(axis=0) - reach, 0)
    stop = np.minimum(where.max(axis=0) + 1 + reach, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = ndimage.distance_transform_edt(~mask[box], sampling=spacing) <= radius_mm
    return out


def user_mask(
    template: str, study_id: str, reference: nib.Nifti1Image, load
) -> tuple[np.ndarray, Path]:
    """Load a user-supplied brain mask; it must lie on the native T1c grid.

    ``load`` is ``metsflow.core.io.load_nifti`` (passed in so this module has no I/O policy of its
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
