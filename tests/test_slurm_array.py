"""Shard rules as SLURM job arrays (profiles/slurm `slurm-array-jobs`) on a real local SLURM.

Three patients with two time points, one study per shard pair: three preprocessing shards and
two inference shards (the seed patient is not segmented), so `preprocess_shard` and
`infer_shard` each go in as one `sbatch --array` of several tasks. The run stops at round 0's
prediction manifests (no evaluation or report: fewer ~14 s scheduling waves).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_slurm import slurm_cluster  # noqa: F401  (fixture: a running SLURM)

from metsflow.cohort import read_sheet
from metsflow.plan import PlanSettings, build_plan, round_inference_plan

# Measured on the 2-core development machine: 460 s idle-ish, 1,035 s with ~15 other processes
# (ANTs registration of three shards dominates); the whole-demo SLURM test allows 900 s.
PIPELINE_LIMIT_S = 1800


@pytest.mark.slow
def test_shard_rules_are_submitted_as_job_arrays(tmp_path, tiny_config, slurm_cluster):  # noqa: F811
    from metsflow.phantom import make_demo_cohort

    demo = tmp_path / "demo"
    make_demo_cohort(
        demo, n_patients=3, n_timepoints=2, model_spacing=4.0, labelled_patients=2, seed=0
    )
    config = tiny_config(
        demo,
        sharding={"cpu_shard_size": 2, "gpu_shard_size": 2},
        validation={"fraction": 0.5},
        active_learning={"rounds": 0},
        preprocess={"coregister": "none", "brain_mask": "nonzero"},
    )
    results = tmp_path / "results"
    plan = build_plan(
        read_sheet(demo / "studies.tsv"),
        PlanSettings(shard_size=2, gpu_shard_size=2, validation_fraction=0.5, seed=0),
    )
    infer_shards = sorted(round_inference_plan(plan, 0, 0, "all", 0, 2).gpu_shard.unique())
    assert plan.shard.nunique() == 3 and len(infer_shards) == 2
    targets = [f"{results}/rounds/round_0/predictions/shards/{g}.tsv" for g in infer_shards]
    cmd = [
        "timeout", "-s", "KILL", str(PIPELINE_LIMIT_S),
        sys.executable, "-m", "snakemake", *targets,
        "--profile", "profiles/slurm",
        "--configfile", str(config),
        "--jobs", "6",
        "--latency-wait", "5",
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-logdir", str(tmp_path / "slurm_logs"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"snakemake via SLURM failed ({proc.returncode}):\n{output[-8000:]}"
    )

    # The plugin's submission lines: one `sbatch --array` per shard rule.
    arrays = re.findall(
        r"Submitted array job with Snakemake IDs ([\d,]+) and SLURM job ID (\d+)\. "
        r"The individual task IDs are (\d+)-(\d+)",
        output,
    )
    print("\n".join(line for line in output.splitlines() if "ubmitted" in line and "SLURM" in line))
    listing = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True)
    print("\n".join(_job_summary(line) for line in listing.stdout.splitlines()))
    assert len(arrays) == 2, output[-4000:]
    # The plugin files each task's log as rule_<rule>/<array id>_<task>.log; slurmctld keeps
    # finished jobs only MinJobAge (300 s), so the controller log is the lasting record.
    ctld_log = slurm_cluster.read_text()
    for rule, shards in (("preprocess_shard", 3), ("infer_shard", 2)):
        logs = sorted((tmp_path / "slurm_logs" / f"rule_{rule}").rglob("*_*.log"))
        print(rule, [str(p.relative_to(tmp_path)) for p in logs])
        tasks = [p.stem.split("_") for p in logs]
        assert len({array for array, _ in tasks}) == 1, tasks  # one array for the rule
        assert sorted(int(task) for _, task in tasks) == list(range(1, shards + 1)), tasks
        for array, task in tasks:
            assert re.search(rf"JobId={array}_{task}\(\d+\) (done|WEXITSTATUS 0)", ctld_log), (
                f"{rule}: array task {array}_{task} did not complete"
            )
    for target in targets:
        assert Path(target).stat().st_size > 0


def _job_summary(line: str) -> str:
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    keys = ("JobId", "ArrayJobId", "ArrayTaskId", "JobName", "JobState", "Comment")
    return " ".join(f"{k}={fields[k]}" for k in keys if k in fields)
