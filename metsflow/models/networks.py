"""Segmentation networks, losses, the network input contract and checkpoints.

Input channels (``ModelSettings.channels``, in this order on the channel axis):
    ``t1c``, ``t1``, ``t2``, ``flair``  preprocessed sequences from the study's ``prep_dir``
                                        (z-scored inside the brain); a sequence the study lacks is
                                        an all-zero channel, i.e. "average intensity" after z-scoring.
    ``prior``                           binary whole-lesion prior of a follow-up: 1 where the
                                        propagated previous-study label is enhancing (1) or
                                        necrosis (3), 0 elsewhere; all zeros when there is no prior.

Label modes (the network's output classes):
    ``multiclass``  4 outputs: internal labels 0 background, 1 enhancing, 2 edema, 3 necrosis.
    ``whole``       2 outputs: 0 background (edema included), 1 whole lesion (enhancing + necrosis).

A checkpoint is a ``torch.save`` of ``{"format", "format_version", "state_dict", "meta"}`` whose
metadata holds plain Python types only, so it loads with ``torch.load(weights_only=True)`` (no
arbitrary code runs when reading a checkpoint someone handed over). ``meta["network"]`` is the
exact constructor spec, so loading never re-derives the architecture from defaults that may have
changed since training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metsflow import __version__ as METSFLOW_VERSION
from metsflow.core import labels as lab
from metsflow.core.io import StudyError, atomic_path, load_nifti, plain
from metsflow.core.layout import BRAIN_MASK, LABEL, T1C, sequence_image
from metsflow.core.netplan import SEGRESNET_STRIDE, dynunet_plan
from metsflow.core.sequences import SEQUENCES
from metsflow.core.settings import ModelSettings, PreprocessSettings, TrainingRun, split_overrides

log = logging.getLogger(__name__)

PRIOR = "prior"
# Optional key of a training item: its hard-negative mask (metsflow.models.sampling).
HARD_NEGATIVES = "hard_negatives"
CHANNELS = (*SEQUENCES, PRIOR)
LABEL_MODES = {"multiclass": 4, "whole": 2}
ARCHS = ("dynunet", "segresnet")
LOSSES = ("dice_ce", "tversky_bce")

# The model section's defaults are owned by metsflow.core.settings.ModelSettings; the grid spacing's
# by PreprocessSettings.
MODEL_DEFAULTS: dict[str, Any] = ModelSettings.defaults()
DEFAULT_SPACING = tuple(PreprocessSettings().spacing)

CHECKPOINT_FORMAT = "metsflow-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
NORMALISATION = "zscore-brain"

# Tversky weights: beta > alpha penalises false negatives more, which favours recall of the many
# small metastases (a missed lesion costs more clinically than a few false-positive voxels).
TVERSKY_ALPHA = 0.3
TVERSKY_BETA = 0.7
BCE_POS_WEIGHT = 10.0


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def check_channels(channels: Sequence[str]) -> list[str]:
    channels = list(channels)
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown or not channels or len(set(channels)) != len(channels):
        raise ValueError(
            f"model channels {channels} invalid: use unique names from {list(CHANNELS)}"
        )
    return channels


def num_classes(label_mode: str) -> int:
    if label_mode not in LABEL_MODES:
        raise ValueError(f"unknown label_mode {label_mode!r}; use one of {list(LABEL_MODES)}")
    return LABEL_MODES[label_mode]


def _triple(value: Any, name: str, cast=float) -> list:
    values = [value] * 3 if np.isscalar(value) else list(value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values, got {value!r}")
    return [cast(v) for v in values]


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------
ModelLike = TrainingRun | ModelSettings | Mapping[str, Any]


def model_settings(params: ModelLike) -> tuple[ModelSettings, list[float]]:
    """The network's settings and grid spacing of ``params``: a ``TrainingRun``, a
    ``ModelSettings`` (``DEFAULT_SPACING``), or a flat dict of model keys and ``spacing`` (other
    keys ignored; a missing or ``None`` key takes its ``MODEL_DEFAULTS`` value)."""
    if isinstance(params, TrainingRun):
        return params.model, _triple(params.spacing, "spacing")
    if isinstance(params, ModelSettings):
        return params, list(DEFAULT_SPACING)
    values = {k: v for k, v in params.items() if v is not None}
    spacing = _triple(values.get("spacing", DEFAULT_SPACING), "spacing")
    return ModelSettings.from_dict(split_overrides(values)[0]), spacing


def model_params(params: ModelLike) -> dict:
    """``params`` completed with the ``model`` section's defaults (a ``None`` value = default)."""
    model, spacing = model_settings(params)
    return {**model.as_dict(), "spacing": spacing}


def network_spec(params: ModelLike) -> dict:
    """The exact network constructor arguments (plain types) for ``params`` (``model_settings``):
    ``arch`` (dynunet|segresnet), ``channels``, ``label_mode``, ``patch_size``, the spacing,
    ``filters`` (dynunet), ``init_filters`` (segresnet), ``dropout``, ``res_block``.
    """
    model, spacing = model_settings(params)
    for key in ("channels", "patch_size"):
        if getattr(model, key) is None:
            raise ValueError(f"model settings lack {key!r}")
    arch = model.arch
    in_channels = len(check_channels(model.channels))
    out_channels = num_classes(model.label_mode)
    patch = _triple(model.patch_size, "patch_size", int)
    if arch == "dynunet":
        filters = [int(f) for f in model.filters]
        kernels, strides = dynunet_plan(patch, spacing, max_levels=len(filters))
        if len(strides) < len(filters):
            log.info(
                "patch %s supports %d resolution levels: using filters %s of %s",
                patch,
                len(strides),
                filters[: len(strides)],
                filters,
            )
        kwargs = {
            "spatial_dims": 3,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "kernel_size": kernels,
            "strides": strides,
            "upsample_kernel_size": strides[1:],
            "filters": filters[: len(strides)],
            "dropout": model.dropout,
            # Deep supervision is off: it changes the training output to a stacked tensor and
            # needs per-scale targets; on the small patches used here it buys little.
            "deep_supervision": False,
            "res_block": bool(model.res_block),
        }
    elif arch == "segresnet":
        kwargs = {
            "spatial_dims": 3,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "init_filters": int(model.init_filters),
            "blocks_down": [1, 2, 2, 4],
            "blocks_up": [1, 1, 1],
            "dropout_prob": model.dropout,
        }
        # SegResNet downsamples 3 times.
        if any(p % SEGRESNET_STRIDE for p in patch):
            raise ValueError(
                f"segresnet needs a patch size divisible by {SEGRESNET_STRIDE}, got {patch}"
            )
    else:
        raise ValueError(f"unknown arch {arch!r}; use one of {list(ARCHS)}")
    return {"arch": arch, "kwargs": kwargs}


def network_from_spec(spec: dict) -> nn.Module:
    from monai.networks.nets import DynUNet, SegResNet

    kwargs = dict(spec["kwargs"])
    if spec["arch"] == "dynunet":
        return DynUNet(**kwargs)
    if spec["arch"] == "segresnet":
        kwargs["blocks_down"] = tuple(kwargs["blocks_down"])
        kwargs["blocks_up"] = tuple(kwargs["blocks_up"])
        return SegResNet(**kwargs)
    raise ValueError(f"unknown arch {spec['arch']!r}; use one of {list(ARCHS)}")


def build_network(params: ModelLike) -> nn.Module:
    """MONAI DynUNet (nnU-Net-like) or SegResNet for ``params`` (see ``network_spec``)."""
    return network_from_spec(network_spec(params))


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
class TverskyBCELoss(nn.Module):
    """Tversky (alpha 0.3, beta 0.7) + foreground BCE (pos_weight 10), weighted 1:1.

    Multi-class output: the Tversky term is MONAI's TverskyLoss on the softmax, one-hot target,
    background excluded, averaged over the foreground classes. The BCE term scores the
    *foreground vs background* decision: its logit is the log-odds of 1 - p(background) under the
    same softmax, ``logsumexp(foreground logits) - background logit``, against ``target > 0``.
    For two classes this is exactly the lesion logit minus the background logit. pos_weight 10
    counters the ~1000:1 background:lesion voxel imbalance of brain metastases.
    """

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import TverskyLoss

        self.tversky = TverskyLoss(
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            alpha=TVERSKY_ALPHA,
            beta=TVERSKY_BETA,
            batch=True,
        )
        self.bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(BCE_POS_WEIGHT))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fg_logit = torch.logsumexp(logits[:, 1:], dim=1, keepdim=True) - logits[:, :1]
        fg_target = (target > 0).to(fg_logit.dtype)
        return self.tversky(logits, target) + self.bce(fg_logit, fg_target)


class NestedRegionDiceLoss(nn.Module):
    """``base(logits, target)`` plus a soft Dice on nested label *regions* of the same softmax.

    A region's probability is the sum of its classes' softmax probabilities: the whole lesion
    (enhancing + necrosis) and the whole abnormality (+ edema). Why: with per-class terms only,
    a multi-class network first finds the lesion blob and parks all of it in one class (here
    edema, whose outline is the largest); leaving that partial optimum takes hundreds of
    iterations more (on the CPU demo: validation lesion Dice 0.00 at 400 iterations, 0.28 at
    500). The region terms reward "lesion vs not" directly, as nnU-Net's region training does
    for the nested BraTS labels, while the output stays one softmax over the three labels.
    Batch Dice over the whole batch, as for the class terms."""

    def __init__(self, base: nn.Module, regions: Sequence[Sequence[int]], weight: float = 1.0):
        super().__init__()
        self.base = base
        self.regions = [tuple(int(c) for c in r) for r in regions]
        self.weight = float(weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.base(logits, target)
        if not self.regions or self.weight == 0:
            return loss
        probs = torch.softmax(logits, dim=1)
        reduce = [0, *range(2, logits.ndim)]
        terms = []
        for region in self.regions:
            p = probs[:, list(region)].sum(1, keepdim=True)
            t = torch.isin(target, torch.tensor(region, device=target.device)).to(p.dtype)
            intersection = (p * t).sum(reduce)
            denominator = p.sum(reduce) + t.sum(reduce)
            terms.append(1 - (2 * intersection + 1e-5) / (denominator + 1e-5))
        return loss + self.weight * torch.stack(terms).mean()


def nested_regions(label_mode: str) -> list[tuple[int, ...]]:
    """Nested regions of ``label_mode``'s classes (none when there is one lesion class)."""
    if num_classes(label_mode) == 2:
        return []
    return [lab.INTERNAL_GROUPS["whole_lesion"], (lab.ENHANCING, lab.EDEMA, lab.NECROSIS)]


class InstanceDiceLoss(nn.Module):
    """``base(logits, target)`` plus ``weight`` x the mean over reference lesions of a soft
    Dice computed per lesion (blob loss, Kofler et al. 2023; CC-DiceCE).

    Why: batch Dice and CE are sums over voxels, so a missed 8-voxel lesion costs ~1/500 of a
    missed 4,000-voxel one. Here each 26-connected component of the reference whole lesion
    (``lesion_classes``) has its own Dice term, computed on the foreground probability
    (1 - p(background)) over the patch *minus the other lesions* (a prediction on another
    lesion is not a false positive of this one), and the terms are averaged, so every lesion
    counts alike. A batch without lesion adds nothing. Components come from
    ``labels.lesion_components`` on the CPU target (a 2x48^3 batch: ~2 ms)."""

    def __init__(self, base: nn.Module, lesion_classes: Sequence[int], weight: float = 1.0):
        super().__init__()
        self.base = base
        self.lesion_classes = tuple(int(c) for c in lesion_classes)
        self.weight = float(weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.base(logits, target)
        if self.weight == 0:
            return loss
        fg = 1 - torch.softmax(logits, dim=1)[:, 0]
        lesion = np.isin(target[:, 0].detach().cpu().numpy(), self.lesion_classes)
        terms = []
        for b in range(lesion.shape[0]):
            components, count = lab.lesion_components(lesion[b])
            if not count:
                continue
            comp = torch.from_numpy(components.astype(np.int64)).to(logits.device)
            for k in range(1, count + 1):
                mine = comp == k
                region = mine | (comp == 0)
                p = fg[b][region]
                t = mine[region].to(p.dtype)
                terms.append(1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5))
        if not terms:
            return loss
        return loss + self.weight * torch.stack(terms).mean()


def build_loss(params: ModelLike, instance_loss_weight: float | None = None) -> nn.Module:
    """``dice_ce``: MONAI DiceCELoss (softmax, one-hot target, Dice over foreground classes with
    batch Dice as nnU-Net does, so patches without lesion do not give a degenerate Dice);
    ``tversky_bce``: ``TverskyBCELoss``. Called as ``loss(logits, target)`` with target
    ``(B, 1, X, Y, Z)`` holding class indices (see ``encode_target``)."""
    model = model_settings(params)[0]
    name = model.loss
    if name == "dice_ce":
        from monai.losses import DiceCELoss

        base = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    elif name == "tversky_bce":
        base = TverskyBCELoss()
    else:
        raise ValueError(f"unknown loss {name!r}; use one of {list(LOSSES)}")
    weight = float(model.region_loss_weight)
    regions = nested_regions(model.label_mode)
    loss = base if weight == 0 or not regions else NestedRegionDiceLoss(base, regions, weight)
    # A training key (TrainSettings.instance_loss_weight), not a model one: read from a
    # TrainingRun, or given; None/0 = off.
    if instance_loss_weight is None and isinstance(params, TrainingRun):
        instance_loss_weight = params.train.instance_loss_weight
    instance_weight = float(instance_loss_weight or 0.0)
    if instance_weight > 0:
        loss = InstanceDiceLoss(loss, lesion_class_indices(model.label_mode), instance_weight)
    return loss


# --------------------------------------------------------------------------------------------
# labels <-> classes
# --------------------------------------------------------------------------------------------
def encode_target(label: np.ndarray, label_mode: str) -> np.ndarray:
    """Internal labels -> class indices of ``label_mode`` (uint8)."""
    num_classes(label_mode)
    if label_mode == "whole":
        return lab.whole_lesion(label).astype(np.uint8)
    return np.asarray(label, dtype=np.uint8)


def decode_classes(classes: np.ndarray, label_mode: str) -> np.ndarray:
    """Class indices -> internal labels (uint8); ``whole`` gives 1 for lesion."""
    num_classes(label_mode)
    # Both modes already use internal values: "whole" class 1 is written as label 1.
    return np.asarray(classes, dtype=np.uint8)


def lesion_class_indices(label_mode: str) -> tuple[int, ...]:
    """Output classes that make up the whole lesion (enhancing + necrosis)."""
    return (1,) if num_classes(label_mode) == 2 else lab.INTERNAL_GROUPS["whole_lesion"]


# --------------------------------------------------------------------------------------------
# reading a study's network input
# --------------------------------------------------------------------------------------------
def load_study_input(
    item: dict, channels: Sequence[str], with_label: bool = False
) -> dict[str, Any]:
    """Read one study's network input from its ``prep_dir``.

    Returns ``image`` (float32, channels-first), ``brain`` (bool), ``affine`` and ``header`` of
    ``t1c.nii.gz`` (the grid every output is written on) and, with ``with_label``, ``label``
    (uint8 internal labels) and, when the item names one (``hard_negatives``: a training study's
    hard-negative mask, ``metsflow.models.sampling``), ``hard_negatives`` (bool). Raises
    ``StudyError`` naming the study for any bad input.
    """
    study_id = str(item["study_id"])
    prep = Path(item["prep_dir"])
    ref = load_nifti(prep / T1C, study_id, "t1c")
    shape = ref.shape

    def on_grid(path: Path, what: str) -> np.ndarray:
        img = ref if what == "t1c" else load_nifti(path, study_id, what)
        if img.shape != shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise StudyError(
                study_id, f"{what} is not on the t1c grid ({img.shape} vs {shape})", path
            )
        return np.asanyarray(img.dataobj)

    image = np.zeros((len(channels), *shape), dtype=np.float32)
    for index, name in enumerate(check_channels(channels)):
        if name == PRIOR:
            prior = item.get("prior")
            if prior:
                image[index] = lab.whole_lesion(
                    _checked_labels(on_grid(Path(prior), "prior"), study_id, prior)
                )
        elif (prep / sequence_image(name)).exists() or name == "t1c":
            image[index] = on_grid(prep / sequence_image(name), name)
        # else: the study lacks this sequence -> zero channel (documented in the module docstring)

    mask_path = prep / BRAIN_MASK
    if mask_path.exists():
        brain = on_grid(mask_path, "brain mask") > 0
    else:
        log.warning("study %s has no brain_mask.nii.gz: using the whole volume", study_id)
        brain = np.ones(shape, dtype=bool)
    out = {"image": image, "brain": brain, "affine": ref.affine, "header": ref.header}
    if with_label:
        path = item.get("label") or prep / LABEL
        out["label"] = _checked_labels(on_grid(Path(path), "label"), study_id, path)
        if item.get(HARD_NEGATIVES):
            out[HARD_NEGATIVES] = on_grid(Path(item[HARD_NEGATIVES]), "hard negatives") > 0
    return out


def _checked_labels(data: np.ndarray, study_id: str, path) -> np.ndarray:
    values = np.unique(data)
    if np.any(values != np.round(values)) or values.min() < 0 or values.max() > lab.NECROSIS:
        raise StudyError(
            study_id, f"label values {values[:10].tolist()} are not internal labels 0-3", path
        )
    return data.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def checkpoint_meta(params: ModelLike, **extra: Any) -> dict:
    """Metadata describing a network trained with ``params`` (plain types only; ``params`` is
    kept in its flat dict form)."""
    import monai

    model, spacing = model_settings(params)
    if isinstance(params, TrainingRun):
        params = params.as_params()
    elif isinstance(params, ModelSettings):
        params = params.as_dict()
    meta = {
        "network": network_spec(params),
        "arch": model.arch,
        "channels": check_channels(model.channels),
        "label_mode": model.label_mode,
        "label_convention": "internal",
        "num_classes": num_classes(model.label_mode),
        "patch_size": _triple(model.patch_size, "patch_size", int),
        "spacing": spacing,
        "normalisation": NORMALISATION,
        "versions": {
            "metsflow": METSFLOW_VERSION,
            "torch": torch.__version__,
            "monai": monai.__version__,
        },
        "params": params,
    }
    meta.update(extra)
    return plain(meta)


_REQUIRED_META = ("network", "channels", "label_mode", "num_classes", "patch_size", "spacing")


def save_checkpoint(path: str | os.PathLike, network: nn.Module, meta: dict) -> None:
    """Write ``network``'s weights and ``meta`` (see ``checkpoint_meta``) atomically."""
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}; build it with checkpoint_meta()")
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": state,
        "meta": plain(meta),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint file safely (``weights_only=True``) and check it is a metsflow one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises unpickling/zip errors of several types
        raise ValueError(f"{path} is not a metsflow checkpoint (unreadable: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a metsflow checkpoint (no {CHECKPOINT_FORMAT!r} tag)")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {payload.get('format_version')} is not "
            f"supported (this metsflow reads version {CHECKPOINT_FORMAT_VERSION})"
        )
    return payload


def check_meta(
    meta: dict,
    expect_channels: Sequence[str] | None,
    expect_label_mode: str | None,
    source: Any = "checkpoint",
) -> None:
    """Raise ValueError if ``meta`` does not match the caller's channels / label mode."""
    if expect_channels is not None and list(meta["channels"]) != list(expect_channels):
        raise ValueError(
            f"{source} was trained on channels {meta['channels']}, but channels "
            f"{list(expect_channels)} were asked for (order matters)"
        )
    if expect_label_mode is not None and meta["label_mode"] != expect_label_mode:
        raise ValueError(
            f"{source} predicts label_mode {meta['label_mode']!r}, but "
            f"{expect_label_mode!r} was asked for"
        )
    if meta.get("label_convention", "internal") != "internal":
        raise ValueError(f"{source} uses label convention {meta['label_convention']!r}")


def init_checkpoint_problems(path: str | os.PathLike, model: ModelLike) -> list[str]:
    """Why the checkpoint at ``path`` cannot start round 0 of a run whose ``model`` section is
    ``model`` (empty: it can): unreadable, or other channels, label mode or patch size (the
    checks fine-tuning makes, ``check_meta``; a different patch size would make the network
    see another context than it learned). One line each, naming the file."""
    try:
        meta = read_checkpoint(path)["meta"]
    except (OSError, ValueError) as exc:
        return [f"train.init_checkpoint: {exc}"]
    settings = model_settings(model)[0]
    found = []
    for key, want in (
        ("channels", check_channels(settings.channels)),
        ("label_mode", settings.label_mode),
        ("patch_size", _triple(settings.patch_size, "patch_size", int)),
    ):
        have = meta.get(key)
        if have is None or list(np.atleast_1d(have)) != list(np.atleast_1d(want)):
            found.append(
                f"train.init_checkpoint {path}: its {key} is {have}, but the model section "
                f"asks for {want}"
            )
    return found


def load_checkpoint(
    path: str | os.PathLike,
    expect_channels: Sequence[str] | None = None,
    expect_label_mode: str | None = None,
    map_location: Any = "cpu",
) -> tuple[nn.Module, dict]:
    """Rebuild the network from a checkpoint (eval mode) and return ``(network, meta)``."""
    payload = read_checkpoint(path, map_location)
    meta = payload["meta"]
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path} is not a metsflow checkpoint (meta lacks {missing})")
    check_meta(meta, expect_channels, expect_label_mode, source=f"checkpoint {path}")
    network = network_from_spec(meta["network"])
    network.load_state_dict(payload["state_dict"])
    network.eval()
    return network, meta
