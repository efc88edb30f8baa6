"""Synthetic MRI studies built from the nilearn MNI152 template (offline, small grids).

A "world" phantom is defined on the 2 mm MNI grid (brain from the template, CSF, skull and
scalp shells, two lesions with BraTS-style sub-regions) and sampled onto arbitrary (oblique,
permuted) native grids, optionally through a known world motion. Knowing the world-to-world
maps exactly lets tests check registration and grid handling against the truth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

WorldMap = Callable[[np.ndarray], np.ndarray]  # (N, 3) world points -> (N, 3) world points

# Lesions in MNI world coordinates (mm): centre, radius of the enhancing sphere.
LESIONS = (((32.0, -22.0, 30.0), 9.0), ((-34.0, 14.0, 12.0), 7.0))


@dataclass
class FakeStudy:
    """Duck-typed stand-in for metsflow.cohort.sheet.Study."""

    patient_id: str
    study_id: str
    t1c: Path | None
    t1: Path | None = None
    t2: Path | None = None
    flair: Path | None = None
    label: Path | None = None
    label_convention: str = "internal"


@functools.lru_cache(maxsize=1)
def phantom() -> dict[str, np.ndarray]:
    """World phantom on the 2 mm MNI grid: T1c, T2 intensities, brain mask, BraTS label."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    affine = template.affine.copy()
    t1 = np.asarray(template.get_fdata(), dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0.5, dtype=bool)
    outside = ndimage.distance_transform_edt(~brain, sampling=2.0)
    csf = (outside > 0) & (outside <= 4)
    skull = (outside > 4) & (outside <= 8)
    scalp = (outside > 8) & (outside <= 14)

    t1c = np.where(brain, t1, 0.0)
    t1c[csf], t1c[skull], t1c[scalp] = 0.12, 0.05, 0.75
    t2 = np.where(brain, 1.1 - t1, 0.0)
    t2[csf], t2[skull], t2[scalp] = 0.95, 0.05, 0.5

    # World coordinates of every voxel, for the lesion spheres.
    ijk = np.indices(t1.shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    label = np.zeros(t1.shape, dtype=np.uint8)  # BraTS: 1 NETC, 2 SNFH, 3 ET
    for centre, radius in LESIONS:
        dist = np.linalg.norm(world - np.asarray(centre), axis=1).reshape(t1.shape)
        edema = (dist <= radius + 6) & brain
        label[edema] = 2
        label[dist <= radius] = 3
        label[dist <= radius * 0.5] = 1
    t1c[label == 3] = 1.3
    t1c[label == 1] = 0.25
    t1c[label == 2] *= 0.7
    t2[label == 2] = 0.9
    return {
        "affine": affine,
        "t1c": t1c.astype(np.float32),
        "t2": t2.astype(np.float32),
        "brain": brain,
        "label": label,
    }


def brain_centre() -> np.ndarray:
    ph = phantom()
    ijk = np.argwhere(ph["brain"]).mean(axis=0)
    return ph["affine"][:3, :3] @ ijk + ph["affine"][:3, 3]


def oblique_affine(
    spacing: float | tuple[float, float, float],
    angles_deg: tuple[float, float, float],
    shape: tuple[int, int, int],
    axes: np.ndarray | None = None,
    centre: np.ndarray | None = None,
) -> np.ndarray:
    """Affine with ``spacing``, rotated by ``angles_deg`` (xyz Euler), voxel axes ``axes``
    (a signed permutation, e.g. LPS order), and the grid centre at ``centre`` (world mm)."""
    axes = np.eye(3) if axes is None else np.asarray(axes, dtype=float)
    centre = brain_centre() if centre is None else np.asarray(centre, dtype=float)
    rotation = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    linear = rotation @ axes @ np.diag(np.broadcast_to(np.asarray(spacing, float), 3))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def sample(
    volume: np.ndarray,
    volume_affine: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    world_map: WorldMap | None = None,
    order: int = 1,
) -> np.ndarray:
    """Value of ``volume`` at the world position of each voxel centre of (affine, shape).

    With ``world_map`` the output at world point x is ``volume(world_map(x))``.
    """
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    if world_map is not None:
        world = world_map(world)
    inv = np.linalg.inv(volume_affine)
    src = world @ inv[:3, :3].T + inv[:3, 3]
    out = ndimage.map_coordinates(volume, src.T, order=order, mode="constant", cval=0.0)
    return out.reshape(shape)


def rigid_map(angles_deg: tuple[float, float, float], shift_mm: tuple[float, float, float]):
    """World map x -> R (x - c) + c + t about the brain centre c."""
    rotation = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    centre = brain_centre()
    shift = np.asarray(shift_mm, dtype=float)

    def apply(points: np.ndarray) -> np.ndarray:
        return (points - centre) @ rotation.T + centre + shift

    return apply


def smooth_deformation(amplitude_mm: float, width_mm: float = 35.0, seed: int = 0) -> WorldMap:
    """Smooth displacement u(x): a few Gaussian bumps inside the brain (diffeomorphic for
    amplitude << width)."""
    rng = np.random.default_rng(seed)
    centre = brain_centre()
    bump_centres = centre + rng.uniform(-40, 40, size=(4, 3))
    bump_vectors = rng.normal(size=(4, 3))
    bump_vectors *= amplitude_mm / np.linalg.norm(bump_vectors, axis=1, keepdims=True)

    def apply(points: np.ndarray) -> np.ndarray:
        out = points.copy()
        for c, v in zip(bump_centres, bump_vectors, strict=True):
            weight = np.exp(-np.sum((points - c) ** 2, axis=1) / (2 * width_mm**2))
            out += weight[:, None] * v
        return out

    return apply


def compose(*maps: WorldMap) -> WorldMap:
    """compose(f, g)(x) = f(g(x))."""

    def apply(points: np.ndarray) -> np.ndarray:
        for world_map in reversed(maps):
            points = world_map(points)
        return points

    return apply


def noisy(data: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Rician-like magnitude noise: never exactly zero, like real unstripped MRI air."""
    rng = np.random.default_rng(seed)
    real = data + rng.normal(0, sigma, data.shape)
    imag = rng.normal(0, sigma, data.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def identity_registration(reg_dir, grid_img):
    """Registration outputs that map the follow-up onto itself (identity affine, zero warp)."""
    import ants

    from metsflow.imaging.brainmask import nifti_to_ants

    reg_dir.mkdir(parents=True)
    ants.write_transform(
        ants.create_ants_transform(transform_type="AffineTransform", dimension=3),
        str(reg_dir / "affine.mat"),
    )
    zero = nifti_to_ants(grid_img) * 0
    field = ants.merge_channels([zero, zero, zero])
    for name in ("warp.nii.gz", "inverse_warp.nii.gz"):
        ants.image_write(field, str(reg_dir / name))
