"""Lesion-level detection at production resolution (1 mm): the detection levers of issue #23.

A heavy-tailed phantom at 1 mm (``config/cohort.yaml``'s spacing), split by patient into train /
validation / test. Lesion radii follow ``metsflow.cohort.phantom``'s heavy-tailed law (Pareto,
r_min 0.9 mm, alpha 2: ~64% under 3 mm in diameter), rendered with partial volume (3^3
supersampling), enhancing rim, necrotic core from 6 mm, edema; the T1c carries the mimics that
make small-lesion FP control hard (``metsflow.cohort.phantom.add_enhancing_mimics``: enhancing
vessels 1-3 mm wide and dark on T2, choroid plexus, dural enhancement).

Scaled down to fit 2 CPU cores (and said so in the output): each patient is one 1 mm brain
*slab* (``--shape`` voxels, an ellipsoidal brain with a GM/WM/sulcal-CSF texture) rather than a
whole head, T1c + T2 only, one time point; stage 1 is a small DynUNet (filters 8-64, patch 32)
trained for ``--iterations`` steps, stage 2 the cascade's classifier. The whole-head phantom
(``make_demo_cohort`` at 1 mm) took > 10 min per patient on the shared machine.

Prints and saves (``--out``/bench_detection.txt and .tsv) for the test patients:
  * the ablation: baseline, each lever alone, all levers, then hard negatives alone and with
    all levers, then two evaluation-time levers on the "all levers" stage-1 model (the same
    model file, trained once): ``+ keep large`` (stage 2 keeps every proposal >= 10 mm,
    ``Stage2Settings.keep_diameter_mm``), ``+ flips`` (stage 1 segments train, validation
    and test with flip test-time augmentation, ``infer.tta``) and ``+ flips + keep large``
    (both: the flips arm's stage-1 outputs, computed once), and ``+ tight recovery`` on "all
    levers" and on "all levers + flips + keep large" (a lesion stage 2 adds back is the part of
    its proposal >= 0.5 x its peak probability around the peak, not the whole proposal,
    ``Stage2Settings.recovered_peak_fraction``: inference only, so the arm reuses the stage-2
    file of the arm it extends, ``stage2_file``), and ``+ split`` on "all levers" and on the
    last (proposals split at stage 1's argmax lesions, ``Stage2Settings.split_proposals``: a
    stage-2 file of its own, as it trains on the split candidates), then on that arm ``+ stage-1
    weight`` (``Stage2Settings.stage1_weight`` 0.5), ``+ selection`` (stage 2's weights of its
    best validation FROC, ``select_every`` = ``--stage2-iterations`` / 20) and ``+ selection +
    ensemble 3`` (three classifiers from consecutive seeds, ``Stage2Settings.ensemble``); per
    variant stage 1 alone
    (argmax) and the cascade at the operating point stage 2 chooses on validation
    (``max_fp_per_patient`` 1.0): size-binned lesion sensitivity (< 3, 3-10, >= 10 mm) with
    Wilson 95% CIs, FP/patient, and the stage-1 proposal sensitivity (the cascade's ceiling);
  * per cascade variant, the test lesions the operating point gives up, per size bin: those a
    stage-1 proposal touches but no candidate stage 2 keeps touches (``cascade.lost_lesions``);
  * the test FROC of each variant's stage 1 and, next to it, of its cascade (sensitivity at
    <= 0.5, 1, 2, 4 FP/patient). Stage 1: its argmax lesions scored by their peak foreground
    probability, matched at IoU > 0.1 as in the detection table. Cascade: the stage-2 scores of
    the test proposals, a lesion detected at threshold t when a proposal scoring >= t touches
    it (``cascade.scored_candidate_hits``, the validation FROC's rule read on the test set);
    plus that curve's point at the threshold chosen on validation; and the cascade's FROC on
    its final masks, as the detection table matches them (IoU > 0.1, every unmatched lesion of
    the mask a false positive; ``mask_froc``): the goal's own measure, swept on the test set, so
    an oracle that says what the best threshold could reach;
  * pretrained vs scratch (``--pretrain-seeds`` seeds): fine-tuning a model pretrained on
    another phantom (other seed, geometry and enhancement contrast) vs training from scratch
    at an equal budget on the target cohort, the paired difference in test lesion
    sensitivity with a 95% t interval.

Levers (``metsflow.core.settings.TrainSettings`` / ``Stage2Settings``): ``sampling: lesion``
(+ ``lesion_size_power``), ``instance_loss_weight``, ``stage2.proposal_sensitivity``,
``hard_negative_fraction``. A hard-negative variant names the variant whose stage-1 model is
"the previous model": that model's false positives on the *training* patients (its lesions that
no reference lesion touches, ``metsflow.models.sampling.false_positive_mask``; in the workflow
the reviewer's deletions from the presegmentation) become each patient's hard-negative mask, and
a stage 1 trains with them on the same budget. ``--quick`` sets smoke-scale defaults; options
given explicitly (e.g. ``--iterations 20``) still win.

``--reuse-models`` reuses what ``--out``/models holds: stage-1 models by name (``s1_<n>``, the
order of ``VARIANTS``: "all levers" and its evaluation-time arms share ``s1_3``; ``pre_<k>``,
``scratch_<k>``, ``pretrained_<k>``) and stage-2 models by arm name (``stage2_file``; a
``+ tight recovery`` arm by the name of the arm it extends) when the file is newer than its
stage-1 model and was trained with the same stage-2 settings (proposal threshold included,
the inference-only ``recovered_peak_fraction`` not). Stage 1 then segments the training patients only where something still
trains on them (a stage 2 or a hard-negative model not reused).

    PYTHONPATH=. nice -n 10 python benchmarks/bench_detection.py --out /tmp/bench_detection
    PYTHONPATH=. nice -n 10 python benchmarks/bench_detection.py --quick   # smoke figures
    PYTHONPATH=. python benchmarks/bench_detection.py --device cuda        # same, on a GPU
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi

from metsflow.cohort import phantom
from metsflow.core import labels as lab
from metsflow.core.io import plain, save_nifti
from metsflow.core.runtime import select_device
from metsflow.evaluation.metrics import (
    DEFAULT_SIZE_BINS_MM,
    detection_by_size,
    false_positive_rates,
    froc,
    froc_from_tables,
    mean_ci,
    pooled_lesion_tables,
    sensitivity_at_fp,
    size_bin_index,
    size_bin_labels,
    within_fp,
)
from metsflow.models.cascade import (
    filter_prediction,
    keep_candidates,
    lesion_peak_probabilities,
    load_stage2,
    lost_lesions,
    proposal_components,
    proposal_threshold,
    resolve_params,
    scored_candidate_hits,
    study_candidates,
    train_stage2,
)
from metsflow.models.infer import foreground_probability, load_ensemble, stage1_probabilities
from metsflow.models.networks import HARD_NEGATIVES
from metsflow.models.sampling import false_positive_mask
from metsflow.models.train import train_model

SPACING = (1.0, 1.0, 1.0)
IOU = 0.1  # as bench_small_lesions.py: a 3-voxel lesion and a 9-voxel prediction still match
CHANNELS = ["t1c", "t2"]
# Relative tissue signals (metsflow.cohort.phantom.INTENSITY, T1c and T2).
SIGNAL = {
    "t1c": {"csf": 0.25, "gm": 0.64, "wm": 1.00, "enh": 1.55, "nec": 0.38, "edema": 0.58},
    "t2": {"csf": 1.00, "gm": 0.62, "wm": 0.45, "enh": 0.62, "nec": 0.95, "edema": 0.88},
}


# --------------------------------------------------------------------------------------------
# the 1 mm phantom slabs
# --------------------------------------------------------------------------------------------
def _heavy_tailed_radius(rng) -> float:
    u = float(rng.uniform())
    radius = phantom.HEAVY_TAIL_MIN_RADIUS_MM * (1 - u) ** (-1 / phantom.HEAVY_TAIL_ALPHA)
    return min(radius, phantom.HEAVY_TAIL_MAX_RADIUS_MM)


def make_patient(seed: int, shape, max_lesions: int, contrast: float = 1.0, squash=1.0) -> dict:
    """One patient's z-scored T1c/T2, brain mask and internal labels on a 1 mm slab.
    ``contrast`` scales lesion enhancement, ``squash`` the brain's third semi-axis."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    axes = np.array(shape) * np.array([0.46, 0.46, 0.46 * squash]) * rng.uniform(0.9, 1.0, 3)
    wobble = ndi.gaussian_filter(rng.normal(size=shape), 8) * 40
    radius = np.sqrt(sum(((grid[i] - centre[i]) / axes[i]) ** 2 for i in range(3)))
    brain = radius + wobble < 1.0
    texture = ndi.gaussian_filter(rng.normal(size=shape), 3.0)
    texture /= texture.std() + 1e-6
    gm = np.clip(0.5 + 0.6 * texture, 0, 1)
    csf = np.clip(-1.6 - texture, 0, 1)  # sulci where the texture is lowest
    wm = np.clip(1 - gm - csf, 0, 1)
    depth = ndi.distance_transform_edt(brain)
    images = {seq: s["csf"] * csf + s["gm"] * gm + s["wm"] * wm for seq, s in SIGNAL.items()}
    label = np.zeros(shape, np.uint8)
    placed: list[tuple[np.ndarray, float]] = []
    sub = (np.arange(3) - 1) / 3.0  # 3^3 supersampling offsets (voxels)
    offsets = np.stack(np.meshgrid(sub, sub, sub, indexing="ij"), -1).reshape(-1, 3)
    for _ in range(int(rng.integers(max(1, max_lesions // 3), max_lesions + 1))):
        r = _heavy_tailed_radius(rng)
        edema_r = r * (1 + (rng.uniform(0.6, 1.5) if r > 2.5 else rng.uniform(0, 0.6)))
        ok = np.argwhere(depth >= edema_r + 3)
        if not len(ok):
            continue
        for _attempt in range(20):
            c = ok[rng.integers(len(ok))] + rng.uniform(-0.5, 0.5, 3)
            if all(np.linalg.norm(c - pc) > edema_r + pr + 3 for pc, pr in placed):
                break
        else:
            continue
        placed.append((c, edema_r))
        reach = int(math.ceil(edema_r)) + 1
        lo = np.maximum(np.floor(c).astype(int) - reach, 0)
        hi = np.minimum(np.floor(c).astype(int) + reach + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        pts = np.stack([g[box] for g in grid], -1)[..., None, :] + offsets  # (..., 27, 3)
        dist = np.linalg.norm(pts - c, axis=-1)
        inside = (dist <= r).mean(-1)
        core = (dist <= r - 1.5).mean(-1) if r >= 6 else np.zeros_like(inside)
        halo = np.clip((dist <= edema_r).mean(-1) - inside, 0, 1)
        fraction_lesion = np.clip(inside, 0, 1)
        lesion_vox = fraction_lesion >= 0.5
        if not lesion_vox.any():  # the smallest still mark their centre voxel
            lesion_vox[tuple(np.floor(c).astype(int) - lo)] = True
            fraction_lesion = np.maximum(fraction_lesion, lesion_vox * 0.5)
        for seq, s in SIGNAL.items():
            enh = s["enh"] * (contrast if seq == "t1c" else 1.0)
            tissue = images[seq][box]
            value = (
                fraction_lesion * ((1 - core) * enh + core * s["nec"])
                + halo * s["edema"]
                + (1 - fraction_lesion - halo) * tissue
            )
            images[seq][box] = value
        sub_label = label[box]
        sub_label[(halo >= 0.5) & (sub_label == 0)] = lab.EDEMA
        sub_label[lesion_vox] = lab.ENHANCING
        sub_label[lesion_vox & (core >= 0.5)] = lab.NECROSIS
    for seq in images:
        images[seq] = images[seq] + rng.normal(0, 0.05, shape)
        values = images[seq][brain]
        images[seq] = np.where(brain, (images[seq] - values.mean()) / (values.std() + 1e-6), 0)
    label[~brain] = 0
    images, _ = phantom.add_enhancing_mimics(images, brain, label, 1.0, seed)
    return {"images": images, "brain": brain, "label": label}


def write_cohort(root: Path, name: str, n: int, seed: int, args, **kw) -> list[dict]:
    """``n`` patients as preprocessed study folders under ``root/name``; training items."""
    items = []
    affine = np.diag([*SPACING, 1.0])
    for p in range(n):
        study = f"{name}-P{p:03d}"
        out = root / name / study
        if not (out / "label.nii.gz").exists():
            patient = make_patient(seed * 1000 + p, args.shape, args.max_lesions, **kw)
            for seq, image in patient["images"].items():
                save_nifti(out / f"{seq}.nii.gz", image.astype(np.float32), affine, np.float32)
            save_nifti(out / "brain_mask.nii.gz", patient["brain"], affine, np.uint8)
            save_nifti(out / "label.nii.gz", patient["label"], affine, np.uint8)
        items.append(
            {
                "study_id": study,
                "patient_id": study,
                "prep_dir": str(out),
                "label": str(out / "label.nii.gz"),
                "prior": None,
            }
        )
    return items


# --------------------------------------------------------------------------------------------
# training, inference, evaluation
# --------------------------------------------------------------------------------------------
class Variant(NamedTuple):
    """One arm of the ablation: stage-1 training ``levers`` (``TrainSettings`` keys), the stage-2
    ``proposal_sensitivity`` (None: argmax proposals), ``hard_negatives_from``: the variant
    whose stage-1 false positives on the training patients are this one's hard negatives, and
    evaluation-time levers that leave stage-1 training alone: the stage-2
    ``keep_diameter_mm``, ``tta`` (stage 1 segments with flip test-time augmentation) and the
    stage-2 ``recovered_peak_fraction``, which only ``filter_prediction`` reads (stage 2 trains
    as without it: ``INFERENCE_ONLY``); ``split_proposals`` and ``stage1_weight`` are stage-2
    settings (the second changes the operating point, not the network)."""

    levers: dict
    proposal_sensitivity: float | None = None
    hard_negatives_from: str | None = None
    keep_diameter_mm: float | None = None
    tta: bool = False
    recovered_peak_fraction: float | None = None
    split_proposals: bool = False
    stage1_weight: float = 0.0
    selections: int = 0  # select_every = stage-2 iterations / this (0: the last iteration)
    members: int = 1  # stage-2 seed ensemble (Stage2Settings.ensemble)


ALL_LEVERS = {"sampling": "lesion", "lesion_size_power": 0.5, "instance_loss_weight": 1.0}
# Half the negative patches of a patient with false positives go to them, half stay anywhere
# in the brain (a model that only sees its old mistakes as background forgets the rest).
HARD_NEGATIVE_FRACTION = 0.5
# config/cohort.yaml's stage-2 settings but for stage1_weight (its arm is the next but one).
COHORT_ARM = Variant(
    ALL_LEVERS,
    0.98,
    keep_diameter_mm=10.0,
    tta=True,
    recovered_peak_fraction=0.5,
    split_proposals=True,
)
VARIANTS = {
    "baseline": Variant({}),
    "+ lesion sampling": Variant({"sampling": "lesion", "lesion_size_power": 0.5}),
    "+ instance loss": Variant({"instance_loss_weight": 1.0}),
    "+ high-sensitivity proposals": Variant({}, 0.98),
    "all levers": Variant(ALL_LEVERS, 0.98),
    # Appended after the others: their stage-1 models keep the names s1_0..s1_3 of earlier
    # runs, which --reuse-models finds.
    "+ hard negatives": Variant(
        {"hard_negative_fraction": HARD_NEGATIVE_FRACTION}, None, "baseline"
    ),
    "all levers + hard negatives": Variant(
        {**ALL_LEVERS, "hard_negative_fraction": HARD_NEGATIVE_FRACTION}, 0.98, "all levers"
    ),
    # Evaluation-time levers on the "all levers" stage-1 model (same training key: same model
    # file, trained once). In 6 of the 7 arms above stage 2 dropped every lesion >= 10 mm stage 1
    # had found (few large positives in a heavy-tailed training set; results/bench_detection.txt).
    "all levers + keep large": Variant(ALL_LEVERS, 0.98, keep_diameter_mm=10.0),
    "all levers + flips": Variant(ALL_LEVERS, 0.98, tta=True),
    # Both: the flips arm's stage-1 outputs (same training key and tta), its own stage 2.
    "all levers + flips + keep large": Variant(ALL_LEVERS, 0.98, keep_diameter_mm=10.0, tta=True),
    # A lesion stage 2 adds back (no argmax voxel) as the part of its proposal >= 0.5 x its peak
    # around the peak, not the whole, bloated proposal (misses IoU > 0.25 and counts as an FP).
    # Inference only: the stage-1 outputs and the stage-2 file of the arm without it.
    "all levers + tight recovery": Variant(ALL_LEVERS, 0.98, recovered_peak_fraction=0.5),
    "all levers + flips + keep large + tight recovery": Variant(
        ALL_LEVERS, 0.98, keep_diameter_mm=10.0, tta=True, recovered_peak_fraction=0.5
    ),
    # One candidate per lesion: proposals split at stage 1's argmax lesions (15 of the 27 test
    # false positives of the arm above were argmax specks a kept proposal carried). Stage 2
    # trains on the split candidates: a stage-2 file of its own.
    "all levers + split": Variant(ALL_LEVERS, 0.98, split_proposals=True),
    "all levers + flips + keep large + tight recovery + split": COHORT_ARM,
    # Stage 1's peak mixed into the score (stage1_weight): the operating point changes, so a
    # stage-2 file of its own (trained as the arm above for the same seed).
    "all levers + flips + keep large + tight recovery + split + stage-1 weight": (
        COHORT_ARM._replace(stage1_weight=0.5)
    ),
    # Stage 2's weights chosen on the validation FROC among 20 evaluations (select_every): the
    # same seed trains the same network as the arm above (scoring draws no random numbers).
    "all levers + flips + keep large + tight recovery + split + stage-1 weight + selection": (
        COHORT_ARM._replace(stage1_weight=0.5, selections=20)
    ),
    # Stage 2 as the mean probability of 3 classifiers from seeds s, s + 1, s + 2 (ensemble),
    # each selected as above: its first member is the selection arm's network of seed s.
    "all levers + flips + keep large + tight recovery + split + stage-1 weight + selection"
    " + ensemble 3": COHORT_ARM._replace(stage1_weight=0.5, selections=20, members=3),
}
# Stage-2 settings only filter_prediction reads: an arm differing from another by these alone
# shares its stage-2 file (stage2_file), trained without them.
INFERENCE_ONLY = ("recovered_peak_fraction",)


def with_hard_negatives(args, source: str, items, outputs, refs) -> tuple[list[dict], str]:
    """``items`` (the training patients) with the false positives of stage-1 model ``source``
    (``outputs``: its ``segment`` of them) as their hard-negative masks, written under
    ``--out``/hard_negatives/``source``; and a line saying how many there are."""
    folder = args.out / "hard_negatives" / source
    affine = np.diag([*SPACING, 1.0])
    out, components, patients = [], 0, 0
    for item, (_, _, pred) in zip(items, outputs, strict=True):
        mask = false_positive_mask(lab.whole_lesion(pred), refs[item["study_id"]])
        if not mask.any():
            out.append(item)
            continue
        path = folder / f"{item['study_id']}.nii.gz"
        save_nifti(path, mask, affine, np.uint8)
        out.append({**item, HARD_NEGATIVES: str(path)})
        components += lab.lesion_components(mask)[1]
        patients += 1
    line = (
        f"  hard negatives from {source}: {components} false-positive components in "
        f"{patients}/{len(items)} training patients"
    )
    return out, line


# The baseline pins the behaviour before issue #23 (MONAI's RandCropByPosNegLabeld, Dice+CE
# only), whatever ``TrainSettings``'s defaults are now: the levers are measured against it.
BASELINE_LEVERS = {
    "sampling": "pos_neg",
    "lesion_size_power": 0.0,
    "instance_loss_weight": 0.0,
    "hard_negative_fraction": 0.0,
}


def stage1_params(args, seed: int, **levers) -> dict:
    return {
        **BASELINE_LEVERS,
        "arch": "dynunet",
        "channels": CHANNELS,
        "label_mode": "multiclass",
        "patch_size": [32, 32, 32],
        "filters": [8, 16, 32, 64],
        "spacing": list(SPACING),
        "optimizer": "adam",
        "learning_rate": 3e-3,
        "batch_size": 2,
        "iterations": args.iterations,
        "seed": seed,
        "log_interval": 50,
        "val_interval": 0,
        "checkpoint_interval": 10**6,
        "pos_neg_ratio": [2, 1],
        **levers,
    }


def model_file(args, name: str) -> Path:
    return args.out / "models" / f"{name}.pt"


def reused(args, name: str) -> bool:
    """Whether ``--reuse-models`` reuses stage-1 model ``name`` (its file exists)."""
    return bool(args.reuse_models) and model_file(args, name).exists()


def train(args, name: str, items, params, init=None) -> tuple[Path, float]:
    path = model_file(args, name)
    t0 = time.perf_counter()
    reuse = reused(args, name)
    if not reuse:
        train_model(items, [], params, path, init_checkpoint=init, device=args.device, resume=False)
    seconds = time.perf_counter() - t0
    how = "reused" if reuse else f"{seconds:.0f} s"
    print(f"  {name}: {params['iterations']} it, {how}", flush=True)
    return path, seconds


def segment(args, path: Path, items, tta: bool = False) -> list[tuple]:
    device = select_device(args.device)
    networks, meta = load_ensemble([path], device=device)
    infer = {"overlap": 0.25, "sw_batch_size": 4, "tta": tta}
    out = []
    for item in items:
        inp, probs, pred = stage1_probabilities(networks, meta, item, infer, device)
        out.append((inp, foreground_probability(probs, inp["brain"]), pred))
    return out


def reference(item) -> np.ndarray:
    import nibabel as nib

    return lab.whole_lesion(np.asarray(nib.load(item["label"]).dataobj))


def evaluate(name: str, preds: dict, refs: dict, scores: dict | None = None) -> tuple:
    """``(row, reference lesion table, predicted lesion table)`` of one variant's test output."""
    binary = {s: lab.whole_lesion(pred) for s, pred in preds.items()}
    lesions, predicted, false = pooled_lesion_tables(binary, refs, SPACING, IOU, scores)
    fp = false_positive_rates(false, {s: s for s in preds})
    row = {"variant": name}
    for b in detection_by_size(lesions, DEFAULT_SIZE_BINS_MM).itertuples():
        row[b.size_bin] = (
            f"{b.n_detected}/{b.n_ref_lesions} {b.sensitivity:.2f} "
            f"[{b.ci95_low:.2f}-{b.ci95_high:.2f}]"
        )
    row["FP/patient"] = round(fp["fp_per_patient"], 2)
    return row, lesions, predicted


def stage2_file(name: str) -> str:
    """The stage-2 model file of variant ``name``, named after the first arm of ``VARIANTS``
    whose stage 2 trains the same (the same variant but for the ``INFERENCE_ONLY`` settings):
    arms that train differently never share one, an inference-only arm reuses its base's."""
    blank = {key: None for key in INFERENCE_ONLY}
    trains = VARIANTS[name]._replace(**blank)
    owner = next(n for n, v in VARIANTS.items() if v._replace(**blank) == trains)
    return "stage2_" + re.sub(r"[^a-z0-9]+", "_", owner.lower()).strip("_") + ".pt"


def reusable_stage2(args, path: Path, stage1_model: Path, params: dict) -> bool:
    """Whether the stage-2 file ``path`` is reused (with ``--reuse-models``, or trained earlier
    in this run for an arm that shares it): it exists, is newer than the stage-1 model whose
    outputs it was trained on and holds the stage-2 settings ``params`` (the proposal threshold,
    which follows stage 1's validation outputs, included; the ``INFERENCE_ONLY`` ones not)."""
    if not ((args.reuse_models or path in args.stage2_trained) and path.exists()):
        return False
    if path.stat().st_mtime < stage1_model.stat().st_mtime:
        return False
    try:
        _, meta = load_stage2(path, CHANNELS)
    except ValueError:
        return False
    wanted = plain(resolve_params(params).as_dict())

    def training(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k not in INFERENCE_ONLY}

    return training(meta["params"]) == training(wanted)


def cascade_variant(args, name, s1_val, s1_test, val_items, train_items, s1_train, refs, model):
    """Stage 2 of variant ``name`` on its stage-1 outputs (``s1_train``: a function returning the
    training patients' outputs, called only when stage 2 trains; ``model``: the stage-1 model
    file); ``proposal_sensitivity`` None = argmax proposals, else high-sensitivity proposals at
    the validation threshold reaching it. Returns test predictions, the stage-2 checkpoint's
    meta (``sensitivity_before``: the stage-1 proposal sensitivity on validation, the cascade's
    ceiling) and each test study's scored candidates; or ``(None, reason, None)`` when stage 1
    left no false-positive candidate on the training patients to learn from."""
    variant = VARIANTS[name]
    sens = variant.proposal_sensitivity
    params = {
        "iterations": args.stage2_iterations,
        "crop_size": [args.stage2_crop] * 3,
        "max_fp_per_patient": 1.0,
        "seed": args.seed if args.stage2_seed is None else args.stage2_seed,
        "proposal_sensitivity": sens,
        "keep_diameter_mm": variant.keep_diameter_mm,
        "split_proposals": variant.split_proposals,
        "stage1_weight": variant.stage1_weight,
        "ensemble": variant.members,
        "select_every": (
            max(1, args.stage2_iterations // variant.selections) if variant.selections else None
        ),
    }
    if sens is not None:
        peaks = np.concatenate(
            [
                lesion_peak_probabilities(fg, refs[i["study_id"]])
                for i, (_, fg, _) in zip(val_items, s1_val, strict=True)
            ]
        )
        params["proposal_threshold"] = proposal_threshold(peaks, sens)["threshold"]

    def cands(items, outputs, add_reference):
        return [
            study_candidates(
                i["study_id"], inp["image"], fg, refs[i["study_id"]], params, add_reference,
                patient_id=i["patient_id"], spacing=SPACING, pred=pred,
            )
            for i, (inp, fg, pred) in zip(items, outputs, strict=True)
        ]  # fmt: skip

    path = args.out / "models" / stage2_file(name)
    if reusable_stage2(args, path, model, params):
        print(f"  {path.name}: reused", flush=True)
    else:
        train_cands = cands(train_items, s1_train(), True)
        if not any((np.asarray(c.labels) == 0).any() for c in train_cands):
            # Seen at smoke scale (80 it, "all levers + hard negatives"): stage 1 found so few
            # validation lesions that the high-sensitivity threshold fell to its floor (0.05),
            # where each training patient's proposals merge into one brain-sized component that
            # touches a lesion, so stage 2 has no negative example.
            return (
                None,
                "stage 2 not trained: no false-positive candidate on the training patients",
                None,
            )
        train_stage2(
            train_cands, cands(val_items, s1_val, False), CHANNELS, params, path,
            device=select_device(args.device),
        )  # fmt: skip
        args.stage2_trained.add(path)
    network, meta = load_stage2(path)
    # Inference-only settings: this arm's, whichever arm's stage 2 the file holds.
    meta["params"].update({k: getattr(variant, k) for k in INFERENCE_ONLY})
    preds, candidates = {}, {}
    for item, (inp, fg, pred) in zip(args.test_items, s1_test, strict=True):
        study = item["study_id"]
        preds[study], candidates[study] = filter_prediction(
            pred, inp["image"], fg, network, meta, study, spacing=SPACING
        )
    return preds, meta, candidates


class ScoredTest(NamedTuple):
    """A cascade's test proposals: stage-2 ``scores``, the reference lesions each touches
    (``hits``, ``(study, lesion)``) and every test reference lesion's diameter (mm)."""

    scores: np.ndarray
    hits: list
    diameters: dict


def scored_test(test_items, s1_test, candidates, meta, refs) -> ScoredTest:
    """The test candidates ``filter_prediction`` scored, pooled over the test patients
    (``cascade.scored_candidate_hits``)."""
    scores, hits, diameters = [], [], {}
    for item, (_, fg, pred) in zip(test_items, s1_test, strict=True):
        study = item["study_id"]
        s, h, d = scored_candidate_hits(
            pred, fg, meta, candidates[study], refs[study], study, SPACING
        )
        scores.append(s)
        hits += h
        diameters.update(d)
    return ScoredTest(np.concatenate(scores) if scores else np.zeros(0), hits, diameters)


def candidate_table(name: str, candidates: dict, scored: ScoredTest) -> list[dict]:
    """One row per scored test candidate of variant ``name`` (``scored_test``'s order): its
    size, stage-1 peak and stage-2 score, and the reference lesions it touches with their
    diameters; written beside the results so a ranking failure can be read lesion by lesion."""
    pooled = [c for study in candidates for c in candidates[study]]
    return [
        {
            "variant": name, "study_id": c.study_id, "candidate": c.index, "voxels": c.voxels,
            "stage1_peak": round(float(c.max_prob), 4), "stage2_score": round(float(c.score), 4),
            "touches": " ".join(f"{ref[1]}:{scored.diameters[ref]:.1f}mm" for ref in hits),
        }
        for c, hits in zip(pooled, scored.hits, strict=True)
    ]  # fmt: skip


def lost_by_size(name, scored: ScoredTest, meta) -> dict:
    """Row of the test lesions variant ``name``'s operating point gives up, per size bin:
    ``lost/touched``, touched = reference lesions a stage-1 proposal (a candidate stage 2
    scored) overlaps, lost = of those, the ones no kept candidate overlaps. Overlap, not the
    IoU match of the detection table: what stage 2 decides, not how well the shapes fit."""
    scores, hits, diameters = scored
    lost = lost_lesions(scores, hits, meta["threshold"], diameters)
    touched = sorted({ref for hit in hits for ref in hit})
    labels = size_bin_labels(DEFAULT_SIZE_BINS_MM)
    bins = size_bin_index([diameters[ref] for ref in touched], DEFAULT_SIZE_BINS_MM)
    row = {"variant": name}
    for index, label in enumerate(labels):
        n_lost = sum(r["size_bin"] == label for r in lost)
        row[label] = f"{n_lost}/{int(np.sum(bins == index))}"
    row["lost"] = len(lost)
    return row


FROC_RATES = (0.5, 1, 2, 4)  # false positives per patient the FROCs are read at


def froc_points(curve: pd.DataFrame) -> str:
    """``sens@FP/pt`` of a FROC curve at ``FROC_RATES`` (``metrics.sensitivity_at_fp``)."""
    points = sensitivity_at_fp(curve, FROC_RATES)
    return ", ".join(f"{sens:.3f}@{k}" for sens, k in zip(points, FROC_RATES, strict=True))


def cascade_froc(scored: ScoredTest, n_patients: int, threshold: float) -> tuple[str, str]:
    """The cascade's test FROC (``metrics.froc`` of the stage-2 scores of the test proposals, a
    lesion detected at t when a proposal scoring >= t touches it: the validation FROC's rule)
    read at ``FROC_RATES``, and its point at the validation ``threshold``."""
    curve = froc(scored.scores, scored.hits, len(scored.diameters), n_patients)
    kept = curve[curve.threshold >= float(threshold)]
    sens, fp = (kept.sensitivity.iloc[-1], kept.fp_per_patient.iloc[-1]) if len(kept) else (0, 0)
    return froc_points(curve), f"{sens:.3f}@{fp:.2f} (t={float(threshold):.3f})"


# Thresholds the final-mask FROC sweeps: quantiles of the test candidates' stage-2 scores.
MASK_FROC_STEPS = 60


def mask_froc(test_items, s1_test, candidates, meta, refs) -> tuple[str, str]:
    """The cascade's test FROC on its final masks, matched as the detection table matches them
    (IoU > ``IOU``; an unmatched lesion of the mask is a false positive): the stage-2 threshold
    swept over ``MASK_FROC_STEPS`` quantiles of the test candidates' scores, each point the
    masks ``cascade.keep_candidates`` builds from the candidates scored once. Read at
    ``FROC_RATES``: the best any threshold reaches (an oracle, chosen on test), against which
    the validation-chosen point is read; and the threshold that gives the point at 1 FP/patient."""
    maps = {
        item["study_id"]: proposal_components(pred, fg, meta)
        for item, (_, fg, pred) in zip(test_items, s1_test, strict=True)
    }
    scores = np.concatenate([[c.score for c in candidates[s]] for s in maps] or [[]])
    thresholds = (
        np.unique(np.quantile(scores, np.linspace(0, 1, MASK_FROC_STEPS)))
        if len(scores)
        else np.zeros(1)
    )
    # Edema stripped first: the whole-lesion masks read here do not depend on it, and with it
    # every call would hand the edema to its nearest lesion (a distance transform per study and
    # threshold: the sweep took minutes per arm instead of seconds).
    lesions_only = [np.where(pred == lab.EDEMA, lab.BACKGROUND, pred) for _, _, pred in s1_test]
    records = []
    for threshold in thresholds:
        binary = {
            s: lab.whole_lesion(keep_candidates(pred, fg, maps[s], candidates[s], threshold, meta))
            for s, (_, fg, _), pred in zip(maps, s1_test, lesions_only, strict=True)
        }
        lesions, _, false = pooled_lesion_tables(binary, refs, SPACING, IOU)
        rates = false_positive_rates(false, {s: s for s in binary})
        records.append(
            {
                "threshold": float(threshold),
                "sensitivity": float(lesions.detected.mean()),
                "fp_per_patient": rates["fp_per_patient"],
            }
        )
    curve = pd.DataFrame(records)
    at_one = curve[within_fp(curve, 1.0)]
    best = at_one.loc[at_one.sensitivity.idxmax()] if len(at_one) else None
    where = f"t={best.threshold:.3f}" if best is not None else "none <= 1"
    return froc_points(curve), where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_detection"))
    ap.add_argument("--quick", action="store_true", help="smoke scale (figures not decisive)")
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 72])
    ap.add_argument("--train-patients", type=int, default=16)
    ap.add_argument("--val-patients", type=int, default=6)
    ap.add_argument("--test-patients", type=int, default=20)
    ap.add_argument("--max-lesions", type=int, default=15)
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--stage2-iterations", type=int, default=300)
    ap.add_argument("--stage2-crop", type=int, default=24, help="stage-2 crop edge (voxels)")
    ap.add_argument(
        "--stage2-seed", type=int, default=None,
        help="stage 2's training seed alone (default --seed, which also draws the cohort)",
    )  # fmt: skip
    ap.add_argument("--pretrain-seeds", type=int, default=3)
    ap.add_argument("--pretrain-iterations", type=int, default=800)
    ap.add_argument("--finetune-patients", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--reuse-models", action="store_true")
    ap.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="evaluate these (a hard-negative variant also trains/segments its source)",
    )  # fmt: skip
    ap.add_argument("--results", default="bench_detection", help="name of the .txt/.tsv")
    args = ap.parse_args()
    if args.quick:
        # Smoke scale: the machinery end to end on a shared 2-core machine in ~30 min; its
        # figures are not evidence for or against a lever. Defaults only: an option given
        # explicitly (a shorter --iterations for a faster smoke) still wins.
        ap.set_defaults(
            shape=[56, 56, 44], train_patients=5, val_patients=3, test_patients=6,
            iterations=80, stage2_iterations=50, pretrain_seeds=2, pretrain_iterations=80,
        )  # fmt: skip
        args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    args.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)
        # Written as it goes: a run cut short still leaves what it measured.
        (args.out / f"{args.results}.txt").write_text("\n".join(lines) + "\n")

    start = time.perf_counter()
    data = args.out / "cohort"
    tr = write_cohort(data, "train", args.train_patients, args.seed, args)
    va = write_cohort(data, "val", args.val_patients, args.seed + 100, args)
    te = write_cohort(data, "test", args.test_patients, args.seed + 200, args)
    args.test_items = te
    args.stage2_trained = set()  # stage-2 files trained in this run (reusable_stage2)
    refs = {i["study_id"]: reference(i) for i in tr + va + te}
    say(
        f"cohort at 1 mm: {len(tr)} train / {len(va)} validation / {len(te)} test patients, "
        f"slab {args.shape} voxels, {time.perf_counter() - start:.0f} s to write"
    )

    # Stage-1 model name and file by training key; stage-1 outputs on each patient set by output
    # key (the training key and tta: flips change the outputs, not the model) and set, computed
    # when first needed: the training patients only where something trains on them.
    model_name: dict[str, str] = {}
    model_path: dict[str, Path] = {}
    stage1_cache: dict[tuple, list] = {}
    key_of: dict[str, str] = {}
    rows, froc_rows, lost_rows, candidate_rows = [], [], [], []
    test_ids = [i["study_id"] for i in te]
    patient_sets = {"train": tr, "val": va, "test": te}
    # Model names follow the order of VARIANTS whatever --variants picks, so --reuse-models
    # finds the models of a full run.
    for name, variant in VARIANTS.items():
        key = key_of[name] = str((sorted(variant.levers.items()), variant.hard_negatives_from))
        model_name.setdefault(key, f"s1_{len(model_name)}")

    def stage1(name: str, which: str) -> list:
        """Variant ``name``'s stage-1 outputs on patient set ``which``, segmented once."""
        out_key = (key_of[name], VARIANTS[name].tta, which)
        if out_key not in stage1_cache:
            stage1_cache[out_key] = segment(
                args, model_path[key_of[name]], patient_sets[which], VARIANTS[name].tta
            )
        return stage1_cache[out_key]

    needed = set(args.variants) | {VARIANTS[v].hard_negatives_from for v in args.variants}
    for name, variant in VARIANTS.items():
        if name not in needed:
            continue
        key, hard_from = key_of[name], variant.hard_negatives_from
        if key not in model_path:
            # Trained once per run whatever the arms that share it (--reuse-models or not).
            train_items = tr
            if hard_from is not None and not reused(args, model_name[key]):
                # "The previous model": the named variant's stage 1 on the training patients.
                source = model_name[key_of[hard_from]]
                source_train = stage1(hard_from, "train")
                train_items, line = with_hard_negatives(args, source, tr, source_train, refs)
                say(line)
            params = stage1_params(args, args.seed, **variant.levers)
            model_path[key], _ = train(args, model_name[key], train_items, params)
        if name not in args.variants:
            continue  # only another's source of hard negatives
        s1_val, s1_test = stage1(name, "val"), stage1(name, "test")
        s1_preds = {s: pred for s, (_, _, pred) in zip(test_ids, s1_test, strict=True)}
        s1_scores = {s: fg for s, (_, fg, _) in zip(test_ids, s1_test, strict=True)}
        row, lesions, predicted = evaluate(f"{name}: stage 1", s1_preds, refs, s1_scores)
        rows.append(row)
        froc_row = {
            "variant": name,
            "stage-1 test FROC": froc_points(
                froc_from_tables(lesions, predicted, {s: s for s in test_ids})
            ),
        }
        preds, meta, candidates = cascade_variant(
            args, name, s1_val, s1_test, va, tr, lambda n=name: stage1(n, "train"), refs,
            model_path[key],
        )  # fmt: skip
        if preds is None:
            row = {"variant": f"{name}: cascade", "note": meta}
        else:
            row, _, _ = evaluate(f"{name}: cascade", preds, refs)
            row["val proposal sens"] = round(meta["sensitivity_before"], 3)
            if any(m["selection"] for m in meta.get("members", [])):
                row["stage-2 iteration"] = "/".join(
                    str(m["selected_iteration"]) for m in meta["members"]
                )
            scored = scored_test(te, s1_test, candidates, meta, refs)
            candidate_rows += candidate_table(name, candidates, scored)
            lost_rows.append(lost_by_size(name, scored, meta))
            curve, at_threshold = cascade_froc(scored, len(test_ids), meta["threshold"])
            froc_row["cascade test FROC"] = curve
            froc_row["cascade at val threshold"] = at_threshold
            froc_row["final-mask test FROC (IoU)"], froc_row["its 1 FP/pt point"] = mask_froc(
                te, s1_test, candidates, meta, refs
            )
        froc_rows.append(froc_row)
        rows.append(row)
        say(pd.DataFrame(rows[-2:]).to_string(index=False))
    table = pd.DataFrame(rows)
    say("\nTest patients: lesion sensitivity per size bin, detected/reference sens [Wilson 95% CI]")
    say(table.to_string(index=False))
    say(
        "\nTest FROC, sensitivity@FP/patient. Stage 1: argmax lesions scored by peak foreground "
        "probability, IoU > 0.1 match.\ncascade test FROC (operating point chosen on validation "
        "is the row above; this curve reads the test set at fixed FP rates): stage-2 scores of "
        "the\ntest proposals, a lesion detected at t when a proposal scoring >= t touches it "
        "(overlap, the validation FROC's rule);\n'cascade at val threshold': this curve at the "
        "threshold chosen on validation.\nfinal-mask test FROC (IoU): the stage-2 threshold "
        "swept on the test set, the final masks matched at IoU > 0.1 as the table above (an "
        "oracle: what the best threshold reaches; the goal's measure)."
    )
    say(pd.DataFrame(froc_rows).to_string(index=False))
    if lost_rows:
        say(
            "\nTest lesions the cascade's operating point gives up, per size bin: lost/touched "
            "(touched by a stage-1 proposal, no kept candidate touches them)"
        )
        say(pd.DataFrame(lost_rows).to_string(index=False))
    table.to_csv(args.out / f"{args.results}.tsv", sep="\t", index=False)
    if candidate_rows:
        path = args.out / f"{args.results}_candidates.tsv"
        pd.DataFrame(candidate_rows).to_csv(path, sep="\t", index=False)

    # ---- pretrained vs scratch -----------------------------------------------------------------
    say("\npretrained (other phantom: seed, geometry, contrast) -> fine-tuned vs scratch")
    source = write_cohort(data, "source", args.train_patients, args.seed + 300, args)
    target_kw = {"contrast": 0.8, "squash": 0.8}
    target_train = write_cohort(
        data, "target", args.finetune_patients, args.seed + 400, args, **target_kw
    )
    target_test = write_cohort(
        data, "target_test", max(3, args.test_patients // 2), args.seed + 500, args, **target_kw
    )
    for i in target_train + target_test + source:
        refs[i["study_id"]] = reference(i)
    diffs = []
    budget = max(args.iterations // 4, 20)
    for k in range(args.pretrain_seeds):
        pre, _ = train(
            args,
            f"pre_{k}",
            source,
            {**stage1_params(args, 10 + k), "iterations": args.pretrain_iterations},
        )
        sens = {}
        for arm, init in (("scratch", None), ("pretrained", pre)):
            path, _ = train(
                args,
                f"{arm}_{k}",
                target_train,
                {**stage1_params(args, 20 + k), "iterations": budget},
                init=init,
            )
            out = segment(args, path, target_test)
            preds = {i["study_id"]: p for i, (_, _, p) in zip(target_test, out, strict=True)}
            _, lesions, _ = evaluate(arm, preds, refs)
            sens[arm] = float(lesions.detected.mean())
        diffs.append(sens["pretrained"] - sens["scratch"])
        say(f"  seed {k}: scratch {sens['scratch']:.3f}, pretrained {sens['pretrained']:.3f}")
    if len(diffs) > 1:
        low, high = mean_ci(diffs)
        say(
            f"  pretrained - scratch lesion sensitivity: {np.mean(diffs):+.3f} [95% CI {low:+.3f}, {high:+.3f}] over {len(diffs)} seeds, fine-tuning budget {budget} it"
        )
    say(
        f"\nscale: 1 mm slabs {args.shape}, stage 1 {args.iterations} it (filters 8-64, patch 32), "
        f"stage 2 {args.stage2_iterations} it (crop {args.stage2_crop}, seed "
        f"{args.seed if args.stage2_seed is None else args.stage2_seed}), device {args.device}; total "
        f"{time.perf_counter() - start:.0f} s"
    )
    (args.out / f"{args.results}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
