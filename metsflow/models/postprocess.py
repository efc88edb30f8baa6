"""The inference-time cascade after stage 1: stage-2 filtering, then the follow-up merge.

``CascadePostProcess`` plugs into ``metsflow.models.infer.predict_study`` (its ``postprocess`` hook):

1. stage 2 (optional): stage-1 lesions scoring below the stage-2 threshold are removed
   (``metsflow.models.cascade.filter_prediction``); the result is the new-lesion detector's output;
2. re-segmentation (optional, follow-ups with a propagated prior only): the re-seg network reads
   its own channels (T1c + prior (+ T2 zero-filled when missing)), and its output is merged with
   the cascade's (``metsflow.imaging.priors.merge_followup``: tracked lesions from re-seg, new lesions
   from the cascade). A baseline study (no prior) keeps the cascade's output.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from metsflow.core.settings import InferRun
from metsflow.imaging.priors import merge_followup
from metsflow.models.cascade import dropped_candidates, filter_prediction, proposal_components
from metsflow.models.infer import (
    SUGGESTIONS_KEY,
    foreground_probability,
    load_ensemble,
    stage1_probabilities,
)
from metsflow.models.networks import PRIOR

log = logging.getLogger(__name__)


class CascadePostProcess:
    def __init__(
        self,
        stage2: tuple[nn.Module, dict] | None,
        reseg: tuple[list[nn.Module], dict] | None,
        params: InferRun | dict,
        device: torch.device,
    ) -> None:
        if reseg is not None and PRIOR not in reseg[1]["channels"]:
            raise ValueError(
                f"the re-segmentation model reads channels {reseg[1]['channels']}: it needs "
                f"the {PRIOR!r} channel"
            )
        self.stage2 = stage2
        self.reseg = reseg
        self.params = params
        self.device = device

    @classmethod
    def from_checkpoints(
        cls,
        stage1_channels: Sequence[str],
        stage2_path: str | None,
        reseg_paths: Sequence[str] | None,
        params: InferRun | dict,
        device: torch.device,
    ) -> CascadePostProcess | None:
        """``None`` when neither stage 2 nor re-seg is given (plain stage-1 inference)."""
        from metsflow.models.cascade import load_stage2

        stage2 = None
        if stage2_path:
            network, meta = load_stage2(stage2_path, stage1_channels)
            stage2 = (network.to(device), meta)
        reseg = load_ensemble(list(reseg_paths), device=device) if reseg_paths else None
        if stage2 is None and reseg is None:
            return None
        return cls(stage2, reseg, params, device)

    def __call__(
        self, item: dict, inp: dict, probs: np.ndarray, pred: np.ndarray
    ) -> tuple[np.ndarray, dict[str, Any]]:
        extra: dict[str, Any] = {}
        lesions_before = _lesion_count(pred)
        if self.stage2 is not None:
            network, meta = self.stage2
            fg_prob = foreground_probability(probs, inp["brain"])
            pred_before = pred
            pred, candidates = filter_prediction(
                pred,
                inp["image"],
                fg_prob,
                network,
                meta,
                str(item["study_id"]),
                spacing=nib.affines.voxel_sizes(inp["affine"]),
            )
            extra["stage2_removed"] = sum(c.score < meta["threshold"] for c in candidates)
            # For the review editor's "possible lesions"; segment_study writes them as files. The
            # map is recomputed by the function filter_prediction numbered its candidates with,
            # rather than threaded out of it (its signature the training code shares).
            extra[SUGGESTIONS_KEY] = dropped_candidates(
                proposal_components(pred_before, fg_prob, meta), candidates, meta["threshold"]
            )
        extra["stage1_lesions"] = lesions_before
        if self.reseg is not None and item.get("prior"):
            networks, meta = self.reseg
            reseg_inp, _, reseg_pred = stage1_probabilities(
                networks, meta, item, self.params, self.device
            )
            prior = reseg_inp["image"][list(meta["channels"]).index(PRIOR)] > 0
            pred, counts = merge_followup(reseg_pred, pred, prior)
            extra["tracked_lesions"] = counts["tracked"]
            extra["new_lesions"] = counts["new"]
        return pred, extra


def _lesion_count(pred: np.ndarray) -> int:
    from metsflow.core import labels as lab

    return lab.lesion_components(lab.whole_lesion(pred))[1]
