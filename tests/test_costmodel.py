"""Cohort cost model from per-rule benchmark files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from _pilot_run import bench, write_pilot_run

from metsflow.cli import main
from metsflow.cohort.costmodel import (
    BenchmarkError,
    CohortShape,
    ModelSet,
    estimate,
    estimate_from_run,
    fit_shard_cost,
    read_benchmarks,
    read_run,
)
from metsflow.core.layout import (
    RESEG_PART,
    STAGE2_PART,
    JobName,
    Layout,
    fold_part,
    job_name,
    parse_job,
)


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
    assert stages["train_stage1"].gpu_hours == pytest.approx(2 * 600 / 3600)
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


def test_job_names_read_back_through_layout():
    """Every kind of name the rules give a log/benchmark parses back to what named it."""
    names = [
        JobName("plan_cohort"),
        JobName("preprocess", shard="s0003"),
        JobName("infer", 2, "g0001"),
        JobName("train", 0),
        JobName("train", 1, part=fold_part(4)),
        JobName("train", 3, part=STAGE2_PART),
        JobName("train", 3, part=RESEG_PART),
        JobName("evaluate", 1, part="compare"),
        JobName("export", part="bids"),
    ]
    for name in names:
        benchmark = Layout("res").job(name.stage, name.round, name.shard, name.part).benchmark
        assert benchmark == f"res/benchmarks/{name}.tsv"
        assert parse_job(f"{name}.tsv") == name
    # Snakemake placeholders: the rules' spelling of the same names.
    assert (
        job_name("train", "{round}", part=fold_part("{fold}")) == "train/round_{round}_fold_{fold}"
    )
    assert parse_job("infer/round_1/not_a_shard.tsv") is None
    assert parse_job("train/round_1/g0000/extra.tsv") is None


def test_training_jobs_of_every_model_kind_are_classified(run):
    for part in (fold_part(1), fold_part(2), STAGE2_PART, RESEG_PART):
        bench(run / f"{job_name('train', 0, part=part)}.tsv", 60, 60)
    bench(run / f"{job_name('evaluate', 0, part='compare')}.tsv", 2, 2)
    bench(run / f"{job_name('export', part='bids')}.tsv", 9, 9)  # no round: not costed
    table = read_benchmarks(run)
    train = table[table.stage == "train"]
    assert sorted(train[train["round"] == 0].kind) == [
        "reseg",
        "stage1",
        "stage1",
        "stage1",
        "stage2",
    ]
    assert sorted(train[train["round"] == 1].kind) == ["stage1"]
    assert set(table.stage) == {"preprocess", "infer", "train", "evaluate"}


PILOT = ModelSet(iterations=12, finetune_iterations=6, stage2_iterations=10, reseg_iterations=12,
                 reseg_finetune_iterations=6)  # fmt: skip
COHORT = ModelSet(folds=5, stage2=True, reseg=True, iterations=20_000, finetune_iterations=5000,
                  stage2_iterations=2000, reseg_iterations=20_000, reseg_finetune_iterations=5000)  # fmt: skip


def test_every_model_of_a_five_fold_cascade_is_costed(run):
    """A one-model pilot (600 s per round at 12 then 6 iterations) costed for 5 folds, stage 2
    and re-seg: every kind a row; kinds the pilot lacks at stage 1's cost per iteration."""
    shape = CohortShape(studies=1000, gpus=8, gpu_shard_size=50, rounds=1, models=COHORT)
    stages = {s.stage: s for s in estimate(read_run(run), shape, PILOT).stages}
    # stage 1 per iteration: round 0 600/12 = 50 s, round 1 600/6 = 100 s -> mean 75 s
    stage1 = stages["train_stage1"]
    assert stage1.jobs == 5 * 2
    assert stage1.gpu_hours == pytest.approx(5 * 75 * (20_000 + 5000) / 3600)
    assert stages["train_stage2"].jobs == 2
    assert stages["train_stage2"].gpu_hours == pytest.approx(2 * 75 * 2000 / 3600)
    assert stages["train_reseg"].gpu_hours == pytest.approx(75 * (20_000 + 5000) / 3600)
    assert "derived from stage 1" in stages["train_reseg"].note
    # 5 folds on 8 GPUs train side by side; re-seg takes a free GPU; stage 2 waits for them.
    assert stage1.makespan_h == pytest.approx(75 * (20_000 + 5000) / 3600)
    assert stages["train_reseg"].makespan_h == pytest.approx(0.0)
    assert stages["train_stage2"].makespan_h == pytest.approx(2 * 75 * 2000 / 3600)

    # The pilot's own stage-2 and re-seg jobs are used when it has them.
    for r, its in ((0, 12), (1, 6)):
        bench(run / f"{job_name('train', r, part=STAGE2_PART)}.tsv", 10 * 3, 10 * 3)  # 3 s/it
        bench(run / f"{job_name('train', r, part=RESEG_PART)}.tsv", its * 20, its * 20)  # 20 s/it
    stages = {s.stage: s for s in estimate(read_run(run), shape, PILOT).stages}
    assert stages["train_stage2"].gpu_hours == pytest.approx(2 * 3 * 2000 / 3600)
    assert stages["train_reseg"].gpu_hours == pytest.approx(20 * (20_000 + 5000) / 3600)
    assert stages["train_reseg"].note.endswith("per iteration")

    # Without the pilot's iterations: its job seconds x train_scale, for every model.
    scaled = dataclasses.replace(shape, train_scale=10.0)
    stages = {s.stage: s for s in estimate(read_run(run), scaled).stages}
    assert stages["train_stage1"].gpu_hours == pytest.approx(5 * 2 * 600 * 10 / 3600)


def test_inference_scales_with_ensemble_members_and_tta(run):
    """The pilot ran one model without TTA: 5 members x 8 flips is 40 passes per study; each
    job loads 5 models instead of 1 (the fixture: 20 s per job + 3 s per study)."""
    base = CohortShape(studies=1000, gpu_shard_size=50, rounds=1)
    cohort = dataclasses.replace(base, models=ModelSet(folds=5, tta=True))
    bench_table = read_run(run)
    one = next(s for s in estimate(bench_table, base).stages if s.stage == "infer")
    ensemble = next(s for s in estimate(bench_table, cohort).stages if s.stage == "infer")
    assert ensemble.per_study_s == pytest.approx(40 * one.per_study_s)
    assert ensemble.fixed_s == pytest.approx(5 * one.fixed_s)
    # Re-seg adds a pass on follow-ups only (here half the segmented studies).
    reseg = dataclasses.replace(base, models=ModelSet(folds=1, reseg=True), followup_fraction=0.5)
    with_reseg = next(s for s in estimate(bench_table, reseg).stages if s.stage == "infer")
    assert with_reseg.per_study_s == pytest.approx(1.5 * one.per_study_s)
    # A pilot that already ran the cohort's ensemble is not scaled.
    for r in (0, 1):
        for f in range(1, 5):
            bench(run / f"{job_name('train', r, part=fold_part(f))}.tsv", 600, 1200)
    five = next(
        s
        for s in estimate(read_run(run), dataclasses.replace(base, models=ModelSet(folds=5))).stages
        if s.stage == "infer"
    )
    assert five.per_study_s == pytest.approx(one.per_study_s)


def test_model_set_of_the_cohort_config():
    import yaml
    from conftest import REPO

    models = ModelSet.from_config(yaml.safe_load((REPO / "config/cohort.yaml").read_text()))
    assert (models.folds, models.stage2, models.reseg, models.tta) == (5, True, True, True)
    assert [models.iterations_of(k, r) for k in ("stage1", "stage2", "reseg") for r in (0, 1)] == [
        20_000, 5000, 6000, 6000, 20_000, 5000  # stage 2: 3 members x 2000
    ]  # fmt: skip
    assert models.forward_passes(followup_fraction=0.5) == pytest.approx(5.5 * 8)  # 8 flips
    # A stage-2 ensemble trains its members one after another: their iterations are its cost.
    ensemble = ModelSet.from_config({"train": {"stage2": {"iterations": 100, "ensemble": 3}}})
    assert ensemble.iterations_of("stage2", 1) == 300


@pytest.mark.slow
def test_every_benchmark_of_a_dry_run_is_a_layout_job_name(tmp_path, tiny_config):
    """Every rule's benchmark (the full model set: folds, stage 2, re-seg, one AL round) is a
    name parse_job reads back exactly, so the cost model sees every job the workflow runs."""
    import re

    from conftest import make_tiny_cohort, run_snakemake

    demo = tmp_path / "demo"
    make_tiny_cohort(demo, n_patients=3, labelled_patients=2, skull=False, separate_grids=False)
    models = {"folds": 2, "stage2": {"enabled": True}, "reseg": {"enabled": True}}
    config = tiny_config(demo, train=models)
    dry = run_snakemake(["-n", "--configfile", str(config)]).stdout
    root = re.escape(f"{tmp_path / 'results' / 'benchmarks'}/")
    names = set(re.findall(rf"benchmark: {root}(\S+)", dry))
    rules = set(re.findall(r"^rule (\w+):", dry, flags=re.M)) - {"all"}
    assert len(names) >= len(rules) > 15
    for name in names:
        job = parse_job(name)
        assert job is not None and f"{job}.tsv" == name, name
    parts = {parse_job(name).part for name in names if name.startswith("train/")}
    assert parts == {None, fold_part(1), STAGE2_PART, RESEG_PART}
