"""Cohort cost model: core-hours, GPU-hours and makespan from the `benchmark:` files of a run.

Every rule writes Snakemake's benchmark table (columns ``s``, ``max_rss``, ``cpu_time``, ...) to
``results/benchmarks/<stage>/...tsv``. Shard jobs (preprocess, register, infer) cost a fixed
part (start-up, model loading) plus a part per study, so for each stage the run's jobs are fitted
as ``seconds = fixed + per_study * n_studies`` (n from the run's plan table; with one shard size
only the fixed part cannot be separated and is taken as 0, i.e. all cost scales with studies).
The full cohort's jobs are then costed at its shard sizes:

- core-hours: CPU time consumed (``cpu_time``; wall seconds where a run recorded none),
- GPU-hours: wall time of the GPU rules (train, infer), which hold a GPU for their whole run,
- makespan: CPU stages spread over ``cores`` (no shorter than their longest job), then per
  round training on one GPU, inference spread over ``gpus`` jobs at a time, and the round's
  single-job steps. Human review time between rounds is not included.

Training cost does not grow with the cohort (a fixed number of iterations). Every model a round
trains is counted (:class:`ModelSet`, from the ``train`` section): stage 1 once per fold
(``train.folds``), cascade stage 2 and the re-segmentation model when enabled, each a row of its
own (``train_stage1``, ``train_stage2``, ``train_reseg``). A kind's cost per iteration is the
pilot's (its job seconds over the pilot config's iterations for that kind and round: round 0
trains ``iterations``, later rounds ``finetune_iterations``), times the cohort config's. Without
the pilot's config the pilot's job seconds are scaled by ``train_scale`` instead. A kind the pilot
did not train is costed at stage 1's cost per iteration (``derived`` in its row).
Before this, the model read only ``train/round_<r>`` and so counted one model of the seven that
config/cohort.yaml trains per round (5 folds, stage 2, re-seg).

Inference: a study costs one forward pass per ensemble member and TTA flip, plus the
re-segmentation model's on follow-ups (``ModelSet.forward_passes``); the pilot's per-study cost is
scaled by the cohort's passes over the pilot's (a one-fold pilot, a five-fold cohort: x5).

Inference per round: every validation and pool study (``infer_fraction`` of the cohort), or, with
``candidates`` (``active_learning.candidates``), the validation studies and N candidates in every
round but the last, which segments them all (``metsflow.cohort.plan.round_inference_plan``).
``compare`` puts the two side by side per stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from metsflow.cohort.plan import read_plan
from metsflow.core.layout import RESEG_PART, STAGE2_PART, Layout, parse_job, part_fold
from metsflow.core.settings import InferSettings, Stage2Settings, TrainSettings, tta_flips

SHARDED_STAGES = ("preprocess", "register", "infer")
# Per-round single-job stages that are costed (bookkeeping rules such as plan_cohort, quarantine
# and the report are seconds per campaign; the one-off ``pretrain`` job, rules/train.smk, runs
# once before round 0 on another sheet and is left out too).
ROUND_STAGES = ("train", "evaluate", "active_learning")
# Training jobs by model kind (rules/train.smk), each a row of the estimate.
STAGE1, STAGE2, RESEG = "stage1", "stage2", "reseg"
MODEL_KINDS = (STAGE1, STAGE2, RESEG)


class BenchmarkError(ValueError):
    """The benchmark folder or plan table cannot be used; the message names the file."""


def model_kind(part: str | None) -> str | None:
    """The model a training job's part trains (``part_fold``: stage 1's folds), None if unknown."""
    if part == STAGE2_PART:
        return STAGE2
    if part == RESEG_PART:
        return RESEG
    return STAGE1 if part_fold(part) is not None else None


@dataclass(frozen=True)
class ModelSet:
    """The models a run trains every round and runs at inference, and their iterations
    (None: not known, e.g. a pilot given without its config)."""

    folds: int = 1
    stage2: bool = False
    reseg: bool = False
    tta: bool = False
    iterations: int | None = None  # stage 1, round 0
    finetune_iterations: int | None = None  # stage 1, rounds > 0
    stage2_iterations: int | None = None  # every round (retrained from scratch), all members
    reseg_iterations: int | None = None
    reseg_finetune_iterations: int | None = None

    @classmethod
    def from_config(cls, config: Mapping) -> ModelSet:
        """From a workflow config's ``train`` and ``infer`` sections; keys it does not set take
        metsflow.core.settings' defaults (as metsflow.models.train reads them)."""
        train = dict(config.get("train") or {})
        stage2 = dict(train.get("stage2") or {})
        reseg = dict(train.get("reseg") or {})
        iterations = int(train.get("iterations", TrainSettings().iterations))
        finetune = int(train.get("finetune_iterations", iterations))
        # metsflow.models.train.reseg_params: train.reseg overrides the train keys.
        reseg_iterations = int(reseg.get("iterations", iterations))
        reseg_finetune = int(
            reseg.get("finetune_iterations", train.get("finetune_iterations", reseg_iterations))
        )
        return cls(
            folds=int(train.get("folds", 1)),
            stage2=bool(stage2.get("enabled", False)),
            reseg=bool(reseg.get("enabled", False)),
            tta=bool((config.get("infer") or {}).get("tta", InferSettings().tta)),
            iterations=iterations,
            finetune_iterations=finetune,
            # An ensemble trains its members one after another: its cost is theirs summed.
            stage2_iterations=int(stage2.get("iterations", Stage2Settings().iterations))
            * int(stage2.get("ensemble", Stage2Settings().ensemble)),
            reseg_iterations=reseg_iterations,
            reseg_finetune_iterations=reseg_finetune,
        )

    def jobs(self, kind: str) -> int:
        """Training jobs of ``kind`` per round."""
        if kind == STAGE1:
            return self.folds
        return int(self.stage2 if kind == STAGE2 else self.reseg)

    def iterations_of(self, kind: str, round_index: int) -> int | None:
        if kind == STAGE1:
            return self.iterations if round_index == 0 else self.finetune_iterations
        if kind == STAGE2:
            return self.stage2_iterations
        return self.reseg_iterations if round_index == 0 else self.reseg_finetune_iterations

    def forward_passes(self, followup_fraction: float) -> float:
        """Network passes per segmented study: every stage-1 member under every TTA flip, and
        the re-segmentation model (same flips) on the follow-ups. Stage 2 classifies candidate
        crops (not counted: a small network on a few dozen crops per study)."""
        members = self.folds + (followup_fraction if self.reseg else 0.0)
        return len(tta_flips(self.tta)) * members


@dataclass(frozen=True)
class CohortShape:
    """The run being estimated."""

    studies: int = 11_892
    gpus: int = 8
    cores: int = 512
    cpu_shard_size: int = 16
    gpu_shard_size: int = 64
    rounds: int = 5  # active-learning rounds after round 0
    infer_fraction: float = 1.0  # share of studies segmented each round (validation + pool)
    train_scale: float = 1.0
    candidates: int | None = None  # active_learning.candidates (None: all)
    validation_fraction: float = 0.1  # share of studies in validation (always segmented)
    models: ModelSet | None = None  # what the cohort trains and ensembles (None: as the pilot)
    followup_fraction: float | None = None  # of segmented studies (None: the pilot plan's)

    def infer_studies_per_round(self) -> list[int]:
        """Studies the models of round 0..R segment."""
        every = math.ceil(self.studies * self.infer_fraction)
        if self.candidates is None:
            return [every] * (self.rounds + 1)
        subset = min(every, math.ceil(self.studies * self.validation_fraction) + self.candidates)
        return [subset] * self.rounds + [every]


@dataclass
class StageCost:
    stage: str
    jobs: int
    fixed_s: float  # per job, wall
    per_study_s: float  # wall
    cpu_per_wall: float  # measured CPU seconds per wall second (cores busy)
    core_hours: float = 0.0
    gpu_hours: float = 0.0
    makespan_h: float = 0.0
    note: str = ""  # how the row was scaled from the pilot


@dataclass
class Estimate:
    shape: CohortShape
    stages: list[StageCost] = field(default_factory=list)

    @property
    def core_hours(self) -> float:
        return sum(s.core_hours for s in self.stages)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def makespan_h(self) -> float:
        return sum(s.makespan_h for s in self.stages)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([vars(s) for s in self.stages])

    def render(self) -> str:
        shape = self.shape
        table = self.table().round(
            {"fixed_s": 1, "per_study_s": 2, "cpu_per_wall": 2, "core_hours": 1,
             "gpu_hours": 1, "makespan_h": 2}
        )  # fmt: skip
        return (
            f"{shape.studies} studies, {shape.rounds} active-learning rounds after round 0, "
            f"{shape.gpus} GPUs, {shape.cores} cores, shards {shape.cpu_shard_size} (CPU) / "
            f"{shape.gpu_shard_size} (GPU)\n{table.to_string(index=False)}\n"
            f"total: {self.core_hours:.1f} core-hours, {self.gpu_hours:.1f} GPU-hours, "
            f"makespan {self.makespan_h:.1f} h (excluding human review between rounds)"
        )


def read_benchmarks(benchmarks: str | Path) -> pd.DataFrame:
    """One row per costed benchmark file: stage, round, shard, part, kind (of a training job's
    model), s (wall), cpu_time. Files are classified by ``metsflow.core.layout.parse_job``, the
    inverse of the name every rule's ``benchmark:`` gets from ``Layout.job``."""
    root = Path(benchmarks)
    if not root.is_dir():
        raise BenchmarkError(f"benchmarks folder {root} does not exist")
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        job = parse_job(path.relative_to(root).as_posix())
        if job is None or not _costed(job):
            continue  # single-job bookkeeping rules (plan, quarantine, report): negligible
        try:
            table = pd.read_csv(path, sep="\t")
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise BenchmarkError(f"benchmark file {path}: unreadable ({exc})") from exc
        if "s" not in table.columns or table.empty:
            raise BenchmarkError(f"benchmark file {path}: no 's' column or no rows")
        wall = float(table["s"].iloc[-1])  # --benchmark-repeats: the last repeat
        cpu = pd.to_numeric(table.get("cpu_time", pd.Series([np.nan])), errors="coerce")
        cpu_time = float(cpu.iloc[-1]) if len(cpu) and not math.isnan(cpu.iloc[-1]) else wall
        rows.append(
            {
                "stage": job.stage,
                "round": job.round,
                "shard": job.shard,
                "part": job.part,
                "kind": model_kind(job.part) if job.stage == "train" else None,
                "s": wall,
                "cpu_time": cpu_time,
                "path": str(path),
            }
        )
    if not rows:
        raise BenchmarkError(f"benchmarks folder {root}: no per-rule benchmark files found")
    return pd.DataFrame(rows)


def _costed(job) -> bool:
    if job.stage in SHARDED_STAGES:
        return job.shard is not None and (job.stage != "infer" or job.round is not None)
    if job.stage == "train":
        return job.round is not None and model_kind(job.part) is not None
    return job.stage in ROUND_STAGES and job.round is not None


def attach_shard_sizes(bench: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """Add ``n_studies``: the studies each shard job processed (infer skips seed studies)."""
    cpu_sizes = plan.groupby("shard").size()
    gpu_sizes = plan[plan.role != "seed"].groupby("gpu_shard").size()
    bench = bench.copy()
    sizes = []
    for row in bench.itertuples():
        if row.stage in ("preprocess", "register"):
            sizes.append(int(cpu_sizes.get(row.shard, 0)))
        elif row.stage == "infer":
            sizes.append(int(gpu_sizes.get(row.shard, 0)))
        else:
            sizes.append(0)
    bench["n_studies"] = sizes
    unknown = bench[bench.stage.isin(SHARDED_STAGES) & (bench.n_studies == 0)]
    if len(unknown):
        raise BenchmarkError(
            f"{unknown.path.iloc[0]}: shard {unknown.shard.iloc[0]} is not in the plan table "
            "(benchmarks and plan from different runs?)"
        )
    return bench


def fit_shard_cost(n_studies: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """(fixed seconds per job, seconds per study) by least squares, both kept >= 0."""
    n_studies = np.asarray(n_studies, dtype=float)
    seconds = np.asarray(seconds, dtype=float)
    if len(np.unique(n_studies)) >= 2:
        per_study, fixed = np.polyfit(n_studies, seconds, 1)
        if per_study > 0 and fixed >= 0:
            return float(fixed), float(per_study)
    # One shard size (or a fit that makes no physical sense): all cost scales with studies.
    return 0.0, float(seconds.sum() / n_studies.sum())


def pilot_models(bench: pd.DataFrame) -> ModelSet:
    """What a run trained, from its training jobs: stage-1 folds per round, stage 2, re-seg
    (TTA and iterations are not in benchmark files: ``estimate``'s ``pilot`` adds them)."""
    train = bench[bench.stage == "train"]
    stage1 = train[train.kind == STAGE1]
    return ModelSet(
        folds=int(stage1.groupby("round").size().max()) if len(stage1) else 1,
        stage2=bool((train.kind == STAGE2).any()),
        reseg=bool((train.kind == RESEG).any()),
    )


def estimate(bench: pd.DataFrame, shape: CohortShape, pilot: ModelSet | None = None) -> Estimate:
    """Costs of the full cohort from one run's benchmarks (with ``n_studies`` attached).

    ``pilot``: the run's models and iterations (``ModelSet.from_config`` of its config); the
    models it trained are read from its benchmark files either way."""
    result = Estimate(shape)
    n_rounds = shape.rounds + 1
    cpu_jobs = math.ceil(shape.studies / shape.cpu_shard_size)
    per_round = shape.infer_studies_per_round()
    observed = pilot_models(bench)
    if pilot is not None:
        observed = replace(
            pilot, folds=observed.folds, stage2=observed.stage2, reseg=observed.reseg
        )
    pilot = observed
    cohort = shape.models or pilot
    # Follow-ups among the segmented studies (re-seg passes): the pilot plan's for the pilot.
    pilot_followup = float(bench.attrs.get("followup_fraction", 0.0))
    followup = pilot_followup if shape.followup_fraction is None else shape.followup_fraction

    for stage in ("preprocess", "register", "infer"):
        rows = bench[bench.stage == stage]
        if rows.empty:
            continue
        fixed, per_study = fit_shard_cost(rows.n_studies.to_numpy(), rows.s.to_numpy())
        cpu_per_wall = float(rows.cpu_time.sum() / max(rows.s.sum(), 1e-9))
        note = ""
        if stage == "infer":
            jobs = sum(math.ceil(n / shape.gpu_shard_size) for n in per_round)
            studies, shard = sum(per_round), shape.gpu_shard_size
            # Forward passes per study (members x TTA flips), and models loaded per job.
            passes = cohort.forward_passes(followup) / pilot.forward_passes(pilot_followup)
            loaded = _models_loaded(cohort) / _models_loaded(pilot)
            per_study, fixed = per_study * passes, fixed * loaded
            if passes != 1.0:
                note = f"x{passes:.2f} passes/study"
        else:
            jobs, studies, shard = cpu_jobs, shape.studies, shape.cpu_shard_size
        wall_s = jobs * fixed + studies * per_study
        longest_job_s = fixed + shard * per_study
        cost = StageCost(stage, jobs, fixed, per_study, cpu_per_wall, note=note)
        cost.core_hours = wall_s * cpu_per_wall / 3600
        if stage == "infer":
            cost.gpu_hours = wall_s / 3600
            cost.makespan_h = max(wall_s / shape.gpus, n_rounds * longest_job_s) / 3600
        else:
            cores_per_job = max(cpu_per_wall, 1.0)
            parallel = max(1.0, shape.cores / cores_per_job)
            cost.makespan_h = max(wall_s / parallel, longest_job_s) / 3600
        result.stages.append(cost)

    result.stages.extend(_training_costs(bench, shape, pilot, cohort))

    # Single-job steps per round: their measured mean per round, repeated for every round.
    for stage in ("evaluate", "active_learning"):
        rows = bench[(bench.stage == stage) & bench["round"].notna()]
        if rows.empty:
            continue
        per_round = rows.groupby("round")[["s", "cpu_time"]].sum()
        wall_per_round = float(per_round.s.mean())
        cpu_per_round = float(per_round.cpu_time.mean())
        rounds_here = n_rounds if stage != "active_learning" else shape.rounds
        cost = StageCost(
            stage,
            jobs=int(round(len(rows) / max(len(per_round), 1))) * rounds_here,
            fixed_s=wall_per_round,
            per_study_s=0.0,
            cpu_per_wall=cpu_per_round / max(wall_per_round, 1e-9),
        )
        cost.core_hours = cpu_per_round * rounds_here / 3600
        cost.makespan_h = wall_per_round * rounds_here / 3600
        result.stages.append(cost)
    return result


def _models_loaded(models: ModelSet) -> int:
    """Networks an inference job loads: the stage-1 members, stage 2, the re-seg model."""
    return models.folds + int(models.stage2) + int(models.reseg)


def _training_costs(
    bench: pd.DataFrame, shape: CohortShape, pilot: ModelSet, cohort: ModelSet
) -> list[StageCost]:
    """One row per model kind the cohort trains (``train_stage1``: every fold, ...).

    Per job and round: the pilot's seconds per iteration of that kind (stage 1's when the pilot
    did not train it) x the cohort's iterations; without iterations (no pilot config), the
    pilot's mean job seconds x ``train_scale``. Makespan on ``gpus`` GPUs per round: the folds
    in waves of ``gpus``, the re-seg model beside them when a GPU is free, stage 2 after them
    (it reads the folds' models)."""
    train = bench[bench.stage == "train"]
    if train.empty:
        return []
    n_rounds = shape.rounds + 1
    seconds: dict[str, list[tuple[float, float]]] = {}  # kind -> per round (wall, cpu) per job
    notes: dict[str, str] = {}
    for kind in MODEL_KINDS:
        if not cohort.jobs(kind):
            continue
        source = kind if (train.kind == kind).any() else STAGE1
        rows = train[train.kind == source]
        per_iteration = _per_iteration(rows, pilot, source)
        per_round = []
        for r in range(n_rounds):
            iterations = cohort.iterations_of(kind, r)
            if per_iteration is not None and iterations is not None:
                wall, cpu = (x * iterations for x in per_iteration)
            else:
                wall = float(rows.s.mean()) * shape.train_scale
                cpu = float(rows.cpu_time.mean()) * shape.train_scale
            per_round.append((wall, cpu))
        seconds[kind] = per_round
        scaled = "per iteration" if per_iteration is not None else f"x{shape.train_scale:g}"
        derived = "" if source == kind else ", derived from stage 1"
        notes[kind] = f"{cohort.jobs(kind)} job(s)/round, {scaled}{derived}"

    waves = math.ceil(cohort.folds / shape.gpus)
    free_gpu = cohort.folds % shape.gpus != 0
    stage1_span = [waves * wall for wall, _ in seconds.get(STAGE1, [(0.0, 0.0)] * n_rounds)]
    costs = []
    for kind, per_round in seconds.items():
        jobs = cohort.jobs(kind)
        wall_total = sum(wall for wall, _ in per_round) * jobs
        cpu_total = sum(cpu for _, cpu in per_round) * jobs
        if kind == STAGE1:
            span = sum(stage1_span)
        elif kind == RESEG and free_gpu:
            span = sum(
                max(0.0, wall - s1) for (wall, _), s1 in zip(per_round, stage1_span, strict=True)
            )
        else:
            span = sum(wall for wall, _ in per_round)
        cost = StageCost(
            f"train_{kind}",
            jobs=jobs * n_rounds,
            fixed_s=wall_total / (jobs * n_rounds),
            per_study_s=0.0,
            cpu_per_wall=cpu_total / max(wall_total, 1e-9),
            note=notes[kind],
        )
        cost.core_hours = cpu_total / 3600
        cost.gpu_hours = wall_total / 3600
        cost.makespan_h = span / 3600
        costs.append(cost)
    return costs


def _per_iteration(rows: pd.DataFrame, pilot: ModelSet, kind: str) -> tuple[float, float] | None:
    """(wall, CPU) seconds per iteration of ``kind``'s pilot jobs; None without iterations."""
    iterations = [pilot.iterations_of(kind, int(r)) for r in rows["round"]]
    if any(i is None for i in iterations):
        return None
    its = np.asarray(iterations, dtype=float)
    return float((rows.s / its).mean()), float((rows.cpu_time / its).mean())


def compare(before: Estimate, after: Estimate) -> pd.DataFrame:
    """Jobs, core-hours and GPU-hours per stage of two estimates (and their total)."""
    columns = ["jobs", "core_hours", "gpu_hours"]
    a = before.table().set_index("stage")[columns]
    b = after.table().set_index("stage")[columns]
    table = a.join(b, lsuffix="_before", rsuffix="_after")
    table.loc["total"] = table.sum()
    order = [f"{c}_{w}" for c in columns for w in ("before", "after")]
    return table[order]


def render_comparison(before: Estimate, after: Estimate) -> str:
    shape = after.shape
    table = compare(before, after)
    table = table.astype({"jobs_before": int, "jobs_after": int}).round(1)
    return (
        f"{shape.studies} studies, {shape.rounds} active-learning rounds after round 0: every "
        f"round segments every validation and pool study (before) vs the validation studies "
        f"({shape.validation_fraction:.1%}) + {shape.candidates} candidates per round and the "
        f"whole pool in the last round (after, active_learning.candidates: {shape.candidates})\n"
        f"{table.to_string()}"
    )


def read_run(benchmarks: str | Path, plan: str | Path | None = None) -> pd.DataFrame:
    """A run's benchmarks with ``n_studies`` per job: ``benchmarks`` (results/benchmarks) and
    its plan (default results/plan/cohort.tsv). An inference job's studies are the rows of its
    prediction manifest when it is there (a round's candidate shards differ from the plan's)."""
    benchmarks = Path(benchmarks)
    if not benchmarks.is_dir():
        raise BenchmarkError(f"benchmarks folder {benchmarks} does not exist")
    layout = Layout(benchmarks.parent)  # the run's results folder holds its benchmarks
    plan_path = Path(plan or layout.plan)
    if not plan_path.is_file():
        raise BenchmarkError(
            f"plan table {plan_path} not found: pass --plan (the run's results/plan/cohort.tsv)"
        )
    plan_table = read_plan(plan_path)
    for column in ("shard", "gpu_shard", "role"):
        if column not in plan_table.columns:
            raise BenchmarkError(f"plan table {plan_path}: column '{column}' missing")
    bench = attach_shard_sizes(read_benchmarks(benchmarks), plan_table)
    for index, row in bench[bench.stage == "infer"].iterrows():
        manifest = Path(layout.prediction_manifest(row["round"], row["shard"]))
        if manifest.is_file():
            bench.loc[index, "n_studies"] = len(pd.read_csv(manifest, sep="\t", dtype=str))
    # Follow-ups among the segmented studies: the re-seg model's share of inference passes.
    segmented = plan_table[plan_table.role != "seed"]
    if "previous_study" in segmented.columns and len(segmented):
        followups = segmented.previous_study.fillna("").astype(bool).sum()
        bench.attrs["followup_fraction"] = float(followups / len(segmented))
    return bench


def estimate_from_run(
    benchmarks: str | Path,
    shape: CohortShape,
    plan: str | Path | None = None,
    pilot: ModelSet | None = None,
) -> Estimate:
    """Read ``benchmarks`` (results/benchmarks) and the run's plan (default results/plan/cohort.tsv)."""
    return estimate(read_run(benchmarks, plan), shape, pilot)
