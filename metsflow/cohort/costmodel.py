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

Training cost does not grow with the cohort (a fixed number of iterations); scale it with
``train_scale`` (e.g. cohort iterations / run iterations) when the run was a small demo.

Inference per round: every validation and pool study (``infer_fraction`` of the cohort), or, with
``candidates`` (``active_learning.candidates``), the validation studies and N candidates in every
round but the last, which segments them all (``metsflow.cohort.plan.round_inference_plan``).
``compare`` puts the two side by side per stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from metsflow.cohort.plan import read_plan
from metsflow.core.layout import Layout

# Benchmark file (relative to the benchmarks folder) -> (stage, round or None, shard or None).
_PATTERNS = [
    (re.compile(r"^preprocess/(?P<shard>s\d+)\.tsv$"), "preprocess"),
    (re.compile(r"^register/(?P<shard>s\d+)\.tsv$"), "register"),
    (re.compile(r"^infer/round_(?P<round>\d+)/(?P<shard>g\d+)\.tsv$"), "infer"),
    (re.compile(r"^train/round_(?P<round>\d+)\.tsv$"), "train"),
    (re.compile(r"^evaluate/round_(?P<round>\d+)\.tsv$"), "evaluate"),
    (re.compile(r"^active_learning/\w+_round_(?P<round>\d+)\.tsv$"), "active_learning"),
]
SHARDED_STAGES = ("preprocess", "register", "infer")
GPU_STAGES = ("train", "infer")


class BenchmarkError(ValueError):
    """The benchmark folder or plan table cannot be used; the message names the file."""


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


def _classify(relative: str) -> tuple[str, re.Match] | None:
    for pattern, stage in _PATTERNS:
        match = pattern.match(relative)
        if match:
            return stage, match
    return None


def read_benchmarks(benchmarks: str | Path) -> pd.DataFrame:
    """One row per benchmark file: stage, round, shard, s (wall), cpu_time."""
    root = Path(benchmarks)
    if not root.is_dir():
        raise BenchmarkError(f"benchmarks folder {root} does not exist")
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        classified = _classify(path.relative_to(root).as_posix())
        if classified is None:
            continue  # single-job bookkeeping rules (plan, quarantine, report): negligible
        stage, match = classified
        try:
            table = pd.read_csv(path, sep="\t")
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise BenchmarkError(f"benchmark file {path}: unreadable ({exc})") from exc
        if "s" not in table.columns or table.empty:
            raise BenchmarkError(f"benchmark file {path}: no 's' column or no rows")
        wall = float(table["s"].iloc[-1])  # --benchmark-repeats: the last repeat
        cpu = pd.to_numeric(table.get("cpu_time", pd.Series([np.nan])), errors="coerce")
        cpu_time = float(cpu.iloc[-1]) if len(cpu) and not math.isnan(cpu.iloc[-1]) else wall
        groups = match.groupdict()
        rows.append(
            {
                "stage": stage,
                "round": int(groups["round"]) if groups.get("round") else None,
                "shard": groups.get("shard"),
                "s": wall,
                "cpu_time": cpu_time,
                "path": str(path),
            }
        )
    if not rows:
        raise BenchmarkError(f"benchmarks folder {root}: no per-rule benchmark files found")
    return pd.DataFrame(rows)


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


def estimate(bench: pd.DataFrame, shape: CohortShape) -> Estimate:
    """Costs of the full cohort from one run's benchmarks (with ``n_studies`` attached)."""
    result = Estimate(shape)
    n_rounds = shape.rounds + 1
    cpu_jobs = math.ceil(shape.studies / shape.cpu_shard_size)
    per_round = shape.infer_studies_per_round()

    for stage in ("preprocess", "register", "infer"):
        rows = bench[bench.stage == stage]
        if rows.empty:
            continue
        fixed, per_study = fit_shard_cost(rows.n_studies.to_numpy(), rows.s.to_numpy())
        cpu_per_wall = float(rows.cpu_time.sum() / max(rows.s.sum(), 1e-9))
        if stage == "infer":
            jobs = sum(math.ceil(n / shape.gpu_shard_size) for n in per_round)
            studies, shard = sum(per_round), shape.gpu_shard_size
        else:
            jobs, studies, shard = cpu_jobs, shape.studies, shape.cpu_shard_size
        wall_s = jobs * fixed + studies * per_study
        longest_job_s = fixed + shard * per_study
        cost = StageCost(stage, jobs, fixed, per_study, cpu_per_wall)
        cost.core_hours = wall_s * cpu_per_wall / 3600
        if stage == "infer":
            cost.gpu_hours = wall_s / 3600
            cost.makespan_h = max(wall_s / shape.gpus, n_rounds * longest_job_s) / 3600
        else:
            cores_per_job = max(cpu_per_wall, 1.0)
            parallel = max(1.0, shape.cores / cores_per_job)
            cost.makespan_h = max(wall_s / parallel, longest_job_s) / 3600
        result.stages.append(cost)

    # Single-job steps per round: their measured mean per round, repeated for every round.
    for stage in ("train", "evaluate", "active_learning"):
        rows = bench[bench.stage == stage]
        if rows.empty:
            continue
        per_round = rows.groupby("round")[["s", "cpu_time"]].sum()
        wall_per_round = float(per_round.s.mean())
        cpu_per_round = float(per_round.cpu_time.mean())
        if stage == "train":
            wall_per_round *= shape.train_scale
            cpu_per_round *= shape.train_scale
        rounds_here = n_rounds if stage != "active_learning" else shape.rounds
        cost = StageCost(
            stage,
            jobs=int(round(len(rows) / max(len(per_round), 1))) * rounds_here,
            fixed_s=wall_per_round,
            per_study_s=0.0,
            cpu_per_wall=cpu_per_round / max(wall_per_round, 1e-9),
        )
        cost.core_hours = cpu_per_round * rounds_here / 3600
        cost.gpu_hours = wall_per_round * rounds_here / 3600 if stage in GPU_STAGES else 0.0
        cost.makespan_h = wall_per_round * rounds_here / 3600
        result.stages.append(cost)
    return result


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
    return bench


def estimate_from_run(
    benchmarks: str | Path, shape: CohortShape, plan: str | Path | None = None
) -> Estimate:
    """Read ``benchmarks`` (results/benchmarks) and the run's plan (default results/plan/cohort.tsv)."""
    return estimate(read_run(benchmarks, plan), shape)
