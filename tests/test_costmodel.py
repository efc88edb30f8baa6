"""Cohort cost model from per-rule benchmark files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _pilot_run import write_pilot_run

from metsflow.cli import main
from metsflow.cohort.costmodel import BenchmarkError, CohortShape, estimate_from_run, fit_shard_cost


@pytest.fixture
def run(tmp_path) -> Path:
    return write_pilot_run(tmp_path)


def test_fit_separates_job_overhead_from_per_study_cost():
    assert fit_shard_cost([2, 4], [25, 45]) == pytest.approx((5.0, 10.0))
    # One shard size: everything scales with studies.
    assert fit_shard_cost([4, 4], [40, 44]) == pytest.approx((0.0, 10.5))


def test_cohort_estimate_scales_per_study_costs_by_shard_sizes(run):
    shape = CohortShape(studies=1000, gpus=4, cores=100, cpu_shard_size=10, gpu_shard_size=50,
                        rounds=1)  # fmt: skip
    stages = {s.stage: s for s in estimate_from_run(run, shape).stages}

    pre = stages["preprocess"]
    assert pre.jobs == 100
    assert pre.core_hours == pytest.approx((100 * 5 + 1000 * 10) / 3600)
    assert pre.makespan_h == pytest.approx((100 * 5 + 1000 * 10) / 100 / 3600)

    infer = stages["infer"]
    assert infer.jobs == 2 * 20  # 2 rounds x 1000/50 shards
    wall = 40 * 20 + 2000 * 3
    assert infer.gpu_hours == pytest.approx(wall / 3600)
    assert infer.makespan_h == pytest.approx(wall / 4 / 3600)
    assert stages["train"].gpu_hours == pytest.approx(2 * 600 / 3600)
    assert "plan_cohort" not in stages

    more_gpus = estimate_from_run(run, CohortShape(**{**vars(shape), "gpus": 8}))
    assert more_gpus.makespan_h < estimate_from_run(run, shape).makespan_h
    assert math.isclose(more_gpus.gpu_hours, estimate_from_run(run, shape).gpu_hours)


def test_cli_prints_totals_and_bad_input_names_the_file(run, tmp_path, capsys):
    assert main(["cost", "--benchmarks", str(run), "--studies", "11892", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "11892 studies" in out

    (run.parent / "plan/cohort.tsv").unlink()
    assert main(["cost", "--benchmarks", str(run)]) == 1
    assert "cohort.tsv" in capsys.readouterr().err
    with pytest.raises(BenchmarkError, match="does not exist"):
        estimate_from_run(tmp_path / "nowhere", CohortShape())
