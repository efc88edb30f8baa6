"""Inference benchmark: metsflow's shard inference against a naive MONAI sliding window.

Section ``levers`` (default): the same studies, the same checkpoint, in one run, on one device:

- naive:     a competent hand-written MONAI loop: the model loaded once, per study the four
             channels and the brain mask read with nibabel, ``sliding_window_inference`` (same
             roi/overlap/sw_batch, Gaussian blending) under ``torch.no_grad``, softmax, argmax,
             zero outside the brain, prediction and foreground probability written.
- metsflow:  ``metsflow.models.infer.predict_items`` (the code ``infer_shard`` runs), first with every
             lever off, then adding one equal-output lever at a time (``metsflow.models.infer.LEVERS``):
             each lever's share is the seconds its row saved over the previous row (medians);
             a last row has them all but compile (what a small CPU shard runs).
             Reduced precision is measured on top and reported with its Dice, since equal
             output (voxel Dice >= 0.999 per study and label against naive) decides whether a
             lever may be on by default.
Each path runs in a process of its own, as a job would (process-wide state such as the
``heap_reuse`` lever's malloc settings stays with its path), with its own copy of the model and
its own empty inductor cache, loaded before timing and warmed up on one study (a compiling
path's warm-up is its cold compile, printed and amortized over the config shard sizes); the
paths are interleaved per repeat, order reversed every other repeat, and the median of the
repeats is reported with the spread and each repeat's figures, next to the load average.

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

from metsflow.core.io import save_nifti
from metsflow.core.runtime import select_device, set_threads
from metsflow.models.networks import (
    build_network,
    checkpoint_meta,
    load_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
CHANNELS = ["t1c", "t1", "t2", "flair"]
OFF = {
    "amp": False,
    "channels_last": False,
    "skip_outside_brain": False,
    "prefetch": False,
    "inference_mode": False,
    "compile": False,
    "fast_norm": False,
    "heap_reuse": False,
}
# Cumulative rows of the levers section: one equal-output lever more per row (fast_norm acts on
# channels-last inputs only, so it comes after channels_last).
EQUAL_OUTPUT_LEVERS = (
    "inference_mode",
    "skip_outside_brain",
    "prefetch",
    "compile",
    "channels_last",
    "fast_norm",
    "heap_reuse",
)
PRECISION_ROWS = (("+ bf16/fp16 autocast", {"amp": True}),)


def load_config(name: str) -> dict:
    """config/config.yaml, overlaid with config/cohort.yaml for ``cohort``."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    if name == "cohort":
        for key, value in yaml.safe_load((REPO / "config/cohort.yaml").read_text()).items():
            config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


def brain_mask(spacing: float, margin_mm: float) -> np.ndarray:
    """MNI152 brain mask at ``spacing`` mm, cropped like metsflow.imaging.preprocess does."""
    from nilearn.datasets import load_mni152_brain_mask
    from scipy import ndimage

    from metsflow.imaging.grid import crop_box

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
    """``predict_items`` over ``items``; ``checkpoints``: paths or ``(networks, meta)``."""
    from metsflow.models.infer import predict_items

    start = time.perf_counter()
    rows = predict_items(checkpoints, items, out, params, device=device)
    seconds = time.perf_counter() - start
    assert len(rows) == len(items)
    return seconds


def run_naive(loaded, items, out: Path, params: dict, device) -> float:
    """The hand-written MONAI loop: model loaded once (``loaded``), per study nibabel read,
    ``sliding_window_inference`` (same roi/overlap/Gaussian mode/sw_batch) under no_grad,
    softmax, argmax, zero outside the brain, prediction (uint8) and foreground probability
    (float32) written as NIfTI."""
    import nibabel as nib
    from monai.inferers import sliding_window_inference

    network, meta = loaded
    start = time.perf_counter()
    for item in items:
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
    (multiclass: class index = internal label, ``metsflow.models.networks.decode_classes``)."""
    import nibabel as nib

    worst = 1.0
    for item in items:
        ours = np.asarray(nib.load(out / item["study_id"] / "pred.nii.gz").dataobj)
        naive = np.asarray(nib.load(reference / item["study_id"] / "pred.nii.gz").dataobj)
        for label in (set(np.unique(ours)) | set(np.unique(naive))) - {0}:
            a, b = ours == label, naive == label
            worst = min(worst, 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    return worst


def window_counts(shape, brain: np.ndarray, roi, overlap: float) -> tuple[int, int]:
    """(windows MONAI's sliding window cuts from ``shape``, those without a brain voxel)."""
    from monai.data.utils import dense_patch_slices, get_valid_patch_size
    from monai.inferers.utils import _get_scan_interval

    roi = get_valid_patch_size(shape, roi)
    slices = dense_patch_slices(shape, roi, _get_scan_interval(shape, roi, 3, (overlap,) * 3))
    return len(slices), sum(not brain[s].any() for s in slices)


def levers_rows() -> list[tuple[str, dict | None]]:
    """(title, levers) rows: naive, all off, then one equal-output lever more per row, then
    reduced precision on top (reported with its Dice, not a default on CPU)."""
    rows: list[tuple[str, dict | None]] = [("naive MONAI loop (model loaded once)", None)]
    levers = dict(OFF)
    rows.append(("metsflow predict_items, levers off", dict(levers)))
    for lever in EQUAL_OUTPUT_LEVERS:
        levers[lever] = True
        rows.append((f"+ {lever}", dict(levers)))
    for title, extra in PRECISION_ROWS:
        rows.append((f"{title} (on top)", {**levers, **extra}))
    # What "auto" runs on a CPU shard below COMPILE_MIN_STUDIES (the demo's 12): eager.
    rows.append(("equal-output levers, compile off (eager)", {**levers, "compile": False}))
    return rows


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
    windows, outside = window_counts(brain.shape, brain, patch, params["overlap"])
    print(
        f"inference, {len(items)} studies of {brain.shape} voxels ({spacing:g} mm, cropped to the "
        f"brain + margin as metsflow.imaging.preprocess does, brain {brain.mean():.0%}, {windows} windows "
        f"of which {outside} hold no brain voxel), {args.config} model (filters "
        f"{config['model']['filters']}, patch {patch}, overlap {params['overlap']}, sw_batch "
        f"{params['sw_batch_size']}), device {device_name(device)}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print(
        "  naive = a competent hand-written MONAI loop: model loaded once, per study nibabel read "
        "of the 4 channels + brain mask,\n  sliding_window_inference (same roi/overlap/gaussian/"
        "sw_batch) under no_grad, softmax, argmax, zero outside the brain, pred (uint8) and\n"
        "  fg_prob (float32) written as .nii.gz. metsflow rows: predict_items (the code "
        "infer_shard runs; also scores uncertainty),\n  each path with its own copy of the model "
        "loaded once before timing. Paths interleaved per repeat (order reversed every other\n"
        "  repeat); median of the repeats, spread = (max - min) / median. Each path runs in a "
        "process of its own (as a job\n  would): CPU s = that process, peak MiB = its peak "
        "resident memory."
    )
    rows = levers_rows()
    # One process per path, as each would be a job of its own: process-wide state (the
    # heap_reuse lever's malloc settings, inductor's kernels, the allocator's free lists) stays
    # with its path; idle workers wait on their pipe.
    # Each with an inductor cache of its own: every compiling row's warm-up is a cold compile.
    workers = [
        PathWorker(title, levers, checkpoint, params, device, args.threads, tmp / f"inductor{i}")
        for i, (title, levers) in enumerate(rows)
    ]
    # Warm-up: one study per path, untimed; a compiling path's first call builds its kernels
    # from an empty inductor cache (cold, as on a fresh node): that is the compile cost.
    compile_cost = {}
    for (title, levers), worker in zip(rows, workers, strict=True):
        seconds, _, _ = worker.run(items[:1], tmp / "warm")
        if levers and levers.get("compile"):
            compile_cost[title] = seconds
    wall = {title: [] for title, _ in rows}
    cpu = {title: [] for title, _ in rows}
    peak = {}
    loads = []
    for repeat in range(args.repeats):
        loads.append(os.getloadavg()[0])
        order = list(enumerate(zip(rows, workers, strict=True)))
        for index, ((title, _), worker) in order if repeat % 2 == 0 else order[::-1]:
            taken, cpu_taken, peak[title] = worker.run(items, tmp / f"c{index}")
            wall[title].append(taken)
            cpu[title].append(cpu_taken)
    for worker in workers:
        worker.close()
    loads.append(os.getloadavg()[0])
    n = len(items)
    naive = rows[0][0]
    med_wall = {t: float(np.median(v)) for t, v in wall.items()}
    med_cpu = {t: float(np.median(v)) for t, v in cpu.items()}
    print(
        f"  {args.repeats} repeats; load average (1 min) at each repeat's start and at the end: "
        + ", ".join(f"{x:.1f}" for x in loads)
    )
    print(
        f"  {'path':<40} {'wall s':>7} {'spread':>7} {'s/study':>8} {'vs naive':>9} {'CPU s':>7} "
        f"{'spread':>7} {'vs naive':>9} {'min Dice':>9} {'peak MiB':>9}"
    )
    for index, (title, _) in enumerate(rows):
        dice = min_dice(tmp / f"c{index}", tmp / "c0", items)
        spread_wall = (max(wall[title]) - min(wall[title])) / med_wall[title]
        spread_cpu = (max(cpu[title]) - min(cpu[title])) / med_cpu[title]
        print(
            f"  {title:<40} {med_wall[title]:7.1f} {spread_wall:7.0%} {med_wall[title] / n:8.2f} "
            f"{med_wall[naive] / med_wall[title]:8.2f}x {med_cpu[title]:7.1f} {spread_cpu:7.0%} "
            f"{med_cpu[naive] / med_cpu[title]:8.2f}x {dice:9.4f} {peak[title]:9.0f}"
        )
    print("  per repeat, wall s (CPU s) by path:")
    for title, _ in rows:
        print(
            f"    {title:<40} "
            + "  ".join(
                f"{w:6.1f} ({c:5.1f})" for w, c in zip(wall[title], cpu[title], strict=True)
            )
        )
    equal = rows[1 : 2 + len(EQUAL_OUTPUT_LEVERS)]
    last = equal[-1][0]
    print(
        f"  equal-output levers together: {med_wall[naive] / med_wall[last]:.2f}x naive wall, "
        f"{med_cpu[naive] / med_cpu[last]:.2f}x CPU (cold compile excluded). Each step's saving "
        "(median minus median), as a share of naive's:"
    )
    previous = naive
    for title, _ in equal:
        saved_wall, saved_cpu = (
            med_wall[previous] - med_wall[title],
            med_cpu[previous] - med_cpu[title],
        )
        print(
            f"    {title:<40} wall {saved_wall:+7.1f} s {saved_wall / med_wall[naive]:+6.1%}   "
            f"CPU {saved_cpu:+7.1f} s {saved_cpu / med_cpu[naive]:+6.1%}"
        )
        previous = title
    naive_study = med_wall[naive] / n
    for title, seconds in compile_cost.items():
        ours_study = med_wall[title] / n
        cost = seconds - ours_study  # the warm-up study's own compute is not compile time
        shards = {"demo": 12, "cohort": 64}
        amortized = ", ".join(
            f"{naive_study * k / (cost + ours_study * k):.2f}x over a {name} shard of {k}"
            for name, k in shards.items()
        )
        print(
            f"  {title.strip('+ ')}: cold compile {cost:.0f} s wall (empty inductor cache); "
            f"counted in: {amortized} (sharding.gpu_shard_size)"
        )


class PathWorker:
    """One levers-section path in a process of its own (spawned): loads the checkpoint once,
    then segments the studies it is sent (``run``) and answers with its wall s, CPU s and peak
    resident MiB."""

    def __init__(self, title, levers, checkpoint, params, device, threads, inductor_cache):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_path_worker,
            args=(child, levers, str(checkpoint), params, str(device), threads, inductor_cache),
            name=f"bench {title}",
        )
        self.process.start()

    def run(self, items, out: Path) -> tuple[float, float, float]:
        self.conn.send((items, out))
        answer = self.conn.recv()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def _path_worker(conn, levers, checkpoint, params, device, threads, inductor_cache) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)  # read at each compile
    set_threads(threads)
    device = select_device(device)
    network, meta = load_checkpoint(checkpoint, map_location="cpu")
    network = network.to(device).eval()
    loaded = (network, meta) if levers is None else ([network], meta)
    while (task := conn.recv()) is not None:
        items, out = task
        before = cpu_seconds()
        try:
            if levers is None:
                taken = run_naive(loaded, items, out, params, device)
            else:
                taken = run_metsflow(loaded, items, out, {**params, **levers}, device)
        except Exception as exc:  # the parent raises it
            conn.send(exc)
            continue
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send((taken, cpu_seconds() - before, peak_mib))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


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
        # An empty inductor cache: the compile cost printed is a fresh node's (cold), not this
        # machine's earlier runs'.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        if "levers" in sections:
            levers_section(args, config, Path(tmp), device)
        if "throughput" in sections:
            throughput_section(args, config, Path(tmp), device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
