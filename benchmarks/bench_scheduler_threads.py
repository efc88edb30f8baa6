"""Does the local scheduler keep the threads of its running jobs within --cores (snakemake#3913)?

Snakemake 9.10-9.16's local scheduler could start two jobs that each claim every core once a
job they both wait for finished: on 2 cores, two 2-thread jobs ran side by side (in the demo,
stage-1 and re-seg training; two inference shards took 84 s instead of ~50). This prints the
largest sum of `threads` over jobs running at once, from a Snakemake log:

    python benchmarks/bench_scheduler_threads.py               # the issue's reproduction, --cores 2
    python benchmarks/bench_scheduler_threads.py --pipeline       # the tiny pipeline, demo threads
    python benchmarks/bench_scheduler_threads.py --log .snakemake/log/<run>.snakemake.log

The reproduction is a 4-job workflow in a temporary folder (`prepare`, then two `work` jobs of
2 threads that sleep 3 s each), run with this interpreter's Snakemake. `--pipeline` runs the
whole pipeline with the local profile on the tests' tiny phantom (4 patients x 2 time points,
2-fold stage 1, cascade, re-segmentation, one simulated round) with the demo's threads (train 2,
infer 2). Exits 1 when the threads in flight ever exceed the cores.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

REPRODUCTION = """
rule all:
    input: "work1", "work2"

rule prepare:
    output: "common"
    threads: 2
    shell: "touch {output}"

rule work:
    input: "common"
    output: "work{n}"
    threads: 2
    shell: "sleep 3; touch {output}"
"""

_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_THREADS = re.compile(r"^\s+threads: (\d+)$")
_RULE = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
_FINISHED = re.compile(r"^Finished job(?:id)?:? (\d+)")


def threads_in_flight(log_text: str) -> tuple[int, int, list[str]]:
    """(cores provided, most threads running at once, the jobs running at that moment).

    A job starts at its `rule ...:` block (threads 1 unless the block says otherwise) and ends
    at its `Finished job` line; events carry the preceding `[timestamp]`.
    """
    cores = 0
    running: dict[str, tuple[str, int]] = {}
    best, best_jobs = 0, []
    stamp = ""
    rule = None
    for line in log_text.splitlines():
        if rule is not None and not line.startswith((" ", "\t")):
            # the job's block ended: it is running from here on
            if rule[1] is not None:
                running[rule[1]] = (
                    f"{rule[0]} (job {rule[1]}, {rule[2]} threads, {stamp})",
                    rule[2],
                )
                total = sum(t for _, t in running.values())
                if total > best:
                    best, best_jobs = total, [name for name, _ in running.values()]
            rule = None
        if m := re.match(r"^Provided cores: (\d+)", line):
            cores = int(m.group(1))
        elif m := _STAMP.match(line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y").strftime("%H:%M:%S")
        elif m := _RULE.match(line):
            rule = [m.group(1), None, 1]
        elif rule is not None and (m := _JOBID.match(line)):
            rule[1] = m.group(1)
        elif rule is not None and (m := _THREADS.match(line)):
            rule[2] = int(m.group(1))
        elif m := _FINISHED.match(line):
            running.pop(m.group(1), None)
    return cores, best, best_jobs


def run_reproduction(cores: int) -> str:
    """Run the reproduction workflow with `--cores`; return Snakemake's log."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "Snakefile").write_text(REPRODUCTION)
        cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores)]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, text=True)
        return next((Path(tmp) / ".snakemake" / "log").glob("*.snakemake.log")).read_text()


def run_pipeline(cores: int) -> str:
    """The tiny pipeline with the demo config's threads, from the checkout; return its log."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_cohort, write_tiny_config

    demo_threads = yaml.safe_load((REPO / "config/config.yaml").read_text())["threads"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tiny_cohort(root / "demo", n_patients=4, labelled_patients=3)
        models = {
            "folds": 2,
            "stage2": {"enabled": True, "iterations": 10},
            "reseg": {"enabled": True, "iterations": 12, "finetune_iterations": 6},
        }
        config = write_tiny_config(root, root / "demo", train=models, threads=demo_threads)
        cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/local"]
        cmd += ["--cores", str(cores), "--configfile", str(config)]
        proc = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        log = re.search(r"Complete log\(s\): (\S+)", proc.stderr + proc.stdout).group(1)
        return Path(log).read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, help="a Snakemake log to read instead of running")
    parser.add_argument("--pipeline", action="store_true", help="run the tiny pipeline instead")
    parser.add_argument("--cores", type=int, default=2, help="for the run (default 2)")
    args = parser.parse_args(argv)
    import snakemake

    if args.log:
        text, source = args.log.read_text(), args.log
    elif args.pipeline:
        text = run_pipeline(args.cores)
        source = f"tiny pipeline, demo threads, snakemake {snakemake.__version__}"
    else:
        text = run_reproduction(args.cores)
        source = f"issue #3913 reproduction, snakemake {snakemake.__version__}"
    cores, most, jobs = threads_in_flight(text)
    print(f"{source}: provided cores {cores}, most threads in flight {most}")
    for job in jobs:
        print(f"  {job}")
    return 1 if most > cores else 0


if __name__ == "__main__":
    sys.exit(main())
