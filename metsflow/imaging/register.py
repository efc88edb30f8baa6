"""Longitudinal registration: follow-up T1c onto the previous study, and label propagation.

``register_followup`` runs ANTs (``antsRegistration`` from the antspyx library) on two
preprocessed study folders: the follow-up T1c is the *moving* image, the previous T1c the
*fixed* one. Stages: affine (Mattes MI, reduced resolution only) then SyN with the CC metric,
both restricted to the (slightly dilated) brain masks. The command is assembled here rather
than through ``ants.registration`` because that wrapper fixes the SyN shrink factors and
smoothing to its own schedule; every knob is in ``DEFAULTS``.

Transforms kept in ``out_dir`` (ANTs conventions, physical LPS space):
    affine.mat          follow-up <- previous affine part (fixed -> moving point map)
    warp.nii.gz         forward displacement field (fixed domain)
    inverse_warp.nii.gz inverse displacement field
Follow-up image -> previous grid: ``[warp.nii.gz, affine.mat]``.
Previous image -> follow-up grid: ``[affine.mat (inverted), inverse_warp.nii.gz]``, which is
what ``propagate_label`` uses to bring the previous study's label into the follow-up.

Resolution-aware schedule: pyramid levels are given in mm (``aff_levels_mm``, ``levels_mm``;
smoothing in mm too) and turned into ANTs shrink factors for the spacing of the preprocessed
grid by ``pyramid``, so the same configuration means the same thing at 1, 2 or 4 mm. Levels
finer than the grid collapse onto full resolution (one level, the larger iteration count).
The CC radius counts voxels of each level's shrunk image, so it scales with the level too.

Default schedule (why it is fast): SyN-CC (radius 4, ANTs' default affine pyramid) took 441 s
per 1 mm pair on 2 cores. Here the affine runs at 8 and 4 mm only, the CC radius is 2 and SyN
runs at 8, 4 and 2 mm, never at full 1 mm resolution, where one CC iteration costs as much as
the whole 2 mm level. ``benchmarks/bench_preprocess_register.py`` measures time and
propagated-label Dice against full-resolution SyN-CC on phantoms with known deformation
(1 mm phantom pair, 2 threads, on a heavily shared machine: 62 CPU-seconds for registration
+ QC, so 31-62 s wall on 2 idle cores depending on thread scaling; propagated brain-mask
Dice 0.991 against the true correspondence).
"""

from __future__ import annotations

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
    StudyError,
    atomic_path,
    load_nifti,
    read_json,
    remove_path,
    save_nifti,
    write_json,
)
from metsflow.core.layout import (
    AFFINE,
    BRAIN_MASK,
    INVERSE_WARP,
    REGISTRATION_FILES,
    REGISTRATION_QC,
    T1C,
    WARP,
)
from metsflow.core.runtime import set_threads
from metsflow.core.settings import RegisterSettings
from metsflow.imaging.brainmask import dilate_mm_ball, nifti_to_ants

# The knobs and their defaults are owned by metsflow.core.settings.RegisterSettings.
DEFAULTS: dict[str, Any] = RegisterSettings().as_dict()

OUTPUT_FILES = REGISTRATION_FILES


def _settings(params: RegisterSettings | Mapping[str, Any] | None) -> RegisterSettings:
    """``params`` (a settings object, or a dict of overrides of the defaults) checked."""
    s = RegisterSettings.from_dict(params, "registration parameters")
    levels = {len(v) for v in (s.reg_iterations, s.levels_mm, s.smoothing_mm)}
    aff_levels = {len(v) for v in (s.aff_iterations, s.aff_levels_mm, s.aff_smoothing_mm)}
    if len(levels) != 1 or len(aff_levels) != 1:
        raise ValueError("iterations, levels (mm) and smoothing (mm) need one entry per level")
    for key in ("levels_mm", "aff_levels_mm"):
        values = [float(v) for v in getattr(s, key)]
        if min(values) <= 0 or values != sorted(values, reverse=True):
            raise ValueError(f"{key} must be positive and coarse to fine, got {getattr(s, key)!r}")
    if s.syn_metric not in ("CC", "Mattes", "MeanSquares"):
        raise ValueError(f"syn_metric must be CC, Mattes or MeanSquares: {s.syn_metric!r}")
    return s


def _x(values) -> str:
    return "x".join(str(v) for v in values)


def pyramid(
    levels_mm, iterations, smoothing_mm, spacing_mm: float
) -> dict[str, tuple[int | float, ...]]:
    """ANTs shrink factors for pyramid levels given in mm on a grid of ``spacing_mm``.

    ``shrink = max(1, round(level / spacing))``. Consecutive levels that land on the same
    shrink factor (levels finer than the grid) are merged into one, keeping the finer level's
    smoothing and the larger iteration count, so a 2 mm schedule on a 4 mm grid does not
    run full resolution twice.
    """
    shrinks: list[int] = []
    iters: list[int] = []
    sigmas: list[float] = []
    for level, count, sigma in zip(levels_mm, iterations, smoothing_mm, strict=True):
        shrink = max(1, int(round(float(level) / float(spacing_mm))))
        if shrinks and shrink == shrinks[-1]:
            iters[-1] = max(iters[-1], int(count))
            sigmas[-1] = float(sigma)
            continue
        shrinks.append(shrink)
        iters.append(int(count))
        sigmas.append(float(sigma))
    return {
        "shrink_factors": tuple(shrinks),
        "iterations": tuple(iters),
        "smoothing_mm": tuple(sigmas),
    }


def _metric(name: str, fixed: str, moving: str, s: RegisterSettings, stage: str) -> str:
    if name == "CC":
        return f"CC[{fixed},{moving},1,{int(s.cc_radius)}]"
    if name == "MeanSquares":
        return f"MeanSquares[{fixed},{moving},1,0]"
    bins = s.aff_bins if stage == "aff" else s.syn_bins
    if stage == "aff":
        return f"Mattes[{fixed},{moving},1,{bins},Regular,{s.aff_sampling_rate}]"
    return f"Mattes[{fixed},{moving},1,{bins}]"


def ants_command(
    fixed: str,
    moving: str,
    fixed_mask: str,
    moving_mask: str,
    outprefix: str,
    params: RegisterSettings | Mapping[str, Any],
    spacing_mm: float,
) -> list[str]:
    """antsRegistration arguments: mask-centroid start, affine stage, SyN stage.

    ``spacing_mm`` is the (finest) voxel size of the fixed grid, which sets the shrink factors.
    """
    s = _settings(params)
    masks = f"[{fixed_mask},{moving_mask}]"
    aff = pyramid(s.aff_levels_mm, s.aff_iterations, s.aff_smoothing_mm, spacing_mm)
    syn = pyramid(s.levels_mm, s.reg_iterations, s.smoothing_mm, spacing_mm)
    convergence = f"{s.convergence_threshold},{s.convergence_window}"
    return [
        "--dimensionality", "3",
        "--float", "1",
        "--collapse-output-transforms", "1",
        "--random-seed", str(int(s.random_seed)),
        "--output", outprefix,
        "--interpolation", "Linear",
        "--use-histogram-matching", "0",
        # z-scored images have negative values: centre on the brain masks, not on intensity.
        "--initial-moving-transform", f"[{fixed_mask},{moving_mask},1]",
        "--transform", f"{s.aff_transform}[{s.aff_gradient_step}]",
        "--metric", _metric(s.aff_metric, fixed, moving, s, "aff"),
        "--convergence", f"[{_x(aff['iterations'])},{convergence}]",
        "--shrink-factors", _x(aff["shrink_factors"]),
        "--smoothing-sigmas", _x(aff["smoothing_mm"]) + "mm",
        "--masks", masks,
        "--transform",
        f"SyN[{s.syn_gradient_step},{s.syn_flow_sigma},{s.syn_total_sigma}]",
        "--metric", _metric(s.syn_metric, fixed, moving, s, "syn"),
        "--convergence", f"[{_x(syn['iterations'])},{convergence}]",
        "--shrink-factors", _x(syn["shrink_factors"]),
        "--smoothing-sigmas", _x(syn["smoothing_mm"]) + "mm",
        "--masks", masks,
    ]  # fmt: skip


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images inside ``mask``."""
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else 0.0


def _load_prep(prep_dir: Path, study_id: str) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    t1c = load_nifti(prep_dir / T1C, study_id, "preprocessed T1c")
    mask = load_nifti(prep_dir / BRAIN_MASK, study_id, "preprocessed brain mask")
    if mask.shape != t1c.shape or not np.allclose(mask.affine, t1c.affine, atol=1e-3):
        raise StudyError(study_id, "brain mask and T1c grids differ", prep_dir)
    if not np.asarray(mask.dataobj).any():
        raise StudyError(study_id, "brain mask is empty", prep_dir / BRAIN_MASK)
    return t1c, mask


def register_followup(
    followup_dir: str | Path,
    previous_dir: str | Path,
    out_dir: str | Path,
    params: RegisterSettings | Mapping[str, Any] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Register the follow-up (moving) to the previous study (fixed); returns the QC dict."""
    set_threads(threads)
    s = _settings(params)
    followup_dir, previous_dir, out_dir = Path(followup_dir), Path(previous_dir), Path(out_dir)
    study_id = followup_dir.name
    start = time.perf_counter()
    moving_img, moving_mask_img = _load_prep(followup_dir, study_id)
    fixed_img, fixed_mask_img = _load_prep(previous_dir, previous_dir.name)
    fixed_mask = np.asarray(fixed_mask_img.dataobj) > 0
    moving_mask = np.asarray(moving_mask_img.dataobj) > 0

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".ants-{study_id}-", dir=out_dir))
    try:
        # Dilated masks for the metric, written to the temp folder for antsRegistration.
        mask_files = {}
        for role, mask, img in (
            ("fixed", fixed_mask, fixed_img),
            ("moving", moving_mask, moving_img),
        ):
            spacing = np.asarray(img.header.get_zooms()[:3], dtype=float)
            dilated = dilate_mm_ball(mask, spacing, max(0.0, float(s.mask_dilate_mm)))
            mask_files[role] = tmp / f"{role}_mask.nii.gz"
            save_nifti(mask_files[role], dilated, img.affine, dtype=np.uint8)
        outprefix = str(tmp / "reg_")
        spacing_mm = float(min(fixed_img.header.get_zooms()[:3]))
        args = ants_command(
            str(previous_dir / T1C),
            str(followup_dir / T1C),
            str(mask_files["fixed"]),
            str(mask_files["moving"]),
            outprefix,
            s,
            spacing_mm,
        )
        exit_code = ants.internal.get_lib_fn("antsRegistration")(args)
        # antsRegistration's own output names (transform index + kind) -> the layout's.
        produced = {
            AFFINE: Path(outprefix + "0GenericAffine.mat"),
            WARP: Path(outprefix + "1Warp.nii.gz"),
            INVERSE_WARP: Path(outprefix + "1InverseWarp.nii.gz"),
        }
        if exit_code != 0 or not all(p.exists() for p in produced.values()):
            raise StudyError(
                study_id,
                f"ANTs registration to {previous_dir.name} failed (exit code {exit_code})",
                followup_dir / T1C,
            )
        for name, src in produced.items():
            with atomic_path(out_dir / name) as dst:
                shutil.copyfile(src, dst)
        registration_seconds = time.perf_counter() - start
    finally:
        remove_path(tmp, ignore_errors=True)

    qc = _quality(fixed_img, moving_img, fixed_mask, moving_mask, out_dir, s)
    qc.update(
        followup=study_id,
        previous=previous_dir.name,
        seconds={
            "registration": round(registration_seconds, 2),
            "total": round(time.perf_counter() - start, 2),
        },
        spacing_mm=spacing_mm,
        schedule={
            "affine": pyramid(
                s.aff_levels_mm,
                s.aff_iterations,
                s.aff_smoothing_mm,
                spacing_mm,
            ),
            "syn": pyramid(s.levels_mm, s.reg_iterations, s.smoothing_mm, spacing_mm),
        },
        params=s.as_dict(),
    )
    write_json(out_dir / REGISTRATION_QC, qc)
    return qc


def _quality(
    fixed_img: nib.Nifti1Image,
    moving_img: nib.Nifti1Image,
    fixed_mask: np.ndarray,
    moving_mask: np.ndarray,
    reg_dir: Path,
    s: RegisterSettings,
) -> dict[str, Any]:
    """NCC and brain-mask Dice before (scanner space) and after registration, Jacobian range."""
    fixed = nifti_to_ants(fixed_img)
    moving = nifti_to_ants(moving_img)
    moving_mask_ants = nifti_to_ants(
        nib.Nifti1Image(moving_mask.astype(np.float32), moving_img.affine)
    )
    forward = [str(reg_dir / WARP), str(reg_dir / AFFINE)]
    before = ants.resample_image_to_target(moving, fixed, interp_type="linear").numpy()
    after = ants.apply_transforms(fixed, moving, forward, interpolator="linear").numpy()
    mask_before = ants.resample_image_to_target(moving_mask_ants, fixed, "genericLabel").numpy()
    mask_after = ants.apply_transforms(
        fixed, moving_mask_ants, forward, interpolator="genericLabel"
    ).numpy()
    jacobian = ants.create_jacobian_determinant_image(fixed, str(reg_dir / WARP))
    # When the finest SyN level is shrunk, the field (and so its Jacobian) lives on a coarser
    # grid than the fixed image: bring it onto the fixed grid before masking.
    jacobian = ants.resample_image_to_target(jacobian, fixed, interp_type="linear")
    jac = jacobian.numpy()[fixed_mask]
    qc = {
        "ncc_before": round(_ncc(fixed.numpy(), before, fixed_mask), 4),
        "ncc_after": round(_ncc(fixed.numpy(), after, fixed_mask), 4),
        "mask_dice_before": round(_dice(fixed_mask, mask_before > 0.5), 4),
        "mask_dice_after": round(_dice(fixed_mask, mask_after > 0.5), 4),
        "jacobian_min": round(float(jac.min()), 4),
        "jacobian_max": round(float(jac.max()), 4),
    }
    reasons = qc_flags(qc, s)
    qc["flag"] = bool(reasons)
    qc["flag_reasons"] = reasons
    return qc


# qc.json figures a registration manifest carries per pair (its QC table).
QC_COLUMNS = (
    "ncc_before",
    "ncc_after",
    "mask_dice_before",
    "mask_dice_after",
    "jacobian_min",
    "qc_flag",
    "qc_reasons",
)


def qc_columns(qc_path: Path) -> dict:
    """The registration-manifest QC columns (``QC_COLUMNS``) of one registered pair's qc.json
    (also for pairs skipped as already done).

    A missing or unreadable qc.json flags the pair rather than failing the whole shard.
    """
    try:
        qc = read_json(qc_path)
    except (OSError, ValueError) as exc:
        return {key: None for key in QC_COLUMNS[:5]} | {
            "qc_flag": True,
            "qc_reasons": f"QC unavailable ({qc_path}): {exc}",
        }
    return {
        **{key: qc[key] for key in QC_COLUMNS[:5]},
        "qc_flag": bool(qc["flag"]),
        "qc_reasons": "; ".join(qc["flag_reasons"]),
    }


def qc_flags(qc: dict[str, float], params: RegisterSettings | Mapping[str, Any]) -> list[str]:
    """Reasons to flag a registration for review (empty list = passes QC)."""
    s = _settings(params)
    reasons = []
    if qc["ncc_after"] < s.qc_min_ncc:
        reasons.append(f"NCC after registration {qc['ncc_after']} < {s.qc_min_ncc}")
    if qc["mask_dice_after"] < s.qc_min_mask_dice:
        reasons.append(
            f"brain-mask Dice after registration {qc['mask_dice_after']} < {s.qc_min_mask_dice}"
        )
    if qc["ncc_after"] < qc["ncc_before"]:
        reasons.append("registration lowered NCC")
    if qc["jacobian_min"] <= 0:
        reasons.append("deformation folds (Jacobian determinant <= 0 inside the brain)")
    return reasons


def propagate_label(
    label_path: str | Path, reg_dir: str | Path, followup_dir: str | Path, out_path: str | Path
) -> dict[str, Any]:
    """Warp the previous study's label into the follow-up grid (genericLabel); uint8, atomic.

    Registration had moving = follow-up, fixed = previous, so previous -> follow-up is the
    inverse: affine inverted, then the inverse warp. Returns voxel counts per label value.
    """
    reg_dir, followup_dir = Path(reg_dir), Path(followup_dir)
    study_id = followup_dir.name
    for name in OUTPUT_FILES:
        if not (reg_dir / name).exists():
            raise StudyError(study_id, f"registration output {name} is missing", reg_dir / name)
    grid = load_nifti(followup_dir / T1C, study_id, "preprocessed T1c")
    label = load_nifti(label_path, study_id, "previous label")
    values = np.asarray(label.dataobj)
    if np.any(values < 0) or np.any(values != np.round(values)):
        raise StudyError(study_id, "previous label has non-integer or negative values", label_path)
    warped = ants.apply_transforms(
        fixed=nifti_to_ants(grid),
        moving=nifti_to_ants(label),
        transformlist=[str(reg_dir / AFFINE), str(reg_dir / INVERSE_WARP)],
        whichtoinvert=[True, False],
        interpolator="genericLabel",
    )
    out = np.rint(warped.numpy()).astype(np.uint8)
    save_nifti(out_path, out, grid.affine, dtype=np.uint8)
    counts = np.bincount(out.ravel())
    return {str(v): int(c) for v, c in enumerate(counts) if c and v}


def warp_previous_image(
    image_path: str | Path, reg_dir: str | Path, followup_dir: str | Path
) -> np.ndarray:
    """The previous study's preprocessed image on the follow-up's preprocessed grid (linear),
    with the same transforms as ``propagate_label``: the review editor shows it beside the
    follow-up at the same crosshair."""
    reg_dir, followup_dir = Path(reg_dir), Path(followup_dir)
    study_id = followup_dir.name
    for name in OUTPUT_FILES:
        if not (reg_dir / name).exists():
            raise StudyError(study_id, f"registration output {name} is missing", reg_dir / name)
    grid = load_nifti(followup_dir / "t1c.nii.gz", study_id, "preprocessed T1c")
    image = load_nifti(image_path, study_id, "previous image")
    warped = ants.apply_transforms(
        fixed=nifti_to_ants(grid),
        moving=nifti_to_ants(image),
        transformlist=[str(reg_dir / "affine.mat"), str(reg_dir / "inverse_warp.nii.gz")],
        whichtoinvert=[True, False],
        interpolator="linear",
    )
    return warped.numpy().astype(np.float32)


def lesion_id_warp(
    prep_root: str | Path, reg_root: str | Path, affines: dict[str, np.ndarray], scratch: Path
):
    """A ``metsflow.evaluation.longitudinal.Warp``: a previous time point's lesion-id map warped into the
    follow-up's preprocessed grid with ``propagate_label`` (genericLabel keeps the ids), through
    files in ``scratch``; ``affines``: study id -> affine of its preprocessed grid."""
    prep_root, reg_root = Path(prep_root), Path(reg_root)

    def warp(ids: np.ndarray, previous, current) -> np.ndarray:
        moving = scratch / f"{previous.study_id}_lesion_ids.nii.gz"
        warped = scratch / f"{current.study_id}_warped_ids.nii.gz"
        save_nifti(moving, ids, affines[previous.study_id], dtype=np.uint8)
        propagate_label(moving, reg_root / current.study_id, prep_root / current.study_id, warped)
        return np.asarray(nib.load(str(warped)).dataobj)

    return warp
