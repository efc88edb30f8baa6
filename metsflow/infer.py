"""Shard inference: load a (fold) ensemble once, segment many studies, score their uncertainty.

Per study ``predict_items`` writes into ``out_root/<study_id>/``:
    ``pred.nii.gz``     uint8 internal labels (0 bg, 1 enhancing, 2 edema, 3 necrosis; a
                        ``whole`` model writes 1 for lesion), zero outside the brain mask, on the
                        grid of ``prep_dir/t1c.nii.gz`` (same shape and affine).
    ``fg_prob.nii.gz``  float32 foreground probability ``1 - p(background)`` (ensemble mean),
                        zero outside the brain mask.
and returns one row per study with uncertainty scores for active learning. Entropies are the
predictive entropy of the ensemble/TTA-averaged softmax, normalised by log(number of classes) so
they lie in [0, 1] for both label modes:
    ``uncertainty_entropy``  mean entropy over the brain mask
    ``uncertainty_lesion``   mean entropy inside the predicted whole lesion (0.0 if none)
    ``lesion_entropies``     JSON list: max entropy of each predicted lesion (26-connected
                             components of enhancing + necrosis, in cc3d label order)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch
from scipy import ndimage
from torch import nn

from metsflow import labels as lab
from metsflow.io import StudyError, save_nifti
from metsflow.models import (
    check_meta,
    decode_classes,
    load_checkpoint,
    load_study_input,
)
from metsflow.runtime import select_device

log = logging.getLogger(__name__)

DEFAULT_OVERLAP = 0.5
DEFAULT_SW_BATCH_SIZE = 4
# Keys of a network's meta that every member of an ensemble must share: averaging softmax over
# models that read different channels, predict different classes or expect a different grid
# would silently produce garbage.
_ENSEMBLE_KEYS = ("channels", "label_mode", "num_classes", "spacing", "patch_size")


def load_ensemble(
    checkpoint_paths: Sequence[str | os.PathLike],
    expect_channels: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    expect_label_mode: str | None = None,
) -> tuple[list[nn.Module], dict]:
    """Load fold checkpoints onto ``device``; return ``(networks, meta of the first)``.

    Raises ValueError if the checkpoints disagree on channels, label mode, classes, spacing or
    patch size, or do not match ``expect_channels`` / ``expect_label_mode``.
    """
    if isinstance(checkpoint_paths, str | os.PathLike):
        checkpoint_paths = [checkpoint_paths]
    if not checkpoint_paths:
        raise ValueError("no checkpoints given")
    device = select_device(device) if isinstance(device, str) else device
    networks, metas = [], []
    for path in checkpoint_paths:
        network, meta = load_checkpoint(
            path, expect_channels, expect_label_mode, map_location="cpu"
        )
        networks.append(network.to(device).eval())
        metas.append(meta)
    for key in _ENSEMBLE_KEYS:
        values = {json.dumps(m[key]) for m in metas}
        if len(values) > 1:
            raise ValueError(
                f"ensemble checkpoints disagree on {key}: "
                + ", ".join(f"{p}={m[key]}" for p, m in zip(checkpoint_paths, metas, strict=True))
            )
    return networks, metas[0]


def _autocast(device: torch.device):
    # Mixed precision only on CUDA: CPU autocast (bfloat16) is slower than float32 on most CPUs.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def sliding_window_predict(
    networks: nn.Module | Sequence[nn.Module],
    image: torch.Tensor,
    params: dict,
    device: str | torch.device = "auto",
) -> torch.Tensor:
    """Class probabilities ``(C, X, Y, Z)`` (float32, CPU) for one channels-first image.

    Sliding window with roi ``params["patch_size"]``, ``overlap`` (default 0.5),
    ``sw_batch_size`` (default 4) and Gaussian blending; with ``tta`` the softmax is averaged
    over all 8 combinations of mirroring the 3 spatial axes; then averaged over ``networks``.
    """
    return ensemble_predict(networks, image, params, device)[0]


def ensemble_predict(
    networks: nn.Module | Sequence[nn.Module],
    image: torch.Tensor,
    params: dict,
    device: str | torch.device = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sliding_window_predict``'s probabilities and, for more than one network, the mean of
    the members' normalised entropies ``(X, Y, Z)`` (each member's softmax averaged over its
    TTA flips first). Entropy of the mean minus this mean is the members' disagreement (the
    mutual information of the fold ensemble); None for a single network."""
    from monai.inferers import SlidingWindowInferer

    if isinstance(networks, nn.Module):
        networks = [networks]
    device = select_device(device) if isinstance(device, str) else device
    if "patch_size" not in params:
        raise ValueError("sliding_window_predict needs params['patch_size'] (the roi size)")
    inferer = SlidingWindowInferer(
        roi_size=[int(p) for p in params["patch_size"]],
        sw_batch_size=int(params.get("sw_batch_size", DEFAULT_SW_BATCH_SIZE)),
        overlap=float(params.get("overlap", DEFAULT_OVERLAP)),
        mode="gaussian",
        sw_device=device,
        device=device,
    )
    flips: list[tuple[int, ...]] = [()]
    if params.get("tta", False):
        flips = [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)]
    batch = image.unsqueeze(0) if image.ndim == 4 else image
    batch = batch.to(device=device, dtype=torch.float32)
    total, member_entropy = None, None
    with torch.inference_mode(), _autocast(device):
        for network in networks:
            network.eval()
            member = None
            for axes in flips:
                inp = torch.flip(batch, axes) if axes else batch
                logits = inferer(inp, network)
                probs = torch.softmax(logits.float(), dim=1)
                if axes:
                    probs = torch.flip(probs, axes)
                member = probs if member is None else member + probs
            member = member / len(flips)
            total = member if total is None else total + member
            if len(networks) > 1:
                entropy = normalised_entropy(member[0].float().cpu().numpy())
                member_entropy = entropy if member_entropy is None else member_entropy + entropy
        total = total / len(networks)
    if member_entropy is not None:
        member_entropy = torch.from_numpy(member_entropy / len(networks))
    return total[0].float().cpu(), member_entropy


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy of ``probs`` (C, ...) divided by log(C): 0 certain, 1 uniform."""
    p = np.clip(probs, 1e-8, 1.0)
    return (-(p * np.log(p)).sum(axis=0) / math.log(probs.shape[0])).astype(np.float32)


def uncertainty_scores(
    probs: np.ndarray, pred: np.ndarray, brain: np.ndarray, voxel_mm3: float
) -> dict[str, Any]:
    """Study-level uncertainty and lesion summary from probabilities and internal labels."""
    entropy = normalised_entropy(probs)
    lesion = lab.whole_lesion(pred)
    components, count = cc3d.connected_components(lesion, connectivity=26, return_N=True)
    per_lesion = (
        ndimage.maximum(entropy, components, index=np.arange(1, count + 1)) if count else []
    )
    return {
        "uncertainty_entropy": float(entropy[brain].mean()),
        "uncertainty_lesion": float(entropy[lesion].mean()) if lesion.any() else 0.0,
        "lesion_entropies": json.dumps([round(float(v), 5) for v in np.atleast_1d(per_lesion)]),
        "lesion_count": int(count),
        "lesion_volume_mm3": float(lesion.sum() * voxel_mm3),
    }


def stage1_probabilities(
    networks: Sequence[nn.Module],
    meta: dict,
    item: dict,
    params: dict,
    device: torch.device,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Read one study's input and segment it: ``(input, probs (C, ...), internal labels)``.

    Labels and probabilities are zero (background) outside the brain mask."""
    study_id = str(item["study_id"])
    inp = load_study_input(item, meta["channels"])
    brain = inp["brain"]
    if not brain.any():
        raise StudyError(
            study_id, "brain mask is empty", Path(item["prep_dir"]) / "brain_mask.nii.gz"
        )
    sw_params = {**params, "patch_size": meta["patch_size"]}
    probs, member_entropy = ensemble_predict(
        networks, torch.from_numpy(inp["image"]), sw_params, device
    )
    probs = probs.numpy()
    if member_entropy is not None:
        inp["member_entropy"] = member_entropy.numpy()
    classes = probs.argmax(axis=0)
    classes[~brain] = 0
    return inp, probs, decode_classes(classes, meta["label_mode"])


def foreground_probability(probs: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``1 - p(background)``, zero outside the brain (float32)."""
    fg_prob = (1.0 - probs[0]).astype(np.float32)
    fg_prob[~brain] = 0.0
    return fg_prob


# Post-processing hook of predict_study: (item, input, probs, labels) -> (labels, extra row
# fields); the cascade's stage 2 and the follow-up re-segmentation merge plug in here.
PostProcess = Callable[[dict, dict, np.ndarray, np.ndarray], tuple[np.ndarray, dict]]


def predict_study(
    networks: Sequence[nn.Module],
    meta: dict,
    item: dict,
    out_root: str | os.PathLike,
    params: dict,
    device: torch.device,
    postprocess: PostProcess | None = None,
) -> dict[str, Any]:
    """Segment one study with a loaded ensemble, write its outputs, return its row."""
    study_id = str(item["study_id"])
    start = time.perf_counter()
    inp, probs, pred = stage1_probabilities(networks, meta, item, params, device)
    brain = inp["brain"]
    extra: dict[str, Any] = {}
    if postprocess is not None:
        pred, extra = postprocess(item, inp, probs, pred)
        pred[~brain] = 0
    fg_prob = foreground_probability(probs, brain)

    affine = inp["affine"]
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    out_dir = Path(out_root) / study_id
    save_nifti(out_dir / "pred.nii.gz", pred, affine, dtype=np.uint8)
    save_nifti(out_dir / "fg_prob.nii.gz", fg_prob, affine, dtype=np.float32)
    row = {"study_id": study_id, **uncertainty_scores(probs, pred, brain, voxel_mm3), **extra}
    if "member_entropy" in inp:
        # Fold-ensemble disagreement: mutual information = entropy of the mean - mean entropy.
        disagreement = normalised_entropy(probs) - inp["member_entropy"]
        row["uncertainty_disagreement"] = float(disagreement[brain].mean())
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def predict_items(
    checkpoints: Sequence[str | os.PathLike] | tuple[list[nn.Module], dict],
    items: Sequence[dict],
    out_root: str | os.PathLike,
    params: dict,
    device: str | torch.device = "auto",
    on_error: Callable[[StudyError], None] | None = None,
) -> list[dict]:
    """Segment ``items`` ({study_id, prep_dir, prior: path|None}) with the model(s) loaded once.

    ``checkpoints``: checkpoint paths (a fold ensemble) or the ``(networks, meta)`` returned by
    ``load_ensemble``. ``params``: ``overlap``, ``sw_batch_size``, ``tta``, optionally
    ``channels`` / ``label_mode`` to check the checkpoints against. A failing study raises
    ``StudyError`` naming it; with ``on_error`` the error is handed to it instead and the
    remaining studies go on (the row is then missing from the result).
    """
    device = select_device(device) if isinstance(device, str) else device
    if (
        isinstance(checkpoints, tuple)
        and len(checkpoints) == 2
        and isinstance(checkpoints[1], dict)
    ):
        networks, meta = checkpoints
        networks = [n.to(device).eval() for n in networks]
        check_meta(meta, params.get("channels"), params.get("label_mode"))
    else:
        networks, meta = load_ensemble(
            checkpoints, params.get("channels"), device, params.get("label_mode")
        )
    rows = []
    for item in items:
        study_id = str(item["study_id"])
        try:
            row = predict_study(networks, meta, item, out_root, params, device)
        except StudyError as exc:
            if on_error is None:
                raise
            on_error(exc)
            continue
        except (RuntimeError, ValueError, OSError) as exc:
            # Anything else that goes wrong with one study's data (odd shapes, unreadable
            # files, out of memory on a huge volume) is reported against that study.
            err = StudyError(
                study_id, f"inference failed: {type(exc).__name__}: {exc}", item.get("prep_dir")
            )
            if on_error is None:
                raise err from exc
            on_error(err)
            continue
        log.info(
            "%s: %d lesion(s), %.0f mm3, entropy %.4f, %.1f s",
            study_id,
            row["lesion_count"],
            row["lesion_volume_mm3"],
            row["uncertainty_entropy"],
            row["seconds"],
        )
        rows.append(row)
    return rows
