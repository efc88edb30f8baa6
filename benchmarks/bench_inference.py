"""Inference benchmark: metsflow's shard inference against a naive MONAI sliding window.

Section ``levers`` (default): the same studies, the same checkpoint, in one run, on one device:

- naive:     per study, the model loaded from the checkpoint, the four channels read,
             ``monai.inferers.sliding_window_inference`` (same roi/overlap/sw_batch, Gaussian
             blending) under ``torch.no_grad``, softmax, argmax, prediction and foreground
             probability written: the hand-rolled one-study-at-a-time loop.
- metsflow:  ``metsflow.infer.predict_items`` (the code ``infer_shard`` runs), first with every
             lever off, then adding one lever at a time (``metsflow.infer.LEVERS``): each lever's
             share is the seconds it saved over the previous row. Reduced precision and
             channels-last are measured on top and reported with their Dice, since equal output
             (voxel Dice >= 0.999 per study and label against naive) decides whether they may be
             on by default.

Section ``throughput`` (``--device cuda`` runs it by default): studies per device-hour of
``predict_items`` for one model and the 5-fold ensemble, with and without TTA and AMP, at a
config's patch size and spacing (``--config cohort``: config/cohort.yaml). On a CPU the same
code runs (give it ``--config demo --studies 1`` to be quick).

Studies are synthetic but shaped like metsflow's preprocessing output: the MNI152 brain mask at
the config's spacing, cropped to its bounding box + ``crop_margin_mm``, noise channels inside it.
The networks are untrained (seeded): their argmax is close to ties everywhere, the worst case for
reduced precision.

    python benchmarks/bench_inference.py                                   # levers, CPU, demo
    python benchmarks/bench_inference.py --device cuda                     # GPU: levers + throughput
    python benchmarks/bench_inference.py --sections throughput --config demo --studies 1 \
        --folds 2 --spacing 4                                              # CPU smoke test
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from metsflow.io import save_nifti
from metsflow.models import build_network, checkpoint_meta, load_checkpoint, save_checkpoint
from metsflow.runtime import select_device, set_threads

REPO = Path(__file__).resolve().parents[1]
CHANNELS = ["t1c", "t1", "t2", "flair"]
OFF = {"amp": False, "channels_last": False, "skip_outside_brain": False, "prefetch": False}
OFF["inference_mode"] = False
# Cumulative rows of the levers section: (title, levers switched on).
EQUAL_OUTPUT_LEVERS = ("inference_mode", "skip_outside_brain", "prefetch")
PRECISION_ROWS = (
    ("+ bf16/fp16 autocast", {"amp": True}),
    ("+ channels-last 3D", {"channels_last": True}),
    ("+ autocast + channels-last", {"amp": True, "channels_last": True}),
)


def load_config(name: str) -> dict:
    """config/config.yaml, overlaid with config/cohort.yaml for ``cohort``."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    if name == "cohort":
        for key, value in yaml.safe_load((REPO / "config/cohort.yaml").read_text()).items():
            config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


def brain_mask(spacing: float, margin_mm: float) -> np.ndarray:
    """MNI152 brain mask at ``spacing`` mm, cropped like metsflow.preprocess does."""
    from nilearn.datasets import load_mni152_brain_mask
    from scipy import ndimage

    from metsflow.preprocess import crop_box

    mask = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0
    mask = ndimage.zoom(mask.astype(np.uint8), 1.0 / spacing, order=0) > 0
    start, stop = crop_box(mask, np.full(3, spacing), margin_mm)
    return mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]


def make_studies(root: Path, n: int, brain: np.ndarray, spacing: float) -> list[dict]:
    rng = np.random.default_rng(0)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    items = []
    for index in range(n):
        study_id = f"B{index:03d}"
        prep = root / study_id
        for channel in CHANNELS:
            image = rng.standard_normal(brain.shape).astype(np.float32) * brain
            save_nifti(prep / f"{channel}.nii.gz", image, affine, dtype=np.float32)
        save_nifti(prep / "brain_mask.nii.gz", brain.astype(np.uint8), affine, dtype=np.uint8)
        items.append({"study_id": study_id, "prep_dir": str(prep), "prior": None})
    return items


def make_checkpoints(root: Path, config: dict, n: int) -> list[Path]:
    params = {
        **config["model"],
        "channels": CHANNELS,
        "spacing": config["preprocess"]["spacing"],
    }
    paths = []
    for fold in range(n):
        torch.manual_seed(fold)
        path = root / f"fold_{fold}.pt"
        save_checkpoint(path, build_network(params), checkpoint_meta(params))
        paths.append(path)
    return paths


def run_metsflow(checkpoints, items, out: Path, params: dict, device) -> float:
    from metsflow.infer import predict_items

    start = time.perf_counter()
    rows = predict_items(checkpoints, items, out, params, device=device)
    seconds = time.perf_counter() - start
    assert len(rows) == len(items)
    return seconds


def run_naive(checkpoint: Path, items, out: Path, params: dict, device) -> float:
    import nibabel as nib
    from monai.inferers import sliding_window_inference

    start = time.perf_counter()
    for item in items:
        network, meta = load_checkpoint(checkpoint, map_location="cpu")
        network = network.to(device).eval()
        prep = Path(item["prep_dir"])
        ref = nib.load(prep / "t1c.nii.gz")
        image = np.stack(
            [
                np.asarray(nib.load(prep / f"{c}.nii.gz").dataobj, dtype=np.float32)
                for c in meta["channels"]
            ]
        )
        brain = np.asarray(nib.load(prep / "brain_mask.nii.gz").dataobj) > 0
        with torch.no_grad():
            logits = sliding_window_inference(
                torch.from_numpy(image)[None].to(device),
                roi_size=meta["patch_size"],
                sw_batch_size=params["sw_batch_size"],
                predictor=network,
                overlap=params["overlap"],
                mode="gaussian",
            )
            probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
        pred = probs.argmax(0)
        pred[~brain] = 0
        fg_prob = (1.0 - probs[0]) * brain
        study_out = out / item["study_id"]
        save_nifti(study_out / "pred.nii.gz", pred, ref.affine, dtype=np.uint8)
        save_nifti(study_out / "fg_prob.nii.gz", fg_prob, ref.affine, dtype=np.float32)
    return time.perf_counter() - start


def min_dice(out: Path, reference: Path, items) -> float:
    """Lowest voxel Dice over studies and labels (present in either) against ``reference``
    (multiclass: class index = internal label, ``metsflow.models.decode_classes``)."""
    import nibabel as nib

    worst = 1.0
    for item in items:
        ours = np.asarray(nib.load(out / item["study_id"] / "pred.nii.gz").dataobj)
        naive = np.asarray(nib.load(reference / item["study_id"] / "pred.nii.gz").dataobj)
        for label in (set(np.unique(ours)) | set(np.unique(naive))) - {0}:
            a, b = ours == label, naive == label
            worst = min(worst, 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    return worst


def levers_section(args, config, tmp: Path, device) -> None:
    infer = config["infer"]
    params = {"overlap": infer["overlap"], "sw_batch_size": infer.get("sw_batch_size", 4)}
    spacing = float(config["preprocess"]["spacing"][0])
    brain = brain_mask(spacing, float(config["preprocess"].get("crop_margin_mm", 10)))
    items = make_studies(tmp / "prep", args.studies, brain, spacing)
    (checkpoint,) = make_checkpoints(tmp / "models", config, 1)
    if args.checkpoint:  # a trained model and real preprocessed studies instead
        checkpoint = Path(args.checkpoint)
        meta = load_checkpoint(checkpoint, map_location="cpu")[1]
        config["model"] = {**config["model"], **meta, "filters": "trained"}
        dirs = sorted(p.parent for p in Path(args.studies_dir).glob("*/t1c.nii.gz"))
        items = [{"study_id": d.name, "prep_dir": str(d), "prior": None} for d in dirs]
        items = items[: args.studies]
        args.config = f"{checkpoint} on {len(items)} studies of {args.studies_dir}"
        brain = np.asarray(nib_load(Path(items[0]["prep_dir"]) / "brain_mask.nii.gz")) > 0
        spacing = float(meta["spacing"][0])
    patch = config["model"]["patch_size"]
    print(
        f"inference, {len(items)} studies of {brain.shape} voxels ({spacing:g} mm, brain "
        f"{brain.mean():.0%}), {args.config} model (filters {config['model']['filters']}, patch "
        f"{patch}, overlap {params['overlap']}, sw_batch {params['sw_batch_size']}), device "
        f"{device_name(device)}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}"
    )
    run_metsflow([checkpoint], items[:1], tmp / "warm", {**params, **OFF}, device)  # warm-up
    # (title, levers) rows: naive, all off, then one equal-output lever more per row, then the
    # precision levers on top of those.
    configs: list[tuple[str, dict | None]] = [("naive MONAI sliding window", None)]
    levers = dict(OFF)
    configs.append(("metsflow, levers off (model loaded once)", dict(levers)))
    for lever in EQUAL_OUTPUT_LEVERS:
        levers[lever] = True
        configs.append((f"+ {lever}", dict(levers)))
    for title, extra in PRECISION_ROWS:
        configs.append((f"{title} (on top)", {**levers, **extra}))
    # Interleaved repeats, fastest kept: on a shared machine the neighbours' load moves every
    # wall figure; the minimum is the closest to the code's own cost. CPU seconds (all threads of
    # this process) are the neighbour-proof measure of the compute levers; prefetch only
    # overlaps work, so it shows in wall seconds alone.
    wall = {title: float("inf") for title, _ in configs}
    cpu = dict(wall)
    for _ in range(args.repeats):
        for index, (title, config) in enumerate(configs):
            out = tmp / f"c{index}"
            before = cpu_seconds()
            if config is None:
                taken = run_naive(checkpoint, items, out, params, device)
            else:
                taken = run_metsflow([checkpoint], items, out, {**params, **config}, device)
            wall[title] = min(wall[title], taken)
            cpu[title] = min(cpu[title], cpu_seconds() - before)
    n = len(items)
    naive = configs[0][0]
    print(
        f"  {'path':<44} {'wall s':>7} {'studies/h':>10} {'vs naive':>9} {'CPU s':>7} "
        f"{'vs naive':>9} {'min Dice':>9}"
    )
    for index, (title, _) in enumerate(configs):
        dice = min_dice(tmp / f"c{index}", tmp / "c0", items)
        print(
            f"  {title:<44} {wall[title]:7.1f} {n / wall[title] * 3600:10.0f} "
            f"{wall[naive] / wall[title]:8.2f}x {cpu[title]:7.1f} {cpu[naive] / cpu[title]:8.2f}x "
            f"{dice:9.4f}"
        )
    equal = configs[1 : 2 + len(EQUAL_OUTPUT_LEVERS)]
    last = equal[-1][0]
    print(
        f"  equal-output levers together (the CPU default): {wall[naive] / wall[last]:.2f}x naive "
        f"wall, {cpu[naive] / cpu[last]:.2f}x CPU. Each step's saving, as a share of naive's:"
    )
    previous = naive
    for title, _ in equal:
        saved_wall, saved_cpu = wall[previous] - wall[title], cpu[previous] - cpu[title]
        print(
            f"    {title:<44} wall {saved_wall:+7.1f} s {saved_wall / wall[naive]:+6.1%}   "
            f"CPU {saved_cpu:+7.1f} s {saved_cpu / cpu[naive]:+6.1%}"
        )
        previous = title


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def throughput_section(args, config, tmp: Path, device) -> None:
    infer = config["infer"]
    spacing = float(config["preprocess"]["spacing"][0])
    brain = brain_mask(spacing, float(config["preprocess"].get("crop_margin_mm", 10)))
    items = make_studies(tmp / "tprep", args.studies, brain, spacing)
    folds = make_checkpoints(tmp / "tmodels", config, args.folds)
    base = {"overlap": infer["overlap"], "sw_batch_size": infer.get("sw_batch_size", 4)}
    print(
        f"throughput, {len(items)} studies of {brain.shape} voxels ({spacing:g} mm), "
        f"{args.config} config (filters {config['model']['filters']}, patch "
        f"{config['model']['patch_size']}, overlap {base['overlap']}), device "
        f"{device_name(device)}, {args.threads} threads"
    )
    run_metsflow(folds[:1], items[:1], tmp / "twarm", base, device)
    print(f"  {'models':<10} {'TTA':<5} {'AMP':<5} {'s/study':>9} {'studies/device-hour':>20}")
    for models in (folds[:1], folds):
        for tta in (False, True):
            for amp in (False, True):
                params = {**base, "tta": tta, "amp": amp}
                out = tmp / f"t{len(models)}{int(tta)}{int(amp)}"
                seconds = run_metsflow(models, items, out, params, device) / len(items)
                label = "1 model" if len(models) == 1 else f"{len(models)} folds"
                print(
                    f"  {label:<10} {str(tta):<5} {str(amp):<5} {seconds:9.1f} "
                    f"{3600 / seconds:20.0f}"
                )


def nib_load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--config", choices=["demo", "cohort"], help="default: demo on CPU")
    parser.add_argument(
        "--sections", nargs="+", choices=["levers", "throughput"], help="default: levers on CPU"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="levers: interleaved repeats")
    parser.add_argument("--folds", type=int, default=5, help="throughput: ensemble size")
    parser.add_argument("--spacing", type=float, help="override the config's spacing (mm)")
    parser.add_argument("--checkpoint", help="levers: a trained model.pt (instead of untrained)")
    parser.add_argument("--studies-dir", help="levers: preprocessed study folders for --checkpoint")
    args = parser.parse_args()

    set_threads(args.threads)
    device = select_device(args.device)
    cuda = device.type == "cuda"
    args.config = args.config or ("cohort" if cuda else "demo")
    sections = args.sections or (["levers", "throughput"] if cuda else ["levers"])
    config = load_config(args.config)
    if args.spacing:
        config["preprocess"]["spacing"] = [args.spacing] * 3
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        if "levers" in sections:
            levers_section(args, config, Path(tmp), device)
        if "throughput" in sections:
            throughput_section(args, config, Path(tmp), device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
