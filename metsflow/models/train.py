"""Patch-based training of a segmentation network (MONAI), resumable and reproducible.

``train_model`` trains for a fixed number of *iterations* (not epochs: the labelled set grows by
a few studies per active-learning round, and a fixed step budget keeps rounds comparable).

Reproducibility: the random draws for training sample ``n`` (which study, crop centre,
augmentation) are seeded from ``(seed, n)`` alone. The data stream therefore does not depend on
how many loader workers run, and a run resumed at iteration ``k`` sees exactly the samples the
uninterrupted run would have seen. On CPU the same seed gives bit-identical weights; on CUDA the
run is seeded but uses cuDNN autotuning and AMP, so it is not bit-identical.

Files: the final checkpoint at ``out_path`` (``metsflow.models.networks.save_checkpoint``), while running
``<out_path>.resume.pt`` (weights, optimizer, scheduler, AMP scaler, RNG states, iteration, log
rows) every ``checkpoint_interval`` iterations, removed once the final checkpoint is written, and
optionally a TSV log (iteration, loss, lr, val_dice, seconds).

Settings: a ``metsflow.core.settings.TrainingRun`` (model, training knobs, grid spacing), or its
flat dict form (``TrainingRun.as_params``); ``metsflow.core.settings.TrainSettings`` owns the
training knobs and their defaults (the optimizer-specific learning rate and weight decay:
``OPTIMIZERS`` there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Transform
from torch import nn

from metsflow.core import labels as lab
from metsflow.core.io import atomic_path, plain, remove_path, write_table
from metsflow.core.layout import LABEL, T1C
from metsflow.core.layout import PRIOR as PRIOR_IMAGE
from metsflow.core.runtime import seed_everything, select_device
from metsflow.core.settings import (
    OPTIMIZERS,
    TRAIN_SUBSECTIONS,
    ModelSettings,
    TrainingRun,
    TrainSettings,
    reseg_settings,
)
from metsflow.imaging.priors import RandFictitiousPriord
from metsflow.models.infer import sliding_window_predict
from metsflow.models.networks import (
    HARD_NEGATIVES,
    PRIOR,
    build_loss,
    build_network,
    check_channels,
    checkpoint_meta,
    encode_target,
    lesion_class_indices,
    load_checkpoint,
    load_study_input,
    network_spec,
    num_classes,
    save_checkpoint,
)

log = logging.getLogger(__name__)

# Columns of the training log (TSV) train_model writes.
LOG_COLUMNS = ["iteration", "loss", "lr", "val_dice", "seconds"]
RESUME_FORMAT = "metsflow-resume"
RESUME_FORMAT_VERSION = 1

# The knobs and their defaults are owned by metsflow.core.settings.TrainSettings.
DEFAULTS: dict[str, Any] = TrainSettings().as_dict()
POLY_POWER = 0.9


def resolve_params(params: dict | TrainingRun) -> TrainingRun:
    """The typed settings of ``params`` (a ``TrainingRun`` or its flat dict form; unknown keys
    refused, ``None`` = the default), channels and label mode checked."""
    run = TrainingRun.from_params(params)
    if run.train.optimizer not in OPTIMIZERS:  # the config schema's enum, for direct callers
        raise ValueError(
            f"unknown optimizer {run.train.optimizer!r}; use one of {list(OPTIMIZERS)}"
        )
    check_channels(run.model.channels)
    num_classes(run.model.label_mode)
    return run


def _settings(
    model: dict | ModelSettings, train: dict | TrainSettings, spacing: Sequence[float]
) -> TrainingRun:
    """``model`` and ``train`` (config sections, or their settings) at ``spacing``; the
    sub-sections of ``train`` configure other models."""
    if not isinstance(model, ModelSettings) or not isinstance(train, TrainSettings):
        model = model.as_dict() if isinstance(model, ModelSettings) else model
        train = train.as_dict() if isinstance(train, TrainSettings) else train
        flat = {**model, **{k: v for k, v in train.items() if k not in TRAIN_SUBSECTIONS}}
        run = TrainingRun.from_params({**flat, "spacing": spacing})
        model, train = run.model, run.train
    return TrainingRun(model, train, tuple(float(v) for v in spacing))


def training_params(
    model: dict | ModelSettings,
    train: dict | TrainSettings,
    spacing: Sequence[float],
    seed: int,
    round_index: int,
) -> TrainingRun:
    """Stage-1 training settings of round ``round_index`` from the ``model:``/``train:`` config:
    round r > 0 fine-tunes for ``finetune_iterations`` and is seeded ``seed + r``."""
    run = _settings(model, train, spacing)
    return resolve_params(dataclasses.replace(run, train=run.train.for_round(seed, round_index)))


def reseg_params(
    model: dict | ModelSettings, train: dict, spacing: Sequence[float], seed: int, round_index: int
) -> TrainingRun:
    """Training settings of the re-seg model: ``model``/``train`` with the ``train.reseg``
    overrides (``metsflow.core.settings.reseg_settings``: ``channels``, default T1c + prior + T2;
    ``iterations``, ``finetune_iterations`` and any other model or training key)."""
    run = _settings(model, train, spacing)
    reseg_model, reseg_train = reseg_settings(run.model, run.train, train.get("reseg"))
    return training_params(reseg_model, reseg_train, spacing, seed, round_index)


def build_items(
    plan: pd.DataFrame,
    ok_studies: set[str],
    prep_root: str | os.PathLike,
    reg_root: str | os.PathLike,
    extra_labels: dict[str, Path] | None = None,
    hard_negatives: dict[str, Path] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Training items (labelled seed studies + ``extra_labels``) and validation items (labelled
    validation studies) of the preprocessed studies in ``ok_studies``; a training study in
    ``hard_negatives`` (``hard_negatives_on_prep_grid``) carries its mask as ``hard_negatives``."""
    extra_labels, hard_negatives = extra_labels or {}, hard_negatives or {}
    train, val = [], []
    for row in plan.itertuples():
        if row.study_id not in ok_studies:
            continue
        prep_dir = Path(prep_root) / row.study_id
        prior = Path(reg_root) / row.study_id / PRIOR_IMAGE
        item = {
            "study_id": row.study_id,
            "prep_dir": str(prep_dir),
            "prior": str(prior) if prior.exists() else None,
        }
        if row.study_id in extra_labels:
            item["label"] = str(extra_labels[row.study_id])
            if row.study_id in hard_negatives:
                item[HARD_NEGATIVES] = str(hard_negatives[row.study_id])
            train.append(item)
        elif (prep_dir / LABEL).exists() and row.role in ("seed", "validation"):
            item["label"] = str(prep_dir / LABEL)
            (val if row.role == "validation" else train).append(item)
    return train, val


def confirmed_study_ids(annotation_table: str | os.PathLike) -> list[str]:
    """Study ids whose label a reviewer confirmed in one round's annotation table."""
    table = pd.read_csv(annotation_table, sep="\t", dtype=str, keep_default_na=False)
    return list(table.loc[table.status == "confirmed", "study_id"])


def confirmed_label_files(annotation_tables: Sequence[str], ok: set[str]) -> dict[str, str]:
    """Study id -> its confirmed human label file (native grid), for the studies in ``ok``; a
    study confirmed in several rounds' tables keeps the last one's."""
    labels: dict[str, str] = {}
    for table_path in annotation_tables:
        table = pd.read_csv(table_path, sep="\t", dtype=str, keep_default_na=False)
        for row in table.itertuples():
            if row.status == "confirmed" and row.study_id in ok:
                labels[row.study_id] = row.label
    return labels


def confirmed_labels_on_prep_grid(
    annotation_tables: Sequence[str], ok: set[str], prep_root: str | os.PathLike, out_dir: Path
) -> dict[str, Path]:
    """Confirmed human labels (native grid) of the studies in ``ok``, resampled onto each
    study's preprocessed grid as ``out_dir/<study_id>.nii.gz``; study id -> that file."""
    import nibabel as nib

    from metsflow.core.io import save_nifti
    from metsflow.imaging.grid import label_to_grid

    labels: dict[str, Path] = {}
    for study_id, label in confirmed_label_files(annotation_tables, ok).items():
        reference = Path(prep_root) / study_id / T1C
        target = out_dir / f"{study_id}.nii.gz"
        save_nifti(
            target,
            label_to_grid(label, reference),
            nib.load(str(reference)).affine,
            dtype=np.uint8,
        )
        labels[study_id] = target
    return labels


def hard_negatives_on_prep_grid(
    confirmed: dict[str, str | os.PathLike],
    presegmentations: dict[str, str | os.PathLike],
    prep_root: str | os.PathLike,
    out_dir: Path,
) -> dict[str, Path]:
    """Each confirmed study's hard negatives: the lesions of its presegmentation (the previous
    model's output the reviewer started from) that its confirmed label does not touch, i.e. the
    false positives a human deleted (``metsflow.models.sampling.false_positive_mask``), on the
    study's preprocessed grid as ``out_dir/<study_id>.nii.gz``; study id -> that file.

    ``confirmed``: study id -> confirmed label (native grid, ``confirmed_label_files``);
    ``presegmentations``: study id -> presegmentation (native grid). The components are found
    on the label's grid, where the reviewer decided, and only the mask is resampled: resampling
    both first could part a kept lesion from the label voxel it touched and make it a "hard
    negative". A study without a presegmentation, with an unreadable one, or with nothing
    deleted, has no hard negatives (no file, not in the result); training goes on."""
    import nibabel as nib

    from metsflow.core.io import StudyError, load_nifti, save_nifti
    from metsflow.imaging.grid import resample_nearest
    from metsflow.models.sampling import false_positive_mask

    found: dict[str, Path] = {}
    for study_id, label_path in confirmed.items():
        preseg_path = presegmentations.get(study_id)
        if preseg_path is None or not Path(preseg_path).is_file():
            continue
        try:
            label = load_nifti(label_path, study_id, "confirmed label")
            preseg = load_nifti(preseg_path, study_id, "presegmentation")
        except StudyError as exc:
            log.warning("%s: no hard negatives: %s", study_id, exc)
            continue
        predicted = np.asarray(preseg.dataobj).astype(np.uint8)
        if predicted.shape != label.shape or not np.allclose(
            preseg.affine, label.affine, atol=1e-3
        ):
            predicted = resample_nearest(predicted, preseg.affine, label.affine, label.shape)
        mask = false_positive_mask(
            lab.whole_lesion(predicted), lab.whole_lesion(np.asarray(label.dataobj))
        )
        if not mask.any():
            continue
        reference = nib.load(str(Path(prep_root) / study_id / T1C))
        on_prep = resample_nearest(
            mask.astype(np.uint8), label.affine, reference.affine, reference.shape[:3]
        )
        if not on_prep.any():  # deleted components smaller than a preprocessed voxel
            continue
        target = out_dir / f"{study_id}.nii.gz"
        save_nifti(target, on_prep > 0, reference.affine, dtype=np.uint8)
        found[study_id] = target
    return found


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class LoadStudy(Transform):
    """Deterministic loading (cached once): channels, encoded target, whole-lesion and brain.

    A MONAI ``Transform`` subclass: CacheDataset caches only up to the first transform that is
    random *or not a MONAI Transform*, so a plain callable here would re-read every study's
    files for every training sample."""

    def __init__(self, channels: Sequence[str], label_mode: str) -> None:
        self.channels = list(channels)
        self.label_mode = label_mode

    def __call__(self, item: dict) -> dict:
        inp = load_study_input(item, self.channels, with_label=True)
        out = {
            "study_id": str(item["study_id"]),
            "image": inp["image"],
            "label": encode_target(inp["label"], self.label_mode)[None],
            # Patch centres: "lesion" = enhancing + necrosis in both label modes (edema alone
            # does not make a patch a lesion patch); background centres stay inside the brain.
            "lesion": lab.whole_lesion(inp["label"])[None].astype(np.uint8),
            "brain": inp["brain"][None].astype(np.uint8),
        }
        if HARD_NEGATIVES in inp:
            out[HARD_NEGATIVES] = inp[HARD_NEGATIVES][None].astype(np.uint8)
        return out


def _cache_transform(
    channels, label_mode, patch_size, sampling: str = "pos_neg", hard_negatives: bool = False
):
    from monai.transforms import Compose, DeleteItemsd, FgBgToIndicesd, SpatialPadd

    from metsflow.models.sampling import LesionInstancesd

    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; use one of {list(SAMPLINGS)}")
    # "lesion" sampling, and either sampling with hard negatives (``_uses_lesion_crop``), reads
    # each lesion's voxels (metsflow.models.sampling); "pos_neg" alone the lesion / brain voxel
    # lists of RandCropByPosNegLabeld.
    indices = (
        LesionInstancesd("lesion", "brain", HARD_NEGATIVES)
        if sampling == "lesion" or hard_negatives
        else FgBgToIndicesd(keys="lesion", image_key="brain", image_threshold=0.0)
    )
    masks = ["lesion", "brain", HARD_NEGATIVES]  # the hard negatives only where a study has them
    return Compose(
        [
            LoadStudy(channels, label_mode),
            # A volume smaller than the patch is zero-padded (z-scored images: 0 = mean).
            SpatialPadd(
                keys=["image", "label", *masks], spatial_size=patch_size, allow_missing_keys=True
            ),
            indices,
            DeleteItemsd(keys=masks),
        ]
    )


SAMPLINGS = ("pos_neg", "lesion")


def _sample_transform(run: TrainingRun):
    """Random crop (lesion/brain balanced) and augmentation, applied per training sample."""
    from monai.transforms import (
        Compose,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandZoomd,
    )

    t = run.train
    keys = ["image", "label"]
    pos, neg = (float(v) for v in t.pos_neg_ratio)
    angle = math.radians(float(t.aug_rotate_degrees))
    zoom_min, zoom_max = (float(v) for v in t.aug_zoom_range)
    transforms = []
    channels = list(run.model.channels)
    has_prior = PRIOR in channels
    if has_prior:
        # The prior travels as its own key: spatially transformed like the label (nearest
        # neighbour, stays binary), untouched by intensity augmentation, put back at the end.
        transforms.append(SplitChanneld("image", "prior", channels.index(PRIOR)))
        if t.fictitious_prior:
            # Before cropping and spatial augmentation, so it moves with image and label.
            transforms.append(
                RandFictitiousPriord(
                    keys="prior",
                    label_key="label",
                    lesion_classes=lesion_class_indices(run.model.label_mode),
                )
            )
        keys = ["image", "label", "prior"]
    interp = ("bilinear", "nearest", "nearest") if has_prior else ("bilinear", "nearest")
    zoom_interp = ("trilinear", "nearest", "nearest") if has_prior else ("trilinear", "nearest")
    padding = ("border", "zeros", "zeros") if has_prior else ("border", "zeros")
    zoom_padding = ("edge", "constant", "constant") if has_prior else ("edge", "constant")
    if t.sampling == "lesion" or t.hard_negative_fraction > 0:
        from metsflow.models.sampling import VOXEL_UNIFORM, RandLesionCropd

        # With hard negatives, "pos_neg" keeps its positive draw (uniform over lesion voxels,
        # as RandCropByPosNegLabeld) in the one crop that can centre a negative on them; the
        # MONAI crop has no third kind of centre. (Its brain-centred negatives may then fall on
        # a lesion voxel, which MONAI's background list leaves out: a few % of the brain.)
        crop = RandLesionCropd(
            keys=keys,
            spatial_size=list(run.model.patch_size),
            pos=pos,
            neg=neg,
            size_power=float(t.lesion_size_power) if t.sampling == "lesion" else VOXEL_UNIFORM,
            hard_negative_fraction=float(t.hard_negative_fraction),
        )
    else:
        crop = RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=list(run.model.patch_size),
            pos=pos,
            neg=neg,
            num_samples=1,
            fg_indices_key="lesion_fg_indices",
            bg_indices_key="lesion_bg_indices",
        )
    transforms += [
        crop,
        RandRotated(
            keys=keys,
            range_x=angle,
            range_y=angle,
            range_z=angle,
            prob=float(t.aug_rotate_prob),
            mode=interp,
            padding_mode=padding,
        ),
        RandZoomd(
            keys=keys,
            prob=float(t.aug_zoom_prob),
            min_zoom=zoom_min,
            max_zoom=zoom_max,
            mode=zoom_interp,
            padding_mode=zoom_padding,
        ),
        RandScaleIntensityd(keys="image", factors=0.25, prob=float(t.aug_scale_intensity_prob)),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=float(t.aug_shift_intensity_prob)),
        RandGaussianNoised(keys="image", std=0.1, prob=float(t.aug_noise_prob)),
    ]
    transforms += [
        RandFlipd(keys=keys, prob=float(t.aug_flip_prob), spatial_axis=axis) for axis in range(3)
    ]
    if has_prior:
        transforms.append(InsertChanneld("image", "prior", channels.index(PRIOR)))
    return Compose(transforms)


class SplitChanneld(Transform):
    """Move channel ``index`` of ``key`` into its own key ``to`` (channel-first)."""

    def __init__(self, key: str, to: str, index: int) -> None:
        self.key, self.to, self.index = key, to, int(index)

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        image = np.asarray(out[self.key])
        out[self.to] = image[self.index : self.index + 1].copy()
        out[self.key] = np.delete(image, self.index, axis=0)
        return out


class InsertChanneld(Transform):
    """Inverse of ``SplitChanneld``: put key ``source`` back as channel ``index`` of ``key``."""

    def __init__(self, key: str, source: str, index: int) -> None:
        self.key, self.source, self.index = key, source, int(index)

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        image = torch.as_tensor(out[self.key])
        channel = torch.as_tensor(out.pop(self.source), dtype=image.dtype)
        out[self.key] = torch.cat([image[: self.index], channel, image[self.index :]], dim=0)
        return out


class PatchStream(torch.utils.data.Dataset):
    """Training samples ``first_sample, first_sample + 1, ...``; sample ``n`` is a pure function
    of ``(seed, n)`` and the cached studies (see the module docstring)."""

    def __init__(self, cache, transform, seed: int, first_sample: int, count: int) -> None:
        self.cache = cache
        self.transform = transform
        self.seed = int(seed)
        self.first_sample = int(first_sample)
        self.count = int(count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from monai.utils import convert_to_tensor

        rng = np.random.default_rng([self.seed, self.first_sample + index])
        study = self.cache[int(rng.integers(len(self.cache)))]
        self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        sample = self.transform(study)[0]  # the crop returns a list of num_samples=1 patches
        return {
            "image": convert_to_tensor(sample["image"], dtype=torch.float32, track_meta=False),
            "label": convert_to_tensor(sample["label"], dtype=torch.uint8, track_meta=False),
        }


def _cache(items, run: TrainingRun, patch_size, num_workers):
    from monai.data import CacheDataset

    transform = _cache_transform(
        run.model.channels,
        run.model.label_mode,
        patch_size,
        run.train.sampling,
        hard_negatives=run.train.hard_negative_fraction > 0,
    )
    return CacheDataset(
        list(items), transform=transform, cache_rate=1.0, num_workers=num_workers, progress=False
    )


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def validate(network: nn.Module, val_cache, run: TrainingRun, device: torch.device) -> float:
    """Mean whole-lesion Dice (enhancing + necrosis) over studies with a lesion (MONAI
    DiceMetric; studies without lesion in the reference are ignored). NaN if none has one."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, ignore_empty=True)
    lesion_classes = list(lesion_class_indices(run.model.label_mode))
    sw_params = {
        "patch_size": run.model.patch_size,
        "overlap": run.train.val_overlap,
        "sw_batch_size": run.train.sw_batch_size,
    }
    network.eval()
    for study in val_cache:
        image = torch.as_tensor(study["image"], dtype=torch.float32)
        probs = sliding_window_predict([network], image, sw_params, device)
        pred = np.isin(probs.argmax(0).numpy(), lesion_classes) & study["val_brain"]
        ref = np.isin(np.asarray(study["label"][0]), lesion_classes)
        onehot = [torch.from_numpy(np.stack([~m, m])[None]) for m in (pred, ref)]
        metric(y_pred=onehot[0], y=onehot[1])
    network.train()
    values = metric.get_buffer()
    if values is None:
        return float("nan")
    values = values.flatten()
    values = values[~torch.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


class LoadValStudy(LoadStudy):
    """Whole validation volume with its brain mask (predictions are restricted to the brain)."""

    def __call__(self, item: dict) -> dict:
        inp = load_study_input(item, self.channels, with_label=True)
        return {
            "study_id": str(item["study_id"]),
            "image": inp["image"],
            "label": encode_target(inp["label"], self.label_mode)[None],
            "val_brain": inp["brain"],
        }


# --------------------------------------------------------------------------------------------
# resume state
# --------------------------------------------------------------------------------------------
def resume_path(out_path: str | os.PathLike) -> Path:
    return Path(f"{out_path}.resume.pt")


def _fingerprint(run: TrainingRun, train_items, val_items, init_checkpoint) -> str:
    """Identifies a training run: a resume state from a different run is not used.

    Settings that cannot change the weights (loader workers, logging and checkpoint cadence)
    are left out, so e.g. a resubmission with more workers still resumes."""
    neutral = ("num_workers", "log_interval", "checkpoint_interval")
    key = {
        "params": plain({k: v for k, v in run.as_params().items() if k not in neutral}),
        "train": sorted(str(i["study_id"]) for i in train_items),
        "val": sorted(str(i["study_id"]) for i in val_items),
        "init": None if init_checkpoint is None else str(init_checkpoint),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _rng_states() -> dict:
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _load_resume(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file must not block a restart: start over instead
        log.warning("ignoring unreadable resume state %s: %s", path, exc)
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log.warning("ignoring %s: not a metsflow resume state", path)
        return None
    if (
        state.get("format_version") != RESUME_FORMAT_VERSION
        or state.get("fingerprint") != fingerprint
    ):
        log.warning("ignoring resume state %s: it belongs to a different training run", path)
        return None
    return state


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _optimizer(network: nn.Module, train: TrainSettings) -> torch.optim.Optimizer:
    lr, wd = train.lr, train.wd
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            network.parameters(), lr=lr, momentum=0.99, nesterov=True, weight_decay=wd
        )
    return torch.optim.Adam(network.parameters(), lr=lr, weight_decay=wd)


def _train_step(network, loss_fn, optimizer, scaler, batch, device, grad_clip) -> float:
    """One optimisation step; returns the loss. (Separate so tests can interrupt a run.)"""
    image = batch["image"].to(device, non_blocking=True)
    target = batch["label"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")
    with autocast:
        logits = network(image)
    # The loss in float32: softmax/log of float16 logits underflows for confident voxels.
    loss = loss_fn(logits.float(), target)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def train_model(
    train_items: Sequence[dict],
    val_items: Sequence[dict],
    params: TrainingRun | dict,
    out_path: str | os.PathLike,
    init_checkpoint: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    resume: bool = True,
) -> dict:
    """Train on ``train_items`` ({study_id, prep_dir, label, prior}) and write ``out_path``.

    ``init_checkpoint``: fine-tune from these weights (its architecture is kept; its channels and
    label mode must equal ``params``'; ``params``: a ``TrainingRun`` or its flat dict form).
    ``resume``: continue from ``<out_path>.resume.pt`` when
    it belongs to this run (same params, studies and init checkpoint).
    Returns ``{final_loss, best_val_dice, final_val_dice, iterations, resumed_from, seconds}``.
    """
    if not train_items:
        raise ValueError("no training studies")
    run = resolve_params(params)
    model, train = run.model, run.train
    out_path = Path(out_path)
    device = select_device(device) if isinstance(device, str) else device
    cuda = device.type == "cuda"
    seed = int(train.seed)
    seed_everything(seed)
    if cuda:
        # Seeded but not bit-reproducible on GPU: autotuned kernels are markedly faster.
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True

    finetuned_from = None
    if init_checkpoint is not None:
        network, init_meta = load_checkpoint(init_checkpoint, model.channels, model.label_mode)
        spec = init_meta["network"]
        if spec != network_spec(run):
            log.info("fine-tuning keeps the architecture of %s", init_checkpoint)
        finetuned_from = {
            "path": str(init_checkpoint),
            "iteration": init_meta.get("iteration"),
            "training_study_ids": init_meta.get("training_study_ids", []),
        }
    else:
        network = build_network(run)
        spec = network_spec(run)
    network.to(device).train()
    loss_fn = build_loss(run).to(device)
    optimizer = _optimizer(network, train)
    iterations = int(train.iterations)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(
        optimizer, total_iters=iterations, power=POLY_POWER
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    fingerprint = _fingerprint(run, train_items, val_items, init_checkpoint)
    state_file = resume_path(out_path)
    state = _load_resume(state_file, fingerprint) if resume else None
    start, best, elapsed, rows = 0, float("nan"), 0.0, []
    if state is not None:
        network.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, best, elapsed = state["iteration"], state["best_val_dice"], state["elapsed"]
        rows = list(state["log_rows"])
        log.info("resuming %s at iteration %d of %d", out_path, start, iterations)

    num_workers = train.num_workers
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if cuda else 0
    patch = [int(p) for p in model.patch_size]
    train_cache = _cache(train_items, run, patch, num_workers)
    val_cache = None
    # val_interval 0: no validation while training (the final weights are what is saved either
    # way; evaluate_round scores the model). Saves the validation cache and 12 s per validation
    # of the CPU demo.
    val_interval = int(train.val_interval)
    if val_items and val_interval > 0:
        from monai.data import CacheDataset

        val_cache = CacheDataset(
            list(val_items),
            transform=LoadValStudy(model.channels, model.label_mode),
            cache_rate=1.0,
            num_workers=num_workers,
            progress=False,
        )
    batch_size = int(train.batch_size)
    stream = PatchStream(
        train_cache,
        _sample_transform(run),
        seed,
        first_sample=start * batch_size,
        count=(iterations - start) * batch_size,
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=cuda,
        # Own generator: the loader's seed draw must not consume the global torch RNG, whose
        # state is part of the resume state.
        generator=torch.Generator().manual_seed(seed),
    )
    if state is not None:
        _set_rng_states(state["rng"])

    log_interval = int(train.log_interval)
    checkpoint_interval = int(train.checkpoint_interval)
    t0 = time.perf_counter() - elapsed
    recent: list[float] = []
    final_loss, val_dice = float("nan"), float("nan")
    iteration = start
    for batch in loader:
        lr = optimizer.param_groups[0]["lr"]
        loss = _train_step(network, loss_fn, optimizer, scaler, batch, device, train.grad_clip)
        scheduler.step()
        iteration += 1
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at iteration {iteration}")
        recent.append(loss)
        validate_now = val_cache is not None and (
            iteration % val_interval == 0 or iteration == iterations
        )
        if validate_now:
            val_dice = validate(network, val_cache, run, device)
            if math.isnan(best) or val_dice > best:
                best = val_dice
        if validate_now or iteration % log_interval == 0 or iteration == iterations:
            final_loss = float(np.mean(recent))
            row = {
                "iteration": iteration,
                "loss": round(final_loss, 6),
                "lr": lr,
                "val_dice": round(val_dice, 6) if validate_now else float("nan"),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            rows.append(row)
            recent = []
            log.info(
                "iteration %d/%d loss %.4f lr %.2e val_dice %s (%.0f s)",
                iteration,
                iterations,
                row["loss"],
                lr,
                f"{row['val_dice']:.4f}" if validate_now else "-",
                row["seconds"],
            )
            if log_path is not None:
                write_table(log_path, pd.DataFrame(rows))
        if iteration % checkpoint_interval == 0 and iteration < iterations:
            _save_resume(
                state_file,
                fingerprint,
                iteration,
                network,
                optimizer,
                scheduler,
                scaler,
                best,
                time.perf_counter() - t0,
                rows,
            )

    seconds = time.perf_counter() - t0
    meta = checkpoint_meta(
        run,
        iteration=iteration,
        seed=seed,
        training_study_ids=[str(i["study_id"]) for i in train_items],
        validation_study_ids=[str(i["study_id"]) for i in val_items],
        best_val_dice=None if math.isnan(best) else best,
        final_val_dice=None if math.isnan(val_dice) else val_dice,
        finetuned_from=finetuned_from,
    )
    meta["network"] = spec
    meta["arch"] = spec["arch"]
    save_checkpoint(out_path, network, meta)
    if log_path is not None:
        write_table(log_path, pd.DataFrame(rows, columns=LOG_COLUMNS))
    remove_path(state_file)
    return {
        "final_loss": final_loss,
        "best_val_dice": best,
        "final_val_dice": val_dice,
        "iterations": iteration,
        "resumed_from": start,
        "seconds": round(seconds, 2),
    }


def _save_resume(
    path, fingerprint, iteration, network, optimizer, scheduler, scaler, best, elapsed, rows
) -> None:
    state = {
        "format": RESUME_FORMAT,
        "format_version": RESUME_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "iteration": iteration,
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_states(),
        "best_val_dice": best,
        "elapsed": elapsed,
        "log_rows": plain(rows),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
