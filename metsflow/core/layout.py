"""The results layout: the one place that knows result folders and per-study file names.

Rule files (through ``LAYOUT`` in ``rules/common.smk``), jobs, the CLI and ``al status`` ask a
:class:`Layout`; nothing else spells a results path. Every method accepts Snakemake wildcard
placeholders as strings (``layout.prediction_manifest("{round}", "{gpu_shard}")``), so a rule's
outputs, logs and benchmarks are built by the same methods the jobs read them back with.

    results/
      plan/cohort.tsv                          the plan (roles and shards)
      preprocessed/shards/<shard>.tsv          per-CPU-shard manifest; manifest.tsv gathers them
      preprocessed/<study>/                    T1C, BRAIN_MASK, LABEL, ... on the model grid
      registered/...                           as preprocessed/; <study>/PRIOR for follow-ups
      qc/quarantine.tsv
      rounds/round_<r>/model/                  model.pt (fold 0), fold_<k>.pt, stage2.pt, reseg.pt
      rounds/round_<r>/predictions/shards/<gpu_shard>.tsv
      rounds/round_<r>/predictions/<study>/    PRED, FG_PROB (model grid), PRED_NATIVE
      rounds/round_<r>/{candidates,selection,annotations,correction_burden}.tsv
      rounds/round_<r>/review/manifest.csv
      rounds/round_<r>/evaluation/, longitudinal/
      final/, bids/, dicom_seg/, report/, logs/, benchmarks/
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# Per-study files: one definition each.
T1C = "t1c.nii.gz"
BRAIN_MASK = "brain_mask.nii.gz"
LABEL = "label.nii.gz"  # the sheet's label resampled to the model grid (seed/validation)
PRIOR = "prior.nii.gz"  # the previous time point's label propagated to a follow-up
PRED = "pred.nii.gz"  # prediction on the model grid
FG_PROB = "fg_prob.nii.gz"  # foreground probability on the model grid
PRED_NATIVE = "pred_native.nii.gz"  # prediction on the study's native T1c grid

# Per-round files (rounds/round_<r>/).
CANDIDATES_NAME = "candidates.tsv"
SELECTION_NAME = "selection.tsv"
ANNOTATIONS_NAME = "annotations.tsv"
BURDEN_NAME = "correction_burden.tsv"
EVALUATION_SUMMARY_NAME = "summary.json"
REVIEW_MANIFEST_NAME = "manifest.csv"
PRESEGMENTATION_NAME = "presegmentation.nii.gz"  # per study of a review package

ROUNDS_DIR = "rounds"
ROUND_PREFIX = "round_"
_ROUND_DIR = re.compile(rf"^{ROUND_PREFIX}(\d+)$")


def round_name(r: int | str) -> str:
    """``round_<r>``: the folder (and log name) of round r; ``r`` may be ``"{round}"``."""
    return f"{ROUND_PREFIX}{r}"


@dataclass(frozen=True)
class Layout:
    """Paths under one results folder. Methods return strings (what Snakemake and the table
    writers take); ``*_dir`` methods of per-study folders return :class:`Path`."""

    results: str

    def __post_init__(self):
        object.__setattr__(self, "results", os.fspath(self.results))

    @classmethod
    def from_config(cls, config: dict) -> Layout:
        return cls(config["results"])

    def _path(self, *parts) -> str:
        return "/".join([self.results, *(str(p) for p in parts)])

    # Logs and benchmarks of a job: the same relative name in both trees.
    def log(self, *parts) -> str:
        return self._path("logs", *parts) + ".log"

    def benchmark(self, *parts) -> str:
        return self._path("benchmarks", *parts) + ".tsv"

    @property
    def benchmarks_dir(self) -> str:
        return self._path("benchmarks")

    # Cohort.
    @property
    def plan(self) -> str:
        return self._path("plan", "cohort.tsv")

    @property
    def quarantine(self) -> str:
        return self._path("qc", "quarantine.tsv")

    # Per-study stages (preprocessed, registered).
    def stage_root(self, stage: str) -> str:
        """Where a stage's per-study folders live (``preprocessed``, ``registered``)."""
        return self._path(stage)

    def shard_manifest(self, stage: str, shard) -> str:
        return self._path(stage, "shards", f"{shard}.tsv")

    def stage_manifest(self, stage: str) -> str:
        """The cohort-wide manifest of a stage (rule gather_manifests)."""
        return self._path(stage, "manifest.tsv")

    def preprocessed_dir(self, study_id: str) -> Path:
        return Path(self.stage_root("preprocessed")) / study_id

    def registered_dir(self, study_id: str) -> Path:
        return Path(self.stage_root("registered")) / study_id

    def prior(self, study_id: str) -> Path:
        return self.registered_dir(study_id) / PRIOR

    # Rounds.
    @property
    def rounds_dir(self) -> str:
        return self._path(ROUNDS_DIR)

    def existing_rounds(self) -> list[tuple[int, Path]]:
        """(r, folder) of every ``round_<r>`` folder present, in round order."""
        rounds_dir = Path(self.rounds_dir)
        if not rounds_dir.is_dir():
            return []
        found = []
        for entry in rounds_dir.iterdir():
            match = _ROUND_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def round_dir(self, r) -> str:
        return self._path(ROUNDS_DIR, round_name(r))

    def round_file(self, r, *parts) -> str:
        return "/".join([self.round_dir(r), *(str(p) for p in parts)])

    def model(self, r, fold=0) -> str:
        """Stage-1 model of round r; fold 0 is ``model.pt`` (the single model without folds)."""
        if str(fold) == "0":
            return self.round_file(r, "model", "model.pt")
        return self.round_file(r, "model", f"fold_{fold}.pt")

    def train_log(self, r, fold=0) -> str:
        suffix = "" if str(fold) == "0" else f"_fold_{fold}"
        return self.round_file(r, "model", f"train_log{suffix}.tsv")

    def train_summary(self, r, fold=0) -> str:
        suffix = "" if str(fold) == "0" else f"_fold_{fold}"
        return self.round_file(r, "model", f"train_summary{suffix}.json")

    # Pretraining on a second study sheet (config ``pretrain:``): its studies live here, apart
    # from the cohort's, so they never enter the pool or the validation set.
    @property
    def pretrain_model(self) -> str:
        return self._path("pretrain", "model.pt")

    @property
    def pretrain_manifest(self) -> str:
        return self._path("pretrain", "preprocessed", "manifest.tsv")

    @property
    def pretrain_log_table(self) -> str:
        return self._path("pretrain", "train_log.tsv")

    def pretrain_preprocessed_dir(self, study_id: str) -> Path:
        return Path(self._path("pretrain", "preprocessed")) / study_id

    def stage2_model(self, r) -> str:
        return self.round_file(r, "model", "stage2.pt")

    def stage2_summary(self, r) -> str:
        return self.round_file(r, "model", "stage2_summary.json")

    def reseg_model(self, r) -> str:
        return self.round_file(r, "model", "reseg.pt")

    def reseg_train_log(self, r) -> str:
        return self.round_file(r, "model", "reseg_train_log.tsv")

    def prediction_root(self, r) -> str:
        """Where round r's per-study predictions live."""
        return self.round_file(r, "predictions")

    def prediction_manifest(self, r, gpu_shard) -> str:
        return self.round_file(r, "predictions", "shards", f"{gpu_shard}.tsv")

    def prediction_dir(self, r, study_id: str) -> Path:
        return Path(self.prediction_root(r)) / study_id

    def study_prediction(self, r, study_id: str) -> Path:
        """Round r's prediction of a study on its native T1c grid."""
        return self.prediction_dir(r, study_id) / PRED_NATIVE

    def candidates(self, r) -> str:
        return self.round_file(r, CANDIDATES_NAME)

    def selection(self, r) -> str:
        return self.round_file(r, SELECTION_NAME)

    def annotations(self, r) -> str:
        return self.round_file(r, ANNOTATIONS_NAME)

    def burden(self, r) -> str:
        """Per-study correction burden of round r's confirmed batch (rule correction_burden)."""
        return self.round_file(r, BURDEN_NAME)

    def review_dir(self, r) -> str:
        return self.round_file(r, "review")

    def review_manifest(self, r) -> str:
        return self.round_file(r, "review", REVIEW_MANIFEST_NAME)

    def evaluation_summary(self, r) -> str:
        return self.round_file(r, "evaluation", EVALUATION_SUMMARY_NAME)

    def evaluation_table(self, r, name="per_study") -> str:
        return self.round_file(r, "evaluation", f"{name}.tsv")

    def compare_table(self, r) -> str:
        return self.evaluation_table(r, "compare_round_0")

    def longitudinal_table(self, r, name) -> str:
        return self.round_file(r, "longitudinal", f"{name}.tsv")

    # The loop's end product.
    def final(self, name) -> str:
        return self._path("final", name)

    @property
    def final_labels(self) -> str:
        """Every pool study's final label (human-confirmed, model or failed)."""
        return self.final("labels.tsv")

    @property
    def qa_sample(self) -> str:
        """The seeded QA sample of the model-labelled studies."""
        return self.final("qa_sample.tsv")

    @property
    def final_review_dir(self) -> str:
        return self._path("final", "qa_review")

    @property
    def final_review_manifest(self) -> str:
        return self._path("final", "qa_review", REVIEW_MANIFEST_NAME)

    def bids_root(self, configured: str | None = None) -> str:
        """``export.bids_dir`` when set, else results/bids."""
        return configured or self._path("bids")

    @property
    def dicom_seg_dir(self) -> str:
        return self._path("dicom_seg")

    @property
    def dicom_seg_manifest(self) -> str:
        return self._path("dicom_seg", "manifest.tsv")

    def report(self, name) -> str:
        return self._path("report", name)
