"""Cost model with a candidate subset per round (active_learning.candidates)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from _pilot_run import write_pilot_run

from metsflow.cli import main
from metsflow.cohort.costmodel import CohortShape, compare, estimate, read_run


@pytest.fixture
def run(tmp_path):
    return write_pilot_run(tmp_path)


def test_subset_rounds_cost_less_and_the_last_round_segments_everything(run):
    shape = CohortShape(studies=1000, gpu_shard_size=50, rounds=2, validation_fraction=0.1)
    assert shape.infer_studies_per_round() == [1000, 1000, 1000]
    subset = dataclasses.replace(shape, candidates=200)
    assert subset.infer_studies_per_round() == [300, 300, 1000]
    bench = read_run(run)
    before, after = estimate(bench, shape), estimate(bench, subset)
    infer_before = next(s for s in before.stages if s.stage == "infer")
    infer_after = next(s for s in after.stages if s.stage == "infer")
    assert infer_before.jobs == 3 * 20 and infer_after.jobs == 2 * 6 + 20
    # 20 s per job + 3 s per study (the fixture's inference benchmarks)
    assert infer_after.gpu_hours == pytest.approx((32 * 20 + 1600 * 3) / 3600, rel=0.01)
    assert infer_after.gpu_hours < infer_before.gpu_hours
    table = compare(before, after)
    assert (
        table.loc["preprocess", "core_hours_before"] == table.loc["preprocess", "core_hours_after"]
    )
    assert table.loc["total", "gpu_hours_after"] < table.loc["total", "gpu_hours_before"]
    # more candidates than the pool: every round segments everything
    assert dataclasses.replace(shape, candidates=5000).infer_studies_per_round() == [1000] * 3


def test_cli_prints_the_before_after_table(run, capsys, tmp_path):
    config = tmp_path / "cohort.yaml"
    config.write_text(
        "sharding: {gpu_shard_size: 64}\nactive_learning: {rounds: 5, candidates: 2000}\n"
    )
    assert main(["cost", "--benchmarks", str(run), "--configfile", str(config)]) == 0
    out = capsys.readouterr().out
    assert "gpu_hours_before" in out and "gpu_hours_after" in out and "candidates: 2000" in out
    jobs = math.ceil(11_892 * 0.1) + 2000
    assert f"{5 * math.ceil(jobs / 64) + math.ceil(11_892 / 64)}" in out
    assert main(["cost", "--benchmarks", str(run), "--candidates", "all"]) == 0
    assert "gpu_hours_after" not in capsys.readouterr().out
