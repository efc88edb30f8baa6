"""The demo pipeline through `profiles/slurm` on a real single-node SLURM cluster on localhost.

tests/slurm/start_slurm.sh installs (Debian: slurmctld, slurmd, slurm-client, munge) and starts
the daemons; they are stopped by PID afterwards. Snakemake is bounded by `timeout -s KILL`
because a status-query failure makes the SLURM plugin wait forever rather than fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, make_tiny_cohort

from metsflow.cohort.plan import PlanSettings, build_plan, round_inference_plan
from metsflow.cohort.sheet import read_sheet

SLURM_DIR = REPO / "tests" / "slurm"
PIPELINE_LIMIT_S = 1800
# Fixed (not per-test) so a cluster this file started earlier is found again, not duplicated.
STATE_DIR = Path("/tmp/metsflow-slurm-ci/state")


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running single-node cluster; yields the slurmctld log file."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    state = STATE_DIR
    try:
        start = subprocess.run(
            ["timeout", "-s", "KILL", "300", "bash", str(SLURM_DIR / "start_slurm.sh"), state],
            capture_output=True,
            text=True,
        )
    except OSError as exc:
        pytest.skip(f"could not run start_slurm.sh: {exc}")
    try:
        idle = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        if start.returncode != 0 or "idle" not in idle.stdout.split():
            pytest.skip(
                f"SLURM could not be started (rc {start.returncode}):\n"
                f"{start.stdout[-2000:]}\n{start.stderr[-2000:]}"
            )
        yield Path(slurm_setting("SlurmctldLogFile"))
    finally:
        subprocess.run(["bash", str(SLURM_DIR / "stop_slurm.sh"), state], check=False)


@pytest.mark.slow
def test_demo_pipeline_runs_through_the_slurm_profile(tmp_path, tiny_config, slurm_cluster):
    """Round 0 (preprocess, register, train, infer, evaluate, report) through profiles/slurm:
    every non-local job goes through sbatch, the GPU rules get a GPU, and the shard rules go in
    as job arrays (`slurm-array-jobs`). One run covers both: two separate runs doubled the
    suite's SLURM time (533 s for the pair)."""

    demo = tmp_path / "demo"
    # Three patients (seed, validation, one more) with two time points, one patient per CPU
    # shard and per GPU shard: three preprocessing shards and two inference shards, so
    # `preprocess_shard` and `infer_shard` each go in as one `sbatch --array` of several tasks.
    # Skull-stripped phantoms on one grid: nonzero brain mask, no co-registration (ANTs is not
    # under test). With the skull, "nonzero" kept the whole head (36 CPU-s per registration).
    make_tiny_cohort(demo, n_patients=3, labelled_patients=2, skull=False, separate_grids=False)
    # Round 0 only: every rule kind incl. the GPU rules, fewer scheduling waves.
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
    # The profile as shipped, with test-only overrides: polls every 2 s (the profile's 20 s,
    # and the plugin's growing interval, are for real clusters; see snakemake_fast_polls.py).
    cmd = [
        "timeout", "-s", "KILL", str(PIPELINE_LIMIT_S),
        sys.executable, str(SLURM_DIR / "snakemake_fast_polls.py"),
        "--profile", "profiles/slurm",
        "--configfile", str(config),
        "--jobs", "6",
        "--latency-wait", "5",
        "--slurm-init-seconds-before-status-checks", "2",
        "--seconds-between-status-checks", "2",
        "--slurm-logdir", str(tmp_path / "slurm_logs"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"snakemake via SLURM failed ({proc.returncode}):\n{output[-8000:]}"
    )
    print("\n".join(line for line in output.splitlines() if "ubmitted" in line and "SLURM" in line))
    ctld_log = slurm_cluster.read_text()

    # Single jobs: Snakemake names the SLURM job id of each, and slurmctld completed each.
    slurm_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    # register x3, train (plan, quarantine, evaluate and report are local rules)
    assert len(slurm_ids) >= 4, output[-4000:]
    for job_id in slurm_ids:
        assert re.search(rf"JobId={job_id} (done|WEXITSTATUS 0)", ctld_log), job_id
    # Each submission names its SLURM log, which the plugin files under rule_<rule>/.
    submitted_rules = set(re.findall(r"SLURM jobid \d+ \(log: \S*/(rule_\w+?)/", output))
    assert {"rule_register_shard", "rule_train_round"} <= submitted_rules, submitted_rules

    # Shard rules: one `sbatch --array` per rule, each task logged by the plugin as
    # rule_<rule>/<array id>_<task>.log and completed by slurmctld (its log is the lasting
    # record: `scontrol` forgets finished jobs after MinJobAge, 300 s).
    arrays = re.findall(
        r"Submitted array job with Snakemake IDs ([\d,]+) and SLURM job ID (\d+)\. "
        r"The individual task IDs are (\d+)-(\d+)",
        output,
    )
    assert len(arrays) == 2, output[-4000:]
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

    # The GPU rules were given the node's (fake) GPU; CPU rules were not. slurmctld keeps
    # finished jobs for MinJobAge (300 s), long enough to still show round 0's GPU jobs.
    jobs = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True)
    print("\n".join(_job_summary(line) for line in jobs.stdout.splitlines()))
    gpu_rule_jobs = [
        line
        for line in jobs.stdout.splitlines()
        if re.search(r"Comment=rule_(infer_shard|train_round)_", line)
    ]
    assert any("rule_train_round" in line for line in gpu_rule_jobs), jobs.stdout[-3000:]
    # SLURM 22.05 logs the request as TresPerJob=gres:gpu:1, newer releases as gres/gpu=1.
    assert all("gres:gpu:1" in line or "gres/gpu=1" in line for line in gpu_rule_jobs), (
        gpu_rule_jobs
    )
    cpu_rule_jobs = [line for line in jobs.stdout.splitlines() if "Comment=rule_register" in line]
    assert all("gres/gpu" not in line for line in cpu_rule_jobs)

    # Outputs exist and are sane.
    summary = results / "rounds/round_0/evaluation/summary.json"
    assert summary.stat().st_size > 0
    rounds = pd.read_csv(results / "report/rounds.tsv", sep="\t")
    assert list(rounds["round"]) == [0]
    preprocessed = pd.concat(
        pd.read_csv(p, sep="\t") for p in (results / "preprocessed/shards").glob("*.tsv")
    )
    assert (preprocessed.status == "ok").all() and len(preprocessed) == 6
    for g in infer_shards:
        assert (results / f"rounds/round_0/predictions/shards/{g}.tsv").stat().st_size > 0


def _job_summary(line: str) -> str:
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    keys = ("JobId", "ArrayJobId", "ArrayTaskId", "JobName", "JobState", "Comment")
    return " ".join(f"{k}={fields[k]}" for k in keys if k in fields)


def slurm_setting(name: str) -> str:
    """A setting of the running slurmctld (the daemon may predate this test's slurm.conf)."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    match = re.search(rf"^{name}\s*=\s*(\S+)", config.stdout, re.MULTILINE)
    assert match, f"scontrol show config has no {name}"
    return match.group(1)
