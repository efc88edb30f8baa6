"""Inference benchmark: studies per hour of the shard job vs naive per-study inference.

Both paths segment the same synthetic preprocessed studies with the same checkpoint, in the same
run, on the same device:

- shard:  ``metsflow.infer.predict_items`` (what ``infer_shard`` runs): the model is loaded once
          for the whole shard; per study: sliding window (Gaussian blending), uncertainty
          scores, prediction and foreground probability written.
- naive:  per study, the model is loaded from the checkpoint again, then MONAI
          ``sliding_window_inference`` with the same roi/overlap/sw_batch, argmax, and the
          prediction and probability written: one-job-per-study written in-process.

A per-study Snakemake/SLURM job also pays a fresh interpreter importing torch + MONAI; that
start-up is measured once here (a subprocess) and reported as a second, "per-study jobs" ratio.
SLURM queueing/polling (seconds per job wave) comes on top and is not included.

    python benchmarks/bench_inference.py                      # demo model, 6 studies, CPU
    python benchmarks/bench_inference.py --model cohort --shape 160 192 160 --studies 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metsflow.io import save_nifti
from metsflow.models import build_network, checkpoint_meta, load_checkpoint, save_checkpoint
from metsflow.runtime import select_device, set_threads

MODELS = {
    # config/config.yaml (demo) and config/cohort.yaml (production) networks
    "demo": {"filters": [16, 32, 64, 128], "patch_size": [48, 48, 48]},
    "cohort": {"filters": [32, 64, 128, 256, 320], "patch_size": [96, 96, 96]},
}
CHANNELS = ["t1c", "t1", "t2", "flair"]


def make_studies(root: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> list[dict]:
    """Preprocessed-study folders (z-scored channels, spherical brain mask) on a 1 mm grid."""
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid**2).sum(axis=0) < 0.8
    items = []
    for index in range(n):
        study_id = f"B{index:03d}"
        prep = root / study_id
        for channel in CHANNELS:
            image = rng.standard_normal(shape).astype(np.float32) * brain
            save_nifti(prep / f"{channel}.nii.gz", image, affine, dtype=np.float32)
        save_nifti(prep / "brain_mask.nii.gz", brain.astype(np.uint8), affine, dtype=np.uint8)
        items.append({"study_id": study_id, "prep_dir": str(prep), "prior": None})
    return items


def make_checkpoint(path: Path, model: str) -> Path:
    params = {
        "arch": "dynunet",
        "channels": CHANNELS,
        "label_mode": "multiclass",
        "spacing": [1.0, 1.0, 1.0],
        **MODELS[model],
    }
    torch.manual_seed(0)
    save_checkpoint(path, build_network(params), checkpoint_meta(params))
    return path


def run_shard(checkpoint: Path, items: list[dict], out: Path, params: dict, device) -> float:
    from metsflow.infer import predict_items

    start = time.perf_counter()
    rows = predict_items([checkpoint], items, out, params, device=device)
    seconds = time.perf_counter() - start
    assert len(rows) == len(items)
    return seconds


def run_naive(checkpoint: Path, items: list[dict], out: Path, params: dict, device) -> float:
    import nibabel as nib
    from monai.inferers import sliding_window_inference

    start = time.perf_counter()
    for item in items:
        network, meta = load_checkpoint(checkpoint, map_location="cpu")
        network = network.to(device).eval()
        prep = Path(item["prep_dir"])
        ref = nib.load(prep / "t1c.nii.gz")
        image = np.stack(
            [np.asarray(nib.load(prep / f"{c}.nii.gz").dataobj, dtype=np.float32) for c in CHANNELS]
        )
        with torch.inference_mode():
            logits = sliding_window_inference(
                torch.from_numpy(image)[None].to(device),
                roi_size=meta["patch_size"],
                sw_batch_size=params["sw_batch_size"],
                predictor=network,
                overlap=params["overlap"],
                mode="gaussian",
            )
            probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
        study_out = out / item["study_id"]
        save_nifti(study_out / "pred.nii.gz", probs.argmax(0), ref.affine, dtype=np.uint8)
        save_nifti(study_out / "fg_prob.nii.gz", 1.0 - probs[0], ref.affine, dtype=np.float32)
    return time.perf_counter() - start


def interpreter_startup_seconds() -> float:
    """A fresh Python importing what an inference job imports (paid once per job)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import torch, monai, nibabel, metsflow.infer"],
        check=True,
        env={**os.environ},
    )
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 112, 96], help="voxels")
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    set_threads(args.threads)
    device = select_device(args.device)
    params = {"overlap": args.overlap, "sw_batch_size": args.sw_batch_size, "tta": False}
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        tmp = Path(tmp)
        items = make_studies(tmp / "prep", args.studies, tuple(args.shape))
        checkpoint = make_checkpoint(tmp / "model.pt", args.model)
        # Warm-up (first-call allocations, kernel selection) so neither path pays it alone.
        run_shard(checkpoint, items[:1], tmp / "warm", params, device)
        shard_s = run_shard(checkpoint, items, tmp / "shard", params, device)
        naive_s = run_naive(checkpoint, items, tmp / "naive", params, device)
        startup_s = interpreter_startup_seconds()

    n = args.studies
    shard_rate = n / shard_s * 3600
    naive_rate = n / naive_s * 3600
    jobs_rate = n / (naive_s + n * startup_s) * 3600
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"inference, {n} studies of {tuple(args.shape)} voxels, {args.model} model "
        f"(patch {MODELS[args.model]['patch_size'][0]}^3, overlap {args.overlap}, "
        f"sw_batch {args.sw_batch_size}), device {name}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  shard job (model loaded once):      {shard_s:7.1f} s  {shard_rate:8.0f} studies/h")
    print(f"  naive, model loaded per study:      {naive_s:7.1f} s  {naive_rate:8.0f} studies/h")
    print(f"  interpreter + imports per job:      {startup_s:7.1f} s")
    print(
        f"  naive as per-study jobs (+startup): {naive_s + n * startup_s:7.1f} s  {jobs_rate:8.0f} studies/h"
    )
    print(f"  ratio shard / naive in-process:     {shard_rate / naive_rate:.2f}x")
    print(f"  ratio shard / per-study jobs:       {shard_rate / jobs_rate:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
