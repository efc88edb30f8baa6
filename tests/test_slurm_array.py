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

import pytest
from conftest import REPO
from test_slurm import PIPELINE_LIMIT_S, slurm_cluster  # noqa: F401  (fixture: a running SLURM)

from metsflow.cohort import read_sheet
from metsflow.plan import PlanSettings, build_plan, round_inference_plan


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

    # The plugin's submission lines: one array per shard rule, with one task per shard.
    arrays = re.findall(
        r"Submitted array job with Snakemake IDs ([\d,]+) and SLURM job ID (\d+)\. "
        r"The individual task IDs are (\d+)-(\d+)",
        output,
    )
    print("\n".join(line for line in output.splitlines() if "SLURM" in line and "ubmit" in line))
    listing = subprocess.run(
        ["scontrol", "show", "job", "-o"], capture_output=True, text=True
    ).stdout
    array_ids = {job_id for _, job_id, _, _ in arrays}
    tasks = [
        line
        for line in listing.splitlines()
        if (m := re.search(r"ArrayJobId=(\d+)", line)) and m.group(1) in array_ids
    ]
    print("\n".join(_job_summary(line) for line in listing.splitlines()))
    by_rule: dict[str, set[str]] = {}
    for line in tasks:
        rule = re.search(r"Comment=rule_(\w+?)_wildcards", line) or re.search(
            r"Comment=rule_(\w+)", line
        )
        by_rule.setdefault(rule.group(1) if rule else "?", set()).add(
            re.search(r"ArrayTaskId=(\d+)", line).group(1)
        )
    assert len(arrays) >= 2, output[-4000:]
    assert by_rule.get("preprocess_shard") == {"1", "2", "3"}, by_rule
    assert by_rule.get("infer_shard") == {"1", "2"}, by_rule
    for line in tasks:
        assert "JobState=COMPLETED" in line, line
    for target in targets:
        assert (REPO / target).stat().st_size > 0


def _job_summary(line: str) -> str:
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    keys = ("JobId", "ArrayJobId", "ArrayTaskId", "JobName", "JobState", "Comment")
    return " ".join(f"{k}={fields[k]}" for k in keys if k in fields)
