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
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metsflow.core import labels as lab
from metsflow.core.io import StudyError, save_nifti, write_json
from metsflow.core.layout import BRAIN_MASK, FG_PROB, PRED, SUGGESTIONS, SUGGESTIONS_TABLE
from metsflow.core.runtime import compiler_follows_determinism, reuse_freed_memory, select_device
from metsflow.core.settings import InferRun, tta_flips
from metsflow.models.networks import (
    check_meta,
    decode_classes,
    load_checkpoint,
    load_study_input,
)

log = logging.getLogger(__name__)

# The infer defaults' one owner is metsflow.core.settings.InferSettings (InferRun here).
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


# Speed levers (issue 14), each measured by benchmarks/bench_inference.py against a naive MONAI
# loop (model loaded once, per study: read, sliding_window_inference, argmax, write) on the same
# model and studies, each path in a process of its own (benchmarks/results/
# bench_inference_levers_cpu.txt: demo DynUNet, 6 studies at 2 mm, 2 idle CPU cores, medians of
# 3 interleaved repeats): all equal-output levers 1.66x wall / 1.65x CPU, Dice 1.0000; shares of
# naive's CPU s: channels_last 17.0%, compile 10.3%, heap_reuse 9.8%, fast_norm 4.0%, the rest
# within +-2%. Figures below not from that file are from earlier runs (same setup unless said).
# Settings (config ``infer:``):
#   compile         torch.compile (inductor) of each network, shared by the fold ensemble (the
#                   folds have one architecture, so dynamo compiles it once: 59 s cold, 4 s for
#                   a second fold). Fuses instance norm + leaky ReLU (22% of the eager CPU time):
#                   31.8 -> 27.7 CPU s (1.15x), and with channels-last 3D 25.5 CPU s (1.25x; wall
#                   1.37x), equal labels. At load 10-13 a cold compile cost 55-117 s, more than the
#                   demo's shard of 12 studies saves (0.60-0.94x counted in) but paid back over
#                   a cohort shard of 64 (1.26x counted in): "auto" = on for a CPU job of at
#                   least COMPILE_MIN_STUDIES studies; off on CUDA (not measured there yet). Only
#                   full ``sw_batch_size`` batches go through the compiled network (one static
#                   shape, no recompiles); a failed build (no C++ compiler on the node) falls
#                   back to eager with a warning.
#   channels_last   channels-last 3D memory format. "auto" = on for CUDA and for CPU inference
#                   jobs: on CPU with compile 1.09x CPU over compile alone, in eager with
#                   fast_norm 1.10x (alone it gained nothing in eager: 1.01x; 1.11x to 0.79x in
#                   the benchmark's noise).
#   amp             reduced precision: float16 autocast on CUDA, bfloat16 on CPU. "auto" = CUDA
#                   only: on CPU bf16 is 1.77x naive (CPU s) with compile + channels-last, but its
#                   labels differ from fp32 beyond the 0.999 Dice bound (lowest per-label Dice
#                   0.9903 untrained, 0.9875 with a trained model), so it is opt-in there.
#   skip_outside_brain  windows that hold no brain voxel are not run (their voxels are zeroed
#                   anyway, so outputs inside the brain are unchanged: a brain voxel's Gaussian
#                   blend only has windows that contain it). On brain-cropped volumes few windows
#                   qualify (demo 2 mm: 0 of 12; MNI brain at 1 mm: 3 of 150 48^3 windows, none
#                   of 96^3); it pays on uncropped or skull-stripped-but-uncropped inputs.
#   prefetch        read/decompress the next study and write the previous one in background
#                   threads while the current one computes (``overlapped``). I/O is ~0.3 s of a
#                   demo study's ~5 s CPU compute, and on 2 busy cores the threads compete with
#                   compute: within the noise on CPU; it is meant for GPU jobs.
#   inference_mode  torch.inference_mode instead of torch.no_grad (no version counters or view
#                   tracking on the tensors): within the noise (+3% CPU).
#   fast_norm       instance norm as a reduction over the channels-last (N, voxels, C) view
#                   (_ChannelsLastInstanceNorm3d; the output stays channels-last). Compiled, the
#                   norm of a 4x16x48^3 batch takes 3.1 ms instead of F.instance_norm's 56 ms
#                   (cache-hot), but in the network it is bound by memory traffic: the demo net's
#                   forward on 12 windows 1.99 -> 1.85 CPU s with compile + channels-last (min of
#                   5, 1.07x; at load 5: 2.41 -> 2.39), labels equal (Dice 1.0000 vs fp32 eager,
#                   untrained and a trained demo model). Eager (no compile, e.g. a 12-study
#                   demo shard): channels-last + fast_norm 2.93 -> 2.66 CPU s (1.10x; 1.14x in
#                   a second run), channels-last alone 2.90; a trained demo model on 3 real
#                   studies (ensemble_predict, median of 3, load 6): 20.1 -> 17.7 CPU s
#                   (1.14x; channels-last alone 1.12x), Dice 1.0000. "auto" = on CPU with
#                   channels_last (not measured on CUDA, where cuDNN has its own norm).
#   heap_reuse      glibc malloc keeps freed blocks for reuse instead of unmapping them
#                   (metsflow.core.runtime.reuse_freed_memory, process-wide): every forward pass
#                   otherwise page-faults its activations in afresh (0.27-0.29 -> 0.24-0.25 s per
#                   4-window forward of the demo net, compiled + channels-last; figures there).
#                   "auto" = on for inference jobs (``studies`` given), on any device.
# Tried and not kept (same figures' setup, network forward on 12 windows, min of 5): inductor
# weight freezing 2.02 -> 2.11 CPU s at sw_batch 4, 1.99 -> 1.95 at 6 (no gain, and a
# recompile per fold); sw_batch 6 or 12 instead of 4: 1.85 -> 1.78 / 1.92 (within the noise);
# torch.backends.mkldnn.conv.fp32_precision = "bf16" (torch 2.13, this CPU): conv3d output
# bitwise unchanged and no faster, i.e. not applied to 3D convolutions.
LEVERS = (
    "amp",
    "channels_last",
    "skip_outside_brain",
    "prefetch",
    "inference_mode",
    "compile",
    "fast_norm",
    "heap_reuse",
)
# Cold compile 15-17 s wall on 2 idle cores with an empty inductor cache, 4 s with the node's
# cache warm from an earlier job (same graph); compiled 0.92 s/study against 1.18 eager (the
# levers file): break-even ~62 studies cold, ~15 warm. A node's /tmp inductor cache usually is
# warm after its first shard, so the threshold sits between the two.
COMPILE_MIN_STUDIES = 32


def lever_settings(
    params: InferRun | Mapping[str, Any], device: torch.device, studies: int | None = None
) -> dict[str, bool]:
    """The levers of ``params`` resolved for ``device`` ("auto" -> on for CUDA only; for
    ``compile``: on for CPU when ``studies``, the number the loaded networks will segment, is at
    least COMPILE_MIN_STUDIES, unknown counting as few; ``channels_last``: on for CUDA, and on
    CPU for an inference job (``studies`` given); ``fast_norm``: on for CPU with channels_last;
    ``heap_reuse``: on for an inference job)."""
    run = InferRun.from_params(params)
    resolved = {}
    for key in ("compile", *(k for k in LEVERS if k != "compile")):
        value = getattr(run, key)
        if value == "auto" and key == "compile":
            many = studies is not None and studies >= COMPILE_MIN_STUDIES
            resolved[key] = device.type == "cpu" and many
        elif value == "auto" and key == "channels_last":
            # CPU: inference jobs only (they pass ``studies``); training's validation passes
            # none, and .to() would convert the network being trained in place.
            resolved[key] = device.type == "cuda" or studies is not None
        elif value == "auto" and key == "fast_norm":
            resolved[key] = device.type == "cpu" and resolved["channels_last"]
        elif value == "auto" and key == "heap_reuse":
            resolved[key] = studies is not None  # process-wide: a job's, not a trainer's
        else:
            resolved[key] = device.type == "cuda" if value == "auto" else bool(value)
    return {key: resolved[key] for key in LEVERS}


def resolve_levers(
    params: InferRun | Mapping[str, Any], device: torch.device, studies: int
) -> InferRun:
    """``params`` with its levers resolved for a job that segments ``studies`` studies with the
    same loaded networks (what ``compile: auto`` needs to know); switches the process-wide
    ``heap_reuse`` lever on when it resolves on (inference jobs call this once, first)."""
    run = InferRun.from_params(params)
    resolved = dataclasses.replace(run, **lever_settings(run, device, studies))
    if resolved.heap_reuse:
        reuse_freed_memory()
    return resolved


class _ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same parameters and state dict) computed, for a channels-last 3D
    input without autograd, as a reduction over its ``(N, voxels, C)`` view, whose channels are
    the contiguous inner axis: one variance/mean pass and one affine pass, the output stays
    channels-last. Inductor builds plain loops of it (3.1 ms for a 4x16x48^3 batch) where
    ``F.instance_norm`` gave 56 ms compiled, 74 ms eager, and a channels-first output that the
    next convolution copied back (the fast_norm lever's figures). Equal up to float rounding
    (max 1.4e-6 on that batch); any other input goes through ``nn.InstanceNorm3d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cl = x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
        if not cl or torch.is_grad_enabled() or self.track_running_stats:
            return super().forward(x)
        n, c = x.shape[:2]
        voxels = x.permute(0, 2, 3, 4, 1).reshape(n, -1, c)
        var, mean = torch.var_mean(voxels, dim=1, keepdim=True, correction=0)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        out = torch.addcmul(shift, voxels, scale)
        return out.view(n, *x.shape[2:], c).permute(0, 4, 1, 2, 3)


def _fast_norm(network: nn.Module) -> nn.Module:
    """``network`` with its ``nn.InstanceNorm3d`` modules switched, in place, to
    ``_ChannelsLastInstanceNorm3d`` (same parameters, so the state dict is unchanged)."""
    for module in network.modules():
        if type(module) is nn.InstanceNorm3d:
            module.__class__ = _ChannelsLastInstanceNorm3d
    return network


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


_COMPILED = "_metsflow_compiled"  # attribute of a network: its compiled module, or None after a
# failed build (then eager for good); set past nn.Module's registration so that the state dict and
# .to() are untouched and the pair is freed with the network.
_FAILED = object()


def _forward(network: nn.Module, windows: torch.Tensor, compiled: bool) -> torch.Tensor:
    """``network(windows)``, through its torch.compile'd module when ``compiled``."""
    module = network.__dict__.get(_COMPILED) if compiled else _FAILED
    if module is _FAILED:
        return network(windows)
    if module is None:
        compiler_follows_determinism()
        module = torch.compile(network, dynamic=False)
        object.__setattr__(network, _COMPILED, module)
    try:
        return module(windows)
    except Exception as exc:  # inductor could not build (e.g. no C++ compiler on the node)
        log.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
        object.__setattr__(network, _COMPILED, _FAILED)
        return network(windows)


@functools.cache
def _gaussian_weights(roi: tuple[int, ...], device: str) -> torch.Tensor:
    """MONAI's Gaussian importance map (sigma_scale 0.125), computed once per roi and device
    instead of once per call."""
    from monai.data.utils import compute_importance_map

    return compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device=device)


def sliding_window_predict(
    networks: nn.Module | Sequence[nn.Module],
    image: torch.Tensor,
    params: InferRun | Mapping[str, Any],
    device: str | torch.device = "auto",
) -> torch.Tensor:
    """Class probabilities ``(C, X, Y, Z)`` (float32, CPU) for one channels-first image.

    Sliding window (``params``: an ``InferRun`` or its dict form) with roi ``patch_size``,
    ``overlap`` (default 0.5),
    ``sw_batch_size`` (default 4) and Gaussian blending; with ``tta`` the softmax is averaged
    over all 8 combinations of mirroring the 3 spatial axes; then averaged over ``networks``.
    """
    return ensemble_predict(networks, image, params, device)[0]


class _EnsembleWindows:
    """MONAI ``sliding_window_inference`` predictor (``with_coord=True``) that runs every member
    of the ensemble on the same batch of windows (the windows are cut, and their blending
    bookkept, once for the ensemble) and returns one logits tensor per member. Windows without
    a brain voxel in ``brain`` (same flips and grid as the input) get zeros, not a forward pass.
    """

    def __init__(
        self,
        networks,
        brain: torch.Tensor | None,
        channels_last: bool,
        compiled_batch: int | None = None,
    ):
        self.networks = networks
        self.brain = brain
        self.channels_last = channels_last
        # Batches of exactly this many windows run through the compiled networks (one static
        # shape); the last, partial batch of a study runs eager.
        self.compiled_batch = compiled_batch
        self.windows = 0
        self.skipped = 0
        self.classes: int | None = None

    def __call__(self, windows: torch.Tensor, coords) -> tuple[torch.Tensor, ...]:
        keep = None
        if self.brain is not None:
            keep = torch.tensor([bool(self.brain[tuple(c[2:])].any()) for c in coords])
            self.skipped += int((~keep).sum())
        self.windows += len(windows)
        run = windows if keep is None or keep.all() else windows[keep]
        if self.channels_last:
            run = run.contiguous(memory_format=torch.channels_last_3d)
        if not len(run):
            # Every window of this batch is outside the brain; one forward pass learns the
            # output shape (at most once per study: the classes are then known).
            run = windows[:1] if self.classes is None else run
        outputs = []
        for network in self.networks:
            compiled = len(run) == self.compiled_batch
            logits = _forward(network, run, compiled).float() if len(run) else None
            if logits is not None:
                self.classes = logits.shape[1]
            if keep is not None and not keep.all():
                full = torch.zeros(
                    (len(windows), self.classes, *windows.shape[2:]),
                    dtype=torch.float32,
                    device=windows.device,
                )
                if keep.any():
                    full[keep.to(windows.device)] = logits
                logits = full
            outputs.append(logits.contiguous())
        return tuple(outputs)


def ensemble_predict(
    networks: nn.Module | Sequence[nn.Module],
    image: torch.Tensor,
    params: InferRun | Mapping[str, Any],
    device: str | torch.device = "auto",
    brain: np.ndarray | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sliding_window_predict``'s probabilities and, for more than one network, the mean of
    the members' normalised entropies ``(X, Y, Z)`` (each member's softmax averaged over its
    TTA flips first). Entropy of the mean minus this mean is the members' disagreement (the
    mutual information of the fold ensemble); None for a single network.

    MONAI's sliding window (Gaussian blending of each member's logits, then softmax) with the
    levers of ``lever_settings``; ``brain`` (X, Y, Z) enables skipping windows outside it
    (probabilities there are meaningless and must be zeroed by the caller)."""
    from monai.inferers import sliding_window_inference

    if isinstance(networks, nn.Module):
        networks = [networks]
    device = select_device(device) if isinstance(device, str) else device
    run = InferRun.from_params(params)
    if run.patch_size is None:
        raise ValueError("sliding_window_predict needs a patch_size (the roi size)")
    levers = lever_settings(run, device)
    sw_batch = int(run.sw_batch_size)
    roi = tuple(int(p) for p in run.patch_size)
    flips = tta_flips(bool(run.tta))
    batch = image.unsqueeze(0) if image.ndim == 4 else image
    batch = batch.to(device=device, dtype=torch.float32)
    # MONAI pads an image smaller than the roi, which moves the window coordinates: no skipping.
    skip = levers["skip_outside_brain"] and brain is not None
    skip = skip and all(s >= r for s, r in zip(batch.shape[2:], roi, strict=True))
    brain_t = torch.as_tensor(np.asarray(brain, dtype=bool))[None, None] if skip else None
    if levers["channels_last"]:
        networks = [n.to(memory_format=torch.channels_last_3d) for n in networks]
    if levers["fast_norm"]:
        networks = [_fast_norm(n) for n in networks]
    for network in networks:
        network.eval()
    sums: list[torch.Tensor | None] = [None] * len(networks)
    no_grad = torch.inference_mode() if levers["inference_mode"] else torch.no_grad()
    with no_grad, _autocast(device, levers["amp"]):
        for axes in flips:
            inp = torch.flip(batch, axes) if axes else batch
            mask = None
            if brain_t is not None:
                mask = torch.flip(brain_t, axes)[0, 0] if axes else brain_t[0, 0]
            predictor = _EnsembleWindows(
                networks, mask, levers["channels_last"], sw_batch if levers["compile"] else None
            )
            logits = sliding_window_inference(
                inp,
                roi_size=roi,
                sw_batch_size=sw_batch,
                predictor=predictor,
                overlap=float(run.overlap),
                mode="gaussian",
                sw_device=device,
                device=device,
                roi_weight_map=_gaussian_weights(roi, str(device)),
                with_coord=True,
            )
            if isinstance(logits, torch.Tensor):  # MONAI unpacks a 1-tuple
                logits = (logits,)
            for index, member_logits in enumerate(logits):
                probs = torch.softmax(member_logits.float(), dim=1)
                if axes:
                    probs = torch.flip(probs, axes)
                sums[index] = probs if sums[index] is None else sums[index] + probs
        members = [s / len(flips) for s in sums]
        total = sum(members[1:], members[0]) / len(members)
    member_entropy = None
    if len(networks) > 1:
        entropies = [normalised_entropy(m[0].float().cpu().numpy()) for m in members]
        member_entropy = torch.from_numpy(np.mean(entropies, axis=0).astype(np.float32))
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
    components, count = lab.lesion_components(lesion)
    # Per-component maximum over the lesion voxels only: ndimage.maximum sorted the whole
    # volume by label (66 ms for a 2 mm demo study, 8 ms this way; same values).
    per_lesion = np.zeros(count, dtype=np.float32)
    np.maximum.at(per_lesion, components[lesion] - 1, entropy[lesion])
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
    params: InferRun | Mapping[str, Any],
    device: torch.device,
    inp: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Read one study's input (unless ``inp``, ``load_study_input``'s result, is given) and
    segment it: ``(input, probs (C, ...), internal labels)``.

    Labels are zero (background) outside the brain mask."""
    study_id = str(item["study_id"])
    if inp is None:
        inp = load_study_input(item, meta["channels"])
    brain = inp["brain"]
    if not brain.any():
        raise StudyError(study_id, "brain mask is empty", Path(item["prep_dir"]) / BRAIN_MASK)
    sw_params = dataclasses.replace(InferRun.from_params(params), patch_size=meta["patch_size"])
    probs, member_entropy = ensemble_predict(
        networks, torch.from_numpy(inp["image"]), sw_params, device, brain=brain
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


# Key of a postprocess's ``extra`` holding (suggestion map, rows): the stage-1 candidates stage 2
# dropped; taken out of the row and written as SUGGESTIONS / SUGGESTIONS_TABLE.
SUGGESTIONS_KEY = "_suggestions"

# One output file of a study: (path, array, affine, dtype); dtype "json": array is a JSON object.
OutputFile = tuple[Path, np.ndarray, np.ndarray, Any]


def segment_study(
    networks: Sequence[nn.Module],
    meta: dict,
    item: dict,
    out_root: str | os.PathLike,
    params: InferRun | Mapping[str, Any],
    device: torch.device,
    postprocess: PostProcess | None = None,
    inp: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[OutputFile]]:
    """Segment one study with a loaded ensemble: its row and its output files (not written)."""
    study_id = str(item["study_id"])
    start = time.perf_counter()
    inp, probs, pred = stage1_probabilities(networks, meta, item, params, device, inp)
    brain = inp["brain"]
    extra: dict[str, Any] = {}
    if postprocess is not None:
        pred, extra = postprocess(item, inp, probs, pred)
        pred[~brain] = 0
    fg_prob = foreground_probability(probs, brain)

    affine = inp["affine"]
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    out_dir = Path(out_root) / study_id
    files = [
        (out_dir / PRED, pred.astype(np.uint8), affine, np.uint8),
        (out_dir / FG_PROB, fg_prob, affine, np.float32),
    ]
    suggestions = extra.pop(SUGGESTIONS_KEY, None)
    if suggestions is not None:
        suggestion_map, rows = suggestions
        files.append((out_dir / SUGGESTIONS, suggestion_map, affine, np.uint8))
        files.append((out_dir / SUGGESTIONS_TABLE, rows, affine, "json"))
    row = {"study_id": study_id, **uncertainty_scores(probs, pred, brain, voxel_mm3), **extra}
    if "member_entropy" in inp:
        # Fold-ensemble disagreement: mutual information = entropy of the mean - mean entropy.
        disagreement = normalised_entropy(probs) - inp["member_entropy"]
        row["uncertainty_disagreement"] = float(disagreement[brain].mean())
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row, files


def write_outputs(files: Sequence[OutputFile]) -> None:
    for path, data, affine, dtype in files:
        if dtype == "json":
            write_json(path, data)
        else:
            save_nifti(path, data, affine, dtype=dtype)


def predict_study(
    networks: Sequence[nn.Module],
    meta: dict,
    item: dict,
    out_root: str | os.PathLike,
    params: InferRun | Mapping[str, Any],
    device: torch.device,
    postprocess: PostProcess | None = None,
) -> dict[str, Any]:
    """Segment one study with a loaded ensemble, write its outputs, return its row."""
    row, files = segment_study(networks, meta, item, out_root, params, device, postprocess)
    write_outputs(files)
    return row


def overlapped(
    items: Sequence[Any],
    load: Callable[[Any], Any],
    compute: Callable[[Any, Any], Any],
    write: Callable[[Any], None],
    enabled: bool = True,
) -> Iterator[tuple[Any, Any, Exception | None]]:
    """``(item, compute(item, load(item)), None)`` per item in order, after ``write`` of the
    result returned; ``(item, None, error)`` when any of the three raised for that item.

    With ``enabled``, the next item is loaded in a reader thread and the previous result is
    written in a writer thread while this one computes (nibabel's gzip, numpy and torch
    release the GIL), so a shard's I/O hides behind its compute; at most one study is held in
    each of the three stages.
    """
    if not enabled:
        for item in items:
            try:
                result = compute(item, load(item))
                write(result)
            except Exception as exc:
                yield item, None, exc
                continue
            yield item, result, None
        return
    with (
        ThreadPoolExecutor(1, thread_name_prefix="metsflow-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="metsflow-write") as writer,
    ):
        next_read = reader.submit(load, items[0]) if len(items) else None
        pending = None  # (item, result, write future) of the previous item
        for index, item in enumerate(items):
            read = next_read
            next_read = reader.submit(load, items[index + 1]) if index + 1 < len(items) else None
            try:
                result, error = compute(item, read.result()), None
            except Exception as exc:
                result, error = None, exc
            if pending is not None:
                yield _written(*pending)
            pending = None
            if error is not None:
                yield item, None, error
            else:
                pending = (item, result, writer.submit(write, result))
        if pending is not None:
            yield _written(*pending)


def _written(item: Any, result: Any, future) -> tuple[Any, Any, Exception | None]:
    try:
        future.result()
    except Exception as exc:
        return item, None, exc
    return item, result, None


def predict_items(
    checkpoints: Sequence[str | os.PathLike] | tuple[list[nn.Module], dict],
    items: Sequence[dict],
    out_root: str | os.PathLike,
    params: InferRun | Mapping[str, Any],
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
    run = InferRun.from_params(params)
    if (
        isinstance(checkpoints, tuple)
        and len(checkpoints) == 2
        and isinstance(checkpoints[1], dict)
    ):
        networks, meta = checkpoints
        networks = [n.to(device).eval() for n in networks]
        check_meta(meta, run.channels, run.label_mode)
    else:
        networks, meta = load_ensemble(checkpoints, run.channels, device, run.label_mode)
    params = resolve_levers(run, device, len(items))
    rows = []
    for item, result, exc in overlapped(
        items,
        load=lambda item: load_study_input(item, meta["channels"]),
        compute=lambda item, inp: segment_study(
            networks, meta, item, out_root, params, device, inp=inp
        ),
        write=lambda result: write_outputs(result[1]),
        enabled=params.prefetch,
    ):
        study_id = str(item["study_id"])
        if exc is not None:
            if not isinstance(exc, StudyError | RuntimeError | ValueError | OSError):
                raise exc
            # Anything else that goes wrong with one study's data (odd shapes, unreadable
            # files, out of memory on a huge volume) is reported against that study.
            err = exc
            if not isinstance(exc, StudyError):
                err = StudyError(
                    study_id,
                    f"inference failed: {type(exc).__name__}: {exc}",
                    item.get("prep_dir"),
                )
            if on_error is None:
                raise err from (None if err is exc else exc)
            on_error(err)
            continue
        row = result[0]
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
