"""Frozen settings, one dataclass per config section, built once from the validated config.

Each dataclass holds its section's defaults (the one owner of each default); the config schema's
closed key lists of these sections come from the dataclass fields (``x-keys-from:
metsflow.settings:InferSettings`` in ``metsflow/schemas/config.schema.yaml``, read by
``metsflow.config`` with ``ast``). This module imports nothing heavy: the Snakefile builds
``SETTINGS`` while it parses, and importing ``metsflow.train`` (torch, MONAI) would add 5.6 s to
every dry run on the 2-core test machine.

Rules pass a section to a job as a plain dict (``dataclasses.asdict``): Snakemake compares
params by ``repr`` to decide reruns and cannot represent a dataclass, so a changed setting
would go unnoticed; the job rebuilds the dataclass (``InferSettings.from_dict``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class _Section:
    """``from_dict`` (unknown keys refused) and ``as_dict`` for a settings dataclass."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None):
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class InferSettings(_Section):
    """The ``infer`` section (metsflow.infer reads it as a dict: ``as_params``)."""

    overlap: float = 0.5  # sliding-window overlap (config/config.yaml sets 0.25)
    sw_batch_size: int = 4
    tta: bool = False  # flip test-time augmentation
    device: str = "auto"
    # Speed levers (metsflow.infer.lever_settings): "auto" = on for CUDA only (measured slower
    # or not equal on CPU, benchmarks/bench_inference.py).
    amp: str | bool = "auto"
    channels_last: str | bool = "auto"
    skip_outside_brain: bool = True
    prefetch: bool = True

    def as_params(self) -> dict[str, Any]:
        return self.as_dict()


@dataclass(frozen=True)
class EvaluateSettings(_Section):
    """The ``evaluate`` section. ``metsflow.metrics`` takes its defaults from here."""

    # A predicted and a reference lesion match when their IoU is strictly greater than this.
    iou_threshold: float = 0.25
    # Reference-lesion size bins (equivalent-sphere diameter, mm): the clinical reporting split
    # of small-metastasis detection studies (< 3 mm is where published detectors lose most,
    # 93% vs 98% overall for a data-centric nnU-Net; BraTS-METS names missed small lesions the
    # commonest error).
    size_bins_mm: tuple[float, ...] = (3.0, 10.0)
    # Paired statistics against round 0; None = metsflow.stats.COMPARE_METRICS / _GROUPS.
    compare_metrics: tuple[str, ...] | None = None
    compare_groups: tuple[str, ...] | None = None
    # Volumetric response thresholds (metsflow.longitudinal.ResponseThresholds owns them).
    response: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("size_bins_mm", "compare_metrics", "compare_groups"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    def metrics(self) -> dict[str, Any]:
        """What rule evaluate_round reads: response or statistics settings must not re-run the
        evaluation (and with it every later active-learning round)."""
        return {"iou_threshold": self.iou_threshold, "size_bins_mm": list(self.size_bins_mm)}

    def comparison(self) -> dict[str, Any]:
        """What rule compare_rounds reads."""
        return {
            key: list(value)
            for key in ("compare_metrics", "compare_groups")
            if (value := getattr(self, key)) is not None
        }


@dataclass(frozen=True)
class ActiveLearningSettings(_Section):
    """The ``active_learning`` section (defaults as config/config.yaml)."""

    rounds: int = 1  # rounds after round 0
    batch_size: int = 4
    strategy: str = "entropy"  # random | entropy | lesion_aware | disagreement
    per_patient_max: int | None = 1  # time points of one patient per batch
    annotator: str = "simulated"  # human | simulated (answers from oracle_sheet)
    dice_threshold: float = 0.95  # no further batch once validation Dice reaches it
    final_validation_sample: int = 4
    candidates: int | str = "all"  # pool studies a round's models segment: all | N

    def selection(self) -> dict[str, Any]:
        """What rule select_batch reads (``rounds`` or the QA sample must not re-select)."""
        keys = ("batch_size", "strategy", "per_patient_max", "dice_threshold")
        return {key: getattr(self, key) for key in keys}


@dataclass(frozen=True)
class Settings:
    """Every section, built once from the validated config (``Settings.from_config``)."""

    infer: InferSettings
    evaluate: EvaluateSettings
    active_learning: ActiveLearningSettings

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        return cls(
            infer=InferSettings.from_dict(config.get("infer")),
            evaluate=EvaluateSettings.from_dict(config.get("evaluate")),
            active_learning=ActiveLearningSettings.from_dict(config.get("active_learning")),
        )
