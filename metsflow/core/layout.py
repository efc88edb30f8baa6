"""The results layout: the one place that knows result folders and per-study file names.

Rule files (through ``LAYOUT`` in ``rules/common.smk``), jobs, the CLI and ``al status`` ask a
:class:`Layout`; nothing else spells a results path. Every method accepts Snakemake wildcard
placeholders as strings (``layout.prediction_manifest("{round}", "{gpu_shard}")``), so a rule's
outputs, logs and benchmarks are built by the same methods the jobs read them back with.

    results/
      plan/cohort.tsv                          the plan (roles and shards)
      preprocessed/shards/<shard>.tsv          per-CPU-shard manifest; manifest.tsv gathers them
      preprocessed/<study>/                    T1C, BRAIN_MASK, LABEL, ... on the model grid,
                                               GEOMETRY, transforms/<sequence>_to_t1c.mat
      registered/<study>/                      AFFINE, WARP, INVERSE_WARP, REGISTRATION_QC,
                                               PRIOR (follow-ups: to the previous time point)
      qc/quarantine.tsv
      rounds/round_<r>/model/                  model.pt (fold 0), fold_<k>.pt, stage2.pt, reseg.pt
      rounds/round_<r>/predictions/shards/<gpu_shard>.tsv
      rounds/round_<r>/predictions/<study>/    PRED, FG_PROB (model grid), PRED_NATIVE
      rounds/round_<r>/{candidates,selection,annotations,correction_burden}.tsv
      rounds/round_<r>/review/manifest.csv
      rounds/round_<r>/evaluation/, longitudinal/
      final/, bids/, dicom_seg/, report/
      logs/<job>.log, benchmarks/<job>.tsv     every rule's log and benchmark: Layout.job

A job is named ``<stage>[/round_<r>[_<part>] | /<part>][/<shard>]`` (:func:`job_name`);
:func:`parse_job` reads a name back (``metsflow.cohort.costmodel`` classifies benchmark files
with it), so the rules and the cost model share one naming function.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# Per-study files: one definition each.


def sequence_image(sequence: str) -> str:
    """A preprocessed sequence's image (``t1c``, ``t1``, ``t2``, ``flair``)."""
    return f"{sequence}.nii.gz"


T1C = sequence_image("t1c")
BRAIN_MASK = "brain_mask.nii.gz"
LABEL = "label.nii.gz"  # the sheet's label resampled to the model grid (seed/validation)
PRIOR = "prior.nii.gz"  # the previous time point's label propagated to a follow-up
PRED = "pred.nii.gz"  # prediction on the model grid
FG_PROB = "fg_prob.nii.gz"  # foreground probability on the model grid
PRED_NATIVE = "pred_native.nii.gz"  # prediction on the study's native T1c grid
GEOMETRY = "geometry.json"  # preprocessed/<study>/: every affine of the study's preprocessing
TRANSFORMS_DIR = "transforms"  # preprocessed/<study>/: each sequence's co-registration to T1c
AFFINE = "affine.mat"  # registered/<study>/: affine part of follow-up -> previous time point
WARP = "warp.nii.gz"  # registered/<study>/: SyN part, forward
INVERSE_WARP = "inverse_warp.nii.gz"  # registered/<study>/: SyN part, inverse
REGISTRATION_QC = "qc.json"  # registered/<study>/: the pair's alignment figures and flag
REGISTRATION_FILES = (AFFINE, WARP, INVERSE_WARP)


def coregistration_transform(sequence: str) -> str:
    """A sequence's co-registration to T1c, relative to its study's preprocessed folder."""
    return f"{TRANSFORMS_DIR}/{sequence}_to_t1c.mat"


SUGGESTIONS = "suggestions.nii.gz"  # stage-1 candidates stage 2 dropped (ids 1..n), model grid
SUGGESTIONS_TABLE = "suggestions.json"  # their stage-1/stage-2 scores and sizes, by id

# Per-round files (rounds/round_<r>/).
CANDIDATES_NAME = "candidates.tsv"
SELECTION_NAME = "selection.tsv"
ANNOTATIONS_NAME = "annotations.tsv"
BURDEN_NAME = "correction_burden.tsv"
EVALUATION_SUMMARY_NAME = "summary.json"
REVIEW_MANIFEST_NAME = "manifest.csv"
PRESEGMENTATION_NAME = "presegmentation.nii.gz"  # per study of a review package
# Review assists, per study of a review package (metsflow.active_learning.assists), all on the
# study's native T1c grid: the dropped candidates, the uint8-quantised foreground probability,
# the previous time point's label and T1c warped here, and one JSON describing them.
REVIEW_SUGGESTIONS_NAME = "suggestions.nii.gz"
REVIEW_PROB_NAME = "fg_prob_u8.nii.gz"
PREVIOUS_LABEL_NAME = "previous_label.nii.gz"
PREVIOUS_T1C_NAME = "previous_t1c.nii.gz"
ASSISTS_NAME = "assists.json"

# Names the layout itself puts beside per-study folders (a stage root holds <study>/, shards/ and
# manifest.tsv; a review package <study>/ and manifest.csv; the label store <study>/ and its
# marker). A study or patient id equal to one of them (compared case-insensitively: macOS and
# Windows shares fold case) would make a study's folder the layout's own: a study called
# ``shards`` deleted s0000.tsv (issue #25). metsflow.core.ids refuses them.
# A folder holding this file (or below one that does) is a human label store
# (metsflow.active_learning.labelstore); metsflow.core.io guards it.
LABEL_STORE_MARKER = "LABELSTORE.json"
SHARDS_DIR = "shards"
STAGE_MANIFEST_NAME = "manifest.tsv"
RESERVED_NAMES = frozenset(
    {
        SHARDS_DIR,
        STAGE_MANIFEST_NAME,
        REVIEW_MANIFEST_NAME,
        LABEL_STORE_MARKER,
        "logs",
        "benchmarks",
    }
)

ROUNDS_DIR = "rounds"
ROUND_PREFIX = "round_"
_ROUND_DIR = re.compile(rf"^{ROUND_PREFIX}(\d+)$")


def round_name(r: int | str) -> str:
    """``round_<r>``: the folder (and log name) of round r; ``r`` may be ``"{round}"``."""
    return f"{ROUND_PREFIX}{r}"


# Shard ids (metsflow.cohort.plan): a prefix per kind and a zero-padded index; they name shard
# manifests and shard jobs' logs, and tell a shard from a part in a job name (parse_job).
CPU_SHARD_PREFIX = "s"
GPU_SHARD_PREFIX = "g"
_SHARD_DIGITS = 4


def shard_id(prefix: str, index: int) -> str:
    return f"{prefix}{index:0{_SHARD_DIGITS}d}"


def shard_pattern(prefix: str) -> str:
    """The regular expression of one kind's shard ids (the rules' wildcard constraints)."""
    return rf"{prefix}\d{{{_SHARD_DIGITS}}}"


_SHARD_ID = re.compile(
    rf"^(?:{shard_pattern(CPU_SHARD_PREFIX)}|{shard_pattern(GPU_SHARD_PREFIX)})$"
)

# Parts of a round's training jobs (rules/train.smk): stage-1 fold f > 0, cascade stage 2,
# follow-up re-segmentation. Fold 0 is the round's plain job (no part).
STAGE2_PART = "stage2"
RESEG_PART = "reseg"
_FOLD_PREFIX = "fold_"


def fold_part(fold: int | str) -> str:
    """The job part of stage-1 fold ``fold`` (> 0); ``fold`` may be ``"{fold}"``."""
    return f"{_FOLD_PREFIX}{fold}"


def part_fold(part: str | None) -> int | None:
    """The stage-1 fold of a training job's part: 0 for none, f for ``fold_<f>``, else None."""
    if part is None:
        return 0
    digits = part.removeprefix(_FOLD_PREFIX)
    return int(digits) if part.startswith(_FOLD_PREFIX) and digits.isdigit() else None


@dataclass(frozen=True)
class JobName:
    """What names a job: its stage (a rule or a family of rules), round, shard and part."""

    stage: str
    round: int | str | None = None
    shard: str | None = None
    part: str | None = None

    def __str__(self) -> str:
        return job_name(self.stage, self.round, self.shard, self.part)


_ROUND_SEGMENT = re.compile(rf"^{ROUND_PREFIX}(\d+)(?:_(.+))?$")
_JOB_SUFFIXES = (".tsv", ".log")


def job_name(stage: str, round=None, shard=None, part=None) -> str:
    """``<stage>[/round_<r>[_<part>] | /<part>][/<shard>]``: a job's log and benchmark name
    (without the folder and suffix). Values may be Snakemake placeholders (``"{round}"``)."""
    if "/" in stage or (part is not None and "/" in str(part)):
        raise ValueError(f"job stage {stage!r} / part {part!r}: no '/' in either")
    segments = [stage]
    if round is not None:
        segments.append(round_name(round) + (f"_{part}" if part else ""))
    elif part:
        segments.append(str(part))
    if shard is not None:
        segments.append(str(shard))
    return "/".join(segments)


def parse_job(relative: str) -> JobName | None:
    """The inverse of :func:`job_name` for a file under logs/ or benchmarks/ (relative to that
    folder, with or without its suffix); None for a name it does not produce."""
    for suffix in _JOB_SUFFIXES:
        relative = relative.removesuffix(suffix)
    stage, *rest = relative.split("/")
    round_ = shard = part = None
    if rest:
        match = _ROUND_SEGMENT.match(rest[0])
        if match:
            round_, part = int(match.group(1)), match.group(2)
            rest = rest[1:]
        elif not _SHARD_ID.match(rest[0]):
            part, rest = rest[0], rest[1:]
    if rest:
        shard, rest = rest[0], rest[1:]
        if not _SHARD_ID.match(shard):
            return None
    if rest or not stage:
        return None
    return JobName(stage, round_, shard, part)


@dataclass(frozen=True)
class JobFiles:
    """A job's ``log:`` and ``benchmark:`` paths."""

    log: str
    benchmark: str


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

    # Logs and benchmarks of a job: the same relative name (job_name) in both trees.
    def job(self, stage: str, round=None, shard=None, part=None) -> JobFiles:
        """Every rule's ``log:`` and ``benchmark:`` (``LAYOUT.job("infer", "{round}",
        "{gpu_shard}").log``); ``metsflow cost`` reads the benchmarks back with parse_job."""
        name = job_name(stage, round, shard, part)
        return JobFiles(self._path("logs", name) + ".log", self._path("benchmarks", name) + ".tsv")

    @property
    def benchmarks_dir(self) -> str:
        return self._path("benchmarks")

    # Cohort.
    @property
    def plan(self) -> str:
        return self._path("plan", "cohort.tsv")

    @property
    def oracle_check(self) -> str:
        """The simulated annotator's labels, checked before any round (rule check_oracle)."""
        return self._path("plan", "oracle_check.tsv")

    @property
    def quarantine(self) -> str:
        return self._path("qc", "quarantine.tsv")

    # Per-study stages (preprocessed, registered).
    def stage_root(self, stage: str) -> str:
        """Where a stage's per-study folders live (``preprocessed``, ``registered``)."""
        return self._path(stage)

    def shard_manifest(self, stage: str, shard) -> str:
        return self._path(stage, SHARDS_DIR, f"{shard}.tsv")

    def stage_manifest(self, stage: str) -> str:
        """The cohort-wide manifest of a stage (rule gather_manifests)."""
        return self._path(stage, STAGE_MANIFEST_NAME)

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
        return self.round_file(r, "predictions", SHARDS_DIR, f"{gpu_shard}.tsv")

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
