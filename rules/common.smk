# Shared state and named input functions. The config, the sheet and everything else the run
# reads are validated once, at parse time (metsflow.cohort.preflight); the plan (roles and shards) is a
# pure function of the sheet and config. Every results path comes from LAYOUT (metsflow.core.layout).
import dataclasses
import functools
import os
import sys

from metsflow.core.io import file_sha256
from metsflow.core.layout import (
    CPU_SHARD_PREFIX,
    GPU_SHARD_PREFIX,
    RESEG_PART,
    STAGE2_PART,
    Layout,
    fold_part,
    round_name,
    shard_pattern,
)
from metsflow.cohort.plan import round_inference_plan
from metsflow.cohort.preflight import RunError, prepare_run
from metsflow.core.settings import Settings

try:
    # Fills in the schema defaults; sheet paths must stay inside data_roots (an empty list
    # means the sheet's own folder), resolved through symbolic links.
    _RUN = prepare_run(config)
except RunError as exc:
    # One message listing every problem, no traceback: print it and stop before planning.
    print(f"metsflow: {exc}", file=sys.stderr)
    sys.exit(1)
for _warning in _RUN.warnings:
    print(f"metsflow: warning: {_warning}", file=sys.stderr)

LAYOUT = Layout.from_config(config)
SETTINGS = Settings.from_config(config)
# Round 0 fine-tunes from train.init_checkpoint when set (e.g. a BraTS-METS model): a file
# that cannot start this run's model stops the run now, not after preprocessing.
INIT_CHECKPOINT = config["train"].get("init_checkpoint")
if INIT_CHECKPOINT:
    from metsflow.models.networks import init_checkpoint_problems

    # After prepare_run (schema and settings.config_problems): it needs torch to read the file.
    _init_problems = init_checkpoint_problems(INIT_CHECKPOINT, SETTINGS.model)
    if _init_problems:
        print(
            "metsflow: the run cannot start:\n"
            + "\n".join(f"  - {problem}" for problem in _init_problems),
            file=sys.stderr,
        )
        sys.exit(1)
# pretrain: {sheet, iterations}: round 0 starts from LAYOUT.pretrain_model (rule pretrain).
PRETRAIN = config.get("pretrain") or {}
PRETRAIN_COHORT = None
if PRETRAIN:
    from metsflow.cohort.sheet import read_sheet

    # Checked by prepare_run (metsflow.cohort.preflight._pretrain_problems).
    PRETRAIN_COHORT = read_sheet(
        PRETRAIN["sheet"],
        data_roots=config.get("data_roots", []),
        allow_outside_roots=config.get("allow_paths_outside_roots", False),
    )
ROUND0_INIT = LAYOUT.pretrain_model if PRETRAIN else INIT_CHECKPOINT
ROUNDS = list(range(SETTINGS.active_learning.rounds + 1))
COHORT = _RUN.cohort
PLAN = _RUN.plan
PLAN_SETTINGS = _RUN.plan_settings
SHEET_SHA256 = file_sha256(config["sheet"])
# A subset run keeps the full-cohort plan (so shard ids and roles do not move) and only targets
# the shards that hold the chosen studies.
TARGET = _RUN.target

CPU_SHARDS = sorted(TARGET["shard"].unique())
STUDIES_BY_SHARD = {s: rows for s, rows in PLAN.groupby("shard")}
STUDIES_BY_GPU_SHARD = {g: rows for g, rows in PLAN.groupby("gpu_shard")}
# GPU shards worth running: they hold studies the model must segment (validation or pool).
INFER_SHARDS = sorted(TARGET.loc[TARGET.role != "seed", "gpu_shard"].unique())
VALIDATION_GPU_SHARDS = sorted(
    PLAN.loc[PLAN.role == "validation", "gpu_shard"].unique()
)
POOL_GPU_SHARDS = sorted(PLAN.loc[PLAN.role == "pool", "gpu_shard"].unique())
SEED_SHARDS = sorted(PLAN.loc[PLAN.role == "seed", "shard"].unique())
# Per round: the studies its models segment, by GPU shard (metsflow.cohort.plan.round_inference_plan):
# with active_learning.candidates: N, rounds before the last segment the validation studies and
# the next round's N candidates in shards of their own; the last round (and `all`) segments
# every validation and pool study in the plan's GPU shards.
CANDIDATES = SETTINGS.active_learning.candidates
ROUND_INFER_SHARDS = {
    r: dict(
        tuple(
            round_inference_plan(
                PLAN,
                r,
                ROUNDS[-1],
                CANDIDATES,
                PLAN_SETTINGS.seed,
                PLAN_SETTINGS.gpu_shard_size,
            ).groupby("gpu_shard")
        )
    )
    for r in ROUNDS
}


wildcard_constraints:
    shard=shard_pattern(CPU_SHARD_PREFIX),
    gpu_shard=shard_pattern(GPU_SHARD_PREFIX),
    round=r"\d+",


@functools.cache
def _study_record(study_id):
    return COHORT.by_id[study_id].to_record()


def study_record(study):
    """Plain-dict form of a Study for a job's params (paths as strings).

    Cached per study: several rules pass every study of the cohort in params, and Snakemake
    evaluates params more than once per job (conda env resolution, then execution); converting
    11,892 dataclasses each time was most of the full-cohort dry run. A copy is returned so a
    job cannot change another job's params.
    """
    return dict(_study_record(study.study_id))


def shard_records(wildcards):
    return [
        study_record(COHORT.by_id[s])
        for s in STUDIES_BY_SHARD[wildcards.shard].study_id
    ]


def shard_raw_inputs(wildcards):
    """The shard's input files that exist. A missing file is not a DAG error: the job records
    that study as failed (quarantined) and the rest of the cohort goes on."""
    paths = []
    for study_id in STUDIES_BY_SHARD[wildcards.shard].study_id:
        study = COHORT.by_id[study_id]
        for path in (study.t1, study.t1c, study.t2, study.flair, study.label):
            if path is not None and os.path.exists(path):
                paths.append(str(path))
    return paths


def shard_manifests(shards):
    shards = sorted(set(shards))
    return {
        "preprocessed": [LAYOUT.shard_manifest("preprocessed", s) for s in shards],
        "registered": [LAYOUT.shard_manifest("registered", s) for s in shards],
    }


# Cohort-wide manifests (gather_manifests in rules/cohort.smk): one file per stage for the jobs
# that need every shard. Why: 812 shard manifests as inputs of each of the ~40 training/QC jobs
# of a campaign made the DAG ~60,000 edges and doubled the dry-run time over 11,892 studies.
def cohort_manifests():
    return {
        "preprocessed": [LAYOUT.stage_manifest("preprocessed")],
        "registered": [LAYOUT.stage_manifest("registered")],
    }


def round_prediction_manifests(r, role=None):
    """Round r's inference manifests: every shard, or those holding studies of ``role``."""
    shards = ROUND_INFER_SHARDS[int(r)]
    return [
        LAYOUT.prediction_manifest(r, g)
        for g in sorted(shards)
        if role is None or (shards[g].role == role).any()
    ]


def train_inputs(wildcards):
    r = int(wildcards.round)
    if r == 0:
        inputs = {"plan": LAYOUT.plan, **shard_manifests(SEED_SHARDS)}
        if ROUND0_INIT:
            inputs["init"] = ROUND0_INIT
        return inputs
    # Annotated studies may come from any shard of the pool, so fine-tuning waits for them all.
    inputs = {"plan": LAYOUT.plan, **cohort_manifests()}
    inputs["init"] = LAYOUT.model(r - 1)
    inputs["annotations"] = [LAYOUT.annotations(k) for k in range(1, r + 1)]
    return inputs


def infer_rows(wildcards):
    """Plan rows of the studies round ``wildcards.round`` segments in ``wildcards.gpu_shard``."""
    return ROUND_INFER_SHARDS[int(wildcards.round)][wildcards.gpu_shard]


def infer_inputs(wildcards):
    rows = infer_rows(wildcards)
    inputs = shard_manifests(rows["shard"])
    inputs["model"] = LAYOUT.model(wildcards.round)
    return inputs


@functools.cache
def _gpu_shard_records(r, gpu_shard):
    rows = ROUND_INFER_SHARDS[r][gpu_shard]
    return rows[["study_id", "patient_id", "role"]].to_dict("records")


def gpu_shard_records(wildcards):
    # Cached: Snakemake evaluates params more than once per job (DataFrame.to_dict per job was
    # seconds of a cohort dry run).
    return [
        dict(row)
        for row in _gpu_shard_records(int(wildcards.round), wildcards.gpu_shard)
    ]


def evaluation_inputs(wildcards):
    return round_prediction_manifests(wildcards.round, "validation")


def validation_records(wildcards):
    rows = PLAN[PLAN.role == "validation"]
    return [
        dict(plan=row, study=study_record(COHORT.by_id[row["study_id"]]))
        for row in rows.to_dict("records")
    ]


def selection_inputs(wildcards):
    r = int(wildcards.round)
    return {
        "plan": LAYOUT.plan,
        "predictions": round_prediction_manifests(r - 1, "pool"),
        "candidates": LAYOUT.candidates(r),
        "previous": [LAYOUT.selection(k) for k in range(1, r)],
        "evaluation": LAYOUT.evaluation_summary(r - 1),
    }


def pool_records(wildcards):
    return PLAN[PLAN.role == "pool"][["study_id", "patient_id"]].to_dict("records")


def final_targets():
    """The default target (an input function: with people it depends on the label store)."""
    if config["subset_studies"] or config["subset_patients"]:
        # A subset rerun refreshes the per-study stages of those studies only.
        targets = [LAYOUT.shard_manifest("preprocessed", s) for s in CPU_SHARDS]
        targets += [LAYOUT.shard_manifest("registered", s) for s in CPU_SHARDS]
        return targets
    targets = [LAYOUT.plan, LAYOUT.quarantine]
    if SETTINGS.active_learning.annotator == "human":
        # Like `round_<R>` (rules/active_learning_common.smk): stop at the first batch that is
        # not confirmed, so neither a run nor a dry run goes past it.
        reached = round_target_inputs(FINAL_ROUND)
        if not set(FINAL_OUTPUTS) <= set(reached):
            return targets + reached
    return targets + [
        LAYOUT.report("rounds.tsv"),
        *report_targets(),  # rules/report.smk: figures, statistics, longitudinal response
    ]


# Evaluation statistics, longitudinal response and report figures (rules/evaluate.smk,
# rules/report.smk).
FINAL_ROUND = ROUNDS[-1]
# GPU shards with predictions (validation and pool studies); seed studies are not predicted.
PREDICTED_GPU_SHARDS = sorted(set(VALIDATION_GPU_SHARDS) | set(POOL_GPU_SHARDS))


def evaluation_targets():
    """Statistics against round 0 (when there are later rounds) and the longitudinal tables."""
    targets = [
        LAYOUT.longitudinal_table(FINAL_ROUND, n) for n in ("lesions", "response")
    ]
    if FINAL_ROUND > 0:
        targets.append(LAYOUT.compare_table(FINAL_ROUND))
    return targets


def report_targets():
    return [
        LAYOUT.report("overlay_best.png"),
        LAYOUT.report("detection_by_size.tsv"),
        *(LAYOUT.report(f"froc_{round_name(r)}.png") for r in ROUNDS),
        *evaluation_targets(),
    ]


# Models of a round beyond stage 1 (rules/train.smk, rules/infer.smk): with train.folds = k > 1,
# stage 1 is k patient-level fold models (fold 0 is model.pt), ensembled at inference;
# train.stage2.enabled adds the cascade's candidate classifier, train.reseg.enabled the
# re-segmentation model for follow-ups.
TRAIN_FOLDS = int(config["train"].get("folds", 1))
STAGE2_ENABLED = bool((config["train"].get("stage2") or {}).get("enabled", False))
RESEG_ENABLED = bool((config["train"].get("reseg") or {}).get("enabled", False))


def train_settings(drop=(), keep=None):
    """The ``train`` section without the ``drop`` keys (or with only the ``keep`` keys)."""
    return {
        key: value
        for key, value in config["train"].items()
        if key not in drop and (keep is None or key in keep)
    }


def stage1_model_paths(r):
    return [LAYOUT.model(r, fold) for fold in range(TRAIN_FOLDS)]


def froc_report_inputs(wildcards):
    """A round's FROC table, and its stage-2 summary (validation FROC) with the cascade."""
    inputs = {"froc": LAYOUT.evaluation_table(wildcards.round, "froc")}
    if STAGE2_ENABLED:
        inputs["stage2"] = LAYOUT.stage2_summary(wildcards.round)
    return inputs


def pretrain_records(wildcards):
    return [s.to_record() for s in PRETRAIN_COHORT.studies if s.label is not None]


def pretrain_inputs(wildcards):
    """The pretrain sheet's files that exist (a missing one quarantines its study)."""
    if PRETRAIN_COHORT is None:
        return {}
    paths = []
    for study in PRETRAIN_COHORT.studies:
        for path in (*study.images.values(), study.label):
            if path is not None and os.path.exists(path):
                paths.append(str(path))
    return {"sheet": PRETRAIN["sheet"], "images": paths}


def fold_train_inputs(wildcards):
    inputs = train_inputs(wildcards)
    if "init" in inputs and int(wildcards.round) > 0:
        inputs["init"] = LAYOUT.model(int(wildcards.round) - 1, wildcards.fold)
    return inputs


def stage2_train_inputs(wildcards):
    inputs = train_inputs(wildcards)
    inputs.pop("init", None)
    inputs["stage1"] = stage1_model_paths(wildcards.round)
    return inputs


def reseg_train_inputs(wildcards):
    inputs = train_inputs(wildcards)
    if int(wildcards.round) == 0:
        # train.init_checkpoint starts stage 1; re-seg reads other channels.
        inputs.pop("init", None)
    elif "init" in inputs:
        inputs["init"] = LAYOUT.reseg_model(int(wildcards.round) - 1)
    return inputs


def round_model_files(r):
    """Every model file round r's inference reads, in run_infer_shard's order."""
    files = stage1_model_paths(r)
    if STAGE2_ENABLED:
        files.append(LAYOUT.stage2_model(r))
    if RESEG_ENABLED:
        files.append(LAYOUT.reseg_model(r))
    return files


def previous_round_predictions(wildcards):
    """The previous round's models and outputs of this shard (read only if the models match;
    they exist by then: round r's training needs round r-1's evaluation and selection).
    """
    r = int(wildcards.round)
    if r == 0:
        return {}
    # With candidate subsets a shard id of round r - 1 may hold other studies, or none: only
    # the studies listed in that manifest are reused, the others are segmented.
    return {
        "models": round_model_files(r - 1),
        "round": r - 1,
        "manifest": LAYOUT.prediction_manifest(r - 1, wildcards.gpu_shard),
    }


def cascade_infer_inputs(wildcards):
    inputs = infer_inputs(wildcards)
    r = int(wildcards.round)
    if TRAIN_FOLDS > 1:
        inputs["folds"] = stage1_model_paths(r)[1:]
    if STAGE2_ENABLED:
        inputs["stage2"] = LAYOUT.stage2_model(r)
    if RESEG_ENABLED:
        inputs["reseg"] = [LAYOUT.reseg_model(r)]
    return inputs
