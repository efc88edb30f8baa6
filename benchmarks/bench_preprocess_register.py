"""Benchmark: per-study preprocessing at 1 mm, longitudinal registration, resampling vs nnU-Net.

Prints tables (figures as ratios against a baseline measured in the same run; the machine is
shared, so absolute seconds are only indicative; ``cpu_s`` is the process CPU time, which a
loaded machine inflates much less than wall time: divide by ``--threads`` for the wall time
on idle cores):

1. Preprocessing seconds per study at 1 mm (per step, from geometry.json) and the brain mask
   against the phantom's ground truth (Dice, volume ratio) on phantoms WITH skull and scalp.
2. Registration seconds per follow-up/previous pair and propagated-label Dice for the default
   schedule and for full-resolution SyN-CC (``REFERENCE``), both against the label propagated
   through the phantom's *true* correspondence (``metsflow.cohort.phantom.map_to_previous``); also
   no registration (scanner space) as the floor. ``--quick`` skips the full-resolution run.
3. The resampling step (native T1c -> 1 mm target, cubic B-spline) against nnU-Net v2's own
   ``resample_data_or_seg_to_shape`` on the same image, when a Python with nnunetv2 is given
   (``--nnunet-python``; install it in a separate venv so the project's stays untouched).

Usage (from the repository root, PYTHONPATH pointing at it):
    python benchmarks/bench_preprocess_register.py --workdir /tmp/bench3 --threads 2 \
        [--quick] [--nnunet-python /tmp/nnunet-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from metsflow.cohort import phantom
from metsflow.cohort.sheet import read_sheet
from metsflow.core.io import read_json
from metsflow.core.runtime import set_threads
from metsflow.imaging import brainmask, preprocess, register
from metsflow.imaging.grid import to_native

# Full-resolution SyN-CC: the reference study's metric (CC radius 4) with a last level at the
# 1 mm grid itself; same affine stage as the default.
REFERENCE = {
    "cc_radius": 4,
    "levels_mm": (8.0, 4.0, 2.0, 1.0),
    "reg_iterations": (40, 20, 10, 5),
    "smoothing_mm": (3.0, 2.0, 1.0, 0.0),
}

NNUNET_SCRIPT = """
import sys, time, numpy as np
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
data = np.load(sys.argv[1])[None].astype(np.float32)
spacing, new_spacing = eval(sys.argv[3]), eval(sys.argv[4])
shape = tuple(int(s) for s in sys.argv[5].split(","))
start = time.perf_counter()
out = resample_data_or_seg_to_shape(data, shape, spacing, new_spacing, is_seg=False, order=3,
                                    order_z=0, force_separate_z=None)
seconds = time.perf_counter() - start
np.save(sys.argv[2], np.asarray(out[0], dtype=np.float32))
print(seconds)
"""


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 1.0


def make_cohort(root: Path) -> Path:
    if not (root / "phantom.json").exists():
        phantom.make_demo_cohort(
            root, n_patients=1, n_timepoints=2, labelled_patients=1, skull=True, seed=3
        )
    return root


def preprocess_all(cohort: Path, out: Path, threads: int) -> list[dict]:
    rows = []
    for study in read_sheet(cohort / "studies.tsv").studies:
        start, cpu = time.perf_counter(), time.process_time()
        geometry = preprocess.preprocess_study(
            study, out / study.study_id, {"spacing": [1.0, 1.0, 1.0]}, threads=threads
        )
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        mask = np.asarray(nib.load(str(out / study.study_id / "brain_mask.nii.gz")).dataobj)
        native = np.asarray(to_native(mask, out / study.study_id).dataobj) > 0
        truth_path = (
            cohort / study.patient_id / study.study_id / f"{study.study_id}_brainmask.nii.gz"
        )
        truth = np.asarray(nib.load(str(truth_path)).dataobj) > 0
        rows.append(
            {
                "study": study.study_id,
                "total_s": seconds,
                "cpu_s": cpu,
                **{f"{k}_s": v for k, v in geometry["seconds"].items()},
                "mask_dice": dice(native, truth),
                "mask_volume_ratio": native.sum() / truth.sum(),
            }
        )
    return rows


def _grid_points(img: nib.Nifti1Image) -> np.ndarray:
    index = np.indices(img.shape[:3]).reshape(3, -1).T.astype(float)
    return index @ img.affine[:3, :3].T + img.affine[:3, 3]


def true_propagation(manifest: Path, fu_id: str, fu_dir: Path, prev_dir: Path, name: str):
    """``name`` (label or brain_mask) of the previous study carried to the follow-up grid
    through the phantom's exact correspondence (nearest neighbour)."""
    grid = nib.load(str(fu_dir / "t1c.nii.gz"))
    previous = nib.load(str(prev_dir / f"{name}.nii.gz"))
    points = phantom.map_to_previous(manifest, fu_id, _grid_points(grid))
    index = (points - previous.affine[:3, 3]) @ np.linalg.inv(previous.affine[:3, :3]).T
    values = ndimage.map_coordinates(
        np.asarray(previous.dataobj), index.T, order=0, mode="constant", cval=0
    )
    return values.reshape(grid.shape)


def _unregistered(fu_dir: Path, prev_dir: Path, name: str) -> np.ndarray:
    import ants

    grid = brainmask.nifti_to_ants(nib.load(str(fu_dir / "t1c.nii.gz")))
    moving = brainmask.nifti_to_ants(nib.load(str(prev_dir / f"{name}.nii.gz")))
    return ants.resample_image_to_target(moving, grid, interp_type="genericLabel").numpy()


def register_pair(cohort: Path, prep: Path, out: Path, threads: int, quick: bool) -> list[dict]:
    manifest = read_json(cohort / "phantom.json")
    studies = manifest["patients"][0]["studies"]
    prev_id, fu_id = studies[0]["study_id"], studies[1]["study_id"]
    fu_dir, prev_dir = prep / fu_id, prep / prev_id
    truth = {
        n: true_propagation(manifest, fu_id, fu_dir, prev_dir, n) for n in ("label", "brain_mask")
    }
    rows = [
        {
            "schedule": "none (scanner space)",
            "seconds": 0.0,
            "lesion_dice": dice(_unregistered(fu_dir, prev_dir, "label") > 0.5, truth["label"] > 0),
            "mask_dice": dice(
                _unregistered(fu_dir, prev_dir, "brain_mask") > 0.5, truth["brain_mask"] > 0
            ),
        }
    ]
    schedules = {"default": {}} if quick else {"default": {}, "full-res SyN-CC r4": REFERENCE}
    for name, params in schedules.items():
        reg_dir = out / name.split()[0]
        cpu = time.process_time()  # ANTs runs in-process: all its threads are counted
        qc = register.register_followup(fu_dir, prev_dir, reg_dir, params, threads=threads)
        cpu = time.process_time() - cpu
        register.propagate_label(
            prev_dir / "label.nii.gz", reg_dir, fu_dir, reg_dir / "prior.nii.gz"
        )
        register.propagate_label(
            prev_dir / "brain_mask.nii.gz", reg_dir, fu_dir, reg_dir / "prior_mask.nii.gz"
        )
        prior = np.asarray(nib.load(str(reg_dir / "prior.nii.gz")).dataobj)
        prior_mask = np.asarray(nib.load(str(reg_dir / "prior_mask.nii.gz")).dataobj)
        rows.append(
            {
                "schedule": name,
                "seconds": qc["seconds"]["registration"],
                "cpu_s": cpu,
                "lesion_dice": dice(prior > 0, truth["label"] > 0),
                "mask_dice": dice(prior_mask > 0, truth["brain_mask"] > 0),
                "ncc_after": qc["ncc_after"],
                "flag": qc["flag"],
                "shrink": "x".join(map(str, qc["schedule"]["syn"]["shrink_factors"])),
            }
        )
        print(f"[{name}] {rows[-1]}", flush=True)  # partial result before the slow run ends
    return rows


def compare_resampling(cohort: Path, threads: int, nnunet_python: str | None) -> dict:
    """Our resampling step (ANTs cubic B-spline onto the target grid) vs nnU-Net v2's."""
    import ants

    study = read_sheet(cohort / "studies.tsv").studies[0]
    ras = nib.as_closest_canonical(nib.load(str(study.t1c)))
    spacing = np.asarray(ras.header.get_zooms()[:3], dtype=float)
    affine, shape = preprocess.target_grid(ras.affine, ras.shape, [1.0, 1.0, 1.0])
    moving = brainmask.nifti_to_ants(ras)
    target = brainmask.nifti_to_ants(nib.Nifti1Image(np.zeros(shape, np.float32), affine))
    start = time.perf_counter()
    ours = ants.resample_image_to_target(moving, target, interp_type="bSpline").numpy()
    result = {"ours_s": time.perf_counter() - start, "shape": shape, "native_spacing": spacing}
    if not nnunet_python:
        return result
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
        np.save(src, np.asarray(ras.dataobj, dtype=np.float32))
        proc = subprocess.run(
            [
                nnunet_python, "-c", NNUNET_SCRIPT, str(src), str(dst),
                repr(tuple(spacing.tolist())), "(1.0, 1.0, 1.0)", ",".join(map(str, shape)),
            ],
            capture_output=True, text=True, env={"OMP_NUM_THREADS": str(threads)},
        )  # fmt: skip
        if proc.returncode != 0:
            result["nnunet_error"] = proc.stderr.strip().splitlines()[-1:]
            return result
        theirs = np.load(dst)
    scale = float(np.percentile(np.asarray(ras.dataobj), 99.5))
    head = ours > 0.05 * scale
    result.update(
        nnunet_s=float(proc.stdout.strip().splitlines()[-1]),
        max_abs_diff=float(np.abs(ours - theirs).max()) / scale,
        mean_abs_diff_head=float(np.abs(ours - theirs)[head].mean()) / scale,
    )
    return result


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(fmt(r.get(c, "")) for c in columns) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip full-resolution SyN-CC (~441 s)")
    ap.add_argument("--nnunet-python", default=None, help="python of a venv with nnunetv2")
    ap.add_argument("--skip", nargs="*", default=[], choices=["preprocess", "resample"])
    args = ap.parse_args()
    set_threads(args.threads)
    cohort = make_cohort(args.workdir / "cohort")
    prep = args.workdir / "prep"

    if "preprocess" not in args.skip or not (prep / "P001_T1" / "geometry.json").exists():
        rows = preprocess_all(cohort, prep, args.threads)
        columns = ["study", "total_s", "cpu_s", "load_s", "coregister_s", "resample_s", "brain_mask_s",
                   "normalise_s", "write_s", "mask_dice", "mask_volume_ratio"]  # fmt: skip
        print("\n## Preprocessing per study at 1 mm (phantom with skull, 4 sequences)\n")
        print(_table(rows, columns), flush=True)

    if "resample" not in args.skip:
        r = compare_resampling(cohort, args.threads, args.nnunet_python)
        print(f"\n## Resampling T1c {r['native_spacing']} mm -> 1 mm, shape {r['shape']}\n")
        print(f"metsflow (ANTs cubic B-spline): {r['ours_s']:.2f} s")
        if "nnunet_s" in r:
            print(
                f"nnU-Net v2 resample_data_or_seg_to_shape (order 3): {r['nnunet_s']:.2f} s; "
                f"time ratio nnU-Net/metsflow {r['nnunet_s'] / r['ours_s']:.2f}; "
                f"max |diff| {r['max_abs_diff']:.4f}, mean |diff| in head "
                f"{r['mean_abs_diff_head']:.4f} (fraction of the 99.5th percentile intensity)"
            )
        else:
            print(f"nnU-Net v2 not compared: {r.get('nnunet_error', 'no --nnunet-python given')}")
        sys.stdout.flush()

    rows = register_pair(cohort, prep, args.workdir / "registered", args.threads, args.quick)
    print("\n## Registration P001_T1 -> P001_T0 at 1 mm, Dice vs true-correspondence propagation\n")
    print(
        _table(
            rows,
            [
                "schedule",
                "shrink",
                "seconds",
                "cpu_s",
                "lesion_dice",
                "mask_dice",
                "ncc_after",
                "flag",
            ],
        )
    )
    by_name = {r["schedule"]: r for r in rows}
    if "full-res SyN-CC r4" in by_name:
        d, f = by_name["default"], by_name["full-res SyN-CC r4"]
        print(
            f"\ndefault vs full-res: time ratio {d['seconds'] / f['seconds']:.3f}, "
            f"lesion Dice difference {d['lesion_dice'] - f['lesion_dice']:+.4f}, "
            f"mask Dice difference {d['mask_dice'] - f['mask_dice']:+.4f}"
        )
    print(json.dumps({"threads": args.threads, "quick": args.quick}))


if __name__ == "__main__":
    main()
